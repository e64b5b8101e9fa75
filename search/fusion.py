"""Rank fusion for hybrid search."""

from __future__ import annotations

from typing import Hashable, Sequence

# k=60 is the constant of Cormack et al. (2009) and the default of
# Elasticsearch/OpenSearch RRF.
RRF_K = 60


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hashable]], *, k: int = RRF_K) -> list[tuple[Hashable, float]]:
    """Fuse ranked id lists: score(d) = sum over lists of 1 / (k + rank), rank from 1.

    Ties keep the order in which ids were first seen, so the result is stable.
    """
    scores: dict[Hashable, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    order = {item: i for i, item in enumerate(scores)}
    return sorted(scores.items(), key=lambda kv: (-kv[1], order[kv[0]]))
