#!/usr/bin/env bash
# Checks the proposed vLLM patches against an installed vLLM release: patches/*.patch
# against vLLM 0.33.0 (the base upstream reviews them on), patches/vllm-0.26.0/*.patch
# (the earlier set, kept for history) against vLLM 0.26.0:
#  1. each patch applies cleanly (no fuzz) to the pristine vLLM source, on its own;
#  2. all patches apply in order to a copy of the installed package (Python files copied
#     only where a patch touches them, everything else, compiled .so files included,
#     symlinked), in a temporary directory;
#  3. the plugin's engine tests and tests/patches pass on the unpatched vLLM (fallback
#     overrides) and on the patched copy (upstream hooks), and a scheduling trace of the
#     prefix policy is the same on both.
# Usage: bash patches/check.sh [--vllm 0.33|0.26] [--patched-only]
# The python comes from $ASYNCBATCH_PYTHON if set (a venv's bin/python with vLLM
# installed), else from scripts/venv.sh for the release given by --vllm (default 0.33).
set -euo pipefail
command -v patch >/dev/null || { echo "patches/check.sh needs GNU patch (apt-get install patch)" >&2; exit 1; }
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
unpatched=1
vllm=0.33
while [ $# -gt 0 ]; do
  case "$1" in
    --patched-only) unpatched=0 ;;
    --vllm) vllm=${2:?--vllm needs a release, e.g. 0.33}; shift ;;
    --vllm=*) vllm=${1#--vllm=} ;;
    *) echo "usage: bash patches/check.sh [--vllm 0.33|0.26] [--patched-only]" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "${ASYNCBATCH_PYTHON:-}" ]; then
  py=$ASYNCBATCH_PYTHON
else
  py="$(scripts/venv.sh "$vllm")/bin/python"
fi
# vLLM seeds its block hashes from PYTHONHASHSEED (random otherwise), and the prefix policy
# orders siblings by block hash: a fixed seed makes the two traces comparable.
export PYTHONHASHSEED=0
src=$("$py" -c 'import os, vllm; print(os.path.dirname(vllm.__file__))')
version=$("$py" -c 'import importlib.metadata as m; print(m.version("vllm"))')
case "$version" in
  0.33.0) patches=(patches/*.patch) ;;
  0.26.0) patches=(patches/vllm-0.26.0/*.patch) ;;
  *) echo "patches target vLLM 0.33.0 (patches/) or 0.26.0 (patches/vllm-0.26.0/), found $version" >&2
     exit 1 ;;
esac
# the tests check that the patched copy still reports the release it was made from
export ASYNCBATCH_EXPECT_VLLM=$version
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
files() { sed -n 's#^+++ b/\(vllm/[^[:space:]]*\).*#\1#p' "$1" | sort -u; }

echo "== apply: each patch alone to vLLM $version ($src)"
for p in "${patches[@]}"; do
  rm -rf "$work/pristine" && mkdir -p "$work/pristine"
  for f in $(files "$p"); do
    mkdir -p "$work/pristine/$(dirname "$f")" && cp "$(dirname "$src")/$f" "$work/pristine/$f"
  done
  out=$(patch -p1 --fuzz=0 --forward --batch -d "$work/pristine" < "$p" 2>&1) \
    || { echo "FAIL $p"; echo "$out"; exit 1; }
  echo "ok   $p ($(files "$p" | wc -l) files)"
done

echo "== apply: all patches in order to a copy of the installed package"
tree="$work/tree"
mkdir -p "$tree"
cp -rs "$src" "$tree/vllm"
for f in $(for p in "${patches[@]}"; do files "$p"; done | sort -u); do
  rm "$tree/$f" && cp "$(dirname "$src")/$f" "$tree/$f"
  rm -f "$tree/$(dirname "$f")/__pycache__/$(basename "$f" .py)".*.pyc
done
for p in "${patches[@]}"; do
  out=$(patch -p1 --fuzz=0 --forward --batch -d "$tree" < "$p" 2>&1) \
    || { echo "FAIL $p"; echo "$out"; exit 1; }
  echo "ok   $p${out:+: $(echo "$out" | grep -c 'offset') hunk(s) at an offset}"
done
echo "patched tree ready in $(( $(date +%s) - start )) s"

tests=(tests/engine tests/patches)
status=0
run_tests() {  # prints the summary line, or the failures
  if "$py" -m pytest -q -p no:cacheprovider "${tests[@]}" > "$work/pytest.log" 2>&1; then
    tail -n 1 "$work/pytest.log"
  else
    tail -n 40 "$work/pytest.log"; return 1
  fi
}
if [ "$unpatched" = 1 ]; then
  echo "== tests on the unpatched vLLM $version (fallback overrides)"
  ASYNCBATCH_EXPECT_HOOKS=0 ASYNCBATCH_TRACE_OUT="$work/trace.unpatched" run_tests || status=1
fi
echo "== tests on the patched vLLM $version (upstream hooks)"
export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
ASYNCBATCH_EXPECT_HOOKS=1 ASYNCBATCH_PATCHED_VLLM="$tree/vllm" \
  ASYNCBATCH_TRACE_OUT="$work/trace.patched" run_tests || status=1
if [ "$unpatched" = 1 ]; then
  if cmp -s "$work/trace.unpatched" "$work/trace.patched"; then
    echo "== same scheduling trace on both ($(wc -l < "$work/trace.patched") lines)"
  else
    echo "== scheduling traces differ:"; diff "$work/trace.unpatched" "$work/trace.patched" | head
    status=1
  fi
fi
echo "patch check (vLLM $version): $([ $status = 0 ] && echo passed || echo FAILED) in $(( $(date +%s) - start )) s"
exit $status
