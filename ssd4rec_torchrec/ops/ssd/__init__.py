"""SSD (Mamba-2) scan over packed variable-length sequences.

`ssd_scan` computes, independently for every segment of a packed token axis (state reset to 0 at each
segment start),

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t ⊗ B_t        (h: (H, P, N) per token)
    y_t = h_t · C_t + D * x_t

which is what `mamba_ssm`'s `mamba_chunk_scan_combined(..., seq_idx=...)` computes for an already positive
`dt`. Two implementations: the Triton kernel from mamba-ssm (`kernel="mamba"`) and a pure-torch chunked
"dual form" (`kernel="torch"`) that runs anywhere and is differentiable by autograd:

* inside each chunk of Q tokens, the output is a masked attention-like matmul
  `Y = (L ∘ C Bᵀ)(dt ⊙ X)` with `L_ij = exp(a_{j+1} + ... + a_i)` for `j <= i` in the same segment;
* chunk end states are propagated by a linear recurrence over chunks, itself evaluated blockwise in the
  same dual form (`_segment_scan`, recursive), so there is no Python loop over tokens, segments or chunks
  and memory stays O(T·Q·H) (never O(T²)).

The quadratic part is one custom autograd Function (`_DecayMatmul`) that runs forward and backward over
blocks of chunks in two reused work buffers of at most `_BLOCK_BYTES` each (on CPU a fresh large buffer
costs more than the arithmetic, and small blocks stay in cache), recomputing the (Q, Q) decay matrices in
backward instead of saving them, so its cost is linear in T with bounded temporaries; the rest is plain
autograd over (T, H, P)- and (T/Q, H, P, N)-sized tensors.

When every chunk's decays span at most `2 * _FACTORED_MAX_LOG` (the usual case), the whole torch path is
instead one autograd Function with a hand-written backward (`_FactoredScan`): the decay matrix is factored
per token (`exp(cs_i - cs_j) = f_i g_j`), so a chunk needs one (Q, Q) matrix per group instead of one per
head, the previous chunk's state enters through the same factors, and every step is a batched matmul or
an element-wise op in the token-major layout.

Segment boundaries need not align with chunks: a segment-equality mask is applied inside chunks and a
state is only carried into tokens of the segment it belongs to. Decays are exponentiated only after
masking (`exp(where(mask, s, -inf))`), so masked terms have exactly zero value and zero gradient.

Modules: `dispatcher` (`ssd_scan`: input checks and the choice of implementation), `chunked` (the torch
path), `factored` (its fused factored form), `decay` (the exact per-head decay matrices and the recursive scan
over chunk states), `mamba` (the mamba-ssm glue) and `traceable` (a branch-free scan for `torch.export`).
"""

from ssd4rec_torchrec.ops.ssd.dispatcher import KERNELS, TORCH_MAX_CHUNK, KernelOverride, override_kernel, ssd_scan
from ssd4rec_torchrec.ops.ssd.mamba import mamba_ssd_available
from ssd4rec_torchrec.ops.ssd.traceable import ssd_scan_traceable

__all__ = [
    "KERNELS",
    "TORCH_MAX_CHUNK",
    "KernelOverride",
    "mamba_ssd_available",
    "override_kernel",
    "ssd_scan",
    "ssd_scan_traceable",
]
