# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test` (the test suite).
# Each creates .venv on first use: torch==2.13.0 (CPU wheel) first, then this package with its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flowtransfer-installed

.PHONY: demo test bench venv clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flowtransfer run

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_flows.py

clean:
	rm -rf $(VENV) build *.egg-info
