#!/usr/bin/env bash
# One prepared check of the GPU path for a bare CUDA machine without network access:
#   1. installs the carried wheels from .wheels/ (built here by `make device-wheels`) into a scratch folder
#      with `pip install --no-index --no-deps` (nothing is fetched; the Python environment is not modified);
#   2. runs ssd4rec_torchrec.bench.device_check: CUDA kernel checks, then the encoder benchmark, writing
#      device_check.json, device_bench.png and device_check.log to --out (default $OUT).
# Usage: scripts/device_check.sh [--device cuda|cpu] [--quick] [--out DIR] [...]; --help lists every option.
# CI runs `scripts/device_check.sh --device cpu --quick --out DIR` (tests/bench/test_device_check.py).
# Environment: PYTHON (interpreter; default .venv/bin/python if present, else python3), SSD4REC_WHEELS
# (wheel folder, default .wheels), SSD4REC_DEVICE_SITE (install folder, default $TMPDIR/ssd4rec-device-site).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then
  PY="$REPO/.venv/bin/python"
else
  PY="python3"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
MODULE=ssd4rec_torchrec.bench.device_check

# Options are checked before anything is installed: --help prints them, bad input fails with one line.
for arg in "$@"; do
  case "$arg" in -h|--help) exec "$PY" -m "$MODULE" --help ;; esac
done
"$PY" -m "$MODULE" --parse-only "$@"

WHEELS="${SSD4REC_WHEELS:-$REPO/.wheels}"
SITE="${SSD4REC_DEVICE_SITE:-${TMPDIR:-/tmp}/ssd4rec-device-site}"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if (( ${#wheels[@]} )); then
  echo "device_check: installing ${#wheels[@]} carried wheel(s) from $WHEELS into $SITE (no index)"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" "${wheels[@]}"
  export PYTHONPATH="$SITE:$PYTHONPATH"
  SSD4REC_WHEELS_INSTALLED="$(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')"
  export SSD4REC_WHEELS_INSTALLED
else
  echo "device_check: no wheels in $WHEELS (make device-wheels builds them); using the installed packages"
fi
exec "$PY" -m "$MODULE" "$@"
