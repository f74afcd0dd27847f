# The two commands of the README:
#   make bench   the main job: the benchmark report (tables, JSON, markdown, plots under bench/results/)
#   make test    the test job (what CI runs): build, then every test stage of scripts/run_tests.sh
# Each creates .venv, installs the pinned dependencies and builds the extension first.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-installed
BENCH_ARGS ?=

.PHONY: test bench build venv clean

venv: $(STAMP)

$(STAMP): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# --no-compile: byte-compiling all of torch costs ~1 min; Python compiles what it imports on first use
	$(PY) -m pip install -q --no-compile -r requirements-dev.txt
	touch $(STAMP)

build: venv
	$(PY) -m pip install -q --no-build-isolation -e .

test: build
	PY=$(PY) bash scripts/run_tests.sh

bench: build
	$(PY) bench/report.py $(BENCH_ARGS)

clean:
	rm -rf build dist *.egg-info opt_fast/_C*.so .pytest_cache .benchmarks
