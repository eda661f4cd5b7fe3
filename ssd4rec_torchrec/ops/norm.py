"""Grouped RMSNorm with a SiLU gate (Mamba-2's `RMSNormGated`) as one autograd Function.

With `g = silu(z)` (or 1 when `z` is None) and statistics per group of `n = group_size` channels,

    norm_before_gate=False:  u = x·g,  r = rsqrt(mean_n(u²) + eps),  y = u·r·w
    norm_before_gate=True:   u = x,    r = rsqrt(mean_n(x²) + eps),  y = x·r·w·g

The hand-derived backward is, with `P = dy·u·(g if norm_before_gate else 1)` and `m = r³·Σ_n(P·w)/n`:

    dw = Σ_t r·P
    norm_before_gate=False:  du = r·w·dy − m·u,             dx = du·g,  dz = silu'(z)·du·x
    norm_before_gate=True:   dx = r·w·g·dy − m·x,           dz = silu'(z)·dy·x·r·w

Autograd over the plain formula runs ~10 full-size ops per direction, each into a fresh (T, H) fp32 buffer,
and keeps those intermediates alive until backward. This Function saves only x, z, the weight and the
per-(row, group) `r`, recomputes `silu(z)` in backward, and runs both directions over blocks of rows with
in-place / `out=` ops in a few block-sized scratch buffers reused across blocks (on CPU a fresh full-size
buffer costs page faults comparable to the arithmetic), so the only full-size allocations are y, dx and dz.
The two reductions (`dw`, `Σ_n P·w`) are matrix products over the block. Strided (column-slice) z and x
blocks are first copied into contiguous scratch: SiLU and its backward are ~3x slower on strided input than
the copy plus a dense SiLU.
Everything is computed in fp32 (float64 for float64 inputs) with autocast off; the output has x's dtype and
each gradient its input's dtype.

The Mamba-2 configuration (fp32, a gate, `norm_before_gate=False`) on CPU runs the native kernels of
`ops.native` when they are built: one pass per row for each direction (2.2x faster fwd+bwd at the ML-1M
mixer shape), SiLU through a vectorised ~1-ulp exp; the Function above is their fallback and reference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ssd4rec_torchrec.ops.native import native_ops

__all__ = ["fused_gated_rms_norm", "gated_rms_norm_traceable"]


# Elements per block of rows (1 MiB per scratch buffer in fp32): 2**18 measured fastest of 2**16..2**20 and
# of a single block at (T, H) = (14090, 128); smaller blocks pay Python overhead (~20 ops per block).
_BLOCK_ELEMS = 2**18


def _block_rows(T: int, H: int) -> int:
    """Rows per block: about `_BLOCK_ELEMS` elements, at least 1, at most T."""
    return max(1, min(T, _BLOCK_ELEMS // H))


def _dense_block(t: torch.Tensor, s: int, L: int, buf: torch.Tensor, G: int) -> torch.Tensor:
    """Rows `s:s+L` of t as a contiguous (L, G, n) block in buf's dtype: a view when t already is, else a copy
    into `buf` (a column slice is read once here instead of by every op of the block; bf16 is upcast once)."""
    tb = t[s: s + L]
    if tb.is_contiguous() and tb.dtype == buf.dtype:
        return tb.unflatten(1, (G, -1))
    return buf[:L].copy_(tb.unflatten(1, (G, -1)))


def _group_dot(p: torch.Tensor, w: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """`Σ_n p[t, g, n] · w[g, n]` -> (T, G): one matrix-vector product for a single group; with several, a
    product into `scratch` and a sum (a batched matmul over the strided groups is ~4x slower)."""
    if p.shape[1] == 1:
        return torch.mv(p.view(p.shape[0], -1), w.view(-1)).unsqueeze(1)
    return torch.mul(p, w, out=scratch[: p.shape[0]]).sum(-1)


def _add_weighted_row_sum_(dw: torch.Tensor, r: torch.Tensor, p: torch.Tensor) -> None:
    """`dw[g, n] += Σ_t r[t, g] · p[t, g, n]` (the weight gradient) as a matmul over the token axis."""
    if p.shape[1] == 1:
        dw.view(-1).addmv_(p.view(p.shape[0], -1).t(), r.view(-1))
    else:
        dw.unsqueeze(1).baddbmm_(r.t().unsqueeze(1), p.transpose(0, 1))


class _GatedRMSNorm(torch.autograd.Function):
    """Gated grouped RMSNorm on a 2-D `(T, H)` input; see the module docstring for the formulas.

    Both directions run over blocks of rows: forward works in the output buffer itself (plus a dense copy of
    z's block), backward in block-sized scratch (SiLU(z), one or two products, dense copies of x and z) and the
    dx / dz outputs, so the only full-size allocations are the results.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None, eps: float,
                group_size: int, norm_before_gate: bool) -> torch.Tensor:
        T, H = x.shape
        n = group_size
        G = H // n
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32  # compute dtype: at least fp32
        w = weight.to(cdt).view(G, n)
        y = torch.empty(T, H, dtype=cdt, device=x.device)
        r = torch.empty(T, G, dtype=cdt, device=x.device)
        gate_first = z is not None and not norm_before_gate
        B = _block_rows(T, H)
        zs = None if z is None else torch.empty(B, G, n, dtype=cdt, device=x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            for s in range(0, T, B):
                L = min(B, T - s)
                xb, yb, rb = x[s: s + L].unflatten(1, (G, n)), y[s: s + L].unflatten(1, (G, n)), r[s: s + L]
                if z is not None:
                    torch.ops.aten.silu.out(_dense_block(z, s, L, zs, G), out=yb)
                if gate_first:
                    yb.mul_(xb)
                # rstd from the L2 norm: one read pass, no squared temporary.
                torch.linalg.vector_norm(yb if gate_first else xb, dim=-1, dtype=cdt, out=rb)
                rb.square_().div_(n).add_(eps).rsqrt_()
                if gate_first:
                    yb.mul_(rb.unsqueeze(-1))
                elif z is not None:
                    yb.mul_(xb).mul_(rb.unsqueeze(-1))
                else:
                    torch.mul(xb, rb.unsqueeze(-1), out=yb)
                yb.mul_(w)
        ctx.save_for_backward(x, weight, z, r)
        ctx.group_size, ctx.norm_before_gate = group_size, norm_before_gate
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, z, r = ctx.saved_tensors
        n, norm_before_gate = ctx.group_size, ctx.norm_before_gate
        need_dx, need_dw, need_dz = ctx.needs_input_grad[:3]
        T, H = x.shape
        G = H // n
        cdt = r.dtype
        w = weight.to(cdt).view(G, n)
        dy = grad.to(cdt)
        k = r.pow(3).div_(n)  # m = k · Σ_n(P·w)
        dx = torch.empty(T, H, dtype=cdt, device=x.device) if need_dx else None
        dz = torch.empty(T, H, dtype=cdt, device=x.device) if need_dz else None
        dw = torch.zeros(G, n, dtype=cdt, device=x.device)
        B = _block_rows(T, H)
        a, b, c, zs, xs = (torch.empty(B, G, n, dtype=cdt, device=x.device) for _ in range(5))
        e = torch.empty(B, G, n, dtype=cdt, device=x.device) if G > 1 else None  # for _group_dot
        with torch.autocast(device_type=x.device.type, enabled=False):
            for s in range(0, T, B):
                L = min(B, T - s)
                xb, dyb = _dense_block(x, s, L, xs, G), dy[s: s + L].unflatten(1, (G, n))
                dxb = None if dx is None else dx[s: s + L].unflatten(1, (G, n))
                dzb = None if dz is None else dz[s: s + L].unflatten(1, (G, n))
                rb, r3 = r[s: s + L], r[s: s + L].unsqueeze(-1)
                if z is not None:
                    zb = _dense_block(z, s, L, zs, G)
                    g = torch.ops.aten.silu.out(zb, out=a[:L])
                if not norm_before_gate:
                    u = xb if z is None else torch.mul(g, xb, out=b[:L])
                    p = torch.mul(dyb, u, out=c[:L])  # dy·u
                    m = _group_dot(p, w, e).mul_(k[s: s + L]).unsqueeze(-1)
                    if need_dw:
                        _add_weighted_row_sum_(dw, rb, p)
                    if need_dx or need_dz:  # du = r·w·dy − m·u (is dx without a gate)
                        du = torch.mul(dyb, w, out=dxb if z is None else p).mul_(r3).addcmul_(u, m, value=-1.0)
                    if z is not None and need_dx:  # dx = du·g
                        torch.mul(du, g, out=dxb)
                    if need_dz:  # dz = silu'(z)·du·x
                        torch.ops.aten.silu_backward(du.mul_(xb), zb, grad_input=dzb)
                else:
                    q = torch.mul(dyb, xb, out=b[:L])  # dy·x
                    p = q if z is None else torch.mul(q, g, out=c[:L])  # dy·x·g
                    m = _group_dot(p, w, e).mul_(k[s: s + L]).unsqueeze(-1)
                    if need_dw:
                        _add_weighted_row_sum_(dw, rb, p)
                    if need_dz:  # dz = silu'(z)·dy·x·r·w
                        torch.ops.aten.silu_backward(q.mul_(r3).mul_(w), zb, grad_input=dzb)
                    if need_dx:  # dx = r·w·g·dy − m·x
                        torch.mul(dyb, w, out=dxb).mul_(r3)
                        if z is not None:
                            dxb.mul_(g)
                        dxb.addcmul_(xb, m, value=-1.0)
        return (
            dx.to(x.dtype) if need_dx else None,
            dw.view(H).to(weight.dtype) if need_dw else None,
            dz.to(z.dtype) if need_dz else None,
            None,
            None,
            None,
        )


class _NativeGatedRMSNorm(torch.autograd.Function):
    """`_GatedRMSNorm` for fp32 CPU inputs with a gate and `norm_before_gate=False`, in the native kernels."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, eps: float,
                group_size: int) -> torch.Tensor:
        y, r = native_ops().gated_rms_norm_forward(x, z, weight.contiguous(), eps, group_size)
        ctx.save_for_backward(x, weight, z, r)
        ctx.group_size = group_size
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, z, r = ctx.saved_tensors
        dx, dz, dw = native_ops().gated_rms_norm_backward(grad, x, z, weight.contiguous(), r, ctx.group_size)
        return dx, dw, dz, None, None


def _native_applies(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None, norm_before_gate: bool) -> bool:
    if z is None or norm_before_gate or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return False
    if not (x.dtype == z.dtype == weight.dtype == torch.float32) or x.stride(-1) != 1 or z.stride(-1) != 1:
        return False
    return native_ops() is not None


def fused_gated_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = True,
) -> torch.Tensor:
    """`RMSNorm(x·silu(z))·weight` (`norm_before_gate=False`) or `RMSNorm(x)·weight·silu(z)`, per group of
    `group_size` channels (all of them when None) over the last dim; fp32 inside, output in x's dtype.

    Same result as `mamba_ssm`'s `rms_norm_ref`, differentiable w.r.t. x, weight and z; x and z may be
    non-contiguous (e.g. column slices of a projection output).
    """
    H = x.shape[-1]
    group_size = H if group_size is None else group_size
    if group_size <= 0 or H % group_size:
        raise ValueError(f"hidden size {H} is not a multiple of group_size {group_size}")
    if weight.shape != (H,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({H},)")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z has shape {tuple(z.shape)}, expected x's {tuple(x.shape)}")
    shape = x.shape
    x2 = x.reshape(-1, H)
    z2 = None if z is None else z.reshape(-1, H)
    if _native_applies(x2, weight, z2, norm_before_gate):
        return _NativeGatedRMSNorm.apply(x2, weight, z2, eps, group_size).view(shape)
    return _GatedRMSNorm.apply(x2, weight, z2, eps, group_size, norm_before_gate).view(shape)


def gated_rms_norm_traceable(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, *, eps: float, group_size: int,
                             norm_before_gate: bool) -> torch.Tensor:
    """``fused_gated_rms_norm`` in plain tensor ops for ``torch.export`` (the fused op works over row blocks,
    a loop bound on T); same mathematics, summation order of the plain formula."""
    if not norm_before_gate:
        x = x * F.silu(z)
    groups = x.unflatten(-1, (-1, group_size))
    out = (groups * torch.rsqrt(groups.square().mean(dim=-1, keepdim=True) + eps)).flatten(-2) * weight
    return out * F.silu(z) if norm_before_gate else out
