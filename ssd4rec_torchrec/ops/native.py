"""Fused CPU kernels (``ops/csrc/*.cpp``), compiled on first use and cached; pure torch otherwise.

Some CPU hot spots are chains of element-wise passes that PyTorch cannot fuse in eager mode (dropout: a
random draw, a comparison, a cast and two multiplies per element; the gated RMSNorm). The C++ file does them
in one pass. :func:`native_ops` builds it once per machine with ``torch.utils.cpp_extension``
(``-O3 -march=native -fno-trapping-math -fopenmp``; the build directory is keyed by the source, the flags, the torch
version and the CPU's feature flags, so a cached build is never reused on a different CPU) and returns
``torch.ops.ssd4rec_cpu``. When it cannot (no C++ compiler, ``SSD4REC_NATIVE=0``, a failed build) it logs one
warning and returns None, and every caller keeps its pure-torch path, which is also the reference the tests
compare the kernels with.

``ssd4rec_torchrec.ops.native.main()`` builds it ahead of time (``make setup`` does; training also calls
:func:`native_ops` before its first step so that a build never counts as training time).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["NATIVE_DIR_ENV", "NATIVE_ENV", "build_directory", "native_ops"]

log = logging.getLogger(__name__)

NATIVE_ENV = "SSD4REC_NATIVE"  # "0": never build or use the native kernels
NATIVE_DIR_ENV = "SSD4REC_NATIVE_DIR"  # where builds are cached (default ~/.cache/ssd4rec_torchrec/native)
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "cpu_kernels.cpp", CSRC / "prefix_reverse.cpp")  # + the header csrc/simd_math.h
# -fno-trapping-math lets the compiler vectorise the clamps; -fopenmp makes at::parallel_for really parallel
# (its OpenMP pragmas are inline in ATen's headers). libgomp.so.1 resolves to the copy torch already loaded, so
# torch.set_num_threads governs the kernels' threads too.
CFLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp")
LDFLAGS = ("-fopenmp",)
LIBRARY = "ssd4rec_cpu"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build_directory() -> Path:
    """Where the build is cached: ``$SSD4REC_NATIVE_DIR/<key>``, default ``~/.cache/ssd4rec_torchrec/native/<key>``
    (independent of ``SSD4REC_CACHE``, which jobs point at scratch data directories)."""
    texts = [p.read_text() for p in sorted(CSRC.iterdir()) if p.suffix in (".cpp", ".h")]
    key = hashlib.sha256("\n".join([*texts, " ".join(CFLAGS + LDFLAGS), torch.__version__, _cpu_flags(),
                                    sys.version]).encode()).hexdigest()[:16]
    root = os.environ.get(NATIVE_DIR_ENV) or Path.home() / ".cache" / "ssd4rec_torchrec" / "native"
    return Path(root) / key


_loaded: list[Any] = []  # the library, once loaded: a process can register its ops namespace only once


@functools.lru_cache(maxsize=1)
def native_ops() -> Any | None:
    """``torch.ops.ssd4rec_cpu`` (building the library on first use), or None when it is unavailable.

    Cached; ``native_ops.cache_clear()`` re-reads ``SSD4REC_NATIVE`` but never loads the library twice.
    """
    if os.environ.get(NATIVE_ENV, "1") == "0":
        log.info("native CPU kernels disabled (%s=0): pure-torch paths", NATIVE_ENV)
        return None
    if _loaded:
        return _loaded[0]
    try:
        from torch.utils.cpp_extension import load

        out = build_directory()
        out.mkdir(parents=True, exist_ok=True)
        # The `ninja` that requirements.txt installs lives next to this interpreter; put it on PATH for the build.
        bin_dir = str(Path(sys.executable).parent)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
        # fresh lists: load() appends its own flags to the lists it is given
        load(name=LIBRARY, sources=[str(p) for p in SOURCES], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
             build_directory=str(out), is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: fall back, once, loudly
        log.warning("native CPU kernels unavailable, using pure-torch paths (%s: %s)", type(exc).__name__,
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
        return None
    _loaded.append(getattr(torch.ops, LIBRARY))
    return _loaded[0]


def main() -> None:
    """Build (or find) the kernels and say where; `make setup` runs this."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Never fails: without the kernels everything still runs (slower), and the warning above says why.
    ops = native_ops()
    log.info("native CPU kernels: %s", f"ready in {build_directory()}" if ops is not None else "unavailable")


if __name__ == "__main__":
    main()
