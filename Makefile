# d2ops: `make demo` runs the whole pipeline offline; `make test` runs the test suite.
# Both create .venv (Python 3.11, torch, detectron2, this package) on first use.

VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast test-unit test-integration test-e2e test-clearml test-cluster bench lint typecheck clean setup

$(VENV)/.ready: pyproject.toml scripts/bootstrap.sh
	VENV=$(VENV) bash scripts/bootstrap.sh
	touch $@

setup: $(VENV)/.ready

demo: $(VENV)/.ready
	$(PY) -m d2ops demo --config configs/demo.yaml --out outputs/demo

test: $(VENV)/.ready
	$(PY) -m pytest -q

# every tier without the tests marked slow (5 s or more each: training, ClearML's loops): about 3 minutes
test-fast: $(VENV)/.ready
	$(PY) -m pytest -q -m "not slow"

# one tier each (CONTRIBUTING.md, "Tests, by tier")
test-unit: $(VENV)/.ready
	$(PY) -m pytest -q tests/unit

test-integration: $(VENV)/.ready
	$(PY) -m pytest -q tests/integration

test-e2e: $(VENV)/.ready
	$(PY) -m pytest -q tests/e2e

test-clearml: $(VENV)/.ready
	$(PY) -m pytest -q tests/clearml_runtime

# the cluster rehearsal: real clearml-agent daemons run the pipeline, a cron clone, an abort and
# scripts/cluster-smoke.sh against the API stand-in and a local S3 (README, "Rehearse the cluster")
test-cluster: $(VENV)/.ready
	$(PY) -m pytest -q tests/cluster

bench: $(VENV)/.ready
	$(PY) bench/bench_s3.py --latency-ms 10 --json bench/results.json
	$(PY) bench/bench_train.py --json bench/results.json
	$(PY) bench/bench_serve.py --json bench/results.json
	$(PY) bench/bench_admission.py --json bench/results.json
	$(PY) bench/bench_runtimes.py --json bench/results.json
	$(PY) bench/bench_runtimes.py --model r50 --json bench/results.json
	$(PY) bench/bench_replicas.py --json bench/results.json
	bash bench/setup_peers.sh
	$(PY) bench/bench_peers.py --rounds 5 --duration-s 10 --json bench/results.json
	$(PY) bench/bench_pipeline.py --json bench/results.json

lint: $(VENV)/.ready
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check d2ops

typecheck: $(VENV)/.ready
	$(VENV)/bin/mypy

clean:
	rm -rf outputs .pytest_cache .mypy_cache .ruff_cache
