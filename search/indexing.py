"""Index builds: a dataset's documents embedded with a model version into pgvector, as a job.

The build is a Job (embedportal.jobs): claimed under a row lock, fenced by
its attempt, beating while it embeds, re-queued by the one reaper when its
worker dies (embedding resumes: documents that already have a vector are
skipped), failed after max_attempts. A finished build tunes the index's
fusion and lets a pending promotion switch over.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import connection

from embedportal import jobs
from search import embedding
from training.fusion import RRF_K
from search.models import Embedding, SearchIndex
from search.vectors import vector_cast
from training.models import Dataset, ModelVersion

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


def run_build(*, index_id: int) -> None:
    """The build job: claim, embed what is missing, create the HNSW index, finish fenced, then tune.

    Side effects: queued -> running -> ready/failed; writes Embedding rows in
    chunks (idempotent: documents that already have a vector are skipped, so
    a crashed build resumes where it stopped); creates the HNSW index.
    """
    attempt = jobs.run_job(SearchIndex, index_id, _build)
    if attempt is None:
        return
    index = SearchIndex.objects.select_related("model_version").filter(pk=index_id).first()
    if index is None:  # deleted with its dataset while it was built: the attempt stopped at its fence
        return
    if index.status == SearchIndex.Status.READY and index.attempt == attempt.number:
        from search import serving  # serving creates indexes through this module: imported here, not at the top

        serving.on_index_ready(index=index)  # a pending promotion switches now, atomically
        retire_base_indexes(dataset=index.dataset)  # the production model's index replaces the base model's
        _tune_after_build(index)
        from search.clustering import assignment  # needs this index's new vectors: after the build, not at the signal

        assignment.after_index_build(index=index)


def _build(attempt: jobs.Attempt) -> None:
    index = SearchIndex.objects.select_related("model_version", "dataset").get(pk=attempt.pk)
    version = index.model_version
    attempt.set_phase("embedding", 0.0)

    def progress(p) -> None:
        attempt.update(
            embedded_count=p.done, total_count=p.total, docs_per_s=round(p.docs_per_s, 2), backend=p.backend,
            progress=round(p.done / p.total, 4) if p.total else None,
        )
        attempt.check()

    result = embedding.embed_documents(dataset=index.dataset, model_version=version, on_chunk=progress)
    attempt.update(
        embedded_count=result.done, total_count=result.total, backend=result.backend,
        docs_per_s=result.docs_per_s if result.docs_per_s else None, phase="building the HNSW index",
    )
    ensure_hnsw_index(model_version=version)
    attempt.check()


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
