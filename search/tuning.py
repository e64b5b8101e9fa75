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
from search.hybrid import SearchError, resolve_fusion
from search.models import Embedding, IndexJob, SearchIndex
from training import evaluation
from training.fusion import FUSION_CANDIDATES, RRF_K, TUNING_MAX_QUERIES, TUNING_METRIC, TUNING_SPLIT, fusion_name

# Held-out queries the evaluation page runs by default. The keyword half of
# these query-by-document runs is BM25 over the stored tsvectors
# (evaluation.bm25_scored_rankings, the DATA.md keyword baseline): building
# its matrix takes ~10-20 s for 20k tickets, each query then ~10 ms.
EVALUATION_MAX_QUERIES = 200
# The most held-out queries one evaluation may replay (each ~10 ms plus BM25's matrix).
MAX_EVALUATION_QUERIES = 5000
_fusion_name = fusion_name  # tests and older callers


def _scored_sides(*, index: SearchIndex, eval_set: evaluation.EvalSet, queries: list[int], matrices=None):
    """BM25 and the index's stored vectors, scored, for the queries (DATA.md protocol, query by document)."""
    eval_set.queries = queries
    keyword = evaluation.bm25_scored_rankings(dataset=index.dataset, eval_set=eval_set, queries=queries,
                                              matrices=matrices)
    embeddings = index_embeddings(eval_set=eval_set, model_version_id=index.model_version_id)
    vector = evaluation.vector_scored_rankings(embeddings=embeddings, eval_set=eval_set, queries=queries)
    return keyword, vector


def tune_fusion(*, index: SearchIndex, max_queries: int | None = TUNING_MAX_QUERIES) -> dict[str, Any]:
    """Pick the index's default fusion by nDCG@10 on queries its model never trained on, and record it.

    Tuning queries: the TRAIN duplicate clusters of ../shared/DATA.md none of
    whose tickets the model (or a version it continued from) trained on
    (training.evaluation.trained_keys), i.e. the run's held-out validation
    clusters; TEST clusters stay unseen. The same rule picks the run page's
    `served` row (training.heldout). Each candidate is also tried with the
    ticket prior (training.priors) whose weights evaluation.learn_prior learns
    on the TRAIN clusters with the keyword side alone. Side effects: writes
    SearchIndex.fusion, with the tuning queries' keys and the learned prior. An index with no such queries keeps RRF
    k=60, recorded with the reason.
    """
    if index.status != SearchIndex.Status.READY:
        raise SearchError(f"This index is {index.status}: tuning needs a ready index.")
    started = time.perf_counter()
    trained, source = evaluation.trained_keys(index.model_version)
    eval_set = evaluation.ticket_eval_set(dataset=index.dataset, split="tuning", trained_keys=trained)
    queries = evaluation.sample_queries(eval_set.queries, max_queries)
    if not queries:
        fusion = {
            "method": "rrf", "rrf_k": RRF_K, "tuned": False,
            "reason": "The dataset has no duplicate clusters the model did not train on (outside the TEST split); "
                      "RRF k=60 is used untuned.",
        }
    else:
        matrices = evaluation.bm25_matrices(index.dataset)
        keyword, vector = _scored_sides(index=index, eval_set=eval_set, queries=queries, matrices=matrices)
        learned = evaluation.learn_prior(dataset=index.dataset, matrices=matrices)
        best, table = evaluation.choose_fusion(keyword, vector, eval_set=eval_set, prior=learned)
        fusion = {
            **best, "tuned": True, "metric": TUNING_METRIC, "split": TUNING_SPLIT, "trained_on": source,
            "learned_prior": learned,
            "queries": len(queries), "query_keys": sorted(eval_set.keys[q] for q in queries),
            "systems": table, "seconds": round(time.perf_counter() - started, 1),
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
    """Held-out (TEST cluster) queries through keyword, vector and `served` (the index's fusion): the metric table.

    Reads only; the page shows it and nothing is stored. Query-by-document as
    in ../shared/DATA.md: a held-out ticket's text is the query.
    """
    if index.status != SearchIndex.Status.READY:
        raise SearchError(f"This index is {index.status}: evaluation needs a ready index.")
    started = time.perf_counter()
    default = resolve_fusion(index=index)
    eval_set = evaluation.ticket_eval_set(dataset=index.dataset, split="test")
    queries = evaluation.sample_queries(eval_set.queries, max_queries)
    if not queries:
        return {"queries": 0, "systems": {},
                "message": "This dataset has no held-out duplicate clusters, so there is nothing to evaluate on."}
    keyword, vector = _scored_sides(index=index, eval_set=eval_set, queries=queries)
    systems = evaluation.hybrid_systems(keyword, vector, fusions=[])
    systems["served"] = evaluation.fused_rankings(keyword, vector, fusion=default, eval_set=eval_set)
    table = {name: evaluation.evaluate(rankings, eval_set).summary() for name, rankings in systems.items()}
    return {
        "queries": len(queries), "fusion": default, "systems": table,
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


