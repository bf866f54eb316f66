# SPDX-License-Identifier: Apache-2.0
"""Why asyncbatch spaces out the steps of requests under a grammar with three
batches in flight: rerun `test_deep_pipeline_structured_outputs`'s requests
with the spacing switched off, on the GPU machine, after that test has run with
``--basetemp /tmp/gt`` (it reads the test's spec and stock's outputs from there).

The EngineCore runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that
the patched scheduler class is the one it builds.
"""

import glob
import json
import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    from asyncbatch.glue.scheduler import Scheduler

    Scheduler._space_structured_output_steps = lambda self, out: None  # type: ignore
    spec_path = glob.glob("/tmp/gt/**/pipelined-so.json", recursive=True)[0]
    with open(spec_path.replace("pipelined-so.json", "stock-so.out.json")) as f:
        stock = json.load(f)
    with open(spec_path) as f:
        spec = json.load(f)
    llm = LLM(model=spec["model"], load_format="dummy", seed=0, **spec["engine_args"])
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=r is None,
                             structured_outputs=StructuredOutputsParams(regex=r) if r else None)
              for m, r in zip(spec["max_tokens"], spec["regex"], strict=True)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params,
                        use_tqdm=False)
    reasons = [o.outputs[0].finish_reason for o in outs]
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    print("MUT depth", llm.llm_engine.vllm_config.max_concurrent_batches)
    print("MUT finish reasons differing:",
          sum(a != b for a, b in zip(reasons, stock["finish_reasons"], strict=True)),
          "errors:", reasons.count("error"))
    print("MUT outputs differing:",
          sum(a != b for a, b in zip(tokens, stock["outputs"], strict=True)), "of", len(tokens))


if __name__ == "__main__":
    main()
