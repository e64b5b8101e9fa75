"""Serving: which model version answers a dataset's search, and the vectors it brings.

A promotion is a request: search keeps answering from the current production
version until the requested version's index for the dataset is complete; the
switch is then one transaction (stage flips), so no query ever sees a half
built index. The previous version keeps its vectors, which makes a rollback
instant. Deleting a version drops its vectors and HNSW index; vector export
reads them. Web/API/admin/tasks call these functions only.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path
from typing import Iterator

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from embedportal.errors import ConflictError, ServiceError
from search.indexing import create_index, is_base_version
from search.models import Embedding, SearchIndex
from search.vectors import drop_partition
from training import artifacts, temporary_files
from training.evaluation import not_worse
from training.importers import csv_safe
from training.models import Dataset, ModelVersion
from training.registry import download_name, held_out_ndcg, production_version
from training.retraining import retrain_tolerance
from training.temporary_files import TemporaryExport

logger = logging.getLogger(__name__)


def request_promotion(*, version: ModelVersion, user=None, require_not_worse: bool = False) -> ModelVersion:
    """Ask for `version` to serve its dataset; switch now if its index is ready, else when it is.

    With require_not_worse, the candidate must not be worse than the current
    production: the champion/challenger comparison of daily retraining
    (training.evaluation.not_worse: paired bootstrap over per-query nDCG@10,
    95% lower bound of the gain above -tolerance, no metric of the held-out
    table down by more than the tolerance; the dataset's retrain tolerance,
    else EMBEDPORTAL_RETRAIN_TOLERANCE).
    Side effects: sets promotion_requested_at/promoted_by; creates or re-queues
    the (dataset, version) search index.
    """
    if version.dataset is None:
        raise ConflictError("This version has no dataset (it was deleted), so it cannot serve search.")
    if version.stage == ModelVersion.Stage.PRODUCTION:
        return version
    current = production_version(dataset=version.dataset)
    if require_not_worse and current is not None:
        mine, theirs = held_out_ndcg(version), held_out_ndcg(current)
        if mine is None or theirs is None:
            raise ConflictError(
                f"Cannot compare {version} with production {current}: held-out nDCG@10 is missing on "
                f"{'the candidate' if mine is None else 'production'}. Promote without the guard, or evaluate both."
            )
        verdict = not_worse(candidate=version, champion=current, tolerance=retrain_tolerance(dataset=version.dataset))
        if not verdict.promote:
            lower = (f"{version} scores nDCG@10 {mine:.4f} on held-out tickets, below production {current} "
                     f"({theirs:.4f})" if mine < theirs else f"{version} is not shown to be as good as {current}")
            comparison = f" ({verdict.comparison.describe()})" if verdict.comparison else ""
            raise ConflictError(f"{lower}: {verdict.reason}{comparison}; not promoted.")
    with transaction.atomic():
        ModelVersion.objects.filter(pk=version.pk).update(promotion_requested_at=timezone.now(), promoted_by=user)
        index = create_index(owner=version.owner, dataset=version.dataset, model_version=version)
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
        raise ConflictError(f"{dataset.name} has no earlier production version with a ready index to roll back to.")
    ModelVersion.objects.filter(pk=previous.pk).update(promoted_by=user)
    return switch_production(version=previous)


def delete_version(*, version: ModelVersion) -> None:
    """Delete a version, its vectors, HNSW index and artifact folder; refused while it is in use."""
    if version.stage == ModelVersion.Stage.PRODUCTION:
        raise ConflictError(f"{version} is in production; promote another version or roll back first.")
    if version.promotion_requested_at:
        raise ConflictError(f"{version} is waiting to be promoted; wait for its index or cancel by promoting another.")
    busy = version.search_indexes.filter(status__in=[SearchIndex.Status.QUEUED, SearchIndex.Status.RUNNING]).count()
    if busy:
        raise ConflictError(f"{version} has {busy} index build(s) in progress; wait for them to finish.")
    artifact = Path(version.artifact_path)
    pk = version.pk
    with transaction.atomic():
        version.search_indexes.all().delete()
        version.delete()
        drop_partition(pk)  # its vectors' table and HNSW index (search.vectors), with the row
    version.pk = pk  # delete() cleared it; the store's and the cache's folders are named by it
    artifacts.forget(version=version)  # the store's copy and this host's cache of it
    models_dir = Path(settings.MODELS_DIR).resolve()
    if artifact.exists() and models_dir in artifact.resolve().parents:
        shutil.rmtree(artifact.parent if artifact.name == "model" else artifact, ignore_errors=True)


EXPORT_FORMATS = ("parquet", "jsonl", "csv")
EXPORT_BATCH = 2000


def export_embeddings(*, version: ModelVersion, fmt: str) -> TemporaryExport:
    """Write the version's vectors (key, title, vector) to version-<id>.<fmt> in a temporary folder of its own.

    The caller removes that folder. CSV cells pass through importers.csv_safe
    (formula prefixes neutralised), as every CSV the product writes.
    """
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
    return TemporaryExport(folder=tmp, path=path, download_name=download_name(version, fmt))


def _batches(iterator, size: int = EXPORT_BATCH) -> Iterator[list]:
    batch = []
    for item in iterator:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def serving_index(*, dataset: Dataset):
    """The index that answers for the dataset now: its production model's, else its base model's, else the newest.

    A searchable index wins over one still being built (which answers keyword
    queries only). None when the dataset has no index.
    """
    indexes = list(SearchIndex.objects.filter(dataset=dataset).select_related("model_version").order_by("-pk"))

    def rank(index) -> tuple:
        version = index.model_version
        production = version.stage == ModelVersion.Stage.PRODUCTION and version.dataset_id == dataset.pk
        return (index.is_searchable, production, is_base_version(version))

    return max(indexes, key=rank, default=None)
