"""Rank fusion: reciprocal rank fusion and weighted score fusion of two rankings.

Pure functions shared by served hybrid search (search.hybrid) and the
held-out evaluation of a training run (training.evaluation), which reports
hybrid with each model; they live in training because training never
imports search.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from training import priors as ticket_priors

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


# alpha of weighted fusion when none is given: the middle (Weaviate's default
# too); an index's tuned alpha (search.tuning.tune_fusion) replaces it.
DEFAULT_ALPHA = 0.5


def _min_max(scored: Sequence[tuple[Hashable, float]]) -> dict[Hashable, float]:
    """Scores rescaled to [0, 1] within one list; a list of equal scores maps to 1."""
    return dict(zip((item for item, _ in scored), ticket_priors.min_max([s for _, s in scored])))


def weighted_score_fusion(
    keyword: Sequence[tuple[Hashable, float]], vector: Sequence[tuple[Hashable, float]], *, alpha: float = DEFAULT_ALPHA
) -> list[tuple[Hashable, float]]:
    """Convex combination of min-max normalised scores: alpha * vector + (1 - alpha) * keyword.

    Each side's scores are normalised over its own candidates (Weaviate's
    "relative score fusion"); a document missing from one side gets 0 there.
    alpha = 1 is vector-only, alpha = 0 keyword-only. Ties keep first-seen order.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    kw, vec = _min_max(keyword), _min_max(vector)
    order: dict[Hashable, int] = {}
    for item, _ in list(keyword) + list(vector):
        order.setdefault(item, len(order))
    fused = {item: alpha * vec.get(item, 0.0) + (1.0 - alpha) * kw.get(item, 0.0) for item in order}
    return sorted(fused.items(), key=lambda kv: (-kv[1], order[kv[0]]))


def fuse_scored(
    keyword: Sequence[tuple[Hashable, float]], vector: Sequence[tuple[Hashable, float]], *, fusion: dict,
    query_facts: ticket_priors.Facts | None = None, facts: Mapping[Hashable, ticket_priors.Facts] | None = None,
) -> list[tuple[Hashable, float]]:
    """Two scored rankings fused as `fusion` says ({"method": "rrf", "rrf_k"} or {"method": "weighted", "alpha"}).

    A fusion with a "prior" (training.priors weights) re-orders the fused list
    by its min-max score plus each candidate's prior against `query_facts`
    (the query ticket's fields; `facts` the candidates'). Without query facts
    (a free-text query) the prior is left out.
    """
    if fusion["method"] == "rrf":
        fused = reciprocal_rank_fusion([[d for d, _ in keyword], [d for d, _ in vector]], k=fusion["rrf_k"])
    else:
        fused = weighted_score_fusion(keyword, vector, alpha=fusion["alpha"])
    weights = fusion.get("prior")
    if query_facts is None or not ticket_priors.is_active(weights):
        return fused
    unknown = ticket_priors.Facts()
    values = [ticket_priors.prior(query_facts, (facts or {}).get(item, unknown), weights) for item, _ in fused]
    return ticket_priors.rerank(fused, values)


# --- The fusions an index may serve, and how one is chosen ------------------------------

# Tried on the tuning queries, RRF k=60 first so it wins ties. The run's held-out
# evaluation (its `served` row) and search.tuning (the index's default) both pick
# from these with training.evaluation.choose_fusion, so the run page shows what
# the index will serve.
FUSION_CANDIDATES = (
    [{"method": "rrf", "rrf_k": 60}, {"method": "rrf", "rrf_k": 20}]
    + [{"method": "weighted", "alpha": a / 10} for a in range(1, 10)]
)
TUNING_METRIC = "ndcg@10"
# What fusion is tuned on, in words (the run page and the index's tuning record say it).
TUNING_SPLIT = "validation: TRAIN duplicate clusters none of whose tickets the model trained on"
# Tuning queries at most (an evenly spaced sample): each is ~10 ms of BM25 plus a kNN.
TUNING_MAX_QUERIES = 300


# How much of the learned prior (training.priors) joins a fusion: each scale is tried with each
# fusion above on the tuning queries; no prior (the plain fusion) comes first and wins ties.
PRIOR_SCALES = (0.5, 1.0, 1.5)


def with_prior(fusion: dict, weights: Mapping[str, float], scale: float) -> dict:
    """`fusion` plus the prior `weights` scaled by `scale` (rounded: they are shown and stored)."""
    return {**fusion, "prior": {name: round(float(weights.get(name, 0.0)) * scale, 4)
                                for name in ticket_priors.FEATURES}}


def fusion_name(fusion: dict) -> str:
    """'rrf k=60', 'weighted alpha=0.5' or 'weighted alpha=0.5 + prior (filed 0.8, ...)': a row name in tables."""
    if fusion["method"] == "rrf":
        name = f"rrf k={fusion['rrf_k']}"
    else:
        name = f"weighted alpha={fusion['alpha']:.1f}"
    if ticket_priors.is_active(fusion.get("prior")):
        name += f" + prior ({ticket_priors.describe(fusion['prior'])})"
    return name
