# Quick start: `make demo`, then `make test`. Everything installs into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SETUP_STAMP := $(VENV)/.pacore-setup
DEMO_QUESTION ?= A farmer has 17 sheep. All but 9 run away. How many sheep does the farmer have left?

.PHONY: setup browser demo test bench docs clean

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

demo: setup
	$(BIN)/pacore ask --schedule 4 --max-tokens 200 "$(DEMO_QUESTION)"

# The trace viewer's tests drive Debian's chromium (never a downloaded browser build).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

test: setup browser
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
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache
