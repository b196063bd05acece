# Every target does its own set-up on a fresh machine: it creates .venv and installs upweight.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
VENV_BENCH  := .venv-bench
BENCH_STAMP := $(VENV_BENCH)/.installed

.PHONY: demo test bench bench-peers lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/upweight explain --out out/explain.png

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_solvers.py --out bench/RESULTS.md

# peers (pyDVL, captum, kronfluence, dattri) live in their own environment (pyDVL needs numpy<2)
$(BENCH_STAMP): bench/peers/requirements.txt bench/peers/constraints.txt pyproject.toml
	VENV_BENCH=$(CURDIR)/$(VENV_BENCH) PYTHON=python3.11 bash bench/peers/setup.sh; test -f $(BENCH_STAMP)

bench-peers: $(BENCH_STAMP)
	$(VENV_BENCH)/bin/python bench/peers/bench_peers.py --workloads W1,W2 --n-train 20000 --n-test 10 --timeout 600 --out bench/PEERS.md

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) $(VENV_BENCH) out .pytest_cache
