"""Pure-torch sequence ops for packed variable-length histories (optional mamba-ssm / causal-conv1d kernels).

Also the exact full-ranking kernels (canonical float64 scores, pessimistic target ranks, top-k) the evaluator
and the serving index share. Never imports torchrec; mamba-ssm and causal-conv1d are imported lazily, only when a
kernel is requested.
"""

from ssd4rec_torchrec.ops.canonical import canonical_scores, canonical_target_scores
from ssd4rec_torchrec.ops.conv import causal_conv1d_available, varlen_causal_conv1d
from ssd4rec_torchrec.ops.norm import fused_gated_rms_norm
from ssd4rec_torchrec.ops.prefix_reverse import prefix_reverse_scan
from ssd4rec_torchrec.ops.ranking import (
    PROTOCOLS,
    block_rank_counts,
    finish_ranks,
    ranks_from_scores,
    score_ranks,
    target_ranks,
)
from ssd4rec_torchrec.ops.segments import (
    offsets_from_lengths,
    reverse_segments_index,
    segment_ids,
    segment_positions,
    validate_offsets,
)
from ssd4rec_torchrec.ops.ssd import mamba_ssd_available, ssd_scan
from ssd4rec_torchrec.ops.topk import block_topk, merge_topk

__all__ = [
    "PROTOCOLS",
    "block_rank_counts",
    "block_topk",
    "canonical_scores",
    "canonical_target_scores",
    "causal_conv1d_available",
    "finish_ranks",
    "fused_gated_rms_norm",
    "mamba_ssd_available",
    "merge_topk",
    "offsets_from_lengths",
    "prefix_reverse_scan",
    "ranks_from_scores",
    "reverse_segments_index",
    "score_ranks",
    "segment_ids",
    "segment_positions",
    "ssd_scan",
    "target_ranks",
    "validate_offsets",
    "varlen_causal_conv1d",
]
