# SPDX-License-Identifier: Apache-2.0
"""Stands in for ``vllm serve --data-parallel-size 2`` in the dp_ab driver tests:
``fake_dp_server.py PORT``.

Two fake engines.  A request goes to the engine its ``X-data-parallel-rank``
header names, else round robin.  Each engine keeps a prefix cache of the first
64 prompt tokens; ``/metrics`` reports vLLM's per-engine counters and gauges
(``engine="0"``/``"1"``), ``/v1/completions`` streams ``max_tokens`` chunks as
vLLM does (SSE, a final usage chunk, ``[DONE]``).  A request for
``FAIL_MAX_TOKENS`` tokens fails mid-stream as vLLM reports it: an error event
in the HTTP 200 stream, then ``[DONE]``.
"""

import asyncio
import itertools
import json
import sys

from aiohttp import web

PORT = int(sys.argv[1])
FAIL_MAX_TOKENS = 7
ENGINES = 2
counters = [dict.fromkeys(("request_success", "prompt_tokens", "generation_tokens",
                           "prefix_cache_queries", "prefix_cache_hits", "num_preemptions"), 0)
            for _ in range(ENGINES)]
running = [0] * ENGINES
caches: list[set] = [set() for _ in range(ENGINES)]
robin = itertools.count()


async def health(request):
    return web.Response(text="ok")


async def reset(request):
    for c in caches:
        c.clear()
    return web.Response(text="ok")


async def metrics(request):
    lines = []
    for e in range(ENGINES):
        labels = f'engine="{e}",model_name="fake"'
        for name, value in counters[e].items():
            lines.append(f"vllm:{name}_total{{{labels}}} {float(value)}")
        lines.append(f"vllm:num_requests_running{{{labels}}} {float(running[e])}")
        lines.append(f"vllm:num_requests_waiting{{{labels}}} 0.0")
    return web.Response(text="\n".join(lines) + "\n")


async def completions(request):
    body = await request.json()
    header = request.headers.get("X-data-parallel-rank")
    engine = int(header) if header is not None else next(robin) % ENGINES
    prompt = body["prompt"]
    key = tuple(prompt[:64])
    c = counters[engine]
    c["prompt_tokens"] += len(prompt)
    c["prefix_cache_queries"] += len(prompt)
    if key in caches[engine]:
        c["prefix_cache_hits"] += 64
    caches[engine].add(key)
    running[engine] += 1
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    try:
        for i in range(body["max_tokens"]):
            await asyncio.sleep(0.001)
            chunk = {"choices": [{"index": 0, "text": f" t{i}"}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if body["max_tokens"] == FAIL_MAX_TOKENS and i == 2:
                error = {"error": {"message": "fake engine error", "type": "InternalServerError",
                                   "code": 500}}
                await resp.write(f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode())
                return resp
        usage = {"choices": [], "usage": {"prompt_tokens": len(prompt),
                                          "completion_tokens": body["max_tokens"]}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
    finally:
        running[engine] -= 1
        c["generation_tokens"] += body["max_tokens"]
        c["request_success"] += 1
    return resp


app = web.Application()
app.add_routes([web.get("/health", health), web.get("/metrics", metrics),
                web.post("/reset_prefix_cache", reset), web.post("/v1/completions", completions)])
print("fake dp server: asyncbatch: data-parallel prefix routing on (fake)", flush=True)
web.run_app(app, host="127.0.0.1", port=PORT, print=None)
