# SPDX-License-Identifier: Apache-2.0
"""Run one offline vLLM engine and write its greedy outputs as JSON.

Each engine runs in its own process so that two engines never share a GPU or
compile caches' in-memory state:  python run_llm.py SPEC.json OUT.json
"""

import json
import sys
from pathlib import Path


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    llm = LLM(model=spec["model"], load_format="dummy", seed=0, **spec["engine_args"])
    # a prompt with a regex samples under that grammar and may end at EOS
    regexes = spec.get("regex") or [None] * len(spec["prompts"])
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=r is None,
                             structured_outputs=StructuredOutputsParams(regex=r) if r else None)
              for m, r in zip(spec["max_tokens"], regexes, strict=True)]
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = {"outputs": [list(o.outputs[0].token_ids) for o in outputs],
              "finish_reasons": [o.outputs[0].finish_reason for o in outputs]}
    if spec["engine_args"].get("worker_cls") == "asyncbatch.Worker":
        # what every worker process sized its input buffers for
        result["buffer_depth"] = llm.collective_rpc("asyncbatch_buffer_depth")
        # ... and the largest batch, in tokens, each runs as a CUDA graph
        result["cuda_graph_max_tokens"] = llm.collective_rpc("asyncbatch_cuda_graph_max_tokens")
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
