"""Business logic for training runs and the model registry.

Views, API views, Celery tasks and management commands call these functions;
none of them mutates these models on its own.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from training import finetune
from training.datasets import dataset_tickets
from training.errors import ServiceError
from training.hyperparameters import Hyperparameters, parse
from training.models import Dataset, ModelVersion, TrainingRun
from training.pairs import build_ticket_pairs

logger = logging.getLogger(__name__)

# Progress is written to the run row at most this often, not once per step.
PROGRESS_WRITE_INTERVAL_S = 2.0
MIN_TRAINING_PAIRS = 2


# --- Training runs --------------------------------------------------------------

HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def check_base_model(name: str) -> str:
    """Refuse a base model that cannot possibly load, before a run is queued."""
    name = (name or "").strip() or settings.DEFAULT_BASE_MODEL
    resolved = finetune.resolve_base_model(name)
    if Path(resolved).is_absolute() or resolved.startswith("."):
        folder = Path(resolved)
        if not folder.is_dir():
            raise ServiceError(f"base_model: the folder {resolved} does not exist on the worker.")
        if not (folder / "modules.json").exists() and not (folder / "config.json").exists():
            raise ServiceError(
                f"base_model: {resolved} holds no sentence-transformers or Hugging Face model "
                "(no modules.json or config.json)."
            )
    elif not HF_ID.match(name):
        raise ServiceError(
            f"base_model: {name!r} is neither a local folder nor a Hugging Face id like "
            "'sentence-transformers/all-MiniLM-L6-v2'."
        )
    return name


def start_run(*, owner, dataset: Dataset, base_model: str = "", hyperparameters: dict | None = None) -> TrainingRun:
    """Validate and queue a training run; the worker picks it up after commit.

    Side effects: creates a queued TrainingRun and enqueues `training.run_training`
    once the transaction commits. Raises ServiceError or HyperparameterError.
    """
    from training import tasks

    if dataset.owner_id != owner.pk:
        raise ServiceError("dataset: not found.")
    hyper = parse(hyperparameters)
    base_model = check_base_model(base_model)
    doc_count = dataset.documents.count()
    if doc_count < MIN_TRAINING_PAIRS:
        raise ServiceError(f"dataset: {dataset.name} has {doc_count} document(s); training needs at least 2.")
    with transaction.atomic():
        run = TrainingRun.objects.create(
            owner=owner, dataset=dataset, base_model=base_model, hyperparameters=hyper.as_dict()
        )
        transaction.on_commit(lambda: tasks.run_training.delay(run_id=run.pk))
    return run


def _claim(run: TrainingRun) -> bool:
    """queued -> running, exactly once even if the task is delivered twice."""
    now = timezone.now()
    claimed = TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.QUEUED).update(
        status=TrainingRun.Status.RUNNING, started_at=now, heartbeat_at=now
    )
    return claimed == 1


def _finish(run: TrainingRun, status: str, **fields: Any) -> None:
    TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING).update(
        status=status, finished_at=timezone.now(), **fields
    )


def execute_run(*, run: TrainingRun, device: str | None = None) -> TrainingRun:
    """Train a queued run to the end and register its model version.

    Side effects: moves the run queued -> running -> succeeded/failed/cancelled,
    writes progress into run.metrics, saves the model under MODELS_DIR,
    creates a ModelVersion (promoted to production when the dataset has none)
    and queues its search index. A run that is not queued is left alone.
    """
    if not _claim(run):
        logger.info("run %s is %s, not queued; skipping", run.pk, run.status)
        run.refresh_from_db()
        return run
    hyper = Hyperparameters(**run.hyperparameters)
    output_dir = Path(settings.MODELS_DIR) / f"run-{run.pk}"
    progress = _ProgressWriter(run)
    try:
        pairs = build_ticket_pairs(dataset_tickets(run.dataset), max_pairs=hyper.max_pairs, seed=hyper.seed)
        if len(pairs) < MIN_TRAINING_PAIRS:
            raise ServiceError(
                f"Only {len(pairs)} training pair(s) could be built from {run.dataset.name}: it needs tickets "
                "with a description of at least 30 characters or Duplicate links between its tickets."
            )
        result = finetune.fine_tune(
            base_model=run.base_model,
            pairs=pairs,
            output_dir=output_dir,
            hyper=hyper,
            device=device or settings.TRAINING_DEVICE,
            on_progress=progress.update,
            should_stop=progress.cancel_requested,
        )
    except finetune.TrainingCancelled:
        _finish(run, TrainingRun.Status.CANCELLED, metrics={**progress.metrics, "cancelled": True})
        shutil.rmtree(output_dir, ignore_errors=True)
        run.refresh_from_db()
        return run
    except Exception as exc:  # any failure ends the run with a reason a person can act on
        logger.exception("training run %s failed", run.pk)
        _finish(run, TrainingRun.Status.FAILED, error=explain_failure(exc), metrics=progress.metrics)
        run.refresh_from_db()
        return run

    metrics = {**progress.metrics, **result.__dict__}
    with transaction.atomic():
        _finish(run, TrainingRun.Status.SUCCEEDED, metrics=metrics)
        run.refresh_from_db()
        if run.status == TrainingRun.Status.SUCCEEDED:
            register_version(run=run, artifact_path=output_dir / "model", dimensions=result.dimensions)
    return run


def explain_failure(exc: Exception) -> str:
    """The error text plus the likely fix for the failures we know."""
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if "out of memory" in lowered or isinstance(exc, MemoryError):
        return text + "\nLikely fix: lower batch_size or max_seq_length."
    if "can't load" in lowered or "does not appear to have" in lowered or "repository not found" in lowered:
        return text + "\nLikely fix: check base_model; this machine may not reach the Hugging Face hub."
    return text


class _ProgressWriter:
    """Batches progress into at most one UPDATE per PROGRESS_WRITE_INTERVAL_S."""

    def __init__(self, run: TrainingRun):
        self.run = run
        self.metrics: dict[str, Any] = {"loss_history": []}
        self._last_write = 0.0
        self._last_cancel_check = 0.0
        self._cancelled = False

    def update(self, point: dict) -> None:
        self.metrics.update({k: point[k] for k in ("step", "total_steps", "epoch", "loss", "learning_rate")})
        self.metrics["loss_history"].append([point["step"], round(point["loss"], 5)])
        now = time.monotonic()
        if now - self._last_write >= PROGRESS_WRITE_INTERVAL_S:
            self._last_write = now
            TrainingRun.objects.filter(pk=self.run.pk).update(metrics=self.metrics, heartbeat_at=timezone.now())

    def cancel_requested(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._last_cancel_check >= 1.0:
            self._last_cancel_check = now
            # Cancellation is a flag the API/UI sets on the row; the worker sees it here.
            row = TrainingRun.objects.filter(pk=self.run.pk).values_list("metrics", flat=True).first()
            self._cancelled = bool(row and row.get("cancel_requested"))
            TrainingRun.objects.filter(pk=self.run.pk).update(heartbeat_at=timezone.now())
        return self._cancelled


def cancel_run(*, run: TrainingRun) -> TrainingRun:
    """Cancel a queued run at once; ask a running one to stop at its next step."""
    TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.QUEUED).update(
        status=TrainingRun.Status.CANCELLED, finished_at=timezone.now()
    )
    run.refresh_from_db()
    if run.status == TrainingRun.Status.RUNNING:
        with transaction.atomic():
            locked = TrainingRun.objects.select_for_update().get(pk=run.pk)
            locked.metrics = {**locked.metrics, "cancel_requested": True}
            locked.save(update_fields=["metrics"])
        run.refresh_from_db()
    return run


def reap_stale_runs(*, timeout_s: int | None = None) -> int:
    """Fail running runs whose worker stopped sending heartbeats. Returns how many."""
    timeout_s = timeout_s if timeout_s is not None else settings.RUN_HEARTBEAT_TIMEOUT_S
    cutoff = timezone.now() - timedelta(seconds=timeout_s)
    return TrainingRun.objects.filter(status=TrainingRun.Status.RUNNING, heartbeat_at__lt=cutoff).update(
        status=TrainingRun.Status.FAILED,
        finished_at=timezone.now(),
        error=f"The worker stopped reporting for over {timeout_s} s (it was killed or lost its connection). "
        "Start the run again.",
    )


# --- Model registry -------------------------------------------------------------


def register_version(*, run: TrainingRun, artifact_path: Path, dimensions: int) -> ModelVersion:
    """Record a trained model; it becomes production when its dataset has none.

    Side effects: creates a ModelVersion (name = dataset name, next version
    number for that name); promotion queues the production search index.
    """
    name = run.dataset.name
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
                    metrics={"final_loss": run.metrics.get("final_loss")},
                )
            break
        except IntegrityError:
            continue  # another run took the number; take the next
    else:
        raise ServiceError(f"Could not allocate a version number for {name}.")
    has_production = ModelVersion.objects.filter(
        dataset=run.dataset, stage=ModelVersion.Stage.PRODUCTION
    ).exists()
    if not has_production:
        promote(version=version)
    return version


def promote(*, version: ModelVersion) -> ModelVersion:
    """Make `version` the production model of its dataset and build its index.

    Side effects: the previous production version of the same dataset becomes
    archived; a search index for (dataset, version) is queued if missing.
    """
    from search import services as search_services

    with transaction.atomic():
        ModelVersion.objects.filter(
            owner=version.owner, dataset=version.dataset, stage=ModelVersion.Stage.PRODUCTION
        ).exclude(pk=version.pk).update(stage=ModelVersion.Stage.ARCHIVED)
        ModelVersion.objects.filter(pk=version.pk).update(stage=ModelVersion.Stage.PRODUCTION)
        version.refresh_from_db()
        if version.dataset is not None:
            search_services.create_index(owner=version.owner, dataset=version.dataset, model_version=version)
    return version
