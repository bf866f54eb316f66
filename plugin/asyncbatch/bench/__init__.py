# SPDX-License-Identifier: Apache-2.0
"""A/B benchmarks of asyncbatch against stock vLLM: offline, online and CPU replay.

Every mode runs the same named workloads (`asyncbatch.bench.workloads`) and
prints the same table (`asyncbatch.bench.report`).  The command line is
``asyncbatch-bench`` (`asyncbatch.bench.cli`).
"""
