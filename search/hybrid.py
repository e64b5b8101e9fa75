"""Hybrid search: the keyword side and pgvector kNN fused, similar tickets, hits for pages and the API.

Keyword side in search.keyword; vector side here: cosine kNN over each model
version's partial HNSW index with iterative scans under filters; the two
rankings are fused with reciprocal rank fusion or weighted score fusion,
the index's default tuned on validation tickets (search.tuning).
"""

from __future__ import annotations

import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection, connections, transaction

from embedportal import db_router
from embedportal.errors import ServiceError
from search import query_vectors
from search.filters import SearchFilters
from search.keyword import key_document, keyword_ranking, marked_html, snippet_annotation, ticket_keyword_ranking
from search.models import Embedding, SearchIndex
from search.vectors import vector_cast
from training.evaluation import RANK_DEPTH
from training import priors as ticket_priors
from training.fusion import DEFAULT_ALPHA, RRF_K, fuse_scored
from training.models import Document

# Candidates taken from each side before fusion.
CANDIDATES_PER_SIDE = 100
# Similar tickets: each side's best, as deep as the held-out evaluation's (its `served` row).
SIMILAR_CANDIDATES = RANK_DEPTH
MAX_QUERY_CHARS = 1000
MAX_K = 100
HNSW_EF_SEARCH = settings.HNSW_EF_SEARCH  # EMBEDPORTAL_HNSW_EF_SEARCH, read once per process
MODES = ("hybrid", "keyword", "vector")


class SearchError(ServiceError):
    """A search request that cannot be answered; the message says why."""


# Fused results can be paged this deep (each side then fetches this many candidates).
MAX_RESULT_DEPTH = 500
RRF_K_RANGE = (1, 1000)
FUSION_METHODS = ("rrf", "weighted")

@dataclass
class Hit:
    document: Document
    score: float
    keyword_rank: int | None = None
    vector_rank: int | None = None
    keyword_score: float | None = None
    vector_similarity: float | None = None
    identifier_match: bool = False
    snippet_html: str = ""
    # Similar tickets with the index's ticket prior: its score and reasons (_prior_reasons).
    prior: dict[str, Any] | None = None


@dataclass
class SearchResponse:
    query: str
    mode: str
    hits: list[Hit] = field(default_factory=list)
    message: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    fusion: dict[str, Any] = field(default_factory=dict)
    page: int = 1
    has_more: bool = False
    # Set when the keyword side relaxed "all words" to "any word".
    notice: str = ""
    filters: dict[str, Any] = field(default_factory=dict)
    # How many results the query has (all pages), counted up to MAX_RESULT_DEPTH; total_capped when there are more.
    total: int = 0
    total_capped: bool = False
    # The document whose key the query is (shown first, then its similar tickets), if any.
    key_document_id: int | None = None
    # How the query was embedded: {"backend": "onnx-int8" | "onnx" | "torch", "cached": bool}; empty when not.
    query_encoder: dict[str, Any] = field(default_factory=dict)


def resolve_fusion(
    *, index: SearchIndex, method: str | None = None, alpha: float | None = None, rrf_k: int | None = None
) -> dict[str, Any]:
    """The fusion a query uses: explicit arguments over the index's tuned default over RRF k=60.

    The index's learned ticket prior (training.priors) comes along unless a
    method is given; it applies only where the query is a ticket (similar tickets).
    """
    default = index.fusion or {}
    prior = default.get("prior") if method is None and ticket_priors.is_active(default.get("prior")) else None
    method = method or default.get("method") or "rrf"
    if method not in FUSION_METHODS:
        raise SearchError(f"fusion: must be one of {', '.join(FUSION_METHODS)}, got {method!r}.")
    if alpha is None:
        alpha = float(default.get("alpha", DEFAULT_ALPHA))
    if rrf_k is None:
        rrf_k = int(default.get("rrf_k", RRF_K))
    if not 0.0 <= alpha <= 1.0:
        raise SearchError(f"alpha: must be between 0 and 1, got {alpha}.")
    if not RRF_K_RANGE[0] <= rrf_k <= RRF_K_RANGE[1]:
        raise SearchError(f"rrf_k: must be between {RRF_K_RANGE[0]} and {RRF_K_RANGE[1]}, got {rrf_k}.")
    chosen = {"method": "rrf", "rrf_k": rrf_k} if method == "rrf" else {"method": "weighted", "alpha": round(alpha, 4)}
    if prior is not None:
        chosen["prior"] = {name: float(prior.get(name, 0.0)) for name in ticket_priors.FEATURES}
    return chosen


@db_router.search_reads()  # its reads may go to the read replica (DATABASE_REPLICA_URL)
def hybrid_search(
    *,
    index: SearchIndex,
    query: str,
    k: int = 10,
    mode: str = "hybrid",
    filters: SearchFilters | None = None,
    page: int = 1,
    fusion: str | None = None,
    alpha: float | None = None,
    rrf_k: int | None = None,
    query_vector: list[float] | None = None,
) -> SearchResponse:
    """Page `page` (k per page) of the index's dataset for `query`.

    Keyword side: websearch_to_tsquery over the weighted tsvector (the
    dataset's language), plus the identifier side index when the query holds
    identifiers; when no document has all the words, any word counts (with a
    notice). Vector side: HNSW cosine kNN with iterative scans so filters
    still fill the page. Hybrid fuses both with the index's default fusion
    (tuned on the validation split) unless `fusion`/`alpha`/`rrf_k` say
    otherwise. Empty or punctuation-only queries return no hits with a
    message, not an error; queries over MAX_QUERY_CHARS are cut (and said so).
    `query_vector` skips encoding (benchmarks, similar-ticket lookups).
    """
    if mode not in MODES:
        raise SearchError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}.")
    if not 1 <= k <= MAX_K:
        raise SearchError(f"k: must be between 1 and {MAX_K}, got {k}.")
    if page < 1 or page * k > MAX_RESULT_DEPTH:
        raise SearchError(f"page: must be between 1 and {MAX_RESULT_DEPTH // k} for k={k} "
                          f"(results are paged up to the {MAX_RESULT_DEPTH}th).")
    if mode != "keyword" and not index.is_searchable:
        raise SearchError(
            f"This index is {index.status}: vector and hybrid search need a ready index "
            f"({index.embedded_count}/{index.total_count} documents embedded). Use mode=keyword meanwhile."
        )
    fusion_used = resolve_fusion(index=index, method=fusion, alpha=alpha, rrf_k=rrf_k) if mode == "hybrid" else {}
    fusion_used.pop("prior", None)  # a text query has no ticket to compare candidates with
    filters = filters or SearchFilters()
    raw = (query or "").strip()
    query = raw[:MAX_QUERY_CHARS]
    response = SearchResponse(query=query, mode=mode, fusion=fusion_used, page=page, filters=filters.as_dict())
    if len(raw) > MAX_QUERY_CHARS:
        response.notice = f"The query was cut to its first {MAX_QUERY_CHARS} characters."
    if not any(ch.isalnum() for ch in query):
        response.message = "Type some words to search for." if not query else "The query has no words to search for."
        return response

    offset = (page - 1) * k
    depth = offset + k
    # The keyword side ranks every match anyway (ts_rank_cd has no index order), so counting the total up to
    # the paging depth costs the LIMIT only; the vector side ranks every document: its total is the depth.
    candidates = max(CANDIDATES_PER_SIDE, depth) if mode == "hybrid" else (
        MAX_RESULT_DEPTH + 1 if mode == "keyword" else depth + 1)
    key_id = key_document(index.dataset, query)
    response.key_document_id = key_id
    if key_id is not None and mode != "keyword" and query_vector is None:
        # A ticket's key: its neighbours are its similar tickets, not the neighbours of the key's letters.
        query_vector = _document_vector(index, key_id)
    keyword: list[tuple[int, float]] = []
    vector: list[tuple[int, float]] = []
    identifier_ids: set[int] = set()
    started = time.perf_counter()
    pending_vector = None
    if mode in ("hybrid", "vector") and query_vector is None:
        version = index.model_version
        hit = query_vectors.cached(model_version_id=version.pk, artifact_path=version.artifact_path, text=query)
        if hit is not None:
            query_vector, response.timings_ms["embed"] = hit.vector, 0.0
            response.query_encoder = {"backend": hit.backend, "cached": True}
        else:
            # The query is embedded on a helper thread while PostgreSQL runs the
            # keyword side on this one (the encoders release the GIL): hybrid
            # latency becomes max(embedding, keyword) + vector instead of their sum.
            pending_vector = _embed_pool.submit(_timed_encode, version.pk, version.artifact_path, query)
    if mode in ("hybrid", "keyword"):
        # In hybrid mode the vector side carries a query whose words no
        # document mostly shares; the costly any-word pass is keyword-only.
        keyword, identifier_ids, relaxed = keyword_ranking(
            index.dataset, query, candidates, filters, any_word=mode == "keyword"
        )
        response.notice = " ".join(filter(None, [response.notice, relaxed]))
        response.timings_ms["keyword"] = _ms(started)
    if mode in ("hybrid", "vector"):
        if pending_vector is not None:
            found, response.timings_ms["embed"] = pending_vector.result()
            query_vector = found.vector
            response.query_encoder = {"backend": found.backend, "cached": found.cached}
        t1 = time.perf_counter()
        vector = _vector_ranking(index, query_vector, candidates, filters)
        response.timings_ms["vector"] = _ms(t1)

    if mode == "keyword":
        ranked = keyword
    elif mode == "vector":
        ranked = vector
    else:
        ranked = fuse_scored(keyword, vector, fusion=fusion_used)
    if key_id is not None:
        # The ticket the query names comes first in every mode, scored as the best hit.
        top = max((score for _, score in ranked), default=1.0)
        ranked = [(key_id, top)] + [(d, score) for d, score in ranked if d != key_id]
        identifier_ids = identifier_ids | {key_id}
    response.total = min(len(ranked), MAX_RESULT_DEPTH)
    # The vector side stops at its candidates: a full list means more documents lie beyond it.
    response.total_capped = len(ranked) > MAX_RESULT_DEPTH or (mode != "keyword" and len(vector) >= candidates)
    response.has_more = len(ranked) > depth
    ranked = ranked[offset:depth]
    response.hits = _hits(index, query, ranked, keyword, vector, identifier_ids)
    response.timings_ms["total"] = _ms(started)
    if not response.hits:
        response.message = (
            "No document matches this query." if page == 1 else "No more results: this page is past the last one."
        )
        if page == 1 and not filters.is_empty:
            response.message = "No document matches this query with these filters."
    return response


def _document_vector(index: SearchIndex, document_id: int) -> list[float] | None:
    """The document's vector under the index's model, None while it has none (then the query text is embedded)."""
    row = Embedding.objects.filter(document_id=document_id, model_version_id=index.model_version_id).values_list(
        "embedding", flat=True).first()
    return None if row is None else [float(x) for x in row]


def encode_query(*, artifact_path: str, text: str) -> list[float]:
    """The normalised query vector on the configured query encoder (search.query_vectors), uncached."""
    return query_vectors.encode(artifact_path=artifact_path, text=text)[0]


# Two threads: the query embedding of one request and the next request's, queued.
_embed_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="query-embed")


def _timed_encode(version_id: int, artifact_path: str, text: str) -> tuple[query_vectors.QueryVector, float]:
    t0 = time.perf_counter()
    found = query_vectors.query_vector(model_version_id=version_id, artifact_path=artifact_path, text=text)
    return found, _ms(t0)


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)


def _hits(
    index: SearchIndex,
    query: str,
    ranked: list[tuple[int, float]],
    keyword: list[tuple[int, float]],
    vector: list[tuple[int, float]],
    identifier_ids: set[int],
) -> list[Hit]:
    keyword_info = {doc_id: (rank, score) for rank, (doc_id, score) in enumerate(keyword, start=1)}
    vector_info = {doc_id: (rank, sim) for rank, (doc_id, sim) in enumerate(vector, start=1)}
    ids = [doc_id for doc_id, _ in ranked]
    # Documents and their snippets in one round trip.
    documents = {doc.pk: doc for doc in Document.objects.filter(pk__in=ids).annotate(
        snippet_text=snippet_annotation(index.dataset, query))} if ids else {}
    hits = []
    for doc_id, score in ranked:
        kw = keyword_info.get(doc_id)
        vec = vector_info.get(doc_id)
        hits.append(
            Hit(
                document=documents[doc_id],
                score=round(float(score), 6),
                keyword_rank=kw[0] if kw else None,
                keyword_score=round(kw[1], 6) if kw else None,
                vector_rank=vec[0] if vec else None,
                vector_similarity=round(vec[1], 6) if vec else None,
                identifier_match=doc_id in identifier_ids,
                snippet_html=marked_html(documents[doc_id].snippet_text or ""),
            )
        )
    return hits


def _vector_sql(dims: int, version_id: int, filters_sql: str, *, source: str = "%s::{cast}") -> str:
    """kNN SQL over the version's partial HNSW index; `source` is the query vector expression.

    The cast `embedding::vector(dims)` and `model_version_id = N` repeat the
    partial index's definition so PostgreSQL uses it (dims and the version id
    are integers from our rows). With iterative scans in relaxed order
    pgvector may return neighbours slightly out of order, so the outer query
    re-sorts the materialized candidates by distance (pgvector's documented
    pattern).
    """
    cast = vector_cast(dims)[0]  # vector(dims), or halfvec(dims) above 2,000 dimensions
    source = source.format(dims=int(dims), cast=cast)
    return (
        "WITH nn AS MATERIALIZED ("
        f"SELECT e.document_id, (e.embedding::{cast}) <=> {source} AS distance "
        "FROM search_embedding e JOIN training_document d ON d.id = e.document_id "
        f"WHERE e.model_version_id = {int(version_id)} AND d.dataset_id = %s{filters_sql} "
        f"ORDER BY (e.embedding::{cast}) <=> {source} LIMIT %s"
        ") SELECT document_id, 1 - distance FROM nn ORDER BY distance, document_id"
    )


def _vector_ranking(
    index: SearchIndex, query_vector: list[float], limit: int, filters: SearchFilters
) -> list[tuple[int, float]]:
    where, params = filters.sql()
    sql = _vector_sql(index.model_version.dimensions, index.model_version_id, where)
    # pgvector's text form "[x,y,...]" bound as a parameter and cast in SQL.
    vec = "[" + ",".join(f"{x:.7g}" for x in query_vector) + "]"
    return _run_knn(sql, [vec, index.dataset_id, *params, vec, limit], limit)


def hnsw_session_settings(sender, connection, **kwargs) -> None:
    """connection_created receiver: every new PostgreSQL session searches with HNSW_EF_SEARCH and iterative scans.

    So a kNN of up to HNSW_EF_SEARCH candidates (every first page) is one
    statement, one round trip; deeper ones raise ef_search with SET LOCAL in
    a transaction of their own (four round trips). The settings are the
    same for every session, so a pooled connection carries nothing of one
    request into another.
    """
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute(f"SET hnsw.ef_search = {int(HNSW_EF_SEARCH)}; SET hnsw.iterative_scan = relaxed_order")
    _hnsw_sessions.add(connection.connection)


# The driver connections hnsw_session_settings has prepared.
_hnsw_sessions: weakref.WeakSet = weakref.WeakSet()


def _run_knn(sql: str, params: list[Any], limit: int) -> list[tuple[int, float]]:
    """Run a kNN statement with ef_search >= limit and iterative scans.

    On a session prepared by hnsw_session_settings, a limit up to
    HNSW_EF_SEARCH is the statement alone; otherwise SET LOCAL in one
    transaction keeps the settings to it.
    """
    ef_search = max(HNSW_EF_SEARCH, min(int(limit), 1000))
    connection = connections[db_router.search_alias()]  # the read replica when one is configured
    connection.ensure_connection()
    if ef_search == HNSW_EF_SEARCH and connection.connection in _hnsw_sessions:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            rows = cursor.fetchall()
        return [(doc_id, float(sim)) for doc_id, sim in rows]
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL hnsw.ef_search = {ef_search}; SET LOCAL hnsw.iterative_scan = relaxed_order")
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    return [(doc_id, float(sim)) for doc_id, sim in rows]


@db_router.search_reads()
def similar_documents(
    *, index: SearchIndex, document: Document, k: int = 10, filters: SearchFilters | None = None
) -> list[Hit]:
    """The k documents most like `document` (itself excluded): the index's fusion of its two sides.

    Keyword side: BM25 of the ticket's lexemes, title weighted
    (search.keyword.ticket_keyword_ranking); vector side: its stored
    vector's nearest neighbours. Each side's SIMILAR_CANDIDATES best are
    fused with the index's tuned fusion: the rule the held-out evaluation's
    `served` row measures (training.evaluation: query by ticket, the same
    depth, BM25 and fusion).
    """
    if not index.is_searchable:
        raise SearchError(f"This index is {index.status}: similar tickets need a ready index.")
    if document.dataset_id != index.dataset_id:
        raise SearchError("This document is not in the index's dataset.")
    if not 1 <= k <= MAX_K:
        raise SearchError(f"k: must be between 1 and {MAX_K}, got {k}.")
    filters = filters or SearchFilters()
    where, params = filters.sql()
    dims, version_id = int(index.model_version.dimensions), int(index.model_version_id)
    source = (
        "(SELECT s.embedding::{cast} FROM search_embedding s "
        f"WHERE s.document_id = {int(document.pk)} AND s.model_version_id = {version_id})"
    )
    if not Embedding.objects.filter(document=document, model_version_id=version_id).exists():
        raise SearchError(f"{document.external_key} has no vector in this index yet.")
    depth = max(SIMILAR_CANDIDATES, k)
    sql = _vector_sql(dims, version_id, where + f" AND e.document_id <> {int(document.pk)}", source=source)
    vector = _run_knn(sql, [index.dataset_id, *params, depth], depth)
    keyword = ticket_keyword_ranking(document, depth, filters)
    fusion = resolve_fusion(index=index)
    query_facts, facts = None, {}
    if ticket_priors.is_active(fusion.get("prior")):
        query_facts = ticket_priors.facts(document.external_key, document.metadata)
        facts = _candidate_facts({doc_id for doc_id, _ in keyword} | {doc_id for doc_id, _ in vector})
    ranked = fuse_scored(keyword, vector, fusion=fusion, query_facts=query_facts, facts=facts)[:k]
    keyword_info = {doc_id: (rank, score) for rank, (doc_id, score) in enumerate(keyword, start=1)}
    vector_info = {doc_id: (rank, sim) for rank, (doc_id, sim) in enumerate(vector, start=1)}
    documents = Document.objects.in_bulk([doc_id for doc_id, _ in ranked])
    hits = []
    for doc_id, score in ranked:
        kw, vec = keyword_info.get(doc_id), vector_info.get(doc_id)
        hits.append(Hit(
            document=documents[doc_id], score=round(float(score), 6),
            keyword_rank=kw[0] if kw else None, keyword_score=round(kw[1], 6) if kw else None,
            vector_rank=vec[0] if vec else None, vector_similarity=round(vec[1], 6) if vec else None,
            prior=_prior_reasons(query_facts, facts.get(doc_id), fusion) if query_facts is not None else None,
        ))
    return hits


def _candidate_facts(ids: set[int]) -> dict[int, ticket_priors.Facts]:
    """The prior's fields of the candidates (key, created, components), one query."""
    rows = Document.objects.filter(pk__in=ids).values_list("id", "external_key", "metadata__created",
                                                           "metadata__components")
    return {doc_id: ticket_priors.facts(key, {"created": created, "components": components})
            for doc_id, key, created, components in rows}


def _prior_reasons(query: ticket_priors.Facts, doc: ticket_priors.Facts | None, fusion: dict) -> dict[str, Any]:
    """A hit's prior and why: {"score", "days_apart", "shared_components", "same_project"} (what the page says)."""
    doc = doc or ticket_priors.Facts()
    days = None if query.day is None or doc.day is None else round(abs(query.day - doc.day))
    return {
        "score": round(ticket_priors.prior(query, doc, fusion["prior"]), 4),
        "days_apart": days,
        "shared_components": sorted(query.components & doc.components),
        "same_project": bool(query.project) and query.project == doc.project,
    }


def serialize_hit(hit: Hit) -> dict[str, Any]:
    doc = hit.document
    return {
        "id": doc.pk,
        "key": doc.external_key,
        "title": doc.title,
        "snippet": doc.body[:300],
        "snippet_html": hit.snippet_html,
        "metadata": {k: v for k, v in doc.metadata.items() if k != "links"},
        "score": hit.score,
        "keyword_rank": hit.keyword_rank,
        "vector_rank": hit.vector_rank,
        "keyword_score": hit.keyword_score,
        "vector_similarity": hit.vector_similarity,
        "identifier_match": hit.identifier_match,
        "prior": hit.prior,
    }

