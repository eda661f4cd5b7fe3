"""Fail loudly if the venv picked up a CUDA build on a machine without a GPU.

A loose `torch` or a plain `pip install torchrec` pulls multi-GB CUDA wheels (torch+cuXXX, nvidia-*,
fbgemm-gpu) that cannot even import here. `make setup` runs this right after installing.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import sys


def machine_has_gpu() -> bool:
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def main() -> int:
    installed = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in md.distributions()}
    problems: list[str] = []
    if not machine_has_gpu():
        torch_version = installed.get("torch", "")
        if "+cpu" not in torch_version:
            problems.append(f"torch {torch_version or '(missing)'} is not the +cpu build")
        if "fbgemm-gpu" in installed:
            problems.append(f"CUDA fbgemm-gpu {installed['fbgemm-gpu']} installed (use fbgemm-gpu-cpu)")
        cuda_wheels = sorted(n for n in installed if n.startswith("nvidia-"))
        if cuda_wheels:
            problems.append("CUDA wheels installed: " + ", ".join(cuda_wheels))
    if "fbgemm-gpu" in installed and "fbgemm-gpu-cpu" in installed:
        problems.append("fbgemm-gpu and fbgemm-gpu-cpu both installed (they overwrite each other)")
    for name in ("torch", "fbgemm-gpu-cpu", "torchrec", "torchx", "mamba-ssm"):
        if name not in installed and not (name == "fbgemm-gpu-cpu" and machine_has_gpu()):
            problems.append(f"{name} is not installed")
    if problems:
        for p in problems:
            print(f"check_env: ERROR: {p}", file=sys.stderr)
        print("check_env: remove .venv and run `make setup` again", file=sys.stderr)
        return 1
    import fbgemm_gpu  # noqa: F401  (the import itself is the check: a mismatched build fails here)
    import torch
    import torchrec

    print(f"check_env: ok (torch {torch.__version__}, torchrec {torchrec.__version__}, cuda={torch.version.cuda})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
