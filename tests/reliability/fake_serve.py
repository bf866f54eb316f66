# SPDX-License-Identifier: Apache-2.0
"""Stands in for `vllm serve` in the serve-soak tests: ``fake_serve.py PORT [MODE]``.

Streams OpenAI completions chunks, refuses empty or too long prompts with 400,
notices client disconnects, and exposes the vLLM metrics the soak reads.
Modes: ``ok``; ``leak`` (a disconnected request stays "running");
``crash`` (exits after 20 requests).
"""

import asyncio
import json
import os
import sys

from aiohttp import web

port, mode = int(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "ok")
MAX_MODEL_LEN = 2048
state = {"success": 0, "running": 0, "num_requests": 0}


async def health(request):
    return web.Response(text="")


async def metrics(request):
    lines = [
        f'vllm:request_success_total{{finished_reason="length"}} {state["success"]}.0',
        'vllm:request_success_total{finished_reason="stop"} 0.0',
        f"vllm:num_requests_running {state['running']}.0",
        "vllm:num_requests_waiting 0.0",
        f"vllm:kv_cache_usage_perc {0.5 if state['running'] else 0.0}",
        "vllm:num_preemptions_total 3.0",
    ]
    return web.Response(text="\n".join(lines) + "\n")


async def completions(request):
    body = await request.json()
    state["num_requests"] += 1
    if mode == "crash" and state["num_requests"] > 20:
        os._exit(1)
    prompt = body["prompt"]
    if not prompt or len(prompt) >= MAX_MODEL_LEN:
        return web.json_response({"error": {"message": "bad prompt"}}, status=400)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    state["running"] += 1
    finished = False
    try:
        await resp.prepare(request)
        n = body["max_tokens"]
        for i in range(n):
            await asyncio.sleep(0.002)
            reason = "length" if i == n - 1 else None
            chunk = {"choices": [{"index": 0, "text": " t", "finish_reason": reason}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        finished = True
        state["success"] += 1
    finally:
        if finished or mode != "leak":
            state["running"] -= 1
    return resp


app = web.Application()
app.add_routes([web.get("/health", health), web.get("/metrics", metrics),
                web.post("/v1/completions", completions)])
web.run_app(app, host="127.0.0.1", port=port, print=None)
