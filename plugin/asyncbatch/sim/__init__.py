# SPDX-License-Identifier: Apache-2.0
"""Run the real vLLM 0.26 scheduler on a CPU, with a simulated model runner.

Used by the CPU tests and by the replay benchmark.  Nothing here needs a GPU or
model weights: the model folder holds only ``config.json`` and tokenizer files.
"""
