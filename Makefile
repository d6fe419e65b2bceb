# Two commands run everything on a fresh machine (README):
#   make demo   set up .venv, then run the main job on the embedded default (no network needed)
#   make test   set up .venv, then run the test suite in a private network namespace
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

# Offline, quiet, CPU-safe defaults for every command below (environment.md).
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

# The demo and the tests run in a private network namespace with only loopback (Ray listens on every
# interface; inside, nothing can reach out, which also proves nothing is downloaded). Where namespaces are
# unavailable, `make demo ISOLATE=` runs without.
ISOLATE ?= infra/isolated.sh

.PHONY: setup demo test lint bench

setup: $(STAMP)

# Reinstall when the dependency list or the tested pins change.
$(STAMP): pyproject.toml infra/constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c infra/constraints.txt -e '.[pipeline,dev,s3,gcs]'
	touch $@

demo: $(STAMP)
	$(ISOLATE) $(VENV)/bin/infgen run jobs/demo.yaml

test: $(STAMP)
	$(ISOLATE) $(VENV)/bin/pytest -q --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(VENV)/bin/python bench/decode.py
