# The two commands of a fresh machine:  make replay   and   make test
# Both build the cached environment on first use (scripts/venv.sh).
# VLLM=0.33 make test: the same on vLLM 0.33 (a second cached environment)
VLLM ?= 0.26
VENV = $(shell scripts/venv.sh $(VLLM))
PY = $(VENV)/bin/python

.PHONY: test replay demo lint env conformance

env:
	@scripts/venv.sh

test:
	$(PY) -m pytest -q

replay:
	$(PY) -m asyncbatch.bench.cli replay

# vLLM's own tests/v1/core against asyncbatch.Scheduler (conformance/run.py)
CONFORMANCE_JOBS ?= 2
conformance:
	$(PY) conformance/run.py --jobs $(CONFORMANCE_JOBS)

demo:
	$(PY) -m asyncbatch.demo

lint:
	$(PY) -m ruff check --no-cache plugin tests benchmarks conformance examples
	$(PY) -m mypy
