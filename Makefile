# The two commands of the README:
#   make bench   the main job: the benchmark report against torch and the peer packages (tables, JSON,
#                markdown, plots under bench/results/); installs the peers (requirements-bench.txt) first
#   make test    the test job (what CI runs): build, then every test stage of scripts/run_tests.sh
# Each creates .venv, installs the pinned dependencies and builds the extension first.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-installed
PEERS  := $(VENV)/.peers-installed
BENCH_ARGS ?=
# torch-householder compiles a C++ extension against the installed torch (~1 min of CPU, once: pip caches the
# wheel): built without isolation (an isolated build would fetch another torch) and without deps. A failed
# build is not fatal: the report names the error from its log.
TORCH_HOUSEHOLDER := torch-householder==1.0.1

.PHONY: test bench build venv peers clean

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

peers: $(PEERS)

# -c requirements-dev.txt: the peers' dependencies never replace the pinned torch (or numpy)
$(PEERS): $(STAMP) requirements-bench.txt
	$(PY) -m pip install -q --no-compile -c requirements-dev.txt -r requirements-bench.txt
	mkdir -p $(VENV)/peer-install
	$(PY) -m pip install -q --no-compile --no-build-isolation --no-deps $(TORCH_HOUSEHOLDER) \
		> $(VENV)/peer-install/torch-householder.log 2>&1 \
		|| echo "torch-householder did not build against this torch (the report says why):" \
			"$(VENV)/peer-install/torch-householder.log"
	touch $(PEERS)

bench: build peers
	OPT_FAST_BENCH_COMMAND="make bench$(if $(BENCH_ARGS), BENCH_ARGS='$(BENCH_ARGS)')" $(PY) bench/report.py $(BENCH_ARGS)

clean:
	rm -rf build dist *.egg-info opt_fast/_C*.so .pytest_cache .benchmarks
