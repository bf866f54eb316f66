#!/usr/bin/env bash
# Create (once) and print the path of the cached virtual environment that the
# tests and the CPU replay run in:  scripts/venv.sh [VLLM]  with VLLM 0.26
# (default, .ci/requirements.txt) or 0.33 (.ci/requirements-vllm0.33.txt).  It
# lives outside the checkout, keyed on the hash of its requirements file, so a
# warm machine reuses it and a change of pins builds a new one.  vLLM brings a
# CUDA build of torch: a cold build downloads several GB.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${ASYNCBATCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/asyncbatch}
vllm=${1:-0.26}
case "$vllm" in
  0.26) requirements="$root/.ci/requirements.txt" ;;
  *) requirements="$root/.ci/requirements-vllm$vllm.txt" ;;
esac
[ -f "$requirements" ] || { echo "asyncbatch: no test environment for vLLM $vllm ($requirements)" >&2; exit 2; }
key=$(cat "$requirements" | sha256sum | cut -c1-12)
venv="$cache/venv-$key"
quiet() { grep -v "^WARNING: Location '" || true; }
mkdir -p "$cache"
# One build at a time: a second caller waits for the first to finish.
exec 9>"$cache/.lock"
flock 9
if [ ! -f "$venv/.complete" ] || [ ! -x "$venv/bin/python" ]; then
  echo "asyncbatch: building the environment in $venv (first run: several minutes) ..." >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | quiet >&2
  "$venv/bin/python" -m pip install -q -r "$requirements" 2>&1 | quiet >&2
  touch "$venv/.complete"
fi
# The project itself, editable and without dependencies: a second or so.
if [ "$("$venv/bin/python" -c 'import asyncbatch, os; print(os.path.dirname(asyncbatch.__file__))' 2>/dev/null)" != "$root/plugin/asyncbatch" ]; then
  "$venv/bin/python" -m pip install -q --no-deps -e "$root" 2>&1 | quiet >&2
fi
flock -u 9
echo "$venv"
