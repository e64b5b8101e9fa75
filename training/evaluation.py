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
from typing import Any, Iterable, Sequence

import numpy as np

from training import bm25, priors
from training.corpus import MAX_EMBED_CHARS, ticket_links, ticket_text
from training.fusion import (
    FUSION_CANDIDATES, PRIOR_SCALES, TUNING_METRIC, fuse_scored, fusion_name, reciprocal_rank_fusion, with_prior,
)
from training.models import Dataset, Document
from training.pairs import Example, Ticket, answer_group, duplicate_clusters, group_split, split_clusters

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
    # Each ticket's fields for the prior (training.priors); empty for Q&A.
    facts: dict[int, priors.Facts] = field(default_factory=dict)

    @property
    def position(self) -> dict[int, int]:
        return {doc_id: i for i, doc_id in enumerate(self.doc_ids)}


def ticket_eval_set(*, dataset: Dataset, split: str = "test", trained_keys: Iterable[str] = ()) -> EvalSet:
    """Queries from the TEST (or TRAIN, or tuning) duplicate clusters of a ticket dataset.

    split "tuning": the TRAIN clusters none of whose tickets is in
    `trained_keys` (what the model's runs trained on, tuning_split_keys), so
    fusion is tuned on tickets the model never saw; TEST clusters stay unseen.
    """
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
    if split == "tuning":
        trained = set(trained_keys)
        clusters = [cluster for cluster in train if trained.isdisjoint(cluster)]
    else:
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
        facts={doc_id: priors.facts(key, metadata) for doc_id, key, _, _, metadata in rows},
    )


@dataclass
class QAEvalSet(EvalSet):
    """Q&A: the corpus is the dataset's distinct answers, the queries are held-out questions (not documents)."""

    query_texts: dict[int, str] = field(default_factory=dict)


def qa_eval_set(*, examples: Sequence[Example], seed: int) -> QAEvalSet:
    """Held-out Q&A retrieval: every question (and user paraphrase) of a TEST answer group asks for its answer.

    Groups are training.pairs.answer_group (the group column, else the
    answer), split by training.pairs.group_split with the run's seed, the
    same split the training pairs come from: a held-out question's answer
    was never trained on, under any phrasing. The corpus holds every
    distinct answer (the trained ones are distractors). Answer ids are
    0..n-1 (key "answer of <first question's key>"), query ids follow them
    (key = the question's key, "<key>~p<n>" for its n-th paraphrase).
    """
    groups: dict[str, list[Example]] = {}
    for example in examples:
        if example.body.strip():
            groups.setdefault(answer_group(example), []).append(example)
    doc_ids, texts, keys = [], [], {}
    relevant: dict[int, set[int]] = {}
    query_texts: dict[int, str] = {}
    pending: list[tuple[int, str, str]] = []
    for answer_id, (group, members) in enumerate(sorted(groups.items())):
        doc_ids.append(answer_id)
        texts.append(members[0].body)
        keys[answer_id] = f"answer of {members[0].key}"
        if group_split(group, seed=seed) != "test":
            continue
        for example in members:
            pending.append((answer_id, example.key, example.title))
            pending.extend((answer_id, f"{example.key}~p{n}", text) for n, text in enumerate(example.paraphrases, 1))
    for offset, (answer_id, key, text) in enumerate(pending):
        query = len(doc_ids) + offset
        relevant[query] = {answer_id}
        query_texts[query] = text
        keys[query] = key
    return QAEvalSet(doc_ids=doc_ids, texts=texts, queries=sorted(relevant), relevant=relevant, keys=keys,
                     query_texts=query_texts)


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


def text_query_rankings(
    *, model, eval_set: QAEvalSet, embeddings: np.ndarray, limit: int = RANK_DEPTH
) -> dict[int, list[int]]:
    """Exact cosine kNN of each query text (encoded with `model`) over the corpus embeddings."""
    queries = list(eval_set.queries)
    encoded = model.encode([eval_set.query_texts[q][:MAX_EMBED_CHARS] for q in queries], batch_size=64,
                           normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
    doc_ids = np.asarray(eval_set.doc_ids)
    scores = encoded @ embeddings.T
    kth = min(limit, scores.shape[1] - 1)
    out: dict[int, list[int]] = {}
    for row, query in enumerate(queries):
        top = np.argpartition(-scores[row], kth=kth)[: kth + 1]
        out[query] = doc_ids[top[np.argsort(-scores[row, top], kind="stable")]].tolist()[:limit]
    return out


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
        top = np.sort(np.argpartition(-scores, kth=kth, axis=1)[:, : kth + 1], axis=1)
        for row, query in enumerate(chunk):
            best = top[row][np.argsort(-scores[row, top[row]], kind="stable")]  # equal scores in id order
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
    eval_set: EvalSet | None = None,
) -> dict[str, dict[int, list[int]]]:
    """Rankings of keyword-only, vector-only and each fusion ({"method", "rrf_k"|"alpha"[, "prior"]}), by fusion_name."""
    queries = set(keyword) | set(vector)
    systems: dict[str, dict[int, list[int]]] = {
        "keyword": {q: [d for d, _ in keyword.get(q, [])] for q in queries},
        "vector": {q: [d for d, _ in vector.get(q, [])] for q in queries},
    }
    for fusion in fusions:
        systems[fusion_name(fusion)] = fused_rankings(keyword, vector, fusion=fusion, eval_set=eval_set)
    return systems


def fused_rankings(
    keyword: dict[int, list[tuple[int, float]]], vector: dict[int, list[tuple[int, float]]], *, fusion: dict,
    eval_set: EvalSet | None = None,
) -> dict[int, list[int]]:
    """Each query's two scored rankings fused the way search serves them (training.fusion.fuse_scored).

    A fusion's prior uses eval_set's ticket facts (the query ticket's against each candidate's).
    """
    facts = eval_set.facts if eval_set is not None else {}
    return {q: [d for d, _ in fuse_scored(keyword.get(q, []), vector.get(q, []), fusion=fusion,
                                          query_facts=facts.get(q), facts=facts)]
            for q in set(keyword) | set(vector)}


def choose_fusion(
    keyword: dict[int, list[tuple[int, float]]], vector: dict[int, list[tuple[int, float]]], *, eval_set: EvalSet,
    candidates: Sequence[dict] = tuple(FUSION_CANDIDATES), prior: dict | None = None,
) -> tuple[dict, dict[str, dict[str, float]]]:
    """The candidate fusion with the best TUNING_METRIC on eval_set's queries (the first wins ties), and the table.

    With a learned `prior` (learn_prior's weights), each candidate is also
    tried with the prior at each of PRIOR_SCALES; the plain candidates come
    first, so a prior joins only when it scores higher. The one rule both the
    run's `served` row and search.tuning.tune_fusion use.
    """
    candidates = list(candidates)
    if priors.is_active(prior) and eval_set.facts:
        candidates += [with_prior(f, prior, scale) for scale in PRIOR_SCALES for f in list(candidates)]
    systems = hybrid_systems(keyword, vector, fusions=candidates, eval_set=eval_set)
    table = {name: evaluate(rankings, eval_set).summary() for name, rankings in systems.items()}
    best = max(candidates, key=lambda f: table[fusion_name(f)][TUNING_METRIC])
    return dict(best), table


def learn_prior(*, dataset: Dataset, matrices: BM25Matrices | None = None) -> dict[str, Any] | None:
    """The prior's weights (training.priors) that best re-rank the keyword side on the TRAIN duplicate clusters.

    BM25 alone ranks up to priors.LEARNING_MAX_QUERIES TRAIN-cluster tickets
    (no model is involved, so what the model trained on cannot leak in); each
    weight triple of priors.weight_grid() re-orders those candidates by
    min-max BM25 + prior, and the best by TUNING_METRIC wins (the all-zero
    triple first). TEST clusters are never read. None without TRAIN queries.
    Returns {"filed", "component", "project", "queries", "keyword_ndcg",
    "with_prior_ndcg"} (nDCG@10 of the keyword side without and with the prior).
    """
    train = ticket_eval_set(dataset=dataset, split="train")
    train.queries = sample_queries(train.queries, priors.LEARNING_MAX_QUERIES)
    if not train.queries:
        return None
    keyword = bm25_scored_rankings(dataset=dataset, eval_set=train, matrices=matrices)
    prepared = []
    for query in train.queries:
        ranked = keyword.get(query, [])
        ids = [doc for doc, _ in ranked]
        normalised = np.asarray(priors.min_max([score for _, score in ranked]), dtype=np.float64)
        unknown = priors.Facts()
        feats = np.asarray([priors.features(train.facts.get(query, unknown), train.facts.get(doc, unknown))
                            for doc in ids], dtype=np.float64).reshape(len(ids), len(priors.FEATURES))
        prepared.append((query, ids, normalised, feats))
    best: tuple[float, dict[str, float]] | None = None
    baseline = 0.0
    for weights in priors.weight_grid():
        vector = np.asarray([weights[name] for name in priors.FEATURES])
        total = 0.0
        for query, ids, normalised, feats in prepared:
            order = np.argsort(-(normalised + feats @ vector), kind="stable")[:10]
            total += query_metrics([ids[i] for i in order], train.relevant[query])[TUNING_METRIC]
        score = total / len(prepared)
        if not priors.is_active(weights):
            baseline = score
        if best is None or score > best[0] + 1e-12:
            best = (score, weights)
    assert best is not None
    return {**best[1], "queries": len(prepared), "keyword_ndcg": round(baseline, 4),
            "with_prior_ndcg": round(best[0], 4)}


def trained_keys(version) -> tuple[set[str], str]:
    """Ticket keys whose duplicate/link pairs trained `version` or any version it continued from, and how known.

    Each run stores the keys it trained on (metrics["training_split"]); a
    run from before that is re-derived from its seed on its dataset as it is
    now. A base-model version trained on none. A version without a run whose
    training is unknown counts every TRAIN cluster outside the default seed's
    validation share as trained (that is what a default run would have seen).
    """
    from training.pairs import ticket_cluster_split

    keys: set[str] = set()
    sources: list[str] = []
    seen: set[int] = set()
    while version is not None and version.pk not in seen:
        seen.add(version.pk)
        run = version.source_run
        if run is None:
            if version.artifact_path == version.base_model:  # a base model, not trained here
                sources.append("base model")
                break
            run_seed, dataset = 42, version.dataset
            stored = None
            sources.append(f"{version}: training unknown, default validation share")
        else:
            stored = ((run.metrics or {}).get("training_split") or {}).get("trained_keys")
            run_seed, dataset = int((run.hyperparameters or {}).get("seed", 42)), run.dataset
            sources.append(f"run #{run.pk}")
        if stored is not None:
            keys.update(stored)
        elif dataset is not None:
            rows = Document.objects.filter(dataset=dataset).values_list("external_key", "metadata")
            clusters = duplicate_clusters([Ticket(key=k, title="", body="", links=ticket_links(m)) for k, m in rows])
            keys.update(key for cluster in clusters if ticket_cluster_split(cluster, seed=run_seed) == "train"
                        for key in cluster)
        parent = run.base_model if run is not None else ""
        match = re.match(r"^version:(\d+)$", parent or "")
        version = type(version).objects.filter(pk=int(match[1])).select_related("source_run").first() if match else None
    return keys, ", ".join(sources)


# --- BM25 over the stored tsvectors ----------------------------------------------

@dataclass
class BM25Matrices:
    """A dataset's BM25 (training.bm25) as sparse matrices, rows in document id order; built once per evaluation."""

    query_weights: Any  # CSR: each document's lexemes as a query, with their query weights
    term_weights: Any  # CSC: each document's BM25 weight of each lexeme (idf times the saturated tf)
    presence: Any  # CSC: 1 where a document holds a lexeme
    frequencies: np.ndarray  # documents holding each lexeme
    vocabulary: list[str]
    candidate_cap: int

    def scores(self, row: int) -> np.ndarray:
        """Every document's BM25 score with document `row` as the query; 0 outside its candidates.

        Candidates: the documents holding bm25.candidate_lexemes() of the query, as search scores them.
        """
        start, stop = self.query_weights.indptr[row], self.query_weights.indptr[row + 1]
        terms, weights = self.query_weights.indices[start:stop], self.query_weights.data[start:stop]
        if not len(terms):
            return np.zeros(self.term_weights.shape[0], dtype=np.float32)
        scores = np.asarray(self.term_weights[:, terms] @ weights).ravel()
        frequency = {self.vocabulary[t]: int(self.frequencies[t]) for t in terms}
        index = {self.vocabulary[t]: t for t in terms}
        chosen = [index[lexeme] for lexeme in bm25.candidate_lexemes(frequency, self.candidate_cap)]
        candidates = np.asarray(self.presence[:, chosen].sum(axis=1)).ravel() > 0
        return np.where(candidates, scores, 0.0)


def bm25_matrices(dataset: Dataset, *, candidate_cap: int | None = None) -> BM25Matrices:
    """Built once, passed as `matrices` to rank several query sets (training.bm25's formula and candidates)."""
    from django.conf import settings
    from scipy import sparse

    rows = Document.objects.filter(dataset=dataset).order_by("id").values_list("search_vector", flat=True)
    vocabulary: dict[str, int] = {}
    tf_data, query_data, indices, indptr = [], [], [], [0]
    for vector in rows.iterator(chunk_size=5000):
        for lexeme, (title, other) in bm25.field_counts(str(vector) if vector is not None else "").items():
            indices.append(vocabulary.setdefault(lexeme, len(vocabulary)))
            tf_data.append(bm25.document_tf(title, other))
            query_data.append(bm25.query_weight(title))
        indptr.append(len(indices))
    shape = (len(indptr) - 1, len(vocabulary))
    tf = sparse.csr_matrix((np.asarray(tf_data, dtype=np.float32), indices, indptr), shape=shape)
    query_weights = sparse.csr_matrix((np.asarray(query_data, dtype=np.float32), indices, indptr), shape=shape)
    frequencies = np.bincount(tf.indices, minlength=shape[1])
    idf = np.asarray([bm25.idf(shape[0], int(f)) for f in frequencies], dtype=np.float32)
    lengths = np.asarray(tf.sum(axis=1), dtype=np.float32).ravel()
    norm = bm25.K1 * (1 - bm25.B + bm25.B * lengths / max(lengths.mean() if len(lengths) else 0.0, 1e-6))
    coo = tf.tocoo()
    weighted = coo.data * (bm25.K1 + 1) / (coo.data + norm[coo.row]) * idf[coo.col]
    term_weights = sparse.csr_matrix((weighted, (coo.row, coo.col)), shape=shape).tocsc()
    presence = sparse.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr), shape=shape).tocsc()
    return BM25Matrices(
        query_weights=query_weights, term_weights=term_weights, presence=presence, frequencies=frequencies,
        vocabulary=list(vocabulary), candidate_cap=candidate_cap or settings.BM25_CANDIDATES,
    )


def bm25_rankings(
    *, dataset: Dataset, eval_set: EvalSet, queries: Iterable[int] | None = None, limit: int = RANK_DEPTH,
    matrices: BM25Matrices | None = None,
) -> dict[int, list[int]]:
    """The keyword side of query-by-ticket search (training.bm25: BM25, title weighted), query removed.

    Term counts come from the documents' stored tsvectors (title A, body B),
    so it tokenizes exactly like the product's full-text index; the query is
    the query document's own lexemes. search.keyword.ticket_keyword_ranking
    serves the same ranking on the similar-tickets page.
    """
    return {q: [doc for doc, _ in ranked] for q, ranked in bm25_scored_rankings(
        dataset=dataset, eval_set=eval_set, queries=queries, limit=limit, matrices=matrices).items()}


def bm25_scored_rankings(
    *, dataset: Dataset, eval_set: EvalSet, queries: Iterable[int] | None = None, limit: int = RANK_DEPTH,
    matrices: BM25Matrices | None = None,
) -> dict[int, list[tuple[int, float]]]:
    """bm25_rankings() with the BM25 scores, for score fusion (search tuning, the run's `served` row).

    ts_rank_cd over an OR of a whole ticket's lexemes scored nDCG@10 0.008
    on the Hadoop validation queries at 2.6 s a query; this takes seconds
    for all of them.
    """
    position = eval_set.position
    matrices = matrices or bm25_matrices(dataset)
    n_docs = matrices.term_weights.shape[0]
    doc_ids = np.asarray(eval_set.doc_ids)
    out: dict[int, list[tuple[int, float]]] = {}
    for query in queries if queries is not None else eval_set.queries:
        row = position[query]
        scores = matrices.scores(row)
        scores[row] = 0.0  # the query itself
        top = np.sort(np.argpartition(-scores, kth=min(limit, n_docs - 1))[: limit + 1])
        best = top[np.argsort(-scores[top], kind="stable")]  # equal scores in id order, as search's SQL
        out[query] = [(int(doc_ids[i]), float(scores[i])) for i in best if scores[i] > 0][:limit]
    return out


# --- Champion / challenger: the paired bootstrap -----------------------------------------------

# 1,000 resamples of the per-query gains with a fixed seed: the same data always gives the same
# interval (a decision can be re-checked), and 1,000 puts the 2.5th percentile within ~0.002 of a
# 100,000-resample run on the Hadoop set's 551 queries.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 20240601
CONFIDENCE = 0.95
# Resamples drawn at once: 100 x 20,000 queries of int64 indices is 16 MB.
_BOOTSTRAP_CHUNK = 100


@dataclass(frozen=True)
class PairedComparison:
    """The challenger's mean nDCG@10 gain over the champion on the same queries, with a bootstrap interval."""

    queries: int
    champion: float
    challenger: float
    gain: float
    ci_low: float
    ci_high: float
    resamples: int = BOOTSTRAP_RESAMPLES
    seed: int = BOOTSTRAP_SEED
    confidence: float = CONFIDENCE

    def describe(self) -> str:
        """'gain +0.004, 95% CI [-0.011, +0.019] over 212 queries'."""
        return (f"gain {self.gain:+.3f}, {self.confidence:.0%} CI [{self.ci_low:+.3f}, {self.ci_high:+.3f}] "
                f"over {self.queries} queries")

    def as_dict(self) -> dict:
        return {"queries": self.queries, "champion_ndcg@10": round(self.champion, 4),
                "challenger_ndcg@10": round(self.challenger, 4), "gain": round(self.gain, 4),
                "ci_low": round(self.ci_low, 4), "ci_high": round(self.ci_high, 4), "resamples": self.resamples,
                "seed": self.seed, "confidence": self.confidence}


def paired_bootstrap(champion: Sequence[float], challenger: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> PairedComparison:
    """Percentile bootstrap of the mean per-query gain (challenger - champion), queries resampled with replacement.

    Paired: each resample draws queries, not scores, so a query's two scores
    stay together and what varies is only which queries were asked.
    """
    a = np.asarray(champion, dtype=np.float64)
    b = np.asarray(challenger, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired scores need the same non-empty list of queries, got {a.shape} and {b.shape}")
    gains = b - a
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, _BOOTSTRAP_CHUNK):
        size = min(_BOOTSTRAP_CHUNK, resamples - start)
        means[start:start + size] = gains[rng.integers(0, len(gains), size=(size, len(gains)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedComparison(queries=len(gains), champion=float(a.mean()), challenger=float(b.mean()),
                            gain=float(gains.mean()), ci_low=float(low), ci_high=float(high), resamples=resamples,
                            seed=seed, confidence=confidence)


@dataclass
class GuardVerdict:
    """Promote or not, and why, with the numbers (stored on the retrain occurrence)."""

    promote: bool
    reason: str
    comparison: PairedComparison | None
    margin: float
    tolerance: float
    # "<system> <metric>" -> how much it fell, for every metric that fell by more than the tolerance.
    drops: dict[str, float] = field(default_factory=dict)
    basis: str = ""

    def as_dict(self) -> dict:
        return {"promote": self.promote, "reason": self.reason, "margin": self.margin, "tolerance": self.tolerance,
                "drops": {k: round(v, 4) for k, v in self.drops.items()}, "basis": self.basis,
                **(self.comparison.as_dict() if self.comparison else {})}


def guard(*, comparison: PairedComparison | None, champion_table: dict[str, dict], challenger_table: dict[str, dict],
          margin: float, tolerance: float, basis: str = "") -> GuardVerdict:
    """The champion/challenger rule: promote only if the gain's lower bound is above `margin` and no metric of the
    held-out table (each system both tables have: vector, hybrid) falls by more than `tolerance`.

    A tie (every query scores the same) has a lower bound of 0, which is not
    above a margin of 0: the champion stays. Without a comparison (no paired
    per-query scores) nothing is promoted.
    """
    drops = {}
    for system in sorted(set(champion_table) & set(challenger_table)):
        for metric in METRIC_NAMES:
            old, new = champion_table[system].get(metric), challenger_table[system].get(metric)
            if old is not None and new is not None and old - new > tolerance + 1e-12:
                drops[f"{system} {metric}"] = float(old - new)
    common = {"comparison": comparison, "margin": margin, "tolerance": tolerance, "drops": drops, "basis": basis}
    if comparison is None:
        reason = "no per-query held-out results to compare"
        if drops:
            reason += "; " + _drops_text(drops, tolerance)
        return GuardVerdict(promote=False, reason=reason, **common)
    if comparison.ci_low <= margin:
        return GuardVerdict(promote=False, reason=(
            f"not better with confidence: the {comparison.confidence:.0%} lower bound {comparison.ci_low:+.3f} is "
            f"not above the margin {margin:+.3f}"), **common)
    if drops:
        return GuardVerdict(promote=False, reason=_drops_text(drops, tolerance), **common)
    return GuardVerdict(promote=True, reason=(
        f"better with confidence: the {comparison.confidence:.0%} lower bound {comparison.ci_low:+.3f} is above the "
        f"margin {margin:+.3f} and no metric drops by more than {tolerance:.3f}"), **common)


def _drops_text(drops: dict[str, float], tolerance: float) -> str:
    worst = sorted(drops.items(), key=lambda item: -item[1])
    listed = ", ".join(f"{name} -{value:.3f}" for name, value in worst[:3])
    return f"{len(drops)} metric(s) drop by more than the tolerance {tolerance:.3f} ({listed})"


@dataclass
class PairedScores:
    """Per-query nDCG@10 of two models on the same held-out queries, and their metric tables."""

    champion: list[float]
    challenger: list[float]
    champion_table: dict[str, dict]
    challenger_table: dict[str, dict]
    basis: str


def scores_from_run(evaluation: dict) -> PairedScores | None:
    """A run's own before/after: its base model and its fine-tuned model on the same TEST queries.

    For a run that started from the production model ("version:<id>") the
    base is the champion, so this is exactly the champion/challenger pairing.
    None when the run kept no per-query results.
    """
    rows = (evaluation or {}).get("per_query") or []
    systems = (evaluation or {}).get("systems") or {}
    if not rows or "base" not in systems or "fine_tuned" not in systems:
        return None
    rows = sorted(rows, key=lambda row: row["query"])
    champion_table = {"vector": systems["base"], **({"hybrid": systems["hybrid_base"]} if "hybrid_base" in systems
                                                    else {})}
    challenger_table = {"vector": systems["fine_tuned"],
                        **({"hybrid": systems["hybrid_fine_tuned"]} if "hybrid_fine_tuned" in systems else {})}
    return PairedScores(champion=[float(r["before"]) for r in rows], challenger=[float(r["after"]) for r in rows],
                        champion_table=champion_table, challenger_table=challenger_table,
                        basis=f"both models on the same {len(rows)} held-out queries (the challenger's run)")


def _own_scores(version) -> tuple[dict[str, float], dict[str, dict]] | None:
    """A version's per-query nDCG@10 by ticket key and its table, from the evaluation of the run that made it."""
    run = getattr(version, "source_run", None)
    evaluation = (run.evaluation if run is not None else None) or {}
    rows = evaluation.get("per_query") or []
    systems = evaluation.get("systems") or {}
    if not rows or "fine_tuned" not in systems:
        return None
    table = {"vector": systems["fine_tuned"],
             **({"hybrid": systems["hybrid_fine_tuned"]} if "hybrid_fine_tuned" in systems else {})}
    return {row["query"]: float(row["after"]) for row in rows}, table


def paired_scores(*, candidate, champion) -> PairedScores | None:
    """Per-query scores of two model versions, paired, from what their runs stored (no model is loaded).

    Exact when the candidate's run started from the champion (its "before" is
    the champion on the same queries); otherwise each version's own
    evaluation, paired on the queries both were asked (their corpora may
    differ by the tickets that came in between). None when either kept none.
    """
    run = getattr(candidate, "source_run", None)
    if run is not None and run.base_model == f"version:{champion.pk}":
        exact = scores_from_run(run.evaluation)
        if exact is not None:
            return exact
    mine, theirs = _own_scores(candidate), _own_scores(champion)
    if mine is None or theirs is None:
        return None
    common = sorted(set(mine[0]) & set(theirs[0]))
    if not common:
        return None
    return PairedScores(champion=[theirs[0][q] for q in common], challenger=[mine[0][q] for q in common],
                        champion_table=theirs[1], challenger_table=mine[1],
                        basis=f"each version's own held-out evaluation, paired on the {len(common)} queries both had")


def compare_versions(*, candidate, champion, margin: float, tolerance: float) -> GuardVerdict:
    """The guard on two registered versions from their stored evaluations (what manual promotion uses).

    Without paired per-query results it judges on the versions' held-out
    tables only (ModelVersion.metrics["held_out"]) and never promotes on
    confidence it does not have: `promote` is then True only when margin < 0
    (a "not worse" check) and nothing dropped beyond the tolerance.
    """
    scores = paired_scores(candidate=candidate, champion=champion)
    if scores is not None:
        comparison = paired_bootstrap(scores.champion, scores.challenger)
        return guard(comparison=comparison, champion_table=scores.champion_table,
                     challenger_table=scores.challenger_table, margin=margin, tolerance=tolerance, basis=scores.basis)
    mine = (candidate.metrics or {}).get("held_out") or {}
    theirs = (champion.metrics or {}).get("held_out") or {}
    verdict = guard(comparison=None, champion_table={"vector": theirs} if theirs else {},
                    challenger_table={"vector": mine} if mine else {}, margin=margin, tolerance=tolerance,
                    basis="the versions' held-out tables (no per-query results kept)")
    if margin < 0 and mine and theirs and not verdict.drops:
        verdict.promote = True
        verdict.reason = f"no metric of the held-out table drops by more than {tolerance:.3f}"
    return verdict


def not_worse(*, candidate, champion, tolerance: float) -> GuardVerdict:
    """The manual promotion's guard: the same comparison, with the margin at -tolerance (non-inferiority).

    The candidate passes when the 95% lower bound of its gain is above
    -tolerance and no metric of the table falls by more than the tolerance.
    """
    return compare_versions(candidate=candidate, champion=champion, margin=-tolerance, tolerance=tolerance)


ANSWER_LABEL = "answer of "


def labelled_drilldown(dataset, rows: list[dict]) -> list[dict]:
    """The run page's per-query rows with each key paired with its document's title: [(key, title), ...].

    A Q&A run's keys are hashes (q-1a2b...) and its answers "answer of <key>": a reader needs the question's
    words. One query for every key of the rows shown, owner-scoped through the run's dataset; a key whose
    document is gone keeps an empty title.
    """
    def bare(label: str) -> str:
        return label[len(ANSWER_LABEL):] if label.startswith(ANSWER_LABEL) else label

    keys = {bare(k) for row in rows for k in [row["query"], *row["relevant"], *row["top_before"], *row["top_after"]]}
    titles = dict(Document.objects.filter(dataset=dataset, external_key__in=keys).values_list("external_key", "title"))

    def pair(label: str) -> tuple[str, str]:
        return label, titles.get(bare(label), "")

    return [{**row, "query": pair(row["query"]), "relevant": [pair(k) for k in row["relevant"]],
             "top_before": [pair(k) for k in row["top_before"]], "top_after": [pair(k) for k in row["top_after"]]}
            for row in rows]
