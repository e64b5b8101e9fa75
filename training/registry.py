"""The model registry: versions, lineage, the model folder as a zip.

Promotion, rollback, deletion and vector export switch or read vectors, so
they live with them in search/serving.py; training announces a new version
with the model_version_registered signal.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from django.db import IntegrityError, transaction
from django.db.models import Max

from training import temporary_files
from training.errors import NotFoundError, ServiceError
from training.models import Dataset, ModelVersion, TrainingRun
from training.signals import model_version_registered
from training.temporary_files import TemporaryExport

logger = logging.getLogger(__name__)


def register_version(
    *, run: TrainingRun, artifact_path: Path, dimensions: int, embeddings: tuple | None = None
) -> ModelVersion:
    """Record a trained model as a candidate; request its promotion when its dataset has no production model.

    Side effects: creates a ModelVersion (name = dataset name, next number for
    that name, lineage to the run and the dataset's latest version), publishes
    its folder to the artifact store, and sends model_version_registered with
    `embeddings` = (document ids, vectors) from the run's evaluation, which
    search stores as the version's vectors (and promotes a first model).
    """
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
    # Search stores the vectors and promotes a dataset's first model (search.receivers).
    model_version_registered.send(sender=ModelVersion, version=version, embeddings=embeddings)
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


def download_name(version: ModelVersion, extension: str) -> str:
    # Shown in the browser's save dialog only (training.downloads); the file on disk is named by id.
    return f"{version.name[:100]}-v{version.version}.{extension}"


def export_zip(*, version: ModelVersion) -> TemporaryExport:
    """A zip of the model folder that `SentenceTransformer(unzipped_path)` loads.

    Written as version-<id>.zip in a temporary folder of its own; the caller
    removes that folder (training.downloads.temporary_file_response does).
    """
    from training import artifacts

    folder = Path(artifacts.ensure_local(version.artifact_path))  # trained on another host: its cached copy
    if not (folder / "modules.json").exists() and not (folder / "config.json").exists():
        raise NotFoundError(f"The files of {version} are not on this server ({folder}).")
    with temporary_files.new_folder("export") as tmp:
        path = Path(shutil.make_archive(str(tmp / f"version-{version.pk}"), "zip", root_dir=folder))
    return TemporaryExport(folder=tmp, path=path, download_name=download_name(version, "zip"))
