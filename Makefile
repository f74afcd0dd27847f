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

.PHONY: test bench build venv peers clean FORCE

venv: $(STAMP)

$(STAMP): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# --no-compile: byte-compiling all of torch costs ~1 min; Python compiles what it imports on first use
	$(PY) -m pip install -q --no-compile -r requirements-dev.txt
	touch $(STAMP)

# The extension is rebuilt (a full compile, ~2 min) only when its sources, the build scripts, the venv or
# the build's environment variables changed since the last build: a second `make test` or `make bench`
# starts at once. (A build without the extension, OPT_FAST_NO_EXT=1, leaves no file and reruns each time.)
EXT       := opt_fast/_C.abi3.so
EXT_SRC   := setup.py pyproject.toml $(wildcard tools/*.py) $(shell find csrc -type f)
BUILD_ENV := $(VENV)/.build-env
BUILD_VARS = OPT_FAST_NO_EXT=$(OPT_FAST_NO_EXT) OPT_FAST_SKIP_CUDA_BUILD=$(OPT_FAST_SKIP_CUDA_BUILD) \
	OPT_FAST_FORCE_CUDA=$(OPT_FAST_FORCE_CUDA) DEBUG=$(DEBUG) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) \
	CUDA_HOME=$(CUDA_HOME) PATH=$(PATH)

build: $(EXT)

$(EXT): $(STAMP) $(BUILD_ENV) $(EXT_SRC)
	$(PY) -m pip install -q --no-build-isolation -e .
	if [ -f $(EXT) ]; then touch $(EXT); fi

# rewritten only when the variables differ from the last build's, so that its date says when they changed
$(BUILD_ENV): $(STAMP) FORCE
	@echo '$(BUILD_VARS)' | cmp -s - $@ || echo '$(BUILD_VARS)' > $@

FORCE:

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
