"""The model registry: versions, promotion with zero-downtime switches, rollback, export.

A promotion is a request: search keeps answering from the current production
version until the requested version's index for the dataset is complete; the
switch is then one transaction (stage flips), so no query ever sees a half
built index. The previous version keeps its vectors, which makes a rollback
instant. Web/API/admin/tasks call these functions only.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path
from typing import Iterator

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Max
from django.utils import timezone

from training import temporary_files
from training.errors import ServiceError
from training.importers import csv_safe
from training.models import Dataset, Document, ModelVersion, TrainingRun
from training.temporary_files import TemporaryExport

logger = logging.getLogger(__name__)


def register_version(
    *, run: TrainingRun, artifact_path: Path, dimensions: int, embeddings: tuple | None = None
) -> ModelVersion:
    """Record a trained model as a candidate; request its promotion when its dataset has no production model.

    Side effects: creates a ModelVersion (name = dataset name, next number for
    that name, lineage to the run and the dataset's latest version); stores
    `embeddings` = (document ids, vectors) from the run's evaluation as the
    version's vectors so the index build only embeds what is missing.
    """
    from search.vectors import store_embeddings

    name = run.dataset.name
    dataset_version = run.dataset.versions.order_by("-number").first() if hasattr(run.dataset, "versions") else None
    for _ in range(3):
        latest = ModelVersion.objects.filter(owner=run.owner, name=name).aggregate(v=Max("version"))["v"] or 0
        try:
            with transaction.atomic():
                version = ModelVersion.objects.create(
                    owner=run.owner,
                    name=name,
                    version=latest + 1,
                    base_model=run.base_model,
                    artifact_path=str(artifact_path),
                    dimensions=dimensions,
                    source_run=run,
                    dataset=run.dataset,
                    dataset_version=dataset_version,
                    created_by=run.owner,
                    metrics={"final_loss": run.metrics.get("final_loss"), **_held_out_metrics(run)},
                )
            break
        except IntegrityError:
            continue  # another run took the number; take the next
    else:
        raise ServiceError(f"Could not allocate a version number for {name}.")
    from training import artifacts

    artifacts.publish(version=version)
    if embeddings is not None:
        doc_ids, vectors = embeddings
        hashes = dict(Document.objects.filter(pk__in=doc_ids).values_list("pk", "content_hash"))
        store_embeddings(
            model_version=version, doc_ids=doc_ids, vectors=vectors, content_hashes=[hashes.get(d, "") for d in doc_ids]
        )
    if not ModelVersion.objects.filter(dataset=run.dataset, stage=ModelVersion.Stage.PRODUCTION).exists():
        request_promotion(version=version, user=run.owner)
    return version


def _held_out_metrics(run: TrainingRun) -> dict:
    systems = (run.evaluation or {}).get("systems", {})
    tuned = systems.get("fine_tuned")
    return {"held_out": tuned} if tuned else {}


def held_out_ndcg(version: ModelVersion) -> float | None:
    value = (version.metrics or {}).get("held_out", {}).get("ndcg@10")
    return float(value) if value is not None else None


def production_version(*, dataset: Dataset) -> ModelVersion | None:
    return ModelVersion.objects.filter(dataset=dataset, stage=ModelVersion.Stage.PRODUCTION).first()


def request_promotion(*, version: ModelVersion, user=None, require_not_worse: bool = False) -> ModelVersion:
    """Ask for `version` to serve its dataset; switch now if its index is ready, else when it is.

    With require_not_worse, a candidate whose held-out nDCG@10 is below the
    current production's is refused (the guard daily retraining uses).
    Side effects: sets promotion_requested_at/promoted_by; creates or re-queues
    the (dataset, version) search index.
    """
    from search import services as search_services
    from search.models import SearchIndex

    if version.dataset is None:
        raise ServiceError("This version has no dataset (it was deleted), so it cannot serve search.")
    if version.stage == ModelVersion.Stage.PRODUCTION:
        return version
    current = production_version(dataset=version.dataset)
    if require_not_worse and current is not None:
        mine, theirs = held_out_ndcg(version), held_out_ndcg(current)
        if mine is None or theirs is None:
            raise ServiceError(
                f"Cannot compare {version} with production {current}: held-out nDCG@10 is missing on "
                f"{'the candidate' if mine is None else 'production'}. Promote without the guard, or evaluate both."
            )
        if mine < theirs:
            raise ServiceError(
                f"{version} scores nDCG@10 {mine:.4f} on held-out tickets, below production {current} ({theirs:.4f}); "
                "not promoted."
            )
    with transaction.atomic():
        ModelVersion.objects.filter(pk=version.pk).update(promotion_requested_at=timezone.now(), promoted_by=user)
        index = search_services.create_index(owner=version.owner, dataset=version.dataset, model_version=version)
        if index.status == SearchIndex.Status.READY:
            switch_production(version=version)
    version.refresh_from_db()
    return version


def switch_production(*, version: ModelVersion) -> ModelVersion:
    """Atomically make `version` production and archive the previous one (its vectors are kept)."""
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        ModelVersion.objects.filter(dataset=locked.dataset, stage=ModelVersion.Stage.PRODUCTION).exclude(
            pk=locked.pk
        ).update(stage=ModelVersion.Stage.ARCHIVED)
        ModelVersion.objects.filter(pk=locked.pk).update(
            stage=ModelVersion.Stage.PRODUCTION, promoted_at=timezone.now(), promotion_requested_at=None
        )
    version.refresh_from_db()
    logger.info("%s is now production for dataset %s", version, version.dataset_id)
    return version


def on_index_ready(*, index) -> None:
    """Called when an index build completes: finish a pending promotion of its version."""
    version = ModelVersion.objects.filter(pk=index.model_version_id).first()
    if version and version.promotion_requested_at and version.stage != ModelVersion.Stage.PRODUCTION:
        switch_production(version=version)


def rollback(*, dataset: Dataset, user=None) -> ModelVersion:
    """Serve the previous production version again, at once (its index is still there)."""
    from search.models import SearchIndex

    previous = (
        ModelVersion.objects.filter(
            dataset=dataset,
            stage=ModelVersion.Stage.ARCHIVED,
            promoted_at__isnull=False,
            search_indexes__dataset=dataset,
            search_indexes__status=SearchIndex.Status.READY,
        )
        .order_by("-promoted_at")
        .first()
    )
    if previous is None:
        raise ServiceError(f"{dataset.name} has no earlier production version with a ready index to roll back to.")
    ModelVersion.objects.filter(pk=previous.pk).update(promoted_by=user)
    return switch_production(version=previous)


def delete_version(*, version: ModelVersion) -> None:
    """Delete a version, its vectors, HNSW index and artifact folder; refused while it is in use."""
    from search.models import SearchIndex
    from search.services import hnsw_index_name

    if version.stage == ModelVersion.Stage.PRODUCTION:
        raise ServiceError(f"{version} is in production; promote another version or roll back first.")
    if version.promotion_requested_at:
        raise ServiceError(f"{version} is waiting to be promoted; wait for its index or cancel by promoting another.")
    busy = version.search_indexes.filter(status__in=[SearchIndex.Status.QUEUED, SearchIndex.Status.RUNNING]).count()
    if busy:
        raise ServiceError(f"{version} has {busy} index build(s) in progress; wait for them to finish.")
    artifact = Path(version.artifact_path)
    with transaction.atomic():
        version.search_indexes.all().delete()
        with connection.cursor() as cursor:
            cursor.execute(f"DROP INDEX IF EXISTS {hnsw_index_name(version.pk)}")
        version.delete()
    models_dir = Path(settings.MODELS_DIR).resolve()
    if artifact.exists() and models_dir in artifact.resolve().parents:
        shutil.rmtree(artifact.parent if artifact.name == "model" else artifact, ignore_errors=True)


def _download_name(version: ModelVersion, extension: str) -> str:
    # Shown in the browser's save dialog only (training.downloads); the file on disk is named by id.
    return f"{version.name[:100]}-v{version.version}.{extension}"


def export_zip(*, version: ModelVersion) -> TemporaryExport:
    """A zip of the model folder that `SentenceTransformer(unzipped_path)` loads.

    Written as version-<id>.zip in a temporary folder of its own; the caller
    removes that folder (training.downloads.temporary_file_response does).
    """
    folder = Path(version.artifact_path)
    if not (folder / "modules.json").exists() and not (folder / "config.json").exists():
        raise ServiceError(f"The files of {version} are not on this server ({folder}).")
    with temporary_files.new_folder("export") as tmp:
        path = Path(shutil.make_archive(str(tmp / f"version-{version.pk}"), "zip", root_dir=folder))
    return TemporaryExport(folder=tmp, path=path, download_name=_download_name(version, "zip"))


EXPORT_FORMATS = ("parquet", "jsonl", "csv")
EXPORT_BATCH = 2000


def export_embeddings(*, version: ModelVersion, fmt: str) -> TemporaryExport:
    """Write the version's vectors (key, title, vector) to version-<id>.<fmt> in a temporary folder of its own.

    The caller removes that folder. CSV cells pass through importers.csv_safe
    (formula prefixes neutralised), as every CSV the product writes.
    """
    from search.models import Embedding

    if fmt not in EXPORT_FORMATS:
        raise ServiceError(f"format: must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}.")
    rows = (
        Embedding.objects.filter(model_version=version)
        .order_by("document_id")
        .values_list("document__external_key", "document__title", "embedding")
    )
    with temporary_files.new_folder("vectors") as tmp:
        path = tmp / f"version-{version.pk}.{fmt}"
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([("key", pa.string()), ("title", pa.string()),
                                ("embedding", pa.list_(pa.float32(), int(version.dimensions)))])
            with pq.ParquetWriter(path, schema) as writer:
                for batch in _batches(rows.iterator(chunk_size=EXPORT_BATCH)):
                    writer.write_table(pa.table(
                        {"key": [r[0] for r in batch], "title": [r[1] for r in batch],
                         "embedding": [list(map(float, r[2])) for r in batch]}, schema=schema))
        elif fmt == "jsonl":
            with open(path, "w", encoding="utf-8") as fh:
                for key, title, vec in rows.iterator(chunk_size=EXPORT_BATCH):
                    fh.write(json.dumps({"key": key, "title": title, "embedding": [round(float(x), 7) for x in vec]}) + "\n")
        else:
            with open(path, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(["key", "title", "embedding"])
                for key, title, vec in rows.iterator(chunk_size=EXPORT_BATCH):
                    writer.writerow([csv_safe(key), csv_safe(title), json.dumps([round(float(x), 7) for x in vec])])
    return TemporaryExport(folder=tmp, path=path, download_name=_download_name(version, fmt))


def _batches(iterator, size: int = EXPORT_BATCH) -> Iterator[list]:
    batch = []
    for item in iterator:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
