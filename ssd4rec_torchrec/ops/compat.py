"""Version shims for the GPU path: torch, Triton and mamba-ssm APIs that differ between the releases we meet.

The CPU set pins torch 2.13 and triton 3.8; the GPU image the device check targets has torch 2.11 (CUDA 13)
and triton 3.6; clusters install `requirements-gpu.txt`. Every version-dependent call of the GPU path goes
through this module, written as feature detection (never a version comparison), so each side of a
difference can be exercised on any machine (tests/ops/test_ops_compat.py simulates the other side):

* fp32 matmul precision: `torch.backends.cuda.matmul.fp32_precision` ("ieee" / "tf32", torch >= 2.9) or
  the legacy `allow_tf32` flag. Recent torch raises when the two are mixed, so only one is ever touched.
* SDPA backend choice: `torch.nn.attention.sdpa_kernel` or the legacy `torch.backends.cuda.sdp_kernel`;
  the flash-attention implementation name where torch reports it.
* Triton's fp32 `tl.dot` precision: `triton.knobs.language.fp32_default` (Triton >= 3.4) or the
  `TRITON_F32_DEFAULT` variable; autotuning limited to each kernel's first config (for checks, where compile
  time matters and speed does not).
* mamba-ssm's SSD kernels from a pure-Python wheel: the package `__init__` imports the Mamba-1 CUDA
  extension `selective_scan_cuda` (absent without a CUDA build) and transformers (whose API moves); the SSD
  Triton kernels need neither, so they can be imported without running that `__init__`.
* Running those kernels on CPU tensors under the Triton interpreter (`TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

__all__ = [
    "SDPA_BACKENDS",
    "flash_attention_impl",
    "fp32_matmul_precision",
    "install_triton_cpu_interpreter",
    "load_mamba_chunk_scan",
    "mamba_import_mode",
    "package_version",
    "sdpa_backends",
    "set_fp32_matmul_precision",
    "set_triton_autotune_limit",
    "set_triton_fp32_default",
    "triton_autotune_limit",
    "triton_fp32_default",
]

log = logging.getLogger(__name__)

FP32_PRECISIONS = ("ieee", "tf32", "none")
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
# Legacy `torch.backends.cuda.sdp_kernel` keyword per backend (cuDNN has none there).
_LEGACY_SDPA_FLAGS = {"flash": "enable_flash", "efficient": "enable_mem_efficient", "math": "enable_math"}


def package_version(name: str) -> str | None:
    """Installed distribution version of `name` (e.g. "mamba-ssm"), or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------- torch


def _matmul_backend() -> Any:
    return torch.backends.cuda.matmul


def fp32_matmul_precision() -> str:
    """Current precision of fp32 CUDA matmuls: "ieee" or "tf32" (torch's "none" default is reported as ieee)."""
    m = _matmul_backend()
    if hasattr(m, "fp32_precision"):
        return "tf32" if m.fp32_precision == "tf32" else "ieee"
    return "tf32" if m.allow_tf32 else "ieee"


def set_fp32_matmul_precision(mode: str) -> str:
    """Set the precision of fp32 CUDA matmuls: "ieee", "tf32" or "none" (torch's default, IEEE fp32).

    Returns the previous setting as this torch stores it, so passing it back restores the state exactly.
    """
    if mode not in FP32_PRECISIONS:
        raise ValueError(f"fp32 matmul precision must be one of {FP32_PRECISIONS}, got {mode!r}")
    m = _matmul_backend()
    if hasattr(m, "fp32_precision"):
        old = m.fp32_precision
        m.fp32_precision = mode
    else:
        old = "tf32" if m.allow_tf32 else "none"
        m.allow_tf32 = mode == "tf32"
    return old


@contextlib.contextmanager
def sdpa_backends(names: Sequence[str]) -> Iterator[None]:
    """Restrict `F.scaled_dot_product_attention` to the named backends (from `SDPA_BACKENDS`) inside the block.

    A call no allowed backend can serve raises ("No available kernel"), so forcing ["flash"] proves flash ran.
    """
    unknown = [n for n in names if n not in SDPA_BACKENDS]
    if unknown or not names:
        raise ValueError(f"SDPA backends must be a non-empty subset of {SDPA_BACKENDS}, got {list(names)}")
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        sdpa_kernel = None
    if sdpa_kernel is not None:
        members = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                   "math": "MATH"}
        with sdpa_kernel([getattr(SDPBackend, members[n]) for n in names]):
            yield
        return
    if "cudnn" in names and len(names) == 1:
        raise ValueError("this torch has no cuDNN SDPA backend selection")
    flags = {flag: name in names for name, flag in _LEGACY_SDPA_FLAGS.items()}
    with torch.backends.cuda.sdp_kernel(**flags):
        yield


def flash_attention_impl() -> str | None:
    """The flash-attention implementation torch dispatches to (e.g. "FA2"), where this torch reports it."""
    try:
        from torch.nn import attention
    except ImportError:
        return None
    current = getattr(attention, "current_flash_attention_impl", None)
    if current is None:
        return None
    try:
        impl = current()
    except Exception as exc:  # reported, never fatal: the name is informational
        log.debug("current_flash_attention_impl() failed: %r", exc)
        return None
    return None if impl is None else str(getattr(impl, "name", impl))


# -------------------------------------------------------------------------------------------- triton


def _triton_knobs() -> Any | None:
    try:
        return importlib.import_module("triton").knobs
    except (ImportError, AttributeError):
        return None


def triton_fp32_default() -> str | None:
    """The fp32 `tl.dot` precision Triton compiles with when a kernel names none (None: Triton's default, tf32)."""
    knobs = _triton_knobs()
    if knobs is not None and hasattr(knobs, "language"):
        return knobs.language.fp32_default
    return os.environ.get("TRITON_F32_DEFAULT") or None


def set_triton_fp32_default(mode: str | None) -> None:
    """Make Triton compile fp32 `tl.dot` as `mode` ("ieee", "tf32", "tf32x3"; None: Triton's default).

    Applies to kernels compiled afterwards. Use a separate Triton cache directory per setting: whether the
    on-disk cache key includes it differs between Triton releases.
    """
    if mode is None:
        os.environ.pop("TRITON_F32_DEFAULT", None)
    else:
        os.environ["TRITON_F32_DEFAULT"] = mode
    knobs = _triton_knobs()
    if knobs is not None and hasattr(knobs, "language"):
        knobs.language.fp32_default = mode


_ORIGINAL_PRUNE: list[Any] = []  # Autotuner.prune_configs as Triton defines it, once patched


def _config_cost(config: Any) -> int:
    """Work per program of a Triton config: product of its BLOCK_SIZE_* values times its pipeline stages."""
    cost = 1
    for key, value in config.kwargs.items():
        if key.startswith("BLOCK_SIZE"):
            cost *= int(value)
    return cost * int(getattr(config, "num_stages", 1) or 1)


def set_triton_autotune_limit(max_configs: int | None, *, smallest: bool = False) -> None:
    """Process-wide: every `triton.autotune` kernel tries only `max_configs` configs (None: all of them).

    The first ones as listed, or with `smallest` the ones with the smallest blocks (cheapest per program:
    for the Triton interpreter). With one config the autotuner compiles once and benchmarks nothing: results
    are the same up to rounding, only (possibly) slower. For correctness checks, where compile time is the cost.
    """
    if max_configs is not None and max_configs < 1:
        raise ValueError(f"max_configs must be >= 1 or None, got {max_configs}")
    from triton.runtime.autotuner import Autotuner

    if not _ORIGINAL_PRUNE:
        _ORIGINAL_PRUNE.append(Autotuner.prune_configs)
    original = _ORIGINAL_PRUNE[0]
    if max_configs is None:
        Autotuner.prune_configs = original
        return

    def prune(self: Any, *args: Any, **kwargs: Any) -> list[Any]:
        configs = list(original(self, *args, **kwargs))
        return (sorted(configs, key=_config_cost) if smallest else configs)[:max_configs]

    prune.max_configs = max_configs  # type: ignore[attr-defined]
    Autotuner.prune_configs = prune


def triton_autotune_limit() -> int | None:
    """The limit `set_triton_autotune_limit` put in place (None: Triton tries every config)."""
    from triton.runtime.autotuner import Autotuner

    return getattr(Autotuner.prune_configs, "max_configs", None)


def install_triton_cpu_interpreter() -> None:
    """Run Triton kernels on CPU tensors, in a process with no GPU: call before any kernel is defined.

    Sets `TRITON_INTERPRET=1`, lets mamba-ssm's `torch.cuda.device(...)` / `get_device_properties(...)` calls
    work without CUDA, and limits autotuning to the config with the smallest blocks (benchmarking configs
    needs a GPU driver; small blocks interpret fastest). Meant for throw-away worker processes: nothing is
    undone.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    knobs = _triton_knobs()  # Triton >= 3.4 may have read the variable already
    if knobs is not None and hasattr(knobs, "runtime"):
        knobs.runtime.interpret = True
    if not torch.cuda.is_available():
        torch.cuda.device = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
        torch.cuda.get_device_properties = (  # type: ignore[assignment]
            lambda *a, **k: types.SimpleNamespace(multi_processor_count=2)
        )
    set_triton_autotune_limit(1, smallest=True)


# ---------------------------------------------------------------------------------------------- mamba


def _bare_package(name: str) -> types.ModuleType | None:
    """Register package `name` in sys.modules without running its `__init__` (submodules import normally)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = spec.origin
    pkg.__package__ = name
    pkg.__spec__ = spec
    sys.modules[name] = pkg
    return pkg


_MAMBA_IMPORT: list[str] = []  # how the SSD kernels were imported: "package" or "bare"


def mamba_import_mode() -> str | None:
    """How `load_mamba_chunk_scan` imported the kernels in this process: "package" (mamba-ssm's own
    `__init__` ran), "bare" (it was skipped), or None (not imported yet)."""
    return _MAMBA_IMPORT[-1] if _MAMBA_IMPORT else None


def load_mamba_chunk_scan(bare_package: bool | None = None) -> Callable[..., Any]:
    """mamba-ssm's `mamba_chunk_scan_combined`.

    Tries the normal import. If the package `__init__` fails (a pure-Python wheel has no
    `selective_scan_cuda`; a newer transformers may lack a name it imports) and `bare_package` is true
    (default: when CUDA is available), imports the SSD kernel module under a `mamba_ssm` package whose
    `__init__` is skipped: only the SSD Triton kernels, which need neither, are then usable.
    """
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        mode = "package" if hasattr(sys.modules.get("mamba_ssm"), "__version__") else "bare"
    except ImportError as exc:
        if bare_package is None:
            bare_package = torch.cuda.is_available()
        if not bare_package or sys.modules.get("mamba_ssm") is not None or _bare_package("mamba_ssm") is None:
            raise
        try:
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        except Exception:
            sys.modules.pop("mamba_ssm", None)
            raise
        log.info("mamba-ssm's package __init__ failed (%s); imported its SSD Triton kernels without it", exc)
        mode = "bare"
    _MAMBA_IMPORT.append(mode)
    return mamba_chunk_scan_combined
