#!/usr/bin/env bash
# GPU A/B runs from a checkout, with vLLM 0.26 importable by python3 (no install needed):
#   benchmarks/gpu.sh ab        [--quick] [flags]   offline, then online, then one summary
#   benchmarks/gpu.sh offline   [--quick] [flags]   three variants, two workloads
#   benchmarks/gpu.sh online    [--quick] [flags]   vllm serve + vllm bench serve, two rates
#   benchmarks/gpu.sh calibrate [--quick] [flags]   fit the replay's cost model
# Results go under benchmarks/results/{offline,online}/ (ab's summary in
# benchmarks/results/), calibrations under plugin/asyncbatch/bench/calibration/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PYTHONPATH="$root/plugin${PYTHONPATH:+:$PYTHONPATH}"
export VLLM_NO_USAGE_STATS=1
exec "${PYTHON:-python3}" -m asyncbatch.bench.cli "$@"
