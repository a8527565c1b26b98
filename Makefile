# `make demo` and `make test` each set up .venv from scratch if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out

.PHONY: demo test test-fast bench-decode bench-train bench-data clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo --workdir $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow"

bench-decode: $(STAMP)
	$(PY) -m benchmarks.decode

bench-train: $(STAMP)
	$(PY) -m benchmarks.train_throughput

bench-data: $(STAMP)
	$(PY) -m benchmarks.data_pipeline

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
