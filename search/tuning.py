"""Fusion tuning and search evaluation on held-out tickets, each run as an IndexJob.

Both replay the ../shared/DATA.md protocol over the index's stored vectors
(query by document, no encoding) and BM25 over the stored tsvectors; their
tables are stored on the job row, so a page shows the last result.
"""

from __future__ import annotations

import time
from typing import Any

from django.utils import timezone

import numpy as np

from search import index_jobs
from training.fusion import RRF_K
from search.hybrid import SearchError, resolve_fusion
from search.models import Embedding, IndexJob, SearchIndex
from training import evaluation

# Fusions tried on the validation split, RRF k=60 first so it wins ties.
FUSION_CANDIDATES = (
    [{"method": "rrf", "rrf_k": 60}, {"method": "rrf", "rrf_k": 20}]
    + [{"method": "weighted", "alpha": a / 10} for a in range(1, 10)]
)
# Validation queries used for tuning, and held-out queries the evaluation
# page runs by default. The keyword half of these query-by-document runs is
# BM25 over the stored tsvectors (evaluation.bm25_scored_rankings, the
# DATA.md keyword baseline): building its matrix takes ~10-20 s for 20k
# tickets, each query then ~10 ms.
TUNING_MAX_QUERIES = 300
EVALUATION_MAX_QUERIES = 200
# The most held-out queries one evaluation may replay (each ~10 ms plus BM25's matrix).
MAX_EVALUATION_QUERIES = 5000
TUNING_METRIC = "ndcg@10"


def _fusion_name(fusion: dict[str, Any]) -> str:
    if fusion["method"] == "rrf":
        return f"rrf k={fusion['rrf_k']}"
    return f"weighted alpha={fusion['alpha']:.1f}"


def _system_table(
    *, index: SearchIndex, split: str, max_queries: int | None, fusions: list[dict[str, Any]]
) -> tuple[dict[str, dict[str, float]], int]:
    """Metrics of keyword, vector and each fusion on a split's queries (DATA.md protocol)."""
    eval_set = evaluation.ticket_eval_set(dataset=index.dataset, split=split)
    queries = evaluation.sample_queries(eval_set.queries, max_queries)
    if not queries:
        return {}, 0
    eval_set.queries = queries
    keyword = evaluation.bm25_scored_rankings(dataset=index.dataset, eval_set=eval_set, queries=queries)
    embeddings = index_embeddings(eval_set=eval_set, model_version_id=index.model_version_id)
    vector = evaluation.vector_scored_rankings(embeddings=embeddings, eval_set=eval_set, queries=queries)
    systems = evaluation.hybrid_systems(keyword, vector, fusions=fusions)
    return {name: evaluation.evaluate(r, eval_set).summary() for name, r in systems.items()}, len(queries)


def tune_fusion(*, index: SearchIndex, max_queries: int | None = TUNING_MAX_QUERIES) -> dict[str, Any]:
    """Pick the index's default fusion by nDCG@10 on the validation split and record it.

    Validation = the TRAIN duplicate clusters of ../shared/DATA.md (the TEST
    clusters stay unseen). Side effects: writes SearchIndex.fusion. An index
    whose dataset has no TRAIN duplicate clusters keeps RRF k=60, recorded
    with the reason.
    """
    if index.status != SearchIndex.Status.READY:
        raise SearchError(f"This index is {index.status}: tuning needs a ready index.")
    started = time.perf_counter()
    table, n_queries = _system_table(
        index=index, split="train", max_queries=max_queries, fusions=list(FUSION_CANDIDATES)
    )
    if not n_queries:
        fusion = {
            "method": "rrf", "rrf_k": RRF_K, "tuned": False,
            "reason": "The dataset has no duplicate clusters in the validation split; RRF k=60 is used untuned.",
        }
    else:
        best = max(FUSION_CANDIDATES, key=lambda f: table[_fusion_name(f)][TUNING_METRIC])
        fusion = {
            **best, "tuned": True, "metric": TUNING_METRIC, "split": "validation (TRAIN duplicate clusters)",
            "queries": n_queries, "systems": table, "seconds": round(time.perf_counter() - started, 1),
            "tuned_at": timezone.now().isoformat(timespec="seconds"),
        }
    SearchIndex.objects.filter(pk=index.pk).update(fusion=fusion)
    index.fusion = fusion
    return fusion


def start_tuning(*, index: SearchIndex, owner) -> IndexJob:
    """Queue fusion tuning of a ready index (a job: ~10-25 s for 20k tickets)."""
    return index_jobs.start(index=index, owner=owner, kind=IndexJob.Kind.TUNING,
                            params={"max_queries": TUNING_MAX_QUERIES})


def start_evaluation(*, index: SearchIndex, owner, max_queries: int | None = EVALUATION_MAX_QUERIES) -> IndexJob:
    """Queue a held-out evaluation of a ready index; max_queries None means every held-out query."""
    if max_queries is not None and not 1 <= max_queries <= MAX_EVALUATION_QUERIES:
        raise SearchError(f"queries: must be between 1 and {MAX_EVALUATION_QUERIES}, got {max_queries}.")
    return index_jobs.start(index=index, owner=owner, kind=IndexJob.Kind.EVALUATION, params={"max_queries": max_queries})


def latest(*, index: SearchIndex, kind: str) -> IndexJob | None:
    return index.jobs.filter(kind=kind).order_by("-created_at", "-id").first()


def evaluate_search(*, index: SearchIndex, max_queries: int | None = EVALUATION_MAX_QUERIES) -> dict[str, Any]:
    """Held-out (TEST cluster) queries through keyword, vector and the index's hybrid: the metric table.

    Reads only; the page shows it and nothing is stored. Query-by-document as
    in ../shared/DATA.md: a held-out ticket's text is the query.
    """
    if index.status != SearchIndex.Status.READY:
        raise SearchError(f"This index is {index.status}: evaluation needs a ready index.")
    started = time.perf_counter()
    default = resolve_fusion(index=index)
    table, n_queries = _system_table(index=index, split="test", max_queries=max_queries, fusions=[default])
    if not n_queries:
        return {"queries": 0, "systems": {},
                "message": "This dataset has no held-out duplicate clusters, so there is nothing to evaluate on."}
    table["hybrid"] = table.pop(_fusion_name(default))
    return {
        "queries": n_queries, "fusion": default, "systems": table,
        "seconds": round(time.perf_counter() - started, 1), "metrics": list(evaluation.METRIC_NAMES),
    }


def index_embeddings(*, eval_set: evaluation.EvalSet, model_version_id: int) -> np.ndarray:
    """The stored vectors of a version, in eval_set.doc_ids order (zeros where missing)."""
    position = eval_set.position
    out: np.ndarray | None = None
    rows = Embedding.objects.filter(model_version_id=model_version_id, document_id__in=eval_set.doc_ids)
    for doc_id, vector in rows.values_list("document_id", "embedding").iterator(chunk_size=2000):
        vector = np.asarray(vector, dtype=np.float32)
        if out is None:
            out = np.zeros((len(eval_set.doc_ids), vector.shape[0]), dtype=np.float32)
        out[position[doc_id]] = vector
    if out is None:
        raise ValueError("this model version has no stored vectors for the dataset")
    return out


