#!/usr/bin/env bash
# CPU replay A/B (no GPU needed): the real vLLM 0.26 schedulers, simulated step times.
#   benchmarks/replay.sh [asyncbatch-bench replay flags]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=$(scripts/venv.sh)
exec "$venv/bin/python" -m asyncbatch.bench.cli replay "$@"
