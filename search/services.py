"""Search indexes (embedding jobs) and hybrid search.

Hybrid search runs PostgreSQL full text (websearch_to_tsquery over the
weighted tsvector, GIN index) and pgvector cosine kNN (per-version partial
HNSW index), and fuses the two rankings with reciprocal rank fusion.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from django.contrib.postgres.search import SearchQuery, SearchRank
from django.db import connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from search import encoders
from search.fusion import reciprocal_rank_fusion
from search.models import Embedding, SearchIndex
from training.models import Dataset, Document, ModelVersion

logger = logging.getLogger(__name__)

# Documents encoded and written per chunk. 256 MiniLM texts at 256 tokens take
# ~8 s on 2 CPU cores; progress is saved after each chunk, so a crash loses at
# most one chunk.
EMBED_CHUNK_SIZE = 256
# Characters of a document sent to the tokenizer: MiniLM truncates at 256
# tokens (~1,000-1,500 characters), so longer text only costs tokenizing time.
MAX_EMBED_CHARS = 4000
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
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS {hnsw_index_name(version_id)} ON search_embedding "
            f"USING hnsw ((embedding::vector({dims})) vector_cosine_ops) "
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
        model = encoders.get_model(version.artifact_path)
        pending = Document.objects.filter(dataset=index.dataset).exclude(
            embeddings__model_version=version
        )
        total = Document.objects.filter(dataset=index.dataset).count()
        done = total - pending.count()
        SearchIndex.objects.filter(pk=index.pk).update(total_count=total, embedded_count=done)
        ids = list(pending.order_by("id").values_list("id", flat=True))
        for start in range(0, len(ids), EMBED_CHUNK_SIZE):
            chunk = list(
                Document.objects.filter(id__in=ids[start : start + EMBED_CHUNK_SIZE]).values_list("id", "title", "body")
            )
            texts = [(f"{title}\n{body}" if body else title)[:MAX_EMBED_CHARS] for _, title, body in chunk]
            vectors = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
            Embedding.objects.bulk_create(
                [
                    Embedding(document_id=doc_id, model_version=version, embedding=vec)
                    for (doc_id, _, _), vec in zip(chunk, vectors.astype(np.float32))
                ],
                ignore_conflicts=True,
            )
            done += len(chunk)
            SearchIndex.objects.filter(pk=index.pk).update(embedded_count=done, heartbeat_at=timezone.now())
        ensure_hnsw_index(model_version=version)
    except Exception as exc:  # the job fails with the reason; vectors written so far are kept
        logger.exception("building index %s failed", index.pk)
        SearchIndex.objects.filter(pk=index.pk).update(
            status=SearchIndex.Status.FAILED, finished_at=timezone.now(), error=f"{type(exc).__name__}: {exc}"
        )
    else:
        SearchIndex.objects.filter(pk=index.pk).update(status=SearchIndex.Status.READY, finished_at=timezone.now())
    index.refresh_from_db()
    return index


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


@dataclass
class Hit:
    document: Document
    score: float
    keyword_rank: int | None = None
    vector_rank: int | None = None
    keyword_score: float | None = None
    vector_similarity: float | None = None


@dataclass
class SearchResponse:
    query: str
    mode: str
    hits: list[Hit] = field(default_factory=list)
    message: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)


def hybrid_search(*, index: SearchIndex, query: str, k: int = 10, mode: str = "hybrid") -> SearchResponse:
    """Top-k documents of the index's dataset for `query`.

    Empty or punctuation-only queries return no hits with a message, not an
    error; queries over MAX_QUERY_CHARS are cut.
    """
    import time

    if mode not in MODES:
        raise SearchError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}.")
    if not 1 <= k <= MAX_K:
        raise SearchError(f"k: must be between 1 and {MAX_K}, got {k}.")
    if mode != "keyword" and index.status != SearchIndex.Status.READY:
        raise SearchError(
            f"This index is {index.status}: vector and hybrid search need a ready index "
            f"({index.embedded_count}/{index.total_count} documents embedded). Use mode=keyword meanwhile."
        )
    query = (query or "").strip()[:MAX_QUERY_CHARS]
    response = SearchResponse(query=query, mode=mode)
    if not any(ch.isalnum() for ch in query):
        response.message = "Type some words to search for." if not query else "The query has no words to search for."
        return response

    keyword: list[tuple[int, float]] = []
    vector: list[tuple[int, float]] = []
    started = time.perf_counter()
    if mode in ("hybrid", "keyword"):
        keyword = _keyword_ranking(index.dataset, query, CANDIDATES_PER_SIDE if mode == "hybrid" else k)
        response.timings_ms["keyword"] = round((time.perf_counter() - started) * 1000, 2)
    if mode in ("hybrid", "vector"):
        t0 = time.perf_counter()
        query_vector = encoders.encode_query(index.model_version.artifact_path, query)
        response.timings_ms["embed"] = round((time.perf_counter() - t0) * 1000, 2)
        t1 = time.perf_counter()
        vector = _vector_ranking(index, query_vector, CANDIDATES_PER_SIDE if mode == "hybrid" else k)
        response.timings_ms["vector"] = round((time.perf_counter() - t1) * 1000, 2)

    keyword_info = {doc_id: (rank, score) for rank, (doc_id, score) in enumerate(keyword, start=1)}
    vector_info = {doc_id: (rank, sim) for rank, (doc_id, sim) in enumerate(vector, start=1)}
    if mode == "keyword":
        ranked = [(doc_id, score) for doc_id, score in keyword]
    elif mode == "vector":
        ranked = [(doc_id, sim) for doc_id, sim in vector]
    else:
        ranked = reciprocal_rank_fusion([[d for d, _ in keyword], [d for d, _ in vector]])
    ranked = ranked[:k]
    documents = Document.objects.in_bulk([doc_id for doc_id, _ in ranked])
    for doc_id, score in ranked:
        kw = keyword_info.get(doc_id)
        vec = vector_info.get(doc_id)
        response.hits.append(
            Hit(
                document=documents[doc_id],
                score=round(float(score), 6),
                keyword_rank=kw[0] if kw else None,
                keyword_score=round(kw[1], 6) if kw else None,
                vector_rank=vec[0] if vec else None,
                vector_similarity=round(vec[1], 6) if vec else None,
            )
        )
    response.timings_ms["total"] = round((time.perf_counter() - started) * 1000, 2)
    if not response.hits:
        response.message = "No document matches this query."
    return response


def _keyword_ranking(dataset: Dataset, query: str, limit: int) -> list[tuple[int, float]]:
    ts_query = SearchQuery(query, search_type="websearch", config=dataset.language)
    rows = (
        Document.objects.filter(dataset=dataset, search_vector=ts_query)
        .annotate(rank=SearchRank(F("search_vector"), ts_query))
        .order_by("-rank", "id")
        .values_list("id", "rank")[:limit]
    )
    return [(doc_id, float(rank)) for doc_id, rank in rows]


def _vector_ranking(index: SearchIndex, query_vector: list[float], limit: int) -> list[tuple[int, float]]:
    """Cosine kNN over the version's partial HNSW index, restricted to the dataset.

    The cast `embedding::vector(dims)` and `model_version_id = N` repeat the
    partial index's definition so PostgreSQL can use it; iterative scans
    (pgvector >= 0.8) keep returning rows when the dataset filter removes many.
    """
    dims = int(index.model_version.dimensions)
    sql = (
        f"SELECT e.document_id, 1 - ((e.embedding::vector({dims})) <=> %s::vector({dims})) AS similarity "
        "FROM search_embedding e JOIN training_document d ON d.id = e.document_id "
        f"WHERE e.model_version_id = {int(index.model_version_id)} AND d.dataset_id = %s "
        f"ORDER BY (e.embedding::vector({dims})) <=> %s::vector({dims}) LIMIT %s"
    )
    # pgvector's text form "[x,y,...]" bound as a parameter and cast in SQL.
    vec = "[" + ",".join(f"{x:.7g}" for x in query_vector) + "]"
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL hnsw.ef_search = {HNSW_EF_SEARCH}")
        cursor.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
        cursor.execute(sql, [vec, index.dataset_id, vec, limit])
        rows = cursor.fetchall()
    return [(doc_id, float(sim)) for doc_id, sim in rows]


def serialize_hit(hit: Hit) -> dict[str, Any]:
    doc = hit.document
    return {
        "id": doc.pk,
        "key": doc.external_key,
        "title": doc.title,
        "snippet": doc.body[:300],
        "metadata": {k: v for k, v in doc.metadata.items() if k != "links"},
        "score": hit.score,
        "keyword_rank": hit.keyword_rank,
        "vector_rank": hit.vector_rank,
        "keyword_score": hit.keyword_score,
        "vector_similarity": hit.vector_similarity,
    }
