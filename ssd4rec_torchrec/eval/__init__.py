"""Evaluation: full-ranking target ranks under the RecBole (unfiltered) and HSTU (filtered) protocols."""

from .metrics import (
    DEFAULT_KS,
    PROTOCOLS,
    RankingMetrics,
    evaluate_protocols,
    evaluate_scores,
    popularity_scores,
    ranks_from_scores,
    score_ranks,
    target_ranks,
)

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
