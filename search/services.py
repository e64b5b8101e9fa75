"""Search indexes (embedding jobs), hybrid search, similar tickets and the duplicate finder.

Hybrid search runs PostgreSQL full text (websearch_to_tsquery over the
weighted tsvector, GIN index, plus a 'simple'-config side index for
identifiers) and pgvector cosine kNN (per-version partial HNSW index,
iterative scans under filters), and fuses the two rankings with reciprocal
rank fusion or weighted score fusion; the index's default fusion is tuned on
the validation split (tune_fusion).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, timedelta
from itertools import combinations
from typing import Any, ClassVar

from django.core.cache import cache
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.html import escape

from search import embedding, encoders, evaluation
from search.fusion import (
    DEFAULT_ALPHA,
    RRF_K,
    reciprocal_rank_fusion,
    weighted_score_fusion,
)
from search.models import DuplicatePair, Embedding, SearchIndex
from search.vectors import vector_cast
from training import registry
from training.models import Dataset, Document, ModelVersion

logger = logging.getLogger(__name__)

# Candidates taken from each side before fusion.
CANDIDATES_PER_SIDE = 100
MAX_QUERY_CHARS = 1000
MAX_K = 100
HNSW_EF_SEARCH = 100
MODES = ("hybrid", "keyword", "vector")


class SearchError(ValueError):
    """A search request that cannot be answered; the message says why."""


# --- Index building -------------------------------------------------------------


def create_index(*, owner, dataset: Dataset, model_version: ModelVersion) -> SearchIndex:
    """Get or create the (dataset, version) index and queue its build after commit.

    A failed index is queued again; a ready or building one is returned as is.
    """
    from search import tasks

    index, created = SearchIndex.objects.get_or_create(
        dataset=dataset, model_version=model_version, defaults={"owner": owner}
    )
    if not created and index.status == SearchIndex.Status.FAILED:
        SearchIndex.objects.filter(pk=index.pk).update(status=SearchIndex.Status.QUEUED, error="")
        index.refresh_from_db()
        created = True
    if created:
        transaction.on_commit(lambda: tasks.build_index.delay(index_id=index.pk))
    return index


def hnsw_index_name(version_id: int) -> str:
    return f"search_embedding_hnsw_v{int(version_id)}"


def ensure_hnsw_index(*, model_version: ModelVersion) -> None:
    """Create the partial HNSW (cosine) index for one model version if missing.

    DDL cannot take bind parameters; the only values formatted in are integers
    from our own rows (id and dimensions), never user input.
    """
    version_id, dims = int(model_version.pk), int(model_version.dimensions)
    cast, ops = vector_cast(dims)  # halfvec above 2,000 dimensions
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS {hnsw_index_name(version_id)} ON search_embedding "
            f"USING hnsw ((embedding::{cast}) {ops}) "
            f"WHERE model_version_id = {version_id}"
        )


def build_index(*, index: SearchIndex) -> SearchIndex:
    """Embed every document of the dataset not yet embedded with this version.

    Side effects: queued -> running -> ready/failed; writes Embedding rows in
    chunks (idempotent: documents that already have a vector are skipped, so a
    crashed build resumes where it stopped); creates the HNSW index.
    """
    now = timezone.now()
    claimed = SearchIndex.objects.filter(pk=index.pk, status=SearchIndex.Status.QUEUED).update(
        status=SearchIndex.Status.RUNNING, started_at=now, heartbeat_at=now, error=""
    )
    if not claimed:
        index.refresh_from_db()
        return index
    version = index.model_version
    try:
        def progress(p) -> None:
            SearchIndex.objects.filter(pk=index.pk).update(
                embedded_count=p.done, total_count=p.total, docs_per_s=round(p.docs_per_s, 2),
                backend=p.backend, heartbeat_at=timezone.now(),
            )

        result = embedding.embed_documents(dataset=index.dataset, model_version=version, on_chunk=progress)
        SearchIndex.objects.filter(pk=index.pk).update(
            embedded_count=result.done, total_count=result.total, backend=result.backend,
            docs_per_s=result.docs_per_s if result.docs_per_s else None,
        )
        ensure_hnsw_index(model_version=version)
    except Exception as exc:  # the job fails with the reason; vectors written so far are kept
        logger.exception("building index %s failed", index.pk)
        SearchIndex.objects.filter(pk=index.pk).update(
            status=SearchIndex.Status.FAILED, finished_at=timezone.now(), error=f"{type(exc).__name__}: {exc}"
        )
    else:
        SearchIndex.objects.filter(pk=index.pk).update(status=SearchIndex.Status.READY, finished_at=timezone.now())
        index.refresh_from_db()
        registry.on_index_ready(index=index)  # a pending promotion switches now, atomically
        _tune_after_build(index)
    index.refresh_from_db()
    return index


def _tune_after_build(index: SearchIndex) -> None:
    """Tune the default fusion of a freshly built index; a failure keeps RRF k=60 and says why."""
    try:
        tune_fusion(index=index)
    except Exception as exc:  # tuning is an optimisation: the index stays usable with RRF
        logger.exception("tuning the fusion of index %s failed", index.pk)
        SearchIndex.objects.filter(pk=index.pk).update(
            fusion={"method": "rrf", "rrf_k": RRF_K, "tuned": False, "reason": f"{type(exc).__name__}: {exc}"}
        )


def refresh_indexes(*, dataset: Dataset) -> int:
    """Queue an incremental build of every complete index of the dataset (new and changed documents).

    The indexes keep serving from their current vectors while the job runs
    (SearchIndex.is_searchable). Returns how many were queued.
    """
    from search import tasks

    queued = 0
    for pk in list(SearchIndex.objects.filter(dataset=dataset, status=SearchIndex.Status.READY).values_list("pk", flat=True)):
        if SearchIndex.objects.filter(pk=pk, status=SearchIndex.Status.READY).update(status=SearchIndex.Status.QUEUED):
            queued += 1
            transaction.on_commit(lambda pk=pk: tasks.build_index.delay(index_id=pk))
    return queued


def requeue_stale_builds(*, timeout_s: int) -> int:
    """Re-queue running builds whose worker stopped (no chunk for timeout_s); they resume.

    Side effects: status running -> queued and a new build task after commit.
    Returns how many were re-queued.
    """
    from search import tasks

    cutoff = timezone.now() - timedelta(seconds=timeout_s)
    stale_filter = Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, started_at__lt=cutoff)
    running = SearchIndex.objects.filter(stale_filter, status=SearchIndex.Status.RUNNING)
    requeued = 0
    for pk in list(running.values_list("pk", flat=True)):
        with transaction.atomic():
            if running.filter(pk=pk).update(status=SearchIndex.Status.QUEUED):
                requeued += 1
                transaction.on_commit(lambda pk=pk: tasks.build_index.delay(index_id=pk))
    return requeued


def production_index(*, dataset: Dataset) -> SearchIndex | None:
    return (
        SearchIndex.objects.filter(dataset=dataset, model_version__stage=ModelVersion.Stage.PRODUCTION)
        .select_related("model_version")
        .first()
    )


# --- Querying -------------------------------------------------------------------

# The identifier side index (migration search 0003): this expression must stay
# byte-for-byte the one indexed there, or PostgreSQL falls back to a scan.
_TRANSLATE_ARGS = "'./\\:;,=()[]{}<>\"''$#@!?*|+', '                          '"
IDENTIFIER_TSVECTOR = "to_tsvector('simple'::regconfig, translate(d.title || ' ' || d.body, " + _TRANSLATE_ARGS + "))"
# A query goes to the side index too when it holds an identifier: a token
# that mixes letters and digits (HDFS-1234, s3a), has an inner capital
# (NullPointerException, FSNamesystem) or glues words with . / : $ #
# (dfs.replication, o.a.h.FSNamesystem).
_TOKEN = re.compile(r"[\w.\-/:$#]+")
_IDENTIFIER = re.compile(r"(?=.*[A-Za-z])(?=.*\d)|[a-z][A-Z]|[A-Z]{2,}[a-z]|[A-Za-z0-9][./:$#][A-Za-z0-9]")
# ts_headline markers: control characters no ticket text contains, turned into
# <mark> after HTML-escaping, so document text can never inject markup.
_MARK_START, _MARK_STOP = "\x02", "\x03"
HEADLINE_OPTIONS = f"MaxFragments=2, MaxWords=28, MinWords=10, FragmentDelimiter=\" … \", StartSel={_MARK_START}, StopSel={_MARK_STOP}"
# ts_headline re-parses the text, its cost grows with length: the first 4,000
# characters hold the description's gist and keep 10 snippets at ~2-4 ms.
HEADLINE_CHARS = 4000
# Fused results can be paged this deep (each side then fetches this many candidates).
MAX_RESULT_DEPTH = 500
RRF_K_RANGE = (1, 1000)
FUSION_METHODS = ("rrf", "weighted")


@dataclass(frozen=True)
class SearchFilters:
    """Attribute filters; each tuple matches any of its values, empty means no filter.

    created_from/created_to compare the date part of metadata.created
    (metadata.date for Q&A rows), inclusive. categories match a Q&A row's
    class (metadata.label).
    """

    issue_types: tuple[str, ...] = ()
    priorities: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    resolutions: tuple[str, ...] = ()
    components: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    created_from: date | None = None
    created_to: date | None = None

    # Tickets keep their creation time in metadata.created, Q&A rows in metadata.date (ISO strings).
    _DATE: ClassVar[str] = "left(coalesce(d.metadata->>'created', d.metadata->>'date'), 10)"
    # filter name -> SQL on alias d; %s takes a text[] parameter. Q&A
    # importers store the row's class/category as metadata.label.
    _SCALAR: ClassVar[dict[str, str]] = {
        "issue_types": "d.metadata->>'issue_type' = ANY(%s)",
        "priorities": "d.metadata->>'priority' = ANY(%s)",
        "statuses": "d.metadata->>'status' = ANY(%s)",
        "resolutions": "d.metadata->>'resolution' = ANY(%s)",
        "categories": "d.metadata->>'label' = ANY(%s)",
        "components": "d.metadata->'components' ?| %s",
        "labels": "d.metadata->'labels' ?| %s",
    }

    def sql(self) -> tuple[str, list[Any]]:
        """' AND ...' conditions on alias d and their parameters (values are always bound)."""
        parts: list[str] = []
        params: list[Any] = []
        for name, condition in self._SCALAR.items():
            values = getattr(self, name)
            if values:
                parts.append(condition)
                params.append(list(values))
        if self.created_from:
            parts.append(f"{self._DATE} >= %s")
            params.append(self.created_from.isoformat())
        if self.created_to:
            parts.append(f"{self._DATE} <= %s")
            params.append(self.created_to.isoformat())
        return "".join(f" AND {p}" for p in parts), params

    @property
    def is_empty(self) -> bool:
        return not self.sql()[1]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: list(getattr(self, name)) for name in self._SCALAR if getattr(self, name)}
        if self.created_from:
            out["created_from"] = self.created_from.isoformat()
        if self.created_to:
            out["created_to"] = self.created_to.isoformat()
        return out


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


def resolve_fusion(
    *, index: SearchIndex, method: str | None = None, alpha: float | None = None, rrf_k: int | None = None
) -> dict[str, Any]:
    """The fusion a query uses: explicit arguments over the index's tuned default over RRF k=60."""
    default = index.fusion or {}
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
    if method == "rrf":
        return {"method": "rrf", "rrf_k": rrf_k}
    return {"method": "weighted", "alpha": round(alpha, 4)}


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
    candidates = max(CANDIDATES_PER_SIDE, depth) if mode == "hybrid" else depth + 1
    keyword: list[tuple[int, float]] = []
    vector: list[tuple[int, float]] = []
    identifier_ids: set[int] = set()
    started = time.perf_counter()
    pending_vector = None
    if mode in ("hybrid", "vector") and query_vector is None:
        # The query is embedded on a helper thread while PostgreSQL runs the
        # keyword side on this one (torch releases the GIL): hybrid latency
        # becomes max(embedding, keyword) + vector instead of their sum.
        pending_vector = _embed_pool.submit(_timed_encode, index.model_version.artifact_path, query)
    if mode in ("hybrid", "keyword"):
        # In hybrid mode the vector side carries a query whose words no
        # document mostly shares; the costly any-word pass is keyword-only.
        keyword, identifier_ids, relaxed = _keyword_ranking(
            index.dataset, query, candidates, filters, any_word=mode == "keyword"
        )
        response.notice = " ".join(filter(None, [response.notice, relaxed]))
        response.timings_ms["keyword"] = _ms(started)
    if mode in ("hybrid", "vector"):
        if pending_vector is not None:
            query_vector, response.timings_ms["embed"] = pending_vector.result()
        t1 = time.perf_counter()
        vector = _vector_ranking(index, query_vector, candidates, filters)
        response.timings_ms["vector"] = _ms(t1)

    if mode == "keyword":
        ranked = keyword
    elif mode == "vector":
        ranked = vector
    elif fusion_used["method"] == "rrf":
        ranked = reciprocal_rank_fusion([[d for d, _ in keyword], [d for d, _ in vector]], k=fusion_used["rrf_k"])
    else:
        ranked = weighted_score_fusion(keyword, vector, alpha=fusion_used["alpha"])
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


# Query embedding runs on one intra-op thread, one query at a time per
# process: on the 2 shared cores, MiniLM with torch's default 2 threads took
# p50 290 ms / p95 1,020 ms per query under load (OpenMP threads spinning
# against other processes) and p50 25 ms / p95 34 ms with 1. Concurrent
# requests get their parallelism from the web server's processes instead.
QUERY_ENCODE_THREADS = 1
_encode_lock = threading.Lock()


def encode_query(*, artifact_path: str, text: str) -> list[float]:
    """The normalised query vector. Side effect: torch's thread count is 1 while it encodes, then restored."""
    import torch

    model = encoders.get_model(artifact_path)
    with _encode_lock:
        previous = torch.get_num_threads()
        torch.set_num_threads(QUERY_ENCODE_THREADS)
        try:
            vector = model.encode([text], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        finally:
            torch.set_num_threads(previous)
    return vector[0].tolist()


# Two threads: one query embedding runs at a time per process (the lock in
# encode_query); the second lets the next request's job queue without waiting.
_embed_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="query-embed")


def _timed_encode(artifact_path: str, text: str) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    vector = encode_query(artifact_path=artifact_path, text=text)
    return vector, _ms(t0)


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
    documents = Document.objects.in_bulk(ids)
    snippets = _snippets(index.dataset, query, ids)
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
                snippet_html=snippets.get(doc_id, ""),
            )
        )
    return hits


def query_identifiers(query: str) -> list[str]:
    """The identifier-like tokens of a query (shown to people; the SQL splits them itself)."""
    return [t for t in (tok.strip(".-/:$#") for tok in _TOKEN.findall(query)) if t and _IDENTIFIER.search(t)]


_KEYWORD_SQL = (
    "SELECT d.id, ts_rank_cd(d.search_vector, q.tq) AS rank "
    "FROM training_document d, (SELECT {tsquery} AS tq) q "
    "WHERE d.dataset_id = %s AND q.tq IS NOT NULL AND d.search_vector @@ q.tq{filters} "
    "ORDER BY rank DESC, d.id LIMIT %s"
)
_ALL_WORDS = "websearch_to_tsquery(%s::regconfig, %s)"
# "Any word": the query's own lexemes OR-ed (as evaluation.keyword_rankings does).
_ANY_WORD = (
    "(SELECT to_tsquery(%s::regconfig, string_agg(quote_literal(lexeme), ' | ')) "
    "FROM unnest(to_tsvector(%s::regconfig, %s)))"
)


def _identifier_sql(filters_sql: str) -> str:
    """Documents holding every word of the query in the side index, ranked by their any-word rank.

    Concatenated, not str.format()-ed: the expression holds braces.
    """
    return (
        "SELECT d.id, ts_rank_cd(d.search_vector, " + _ANY_WORD + ") AS rank "
        "FROM training_document d WHERE d.dataset_id = %s AND " + IDENTIFIER_TSVECTOR + " @@ "
        "websearch_to_tsquery('simple'::regconfig, translate(%s, " + _TRANSLATE_ARGS + "))"
        + filters_sql + " ORDER BY rank DESC, d.id LIMIT %s"
    )


# Relaxing "all words": documents with all but 1, then all but 2 of the
# query's lexemes (Elasticsearch's minimum_should_match), written as an OR of
# AND-groups so each group stays selective and the GIN index does the work.
# Up to 12 lexemes (66 groups when dropping 2); at least 2 must remain.
MAX_RELAXED_LEXEMES = 12
MAX_DROPPED_WORDS = 2
# Last resort in keyword mode: any word, ranking only the first 500 matches
# found. Ranking every document that shares one common word with the query
# read and ranked ~30k tsvectors at 100k tickets: 0.5-1.7 s per query.
ANY_WORD_CAP = 500

_ANY_WORD_CAPPED_SQL = (
    "SELECT s.id, ts_rank_cd(s.sv, %s::tsquery) AS rank FROM ("
    "SELECT d.id, d.search_vector AS sv FROM training_document d "
    "WHERE d.dataset_id = %s AND d.search_vector @@ %s::tsquery{filters} LIMIT %s"
    ") s ORDER BY rank DESC, s.id LIMIT %s"
)


def _tsquery_literal(groups) -> str:
    """tsquery text OR-ing AND-groups of lexemes, each quoted (bound as a parameter, cast ::tsquery)."""

    def quoted(lexeme: str) -> str:
        return "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"

    return " | ".join("(" + " & ".join(quoted(lexeme) for lexeme in group) + ")" for group in groups)


def _keyword_ranking(
    dataset: Dataset, query: str, limit: int, filters: SearchFilters, *, any_word: bool = True
) -> tuple[list[tuple[int, float]], set[int], str]:
    """(ranking, ids matched through the identifier index, notice when the query was relaxed).

    Full text (all words, the dataset's language) and, when the query holds
    identifiers, the side index (all words too, unstemmed, identifiers split
    at their punctuation) are merged: a document found by either matches
    every word of the query. Documents only the side index finds are ranked
    by their any-word rank. When nothing has all the words the query is
    relaxed to all but 1, then all but 2 words, then (if `any_word`) any
    word among the first ANY_WORD_CAP matches. All values are bound
    parameters; only our own SQL fragments are formatted in.
    """
    config = dataset.language
    where, params = filters.sql()
    notice = ""
    with connection.cursor() as cursor:
        by_identifier: list[tuple[int, float]] = []
        if query_identifiers(query):
            cursor.execute(_identifier_sql(where), [config, config, query, dataset.pk, query, *params, limit])
            by_identifier = [(doc_id, float(rank)) for doc_id, rank in cursor.fetchall()]
        cursor.execute(
            _KEYWORD_SQL.format(tsquery=_ALL_WORDS, filters=where), [config, query, dataset.pk, *params, limit]
        )
        rows = [(doc_id, float(rank)) for doc_id, rank in cursor.fetchall()]
        if not rows and not by_identifier:
            cursor.execute("SELECT lexeme FROM unnest(to_tsvector(%s::regconfig, %s))", [config, query])
            lexemes = [row[0] for row in cursor.fetchall()]
            for dropped in range(1, MAX_DROPPED_WORDS + 1):
                if len(lexemes) > MAX_RELAXED_LEXEMES or len(lexemes) - dropped < 2:
                    break
                tsquery = _tsquery_literal(combinations(lexemes, len(lexemes) - dropped))
                cursor.execute(
                    _KEYWORD_SQL.format(tsquery="%s::tsquery", filters=where), [tsquery, dataset.pk, *params, limit]
                )
                rows = [(doc_id, float(rank)) for doc_id, rank in cursor.fetchall()]
                if rows:
                    notice = (
                        f"No document has all the words; showing documents with all but {dropped} of them."
                    )
                    break
            if not rows and any_word and lexemes:
                tsquery = _tsquery_literal([lexeme] for lexeme in lexemes)
                cursor.execute(
                    _ANY_WORD_CAPPED_SQL.format(filters=where),
                    [tsquery, dataset.pk, tsquery, *params, ANY_WORD_CAP, limit],
                )
                rows = [(doc_id, float(rank)) for doc_id, rank in cursor.fetchall()]
                if rows:
                    notice = "No document has most of the words; showing documents with any of them."
    identifier_ids = {doc_id for doc_id, _ in by_identifier}
    scores = dict(by_identifier)
    scores.update(rows)  # the full-text rank wins where both found a document
    ranking = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    return ranking[:limit], identifier_ids, notice


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


def _run_knn(sql: str, params: list[Any], limit: int) -> list[tuple[int, float]]:
    """Run a kNN statement with ef_search >= limit and iterative scans, in one transaction.

    SET LOCAL keeps the settings to this transaction, so pooled connections
    are left as they were.
    """
    ef_search = max(HNSW_EF_SEARCH, min(int(limit), 1000))
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL hnsw.ef_search = {ef_search}; SET LOCAL hnsw.iterative_scan = relaxed_order")
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    return [(doc_id, float(sim)) for doc_id, sim in rows]


def _snippets(dataset: Dataset, query: str, ids: list[int]) -> dict[int, str]:
    """ts_headline fragments of the bodies (HTML-escaped, matches in <mark>)."""
    if not ids:
        return {}
    sql = (
        "SELECT d.id, ts_headline(%s::regconfig, left(d.body, %s), websearch_to_tsquery(%s::regconfig, %s), %s) "
        "FROM training_document d WHERE d.id = ANY(%s)"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [dataset.language, HEADLINE_CHARS, dataset.language, query, HEADLINE_OPTIONS, ids])
        rows = cursor.fetchall()
    return {doc_id: _marked_html(text or "") for doc_id, text in rows}


def _marked_html(text: str) -> str:
    return (
        escape(" ".join(text.split()))
        .replace(_MARK_START, "<mark>")
        .replace(_MARK_STOP, "</mark>")
    )


def similar_documents(
    *, index: SearchIndex, document: Document, k: int = 10, filters: SearchFilters | None = None
) -> list[Hit]:
    """The k nearest documents to `document` under the index's vectors (itself excluded)."""
    if not index.is_searchable:
        raise SearchError(f"This index is {index.status}: similar tickets need a ready index.")
    if document.dataset_id != index.dataset_id:
        raise SearchError("This document is not in the index's dataset.")
    if not 1 <= k <= MAX_K:
        raise SearchError(f"k: must be between 1 and {MAX_K}, got {k}.")
    where, params = (filters or SearchFilters()).sql()
    dims, version_id = int(index.model_version.dimensions), int(index.model_version_id)
    source = (
        "(SELECT s.embedding::{cast} FROM search_embedding s "
        f"WHERE s.document_id = {int(document.pk)} AND s.model_version_id = {version_id})"
    )
    if not Embedding.objects.filter(document=document, model_version_id=version_id).exists():
        raise SearchError(f"{document.external_key} has no vector in this index yet.")
    sql = _vector_sql(dims, version_id, where + f" AND e.document_id <> {int(document.pk)}", source=source)
    ranked = _run_knn(sql, [index.dataset_id, *params, k], k)
    documents = Document.objects.in_bulk([doc_id for doc_id, _ in ranked])
    return [
        Hit(document=documents[doc_id], score=round(sim, 6), vector_rank=rank, vector_similarity=round(sim, 6))
        for rank, (doc_id, sim) in enumerate(ranked, start=1)
    ]


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
    }


def filter_options(*, dataset: Dataset) -> dict[str, list[tuple[str, int]]]:
    """Values (with counts, most frequent first) of each filterable attribute, for the search form.

    One GROUP BY per attribute over the dataset's metadata; cached for 5
    minutes per dataset and document count (~40 ms for 20k tickets).
    """
    total = Document.objects.filter(dataset=dataset).count()
    key = f"search:filter-options:{dataset.pk}:{total}"
    cached = cache.get(key)
    if cached is not None:
        return cached
    scalar = {"issue_types": "issue_type", "priorities": "priority", "statuses": "status",
              "resolutions": "resolution", "categories": "label"}
    arrays = {"components": "components", "labels": "labels"}
    out: dict[str, list[tuple[str, int]]] = {}
    with connection.cursor() as cursor:
        for name, key_name in scalar.items():
            cursor.execute(
                "SELECT d.metadata->>%s AS v, count(*) FROM training_document d WHERE d.dataset_id = %s "
                "AND coalesce(d.metadata->>%s, '') <> '' GROUP BY v ORDER BY count(*) DESC, v LIMIT 200",
                [key_name, dataset.pk, key_name],
            )
            out[name] = [(v, n) for v, n in cursor.fetchall()]
        for name, key_name in arrays.items():
            cursor.execute(
                "SELECT v, count(*) FROM training_document d, jsonb_array_elements_text(d.metadata->%s) AS v "
                "WHERE d.dataset_id = %s AND jsonb_typeof(d.metadata->%s) = 'array' "
                "GROUP BY v ORDER BY count(*) DESC, v LIMIT 200",
                [key_name, dataset.pk, key_name],
            )
            out[name] = [(v, n) for v, n in cursor.fetchall()]
    cache.set(key, out, 300)
    return out


# --- Fusion tuning and search evaluation ------------------------------------------

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
    embeddings = evaluation.index_embeddings(eval_set=eval_set, model_version_id=index.model_version_id)
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


# --- Duplicate finder ------------------------------------------------------------------

DEFAULT_DUPLICATE_THRESHOLD = 0.9
# Neighbours looked at per document; pairs beyond the 5th neighbour are rare
# above a 0.85 threshold and each extra one costs HNSW work for every document.
DUPLICATE_NEIGHBOURS = 5
# Documents per INSERT ... SELECT statement (one HNSW lookup each, ~1-3 ms),
# with the heartbeat/progress saved in between.
DUPLICATE_CHUNK = 500


def start_duplicate_scan(*, index: SearchIndex, threshold: float = DEFAULT_DUPLICATE_THRESHOLD) -> SearchIndex:
    """Queue a duplicate scan of the index's dataset (after commit); refused while one is under way."""
    from search import tasks

    if index.status != SearchIndex.Status.READY:
        raise SearchError(f"This index is {index.status}: the duplicate finder needs a ready index.")
    if not 0.5 <= threshold < 1.0:
        raise SearchError(f"threshold: must be at least 0.5 and below 1, got {threshold}.")
    busy = (SearchIndex.ScanStatus.QUEUED, SearchIndex.ScanStatus.RUNNING)
    claimed = SearchIndex.objects.filter(pk=index.pk).exclude(duplicates_status__in=busy).update(
        duplicates_status=SearchIndex.ScanStatus.QUEUED, duplicates_threshold=threshold, duplicates_error=""
    )
    if not claimed:
        raise SearchError("A duplicate scan of this index is already queued or running.")
    transaction.on_commit(lambda: tasks.scan_duplicates.delay(index_id=index.pk))
    index.refresh_from_db()
    return index


def scan_duplicates(*, index: SearchIndex) -> SearchIndex:
    """Store every pair of the dataset whose cosine similarity is >= the queued threshold.

    Side effects: duplicates_status queued -> running -> done/failed; deletes
    the dataset's unreviewed pairs, then inserts the pairs found (each
    document's DUPLICATE_NEIGHBOURS nearest, via HNSW). Reviewed pairs keep
    their decision and are not re-added as pending.
    """
    claimed = SearchIndex.objects.filter(pk=index.pk, duplicates_status=SearchIndex.ScanStatus.QUEUED).update(
        duplicates_status=SearchIndex.ScanStatus.RUNNING, duplicates_started_at=timezone.now(), duplicates_found=0
    )
    index.refresh_from_db()
    if not claimed:
        return index
    threshold = float(index.duplicates_threshold or DEFAULT_DUPLICATE_THRESHOLD)
    cast, version_id = vector_cast(index.model_version.dimensions)[0], int(index.model_version_id)
    sql = (
        "INSERT INTO search_duplicatepair (dataset_id, document_a_id, document_b_id, similarity, found_with_id, "
        "decision, created_at) "
        "SELECT DISTINCT ON (a, b) %s, a, b, sim, %s, 'pending', now() FROM ("
        "  SELECT LEAST(src.document_id, nn.document_id) AS a, GREATEST(src.document_id, nn.document_id) AS b, nn.sim "
        "  FROM search_embedding src CROSS JOIN LATERAL ("
        f"    SELECT e.document_id, 1 - ((e.embedding::{cast}) <=> (src.embedding::{cast})) AS sim "
        "    FROM search_embedding e JOIN training_document d ON d.id = e.document_id "
        f"    WHERE e.model_version_id = {version_id} AND d.dataset_id = %s "
        f"    ORDER BY (e.embedding::{cast}) <=> (src.embedding::{cast}) LIMIT %s"
        "  ) nn "
        f"  WHERE src.model_version_id = {version_id} AND src.document_id = ANY(%s) "
        "  AND nn.document_id <> src.document_id AND nn.sim >= %s"
        ") found ORDER BY a, b, sim DESC "
        "ON CONFLICT (document_a_id, document_b_id) DO NOTHING"
    )
    try:
        DuplicatePair.objects.filter(dataset_id=index.dataset_id, decision=DuplicatePair.Decision.PENDING).delete()
        ids = list(Document.objects.filter(dataset_id=index.dataset_id).order_by("id").values_list("id", flat=True))
        found = 0
        for start in range(0, len(ids), DUPLICATE_CHUNK):
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(f"SET LOCAL hnsw.ef_search = {HNSW_EF_SEARCH}")
                cursor.execute(
                    sql,
                    [index.dataset_id, version_id, index.dataset_id, DUPLICATE_NEIGHBOURS + 1,
                     ids[start : start + DUPLICATE_CHUNK], threshold],
                )
                found += cursor.rowcount
            SearchIndex.objects.filter(pk=index.pk).update(duplicates_found=found)
    except Exception as exc:  # the job fails with the reason; pairs stored so far are kept
        logger.exception("duplicate scan of index %s failed", index.pk)
        SearchIndex.objects.filter(pk=index.pk).update(
            duplicates_status=SearchIndex.ScanStatus.FAILED, duplicates_finished_at=timezone.now(),
            duplicates_error=f"{type(exc).__name__}: {exc}",
        )
    else:
        SearchIndex.objects.filter(pk=index.pk).update(
            duplicates_status=SearchIndex.ScanStatus.DONE, duplicates_finished_at=timezone.now()
        )
    index.refresh_from_db()
    return index


def decide_duplicate(*, pair: DuplicatePair, decision: str, user) -> DuplicatePair:
    """Record a reviewer's verdict on a pair (duplicate / not_duplicate / pending to undo)."""
    if decision not in DuplicatePair.Decision.values:
        raise SearchError(f"decision: must be one of {', '.join(DuplicatePair.Decision.values)}, got {decision!r}.")
    undo = decision == DuplicatePair.Decision.PENDING
    pair.decision = decision
    pair.decided_by = None if undo else user
    pair.decided_at = None if undo else timezone.now()
    pair.save(update_fields=["decision", "decided_by", "decided_at"])
    return pair


def duplicate_pairs(*, dataset: Dataset, decision: str | None = None):
    """The dataset's pairs, most similar first, with both documents (one query)."""
    pairs = DuplicatePair.objects.filter(dataset=dataset).select_related("document_a", "document_b", "decided_by")
    if decision:
        pairs = pairs.filter(decision=decision)
    return pairs.order_by("-similarity", "id")
