"""Index builds: a dataset's documents embedded with a model version into pgvector, as a job.

The build is a Job (embedportal.jobs): claimed under a row lock, fenced by
its attempt, beating while it embeds, re-queued by the one reaper when its
worker dies (embedding resumes: documents that already have a vector are
skipped), failed after max_attempts. A finished build tunes the index's
fusion and lets a pending promotion switch over.

Sharded builds: a build with more than settings.EMBED_CHUNK_DOCS pending
documents plans EmbedChunk jobs (id ranges of the pending documents) and
hands off (jobs.HandedOff): every idle embed worker, on any host, takes a
chunk. Each chunk is a job of its own (claimed once, fenced, re-queued by the
reaper when its worker dies, re-done without a second vector); the index
stays RUNNING while a chunk of its attempt lives (SearchIndex.held_by_children).
The chunk that completes the set wins a conditional update of the index's
phase, carries the build's attempt on (jobs.run_attempt), builds the HNSW
index once over the bulk-loaded vectors and finishes READY once. A failed
chunk fails the build and stops its siblings. A build whose chunks all died
is reaped like any build; its next attempt plans chunks for what is still
pending.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from embedportal import jobs
from search import embedding
from training.fusion import RRF_K
from search.models import EmbedChunk, Embedding, SearchIndex
from search.vectors import ensure_partition, partition_name, vector_cast
from training.models import Dataset, Document, ModelVersion

logger = logging.getLogger(__name__)

def create_index(*, owner, dataset: Dataset, model_version: ModelVersion) -> SearchIndex:
    """Get or create the (dataset, version) index and queue its build after commit.

    A failed or cancelled index is queued again (attempts start over); a ready
    or building one is returned as is.
    """
    index, created = SearchIndex.objects.get_or_create(
        dataset=dataset, model_version=model_version, defaults={"owner": owner}
    )
    if created:
        jobs.enqueue(index)
    elif index.status in (SearchIndex.Status.FAILED, SearchIndex.Status.CANCELLED):
        jobs.requeue(index)
    index.refresh_from_db()
    return index


# The default base model's width (all-MiniLM-L6-v2). Known here, not measured, so an import does not load
# a model inside its request; another EMBEDPORTAL_BASE_MODEL gets no automatic base index (keyword search
# still works at once, and the first trained model's index follows).
BASE_MODEL_DIMENSIONS = {"all-minilm-l6-v2": 384, "sentence-transformers/all-minilm-l6-v2": 384}


def is_base_version(version: ModelVersion) -> bool:
    """A version that stands for an untrained base model (made by base_model_version, not by a run)."""
    return version.source_run_id is None and version.artifact_path == version.base_model


def base_model_version(*, owner) -> ModelVersion | None:
    """The owner's one version standing for the configured base model (created on first use), or None.

    No dataset: it is never a dataset's production model, so a first trained model is still promoted.
    """
    name = settings.DEFAULT_BASE_MODEL
    dims = BASE_MODEL_DIMENSIONS.get(name.strip().lower())
    if dims is None:
        return None
    version, _ = ModelVersion.objects.get_or_create(
        owner=owner, name=f"{name} (base model)", version=1,
        defaults={"base_model": name, "artifact_path": name, "dimensions": dims, "created_by": owner},
    )
    return version


def create_base_index(*, dataset: Dataset) -> SearchIndex | None:
    """Queue (after commit) an index of the dataset with the untrained base model, so it is searchable at once.

    Nothing when settings.BASE_INDEX is off, the dataset already has an index,
    or the base model's width is unknown (BASE_MODEL_DIMENSIONS).
    """
    if not settings.BASE_INDEX or SearchIndex.objects.filter(dataset=dataset).exists():
        return None
    version = base_model_version(owner=dataset.owner)
    if version is None:
        logger.info("no base-model index for dataset %s: the width of %s is not known", dataset.pk,
                    settings.DEFAULT_BASE_MODEL)
        return None
    return create_index(owner=dataset.owner, dataset=dataset, model_version=version)


def retire_base_indexes(*, dataset: Dataset) -> int:
    """Delete the dataset's base-model indexes (and their vectors) once its production model's index is ready.

    Returns how many were deleted; none while the production index is not ready.
    """
    if not SearchIndex.objects.filter(
        dataset=dataset, status=SearchIndex.Status.READY,
        model_version__dataset=dataset, model_version__stage=ModelVersion.Stage.PRODUCTION,
    ).exists():
        return 0
    retired = 0
    for index in SearchIndex.objects.filter(dataset=dataset).select_related("model_version"):
        if is_base_version(index.model_version) and index.is_terminal:
            Embedding.objects.filter(model_version=index.model_version, document__dataset=dataset).delete()
            index.delete()
            retired += 1
    return retired


def hnsw_index_name(version_id: int) -> str:
    return f"search_embedding_hnsw_v{int(version_id)}"


def hnsw_build_memory_mb(rows: int, dims: int, *, cap_mb: int | None = None) -> int:
    """maintenance_work_mem (MB) for an HNSW build of `rows` vectors of `dims` dimensions.

    pgvector's graph at m 16 takes about the vector (4 bytes a dimension) plus
    ~300 bytes of neighbour lists and tuple overhead per row; a quarter more
    leaves room. A graph that does not fit is built on disk, many times slower
    (docs/scaling.md). Never under PostgreSQL's own 64 MB, never over cap_mb
    (default settings.HNSW_BUILD_MEMORY_MB).
    """
    need_mb = int(rows * (4 * dims + 300) * 1.25 / 2**20) + 1
    return max(64, min(need_mb, settings.HNSW_BUILD_MEMORY_MB if cap_mb is None else cap_mb))


def ensure_hnsw_index(*, model_version: ModelVersion) -> None:
    """Create the HNSW (cosine) index on the version's partition of search_embedding if missing.

    The index covers that partition only, so building it locks no other
    version's vectors (search.vectors explains the partitions). The build's
    memory is sized to the partition (hnsw_build_memory_mb) and its parallel
    workers come from settings.HNSW_BUILD_WORKERS, both SET LOCAL to the
    build's transaction. DDL cannot take bind parameters; the only values
    formatted in are integers from our own rows and settings, never user input.
    """
    version_id, dims = int(model_version.pk), int(model_version.dimensions)
    cast, ops = vector_cast(dims)  # halfvec above 2,000 dimensions
    ensure_partition(version_id)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [hnsw_index_name(version_id)])
        if cursor.fetchone()[0]:
            return
        cursor.execute(f"SELECT count(*) FROM {partition_name(version_id)}")
        memory_mb = hnsw_build_memory_mb(int(cursor.fetchone()[0]), dims)
        cursor.execute(f"SET LOCAL maintenance_work_mem = '{int(memory_mb)}MB'")
        if settings.HNSW_BUILD_WORKERS >= 0:
            cursor.execute(f"SET LOCAL max_parallel_maintenance_workers = {int(settings.HNSW_BUILD_WORKERS)}")
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS {hnsw_index_name(version_id)} ON {partition_name(version_id)} "
            f"USING hnsw ((embedding::{cast}) {ops})"
        )


def run_build(*, index_id: int) -> None:
    """The build job: claim, embed what is missing (here, or handed to chunks), build HNSW, finish fenced, then tune.

    Side effects: queued -> running -> ready/failed; writes Embedding rows in
    chunks (idempotent: documents that already have a vector are skipped, so
    a crashed build resumes where it stopped); creates the HNSW index. More
    than settings.EMBED_CHUNK_DOCS pending documents are handed to EmbedChunk
    jobs instead (see plan_chunks): the index stays running until the chunk
    that completes the set finishes it (run_chunk).
    """
    attempt = jobs.run_job(SearchIndex, index_id, _build)
    if attempt is not None:
        _after_ready(index_id=index_id, attempt_number=attempt.number)


def _after_ready(*, index_id: int, attempt_number: int) -> None:
    """What follows a build that this attempt finished READY: promotion switch, base index retired, tuning."""
    index = SearchIndex.objects.select_related("model_version").filter(pk=index_id).first()
    if index is None:  # deleted with its dataset while it was built: the attempt stopped at its fence
        return
    if index.status == SearchIndex.Status.READY and index.attempt == attempt_number:
        from search import serving  # serving creates indexes through this module: imported here, not at the top

        serving.on_index_ready(index=index)  # a pending promotion switches now, atomically
        retire_base_indexes(dataset=index.dataset)  # the production model's index replaces the base model's
        _tune_after_build(index)
        from search.clustering import assignment  # needs this index's new vectors: after the build, not at the signal

        assignment.after_index_build(index=index)


def _build(attempt: jobs.Attempt) -> None:
    index = SearchIndex.objects.select_related("model_version", "dataset").get(pk=attempt.pk)
    attempt.set_phase("embedding", 0.0)
    # Chunks of an earlier attempt, or of an earlier build (a refresh starts again at attempt 1): gone, so
    # numbers never collide and a chunk still running somewhere stops at its fence (LostClaim).
    EmbedChunk.objects.filter(index=index).delete()
    pending = list(embedding.pending_documents(dataset=index.dataset, model_version=index.model_version)
                   .order_by("id").values_list("id", flat=True))
    size = int(settings.EMBED_CHUNK_DOCS)
    if 0 < size < len(pending):
        plan_chunks(attempt=attempt, index=index, pending_ids=pending, size=size)
        raise jobs.HandedOff()
    _embed_and_index(attempt, index)


def _embed_and_index(attempt: jobs.Attempt, index: SearchIndex, *, docs_per_s: float | None = None) -> None:
    """Embed the index's pending documents here, then create its HNSW index (once, after the bulk load)."""
    version = index.model_version

    def progress(p) -> None:
        attempt.update(
            embedded_count=p.done, total_count=p.total, docs_per_s=round(p.docs_per_s, 2), backend=p.backend,
            progress=round(p.done / p.total, 4) if p.total else None,
        )
        attempt.check()

    result = embedding.embed_documents(dataset=index.dataset, model_version=version, on_chunk=progress)
    attempt.update(
        embedded_count=result.done, total_count=result.total, backend=result.backend,
        docs_per_s=docs_per_s or result.docs_per_s or None, phase="building the HNSW index",
    )
    ensure_hnsw_index(model_version=version)
    attempt.check()


# --- Sharded builds: chunks every idle embed worker takes -----------------------------

CHUNKED_PHASE = "embedding in chunks"


def plan_chunks(*, attempt: jobs.Attempt, index: SearchIndex, pending_ids: list[int], size: int) -> list[EmbedChunk]:
    """Split the pending documents into EmbedChunk jobs of `size` (by id range) and queue them after commit.

    The encoder is loaded (and its ONNX export made) here first, so workers on
    this host find the export instead of each making it. Side effects: creates
    the chunk rows of this attempt, sets the index's phase, counts and
    progress (fenced), sends one embed-queue message per chunk.
    """
    from search import encoders

    encoders.get_job_encoder(index.model_version.artifact_path, settings.EMBED_BACKEND)
    total = Document.objects.filter(dataset=index.dataset).count()
    ranges = [(pending_ids[i], pending_ids[min(i + size, len(pending_ids)) - 1], min(size, len(pending_ids) - i))
              for i in range(0, len(pending_ids), size)]
    with transaction.atomic():
        chunks = EmbedChunk.objects.bulk_create([
            EmbedChunk(index=index, build_attempt=attempt.number, number=n, first_document_id=first,
                       last_document_id=last, documents=count)
            for n, (first, last, count) in enumerate(ranges, start=1)
        ])
        done = total - len(pending_ids)
        attempt.update(phase=f"{CHUNKED_PHASE}: 0 of {len(chunks)} done", total_count=total, embedded_count=done,
                       progress=round(done / total, 4) if total else None)
        for chunk in chunks:
            jobs.enqueue(chunk)
    logger.info("index %s: %s pending documents in %s chunks", index.pk, len(pending_ids), len(chunks))
    return chunks


def run_chunk(*, chunk_id: int, worker: str = "") -> None:
    """The chunk job: claim, embed the chunk's pending documents, finish fenced; then maybe finish the build.

    A redelivered or duplicate message finds the chunk running or finished and
    does nothing; a killed chunk is re-queued by the reaper and re-done
    without a second vector. The chunk that leaves none of its build's chunks
    unfinished takes the build's attempt by a conditional update and finishes
    it (HNSW once, READY once); a failed chunk fails the build.
    """
    if jobs.run_job(EmbedChunk, chunk_id, lambda attempt: _embed_chunk(attempt, worker=worker)) is not None:
        _after_chunk(chunk_id=chunk_id)


def _embed_chunk(attempt: jobs.Attempt, *, worker: str) -> None:
    chunk = EmbedChunk.objects.select_related("index__model_version", "index__dataset").get(pk=attempt.pk)
    index = chunk.index
    attempt.update(worker=worker[:200], phase="embedding", progress=0.0, embedded_count=0)
    build = SearchIndex.objects.filter(pk=index.pk, status=SearchIndex.Status.RUNNING, attempt=chunk.build_attempt)

    def check_build() -> None:
        if not build.filter(cancel_requested=False).exists():  # cancelled, failed or superseded meanwhile
            raise jobs.Cancelled()

    check_build()

    def progress(p) -> None:
        attempt.update(embedded_count=p.done, progress=round(p.done / p.total, 4) if p.total else None)
        attempt.check()
        check_build()

    result = embedding.embed_documents(dataset=index.dataset, model_version=index.model_version, on_chunk=progress,
                                       id_range=(chunk.first_document_id, chunk.last_document_id))
    attempt.update(embedded_count=result.done)


def _after_chunk(*, chunk_id: int) -> None:
    chunk = EmbedChunk.objects.select_related("index__dataset", "index__model_version").filter(pk=chunk_id).first()
    if chunk is None:
        return
    index, number = chunk.index, chunk.build_attempt
    build = SearchIndex.objects.filter(pk=index.pk, status=SearchIndex.Status.RUNNING, attempt=number)
    siblings = EmbedChunk.objects.filter(index=index, build_attempt=number)
    now = timezone.now()
    if chunk.status == EmbedChunk.FAILED:
        count = siblings.count()
        if build.update(status=SearchIndex.Status.FAILED, finished_at=now, heartbeat_at=now,
                        error=f"Chunk {chunk.number} of {count} (documents {chunk.first_document_id}-"
                              f"{chunk.last_document_id}) failed: {chunk.error}"):
            _stop_chunks(siblings)
        return
    if chunk.status == EmbedChunk.CANCELLED:
        if build.filter(cancel_requested=True).update(status=SearchIndex.Status.CANCELLED, finished_at=now,
                                                      heartbeat_at=now, phase="cancelled"):
            _stop_chunks(siblings)
        return
    if chunk.status != EmbedChunk.SUCCEEDED:
        return
    chunks = siblings.count()
    finished = siblings.filter(status=EmbedChunk.SUCCEEDED).count()
    total = Document.objects.filter(dataset=index.dataset).count()
    pending = embedding.pending_documents(dataset=index.dataset, model_version=index.model_version).count()
    in_chunks = build.filter(phase__startswith=CHUNKED_PHASE)
    in_chunks.update(phase=f"{CHUNKED_PHASE}: {finished} of {chunks} done", heartbeat_at=now,
                     embedded_count=total - pending, total_count=total,
                     progress=round((total - pending) / total, 4) if total else None)
    if finished < chunks:
        return
    # The last chunk landed. Several workers may get here at once: the conditional update lets one through.
    if not in_chunks.update(phase="building the HNSW index", heartbeat_at=timezone.now()):
        return
    started = min(siblings.values_list("created_at", flat=True))
    written = sum(siblings.values_list("embedded_count", flat=True))
    rate = round(written / max((timezone.now() - started).total_seconds(), 1e-3), 2) if written else None
    attempt = jobs.Attempt(model=SearchIndex, pk=index.pk, number=number, _phase="building the HNSW index")
    jobs.run_attempt(attempt, lambda held: _embed_and_index(held, index, docs_per_s=rate))
    _after_ready(index_id=index.pk, attempt_number=number)


def _stop_chunks(chunks) -> None:
    """Cancel these chunks: queued ones at once, running ones at their next safe point."""
    now = timezone.now()
    chunks.filter(status=EmbedChunk.QUEUED).update(status=EmbedChunk.CANCELLED, cancel_requested=True,
                                                   finished_at=now, phase="cancelled")
    chunks.filter(status=EmbedChunk.RUNNING).update(cancel_requested=True)


def build_index(*, index: SearchIndex) -> SearchIndex:
    """Run the index's build here and now (tests, commands); the worker's task calls run_build."""
    run_build(index_id=index.pk)
    index.refresh_from_db()
    return index


def _tune_after_build(index: SearchIndex) -> None:
    """Tune the default fusion of a freshly built index; a failure keeps RRF k=60 and says why."""
    from search import tuning

    try:
        tuning.tune_fusion(index=index)
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
    queued = 0
    for index in SearchIndex.objects.filter(dataset=dataset, status=SearchIndex.Status.READY):
        if jobs.requeue(index):
            queued += 1
    return queued
