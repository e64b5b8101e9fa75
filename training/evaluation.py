"""Retrieval evaluation on held-out duplicate tickets (the ../shared/DATA.md protocol).

corpus: every document of the dataset, text = title + newline + body; queries:
every member of a TEST duplicate cluster, its relevant documents the other
members; the query itself is removed from its own result list. Metrics are
binary-relevance Recall@1/5/10, MRR@10, nDCG@10 and MAP@100, averaged over
queries. The same code serves the training run's before/after table, the
search evaluation page and `python -m bench quality`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from training.corpus import MAX_EMBED_CHARS, ticket_links, ticket_text
from training.fusion import reciprocal_rank_fusion
from training.models import Dataset, Document
from training.pairs import Ticket, duplicate_clusters, split_clusters

RANK_DEPTH = 100
METRIC_NAMES = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "map@100")


@dataclass
class EvalSet:
    """Documents in id order plus the queries (document ids) and their relevant ids."""

    doc_ids: list[int]
    texts: list[str]
    queries: list[int]
    relevant: dict[int, set[int]]
    keys: dict[int, str] = field(default_factory=dict)

    @property
    def position(self) -> dict[int, int]:
        return {doc_id: i for i, doc_id in enumerate(self.doc_ids)}


def ticket_eval_set(*, dataset: Dataset, split: str = "test") -> EvalSet:
    """Queries from the TEST (or TRAIN) duplicate clusters of a ticket dataset."""
    rows = list(
        Document.objects.filter(dataset=dataset).order_by("id").values_list("id", "external_key", "title", "body", "metadata")
    )
    tickets = [
        Ticket(
            key=key,
            title=title,
            body=body,
            links=ticket_links(metadata),
        )
        for _, key, title, body, metadata in rows
    ]
    train, test = split_clusters(duplicate_clusters(tickets))
    clusters = test if split == "test" else train
    id_of = {key: doc_id for doc_id, key, *_ in rows}
    relevant: dict[int, set[int]] = {}
    for cluster in clusters:
        ids = {id_of[key] for key in cluster}
        for doc_id in ids:
            relevant[doc_id] = ids - {doc_id}
    return EvalSet(
        doc_ids=[r[0] for r in rows],
        texts=[ticket_text(title, body) for _, _, title, body, _ in rows],
        queries=sorted(relevant),
        relevant=relevant,
        keys={doc_id: key for doc_id, key, *_ in rows},
    )


# --- metrics --------------------------------------------------------------------


def query_metrics(ranked: Sequence[int], relevant: set[int]) -> dict[str, float]:
    """Binary-relevance metrics of one ranked list (query already removed)."""
    out: dict[str, float] = {}
    if not relevant:
        return {name: 0.0 for name in METRIC_NAMES}
    for k in (1, 5, 10):
        out[f"recall@{k}"] = len(relevant.intersection(ranked[:k])) / len(relevant)
    rr = 0.0
    for i, doc in enumerate(ranked[:10], start=1):
        if doc in relevant:
            rr = 1.0 / i
            break
    out["mrr@10"] = rr
    dcg = sum(1.0 / math.log2(i + 1) for i, doc in enumerate(ranked[:10], start=1) if doc in relevant)
    ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(len(relevant), 10) + 1))
    out["ndcg@10"] = dcg / ideal
    hits, precision_sum = 0, 0.0
    for i, doc in enumerate(ranked[:RANK_DEPTH], start=1):
        if doc in relevant:
            hits += 1
            precision_sum += hits / i
    out["map@100"] = precision_sum / min(len(relevant), RANK_DEPTH)
    return out


@dataclass
class EvalResult:
    metrics: dict[str, float]
    per_query: dict[int, dict[str, float]]
    rankings: dict[int, list[int]]

    def summary(self) -> dict[str, float]:
        return {name: round(value, 4) for name, value in self.metrics.items()}


def evaluate(rankings: dict[int, list[int]], eval_set: EvalSet) -> EvalResult:
    per_query = {}
    for query in eval_set.queries:
        ranked = [doc for doc in rankings.get(query, []) if doc != query]
        per_query[query] = query_metrics(ranked, eval_set.relevant[query])
    n = max(len(per_query), 1)
    metrics = {name: sum(m[name] for m in per_query.values()) / n for name in METRIC_NAMES}
    metrics["queries"] = len(per_query)
    return EvalResult(metrics=metrics, per_query=per_query, rankings=rankings)


# --- systems --------------------------------------------------------------------


def encode_corpus(model, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """Normalized float32 embeddings of texts, encoded longest first (less padding)."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    encoded = model.encode(
        # Same truncation as the embedding job: a run's evaluation vectors become the version's stored vectors.
        [texts[i][:MAX_EMBED_CHARS] for i in order], batch_size=batch_size, normalize_embeddings=True,
        convert_to_numpy=True,
    )
    out = np.empty_like(encoded)
    out[order] = encoded
    return out.astype(np.float32)


def vector_rankings(
    *, embeddings: np.ndarray, eval_set: EvalSet, queries: Iterable[int] | None = None, limit: int = RANK_DEPTH,
    query_embeddings: np.ndarray | None = None,
) -> dict[int, list[int]]:
    """Exact cosine kNN; a query's vector is its own document's embedding.

    query_embeddings (same rows as `embeddings`) takes the queries' vectors from
    another encoder, e.g. fp32 queries against int8 document vectors, as search does.
    """
    position = eval_set.position
    query_matrix = embeddings if query_embeddings is None else query_embeddings
    query_ids = list(queries if queries is not None else eval_set.queries)
    out: dict[int, list[int]] = {}
    doc_ids = np.asarray(eval_set.doc_ids)
    for start in range(0, len(query_ids), 256):
        chunk = query_ids[start : start + 256]
        scores = query_matrix[[position[q] for q in chunk]] @ embeddings.T
        top = np.argpartition(-scores, kth=min(limit + 1, scores.shape[1] - 1), axis=1)[:, : limit + 1]
        for row, query in enumerate(chunk):
            best = top[row][np.argsort(-scores[row, top[row]])]
            out[query] = doc_ids[best].tolist()
    return out


def fuse(*rankings: dict[int, list[int]], k: int = 60) -> dict[int, list[int]]:
    """RRF of several systems' rankings, query by query."""
    queries = set().union(*(r.keys() for r in rankings))
    return {q: [doc for doc, _ in reciprocal_rank_fusion([r.get(q, []) for r in rankings], k=k)] for q in queries}


# --- scored rankings and fusion tuning (search) ---------------------------------


def vector_scored_rankings(
    *, embeddings: np.ndarray, eval_set: EvalSet, queries: Iterable[int] | None = None, limit: int = RANK_DEPTH
) -> dict[int, list[tuple[int, float]]]:
    """vector_rankings() with cosine similarities (exact kNN), the query removed."""
    position = eval_set.position
    query_ids = list(queries if queries is not None else eval_set.queries)
    doc_ids = np.asarray(eval_set.doc_ids)
    out: dict[int, list[tuple[int, float]]] = {}
    for start in range(0, len(query_ids), 256):
        chunk = query_ids[start : start + 256]
        scores = embeddings[[position[q] for q in chunk]] @ embeddings.T
        kth = min(limit + 1, scores.shape[1] - 1)
        top = np.argpartition(-scores, kth=kth, axis=1)[:, : kth + 1]
        for row, query in enumerate(chunk):
            best = top[row][np.argsort(-scores[row, top[row]], kind="stable")]
            ranked = [(int(doc_ids[i]), float(scores[row, i])) for i in best if doc_ids[i] != query]
            out[query] = ranked[:limit]
    return out


def sample_queries(queries: Sequence[int], max_queries: int | None) -> list[int]:
    """An evenly spaced, deterministic subset (all of them when max_queries is None)."""
    queries = list(queries)
    if max_queries is None or len(queries) <= max_queries:
        return queries
    step = len(queries) / max_queries
    return [queries[int(i * step)] for i in range(max_queries)]


def hybrid_systems(
    keyword: dict[int, list[tuple[int, float]]],
    vector: dict[int, list[tuple[int, float]]],
    *,
    fusions: Sequence[dict],
) -> dict[str, dict[int, list[int]]]:
    """Rankings of keyword-only, vector-only and each fusion ({"method", "rrf_k"|"alpha"})."""
    from training.fusion import weighted_score_fusion

    queries = set(keyword) | set(vector)
    systems: dict[str, dict[int, list[int]]] = {
        "keyword": {q: [d for d, _ in keyword.get(q, [])] for q in queries},
        "vector": {q: [d for d, _ in vector.get(q, [])] for q in queries},
    }
    for fusion in fusions:
        if fusion["method"] == "rrf":
            name = f"rrf k={fusion['rrf_k']}"
            systems[name] = fuse(systems["keyword"], systems["vector"], k=fusion["rrf_k"])
        else:
            name = f"weighted alpha={fusion['alpha']:.1f}"
            systems[name] = {
                q: [d for d, _ in weighted_score_fusion(keyword.get(q, []), vector.get(q, []), alpha=fusion["alpha"])]
                for q in queries
            }
    return systems


# --- BM25 over the stored tsvectors ----------------------------------------------

BM25_K1 = 1.2
BM25_B = 0.75
_LEXEME = re.compile(r"'((?:[^']|'')*)':([0-9A-D,]+)")


def _term_counts(tsvector_text: str) -> dict[str, int]:
    """Lexeme -> occurrences from a tsvector's text form ('word':1,5A 'other':3B)."""
    return {m.group(1).replace("''", "'"): m.group(2).count(",") + 1 for m in _LEXEME.finditer(tsvector_text or "")}


def _bm25_matrices(dataset: Dataset):
    """(term counts per document as CSR, BM25 term weights per document as CSC), rows in id order."""
    from scipy import sparse

    rows = Document.objects.filter(dataset=dataset).order_by("id").values_list("id", "search_vector")
    vocabulary: dict[str, int] = {}
    data, indices, indptr, lengths = [], [], [0], []
    for _, vector in rows.iterator(chunk_size=5000):
        counts = _term_counts(str(vector) if vector is not None else "")
        for term, count in counts.items():
            indices.append(vocabulary.setdefault(term, len(vocabulary)))
            data.append(count)
        indptr.append(len(indices))
        lengths.append(sum(counts.values()))
    tf = sparse.csr_matrix((np.asarray(data, dtype=np.float32), indices, indptr), shape=(len(lengths), len(vocabulary)))
    n_docs = tf.shape[0]
    df = np.bincount(tf.indices, minlength=tf.shape[1])
    idf = np.log(1 + (n_docs - df + 0.5) / (df + 0.5)).astype(np.float32)
    lengths_arr = np.asarray(lengths, dtype=np.float32)
    norm = BM25_K1 * (1 - BM25_B + BM25_B * lengths_arr / max(lengths_arr.mean(), 1e-6))
    weighted = tf.tocoo()
    scores_data = weighted.data * (BM25_K1 + 1) / (weighted.data + norm[weighted.row])
    term_weights = sparse.csr_matrix((scores_data * idf[weighted.col], (weighted.row, weighted.col)), shape=tf.shape)
    return tf, term_weights.tocsc()


def bm25_rankings(
    *, dataset: Dataset, eval_set: EvalSet, queries: Iterable[int] | None = None, limit: int = RANK_DEPTH
) -> dict[int, list[int]]:
    """Okapi BM25 (k1 1.2, b 0.75) with PostgreSQL's own stemming and stop words.

    Term counts come from the documents' stored tsvectors (title and body), so
    the keyword baseline tokenizes exactly like the product's full-text index;
    the query is the query document's own lexemes. This is the BM25-class
    system ../shared/DATA.md's keyword figure uses, which ts_rank over an OR of
    a whole ticket's lexemes is not.
    """
    position = eval_set.position
    tf, term_weights = _bm25_matrices(dataset)
    n_docs = tf.shape[0]
    doc_ids = np.asarray(eval_set.doc_ids)
    out: dict[int, list[int]] = {}
    for query in queries if queries is not None else eval_set.queries:
        row = position[query]
        terms = tf.indices[tf.indptr[row] : tf.indptr[row + 1]]
        scores = np.asarray(term_weights[:, terms].sum(axis=1)).ravel()
        top = np.argpartition(-scores, kth=min(limit + 1, n_docs - 1))[: limit + 1]
        best = top[np.argsort(-scores[top], kind="stable")]
        out[query] = [int(doc_ids[i]) for i in best if scores[i] > 0]
    return out


def bm25_scored_rankings(
    *, dataset: Dataset, eval_set: EvalSet, queries: Iterable[int] | None = None, limit: int = RANK_DEPTH
) -> dict[int, list[tuple[int, float]]]:
    """bm25_rankings() with the BM25 scores (query removed), for score fusion in search tuning.

    The same Okapi BM25 over the stored tsvectors (shared _bm25_matrices).
    ts_rank_cd over an OR of a whole ticket's lexemes
    scored nDCG@10 0.008 on the Hadoop validation queries at 2.6 s a query;
    this takes seconds for all of them.
    """
    position = eval_set.position
    tf, term_weights = _bm25_matrices(dataset)
    n_docs = tf.shape[0]
    doc_ids = np.asarray(eval_set.doc_ids)
    out: dict[int, list[tuple[int, float]]] = {}
    for query in queries if queries is not None else eval_set.queries:
        row = position[query]
        terms = tf.indices[tf.indptr[row] : tf.indptr[row + 1]]
        scores = np.asarray(term_weights[:, terms].sum(axis=1)).ravel()
        scores[row] = 0.0  # the query itself
        top = np.argpartition(-scores, kth=min(limit, n_docs - 1))[: limit + 1]
        best = top[np.argsort(-scores[top], kind="stable")]
        out[query] = [(int(doc_ids[i]), float(scores[i])) for i in best if scores[i] > 0][:limit]
    return out
