# Quick start: `make demo`, then `make test`. Everything installs into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SETUP_STAMP := $(VENV)/.pacore-setup
TRAIN_STAMP := $(VENV)/.pacore-train
# The CPU build of torch; pinned so pip never swaps in the CUDA one (3 GB).
TORCH_VERSION := 2.13.0
# The demo runs the embedded SmolLM2-135M-Instruct: the default Gemma 3 270M is a base model that
# cannot follow a synthesis prompt. It was never trained for PaCoRe, hence the generic template.
DEMO_QUESTION ?= What is 2 + 3?
DEMO_FLAGS ?= --backend embedded:smollm2 --template generic --schedule 4 --max-tokens 48 --temperature 0.7 --seed 1

.PHONY: setup train-extra browser demo lint test bench docs clean

setup: $(SETUP_STAMP)

# Re-run when the dependencies change; pip caches the llama-cpp-python wheel
# it builds (about 4 minutes on 2 cores the first time), so later runs are quick.
$(SETUP_STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "Installing pacore and its dependencies (the first build of llama-cpp-python takes a few minutes)..."
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install --progress-bar off -e '.[dev]'
	$(BIN)/pacore model prepare
	@touch $@

# The train extra (torch, transformers, TRL) for 'pacore train' and its tests; 'make setup' stays torch-free.
train-extra: $(TRAIN_STAMP)

$(TRAIN_STAMP): $(SETUP_STAMP)
	@echo "Installing the train extra for the training tests (torch $(TORCH_VERSION) CPU, transformers, TRL)..."
	$(BIN)/python -m pip install --progress-bar off torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --progress-bar off -e '.[dev,train]'
	@touch $@

# Round 1: 4 trajectories in parallel; round 2: one synthesis call that reads them.
demo: setup
	$(BIN)/pacore ask --show-rounds $(DEMO_FLAGS) "$(DEMO_QUESTION)"
	@echo "Every trajectory in full and the exact synthesis prompt: $(BIN)/pacore serve, then open"
	@echo "http://127.0.0.1:8000/ui and send a question (docs/serve.md); 'pacore ask --help' for the options."

# ruff (lint rules and import order) and mypy, both configured in pyproject.toml.
lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

# The trace viewer's tests drive Debian's chromium (never a downloaded browser build).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

test: setup train-extra browser
	$(BIN)/python -m pytest

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
