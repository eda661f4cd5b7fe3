"""`prefix_reverse_scan` against re-running the reverse recurrence on every prefix (float64, token by token)."""

from __future__ import annotations

import pytest
import torch

from ssd4rec_torchrec.ops import prefix_reverse_scan
from tests.ops.ops_reference import conv_reference, offsets_of, rel_err, ssd_reference


def _reference(xBC, w, b, dt, A, D, lengths, H, G, N):
    """For every prefix s..t: reverse it, conv + SiLU, SSD recurrence, keep the last output (token s)."""
    d_inner = xBC.shape[1] - 2 * G * N
    P = d_inner // H
    rows = []
    start = 0
    for n in lengths:
        for t in range(n):
            idx = torch.arange(start + t, start - 1, -1)  # t, t-1, .., s
            u = conv_reference(xBC[idx], w, b, offsets_of([t + 1]), activation="silu")
            x, B, C = u.split([d_inner, G * N, G * N], 1)
            y = ssd_reference(x.reshape(-1, H, P), dt[idx], A, B.reshape(-1, G, N), C.reshape(-1, G, N),
                              offsets_of([t + 1]), D=D)
            rows.append(y[-1])
        start += n
    return torch.stack(rows)


def _inputs(lengths, H=4, G=1, P=4, N=3, W=4, D_kind="h", seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    ch = H * P + 2 * G * N
    return {
        "xBC": torch.randn(T, ch, generator=g, dtype=dtype),
        "w": torch.randn(ch, W, generator=g, dtype=dtype) / 2,
        "b": torch.randn(ch, generator=g, dtype=dtype) / 2,
        "dt": torch.nn.functional.softplus(torch.randn(T, H, generator=g, dtype=dtype) - 1.0),
        "A": -(0.2 + 3 * torch.rand(H, generator=g, dtype=dtype)),
        "D": {None: None, "h": torch.randn(H, generator=g, dtype=dtype),
              "hp": torch.randn(H, P, generator=g, dtype=dtype)}[D_kind],
    }


@pytest.mark.parametrize("lengths", [[1], [2, 1, 3], [4, 5, 1, 7], [9, 3, 12]])
@pytest.mark.parametrize("G,W,D_kind", [(1, 4, "h"), (2, 4, "hp"), (1, 2, None), (1, 1, "h")])
def test_matches_reverse_recurrence_on_every_prefix(lengths, G, W, D_kind):
    H, N = 4, 3
    p = _inputs(lengths, G=G, W=W, D_kind=D_kind)
    off = offsets_of(lengths)
    got = prefix_reverse_scan(p["xBC"], p["w"], p["b"], p["dt"], p["A"], p["D"], off, nheads=H, ngroups=G, d_state=N)
    want = _reference(p["xBC"], p["w"], p["b"], p["dt"], p["A"], p["D"], lengths, H, G, N)
    assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("lengths", [[3, 6, 1], [1, 2], [9]])
@pytest.mark.parametrize("G,W,D_kind", [(1, 4, "h"), (2, 4, "hp"), (1, 2, None), (1, 1, "h"), (2, 3, "h")])
def test_gradients_match_reference(lengths, G, W, D_kind):
    H, N = 4, 3
    p = _inputs(lengths, G=G, W=W, D_kind=D_kind)
    off = offsets_of(lengths)
    leaves = {k: None if v is None else v.clone().requires_grad_(True) for k, v in p.items()}
    got = prefix_reverse_scan(leaves["xBC"], leaves["w"], leaves["b"], leaves["dt"], leaves["A"], leaves["D"], off,
                              nheads=H, ngroups=G, d_state=N)
    ref_leaves = {k: None if v is None else v.clone().requires_grad_(True) for k, v in p.items()}
    want = _reference(ref_leaves["xBC"], ref_leaves["w"], ref_leaves["b"], ref_leaves["dt"], ref_leaves["A"],
                      ref_leaves["D"], lengths, H, G, N)
    upstream = torch.randn_like(want)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    for k in p:
        if p[k] is not None:
            assert rel_err(leaves[k].grad, ref_leaves[k].grad) < 1e-10, k


def test_row_depends_only_on_its_prefix():
    """Changing tokens after t (in t's segment) or in other segments leaves row t unchanged, exactly."""
    lengths, H, G, N = [6, 8], 4, 1, 3
    p = _inputs(lengths, dtype=torch.float32)
    off = offsets_of(lengths)
    base = prefix_reverse_scan(p["xBC"], p["w"], p["b"], p["dt"], p["A"], p["D"], off, nheads=H, ngroups=G,
                               d_state=N)
    t = 6 + 3  # fourth token of the second segment
    xBC, dt = p["xBC"].clone(), p["dt"].clone()
    xBC[t + 1:] += 5.0
    dt[t + 1:] *= 3.0
    xBC[:6] -= 2.0
    changed = prefix_reverse_scan(xBC, p["w"], p["b"], dt, p["A"], p["D"], off, nheads=H, ngroups=G, d_state=N)
    assert torch.equal(changed[6:t + 1], base[6:t + 1])
    assert not torch.equal(changed[t + 1:], base[t + 1:])


def test_long_segment_is_finite_and_float32_close():
    """Decays underflow over a long segment: values stay finite and fp32 tracks float64."""
    lengths, H, G, N = [3000, 5], 4, 1, 3
    p = _inputs(lengths, dtype=torch.float64)
    off = offsets_of(lengths)
    args = dict(nheads=H, ngroups=G, d_state=N)
    y64 = prefix_reverse_scan(p["xBC"], p["w"], p["b"], p["dt"], p["A"], p["D"], off, **args)
    y32 = prefix_reverse_scan(*(p[k].float() for k in ("xBC", "w", "b", "dt", "A", "D")), off, **args)
    assert torch.isfinite(y32).all()
    assert rel_err(y32, y64) < 1e-5


def test_rejects_bad_shapes():
    p = _inputs([3])
    off = offsets_of([3])
    with pytest.raises(ValueError, match="multiple of nheads"):
        prefix_reverse_scan(p["xBC"], p["w"], p["b"], p["dt"], p["A"], p["D"], off, nheads=5, ngroups=1, d_state=3)
    with pytest.raises(ValueError, match="dt must be"):
        prefix_reverse_scan(p["xBC"], p["w"], p["b"], p["dt"][:, :2], p["A"], p["D"], off, nheads=4, ngroups=1,
                            d_state=3)


@pytest.mark.parametrize("path", ["torch", "native"])
@pytest.mark.parametrize("G,W,D_kind", [(1, 4, "h"), (2, 4, "hp"), (1, 2, None), (2, 3, "h")])
def test_float32_paths_match_float64_reference(path, G, W, D_kind, monkeypatch):
    """fp32 on CPU runs the native kernels (or the torch Function where they are off): outputs and gradients
    within fp32 rounding of the float64 recurrence."""
    from ssd4rec_torchrec.ops import prefix_reverse as module
    from tests.ops.ops_reference import select_cpu_path

    select_cpu_path(path, module, monkeypatch)
    lengths, H, N = [1, 3, 7, 40, 2], 4, 3
    p = _inputs(lengths, G=G, W=W, D_kind=D_kind)
    off = offsets_of(lengths)
    want = _reference(p["xBC"], p["w"], p["b"], p["dt"], p["A"], p["D"], lengths, H, G, N)
    leaves = {k: None if v is None else v.float().requires_grad_(True) for k, v in p.items()}
    got = prefix_reverse_scan(*(leaves[k] for k in ("xBC", "w", "b", "dt", "A", "D")), off, nheads=H, ngroups=G,
                              d_state=N)
    assert got.dtype == torch.float32
    assert rel_err(got, want) < 2e-6
    ref_leaves = {k: None if v is None else v.clone().requires_grad_(True) for k, v in p.items()}
    want = _reference(*(ref_leaves[k] for k in ("xBC", "w", "b", "dt", "A", "D")), lengths, H, G, N)
    upstream = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (got * upstream.float()).sum().backward()
    (want * upstream).sum().backward()
    for k, leaf in leaves.items():
        if leaf is not None:
            assert rel_err(leaf.grad, ref_leaves[k].grad) < 2e-5, k
