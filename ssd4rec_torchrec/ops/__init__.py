"""Pure-torch sequence ops for packed variable-length histories (optional mamba-ssm / causal-conv1d kernels).

Never imports torchrec; mamba-ssm and causal-conv1d are imported lazily, only when a kernel is requested.
"""

from ssd4rec_torchrec.ops.conv import causal_conv1d_available, varlen_causal_conv1d
from ssd4rec_torchrec.ops.norm import fused_gated_rms_norm
from ssd4rec_torchrec.ops.prefix_reverse import prefix_reverse_scan
from ssd4rec_torchrec.ops.segments import (
    offsets_from_lengths,
    reverse_segments_index,
    segment_ids,
    segment_positions,
    validate_offsets,
)
from ssd4rec_torchrec.ops.ssd import mamba_ssd_available, ssd_scan

__all__ = [
    "causal_conv1d_available",
    "fused_gated_rms_norm",
    "mamba_ssd_available",
    "offsets_from_lengths",
    "prefix_reverse_scan",
    "reverse_segments_index",
    "segment_ids",
    "segment_positions",
    "ssd_scan",
    "validate_offsets",
    "varlen_causal_conv1d",
]
