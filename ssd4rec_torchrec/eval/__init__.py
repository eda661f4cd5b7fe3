"""Evaluation: full-ranking target ranks under the RecBole (unfiltered) and HSTU (filtered) protocols.

The ranking kernels live in ``ssd4rec_torchrec.ops.ranking``; they are re-exported here with the metrics.
"""

from ..ops.ranking import PROTOCOLS, ranks_from_scores, score_ranks, target_ranks
from .metrics import DEFAULT_KS, RankingMetrics, evaluate_protocols, evaluate_scores, popularity_scores

__all__ = [
    "DEFAULT_KS",
    "PROTOCOLS",
    "RankingMetrics",
    "evaluate_protocols",
    "evaluate_scores",
    "popularity_scores",
    "ranks_from_scores",
    "score_ranks",
    "target_ranks",
]
