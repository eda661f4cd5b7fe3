"""Mamba-2 (SSD) mixer over packed variable-length sequences.

`SSDMixer` is a pure-torch re-statement of the non-fused path of `mamba_ssm.Mamba2.forward`
(in_proj -> segment-resetting causal conv + SiLU -> SSD scan with D skip -> gated RMSNorm -> out_proj)
that works on a flat token axis `(T, d_model)` with jagged `offsets` instead of a padded batch. Parameter
names, shapes and initialisation match `Mamba2`, so state dicts load in both directions; the only
difference is that segment boundaries come from `offsets` (the role `seq_idx` plays in Mamba2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssd4rec_torchrec.ops import fused_gated_rms_norm, prefix_reverse_scan, segment_ids, ssd_scan, varlen_causal_conv1d

__all__ = ["GatedRMSNorm", "SSDMixer", "gated_rms_norm"]


def gated_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None,
    *,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> torch.Tensor:
    """Grouped RMSNorm with an optional SiLU gate, as `mamba_ssm`'s `rms_norm_ref` (fp32 inside).

    `norm_before_gate=False` (Mamba2 default): `RMSNorm(x * silu(z)) * weight`; otherwise
    `RMSNorm(x) * weight * silu(z)`. Statistics are per group of `group_size` channels. Runs as one autograd
    Function with a hand-written, row-blocked backward (`ssd4rec_torchrec.ops.norm`).
    """
    return fused_gated_rms_norm(x, weight, z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)


class GatedRMSNorm(nn.Module):
    """Module form of `gated_rms_norm`; same parameter layout as `mamba_ssm`'s `RMSNormGated` (`weight`)."""

    def __init__(
        self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None, norm_before_gate: bool = True
    ) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = hidden_size if group_size is None else group_size
        if hidden_size % self.group_size:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of group_size {self.group_size}")
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return gated_rms_norm(
            x, self.weight, z, eps=self.eps, group_size=self.group_size, norm_before_gate=self.norm_before_gate
        )


class SSDMixer(nn.Module):
    """Mamba-2 block body on packed sequences: `forward(x (T, d_model), offsets (S+1,)) -> (T, d_model)`.

    State (conv window and SSM state) resets at every segment start, so packing several sequences
    together gives the same result as running each alone. Arguments mirror `mamba_ssm.Mamba2`
    (`chunk_size` and `kernel` are forwarded to `ssd4rec_torchrec.ops.ssd_scan`).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * d_model
        self.headdim = headdim
        self.ngroups = ngroups
        if self.d_inner % headdim:
            raise ValueError(f"d_inner={self.d_inner} must be a multiple of headdim={headdim}")
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"nheads={self.nheads} must be a multiple of ngroups={ngroups}")
        self.D_has_hdim = D_has_hdim
        self.rmsnorm = rmsnorm
        self.norm_before_gate = norm_before_gate
        self.chunk_size = chunk_size
        self.kernel = kernel

        # Order of the projection: [z, x, B, C, dt] (exactly Mamba2's).
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias)
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        # Kept as nn.Conv1d only for the parameter layout/init Mamba2 uses; forward calls the varlen op.
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, kernel_size=d_conv, groups=self.conv_dim, padding=d_conv - 1, bias=conv_bias
        )

        # dt_bias = softplus^{-1}(dt), dt log-uniform in [dt_min, dt_max], floored (Mamba2 init).
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = torch.clamp(dt, min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        if not (0 < A_init_range[0] <= A_init_range[1]):
            raise ValueError(f"bad A_init_range {A_init_range}")
        A = torch.empty(self.nheads, dtype=torch.float32).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner if D_has_hdim else self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # same marker Mamba2 sets

        if rmsnorm:
            self.norm = GatedRMSNorm(
                self.d_inner, eps=1e-5, group_size=self.d_inner // ngroups, norm_before_gate=norm_before_gate
            )
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Mix tokens within each segment `offsets[s]:offsets[s+1]` of the flat input `x` (T, d_model)."""
        return self.project_out(self.mix(self.project_in(x), offsets))

    # The three stages of `forward`, public so that `BiSSDLayer` can run the per-token projections once for
    # both directions of a shared mixer (they commute with the token reversal) and only the core twice.

    def project_in(self, x: torch.Tensor) -> torch.Tensor:
        """`in_proj`: (T, d_model) -> (T, d_in_proj) `[z, x, B, C, dt]`, in the caller's (autocast) dtype."""
        return self.in_proj(x)

    def mix(self, zxbcdt: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Conv + SiLU, SSD scan with D skip and gated norm: `project_in` output -> (T, d_inner).

        Computed and returned in fp32 (float64 stays float64) whatever the autocast dtype: the scan
        exponentiates cumulative sums of dt*A, which bf16 cannot resolve (Mamba's kernels also compute
        conv, scan and norm in fp32 and only store activations in low precision).
        """
        return self.mix_parts(*torch.split(zxbcdt, self.split_sizes, dim=-1), offsets)

    @property
    def split_sizes(self) -> list[int]:
        """Column widths of `project_in`'s output: `[z, xBC, dt]`."""
        return [self.d_inner, self.conv_dim, self.nheads]

    def mix_parts(self, z: torch.Tensor, xBC: torch.Tensor, dt: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """`mix` on the three column blocks of `project_in`'s output (callers that produce them as separate
        tensors avoid autograd concatenating their gradients)."""
        T = z.shape[0]
        dtype = torch.promote_types(z.dtype, torch.float32)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z, xBC, dt = z.to(dtype), xBC.to(dtype), dt.to(dtype)
            conv_b = None if self.conv1d.bias is None else self.conv1d.bias.to(dtype)
            # (conv_dim, d_conv); column -1 multiplies the current token, as in causal_conv1d. Returned as the
            # [x, B, C] column blocks (the conv's backward joins their gradients itself).
            xs, B, C = varlen_causal_conv1d(
                xBC, self.conv1d.weight.to(dtype).squeeze(1), conv_b, offsets, activation="silu", kernel=self.kernel,
                split=[self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state],
            )
            dt = F.softplus(dt + self.dt_bias.to(dtype))
            A = -torch.exp(self.A_log.to(dtype))
            D = self.D.to(dtype).view(self.nheads, self.headdim) if self.D_has_hdim else self.D.to(dtype)
            y = ssd_scan(
                xs.reshape(T, self.nheads, self.headdim),
                dt,
                A,
                B.reshape(T, self.ngroups, self.d_state),
                C.reshape(T, self.ngroups, self.d_state),
                offsets,
                D=D,
                chunk_size=self.chunk_size,
                kernel=self.kernel,
            ).reshape(T, self.d_inner)
            return self.norm(y, z) if self.rmsnorm else y * F.silu(z)

    def mix_prefix_reverse(self, zxbcdt: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The reverse-time scan of every prefix ``s..t`` read at its end, placed at t: `project_in` output ->
        (T, d_inner), fp32 like `mix`.

        Row t equals row t of `mix` run on the reversed prefix ``t, t-1, .., s`` (each segment on its own):
        what an un-flipped backward branch gives the read-out token of the history ``s..t``. It depends only
        on tokens up to t, for every t at once in linear time (`ops.prefix_reverse_scan`); the gate is token
        s's ``z``, the token the reverse scan ends on.
        """
        z, xBC, dt = torch.split(zxbcdt, self.split_sizes, dim=-1)
        T = z.shape[0]
        dtype = torch.promote_types(z.dtype, torch.float32)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z, xBC, dt = z.to(dtype), xBC.to(dtype), dt.to(dtype)
            conv_b = None if self.conv1d.bias is None else self.conv1d.bias.to(dtype)
            D = self.D.to(dtype).view(self.nheads, self.headdim) if self.D_has_hdim else self.D.to(dtype)
            y = prefix_reverse_scan(
                xBC, self.conv1d.weight.to(dtype).squeeze(1), conv_b, F.softplus(dt + self.dt_bias.to(dtype)),
                -torch.exp(self.A_log.to(dtype)), D, offsets, nheads=self.nheads, ngroups=self.ngroups,
                d_state=self.d_state,
            ).reshape(T, self.d_inner)
            z_first = z[offsets[:-1][segment_ids(offsets, T)]]
            return self.norm(y, z_first) if self.rmsnorm else y * F.silu(z_first)

    def project_out(self, y: torch.Tensor, bias_scale: float = 1.0) -> torch.Tensor:
        """`out_proj` (under the caller's autocast), its bias multiplied by `bias_scale`.

        `out_proj` is affine, so `out_proj(a) + beta * out_proj(b) == project_out(a + beta * b, 1 + beta)`.
        """
        if bias_scale == 1.0 or self.out_proj.bias is None:
            return self.out_proj(y)
        return F.linear(y, self.out_proj.weight, self.out_proj.bias * bias_scale)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, "
            f"headdim={self.headdim}, nheads={self.nheads}, ngroups={self.ngroups}, "
            f"chunk_size={self.chunk_size}, kernel={self.kernel!r}"
        )
