"""Training runs: check the base model, start, execute one attempt (a job of embedportal.jobs), cancel.

Views, API views, Celery tasks and management commands call these functions;
none of them mutates runs on its own. The trained model is registered through
training.registry; the held-out proof comes from training.heldout.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Callable

from django.conf import settings
from django.db import transaction
from django.db.models import F, Value
from django.db.models.functions import Concat
from django.utils import timezone

from embedportal import jobs
from training import artifacts, distributed, finetune, pairs, registry
from training import evaluation as evaluation_module
from training.fusion import fusion_name
from training.errors import ServiceError
from training.hyperparameters import Hyperparameters, parse
from training.models import Dataset, ModelVersion, TrainingRun

logger = logging.getLogger(__name__)

# Progress is written to the run row at most this often, not once per step.
PROGRESS_WRITE_INTERVAL_S = 2.0
MIN_TRAINING_PAIRS = 2


# --- Training runs --------------------------------------------------------------

# A Hugging Face id: "name" or "org/name", each part starting with a letter or digit (so no
# leading "/" or "." and no ".." part).
HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
# "Continue from one of my versions": the run stores this and trains from the version's folder.
VERSION_REF = re.compile(r"^version:(\d+)$")
# One answer for a folder or version that does not exist and for one that is not the user's, so
# the message reveals nothing about other users' models or the worker's disk.
BASE_MODEL_UNAVAILABLE = (
    "base_model: not found or not available to you. Give a Hugging Face id like "
    "'sentence-transformers/all-MiniLM-L6-v2', one of your model versions as 'version:<id>' (or base_version), "
    "or a folder under a directory your administrator allows (EMBEDPORTAL_BASE_MODEL_DIRS)."
)


def check_base_model(*, owner, name: str) -> str:
    """The base model to store on a new run, or ServiceError(BASE_MODEL_UNAVAILABLE).

    Allowed: the configured default (and the shipped offline copy of
    all-MiniLM-L6-v2), a Hugging Face id, `version:<id>` of one of the
    owner's model versions, or a model folder inside settings.BASE_MODEL_DIRS
    (resolved, so `..` and symlinks cannot leave it; never MODELS_DIR, where
    every user's fine-tuned models live: those are reached by version only).
    A folder is returned resolved, so the worker loads what was checked.
    """
    name = (name or "").strip() or settings.DEFAULT_BASE_MODEL
    if name == settings.DEFAULT_BASE_MODEL or name.lower() in finetune.DEFAULT_MODEL_ALIASES:
        return name  # the administrator's choice, or the copy shipped in a package
    match = VERSION_REF.match(name)
    if match:
        if not ModelVersion.objects.filter(pk=int(match[1]), owner=owner).exists():
            raise ServiceError(BASE_MODEL_UNAVAILABLE)
        return f"version:{int(match[1])}"
    # SentenceTransformer loads an existing local path before asking the hub, so an id that is
    # also a folder relative to the working directory is checked as a folder.
    if HF_ID.match(name) and ".." not in name and not _exists(Path(name)):
        return name
    folder = _allowed_folder(name)
    if folder is None:
        raise ServiceError(BASE_MODEL_UNAVAILABLE)
    return str(folder)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _allowed_folder(name: str) -> Path | None:
    """The resolved model folder when it lies inside an allowed root; None otherwise."""
    try:
        folder = Path(name).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return None
    roots = [Path(root).resolve() for root in getattr(settings, "BASE_MODEL_DIRS", []) if str(root).strip()]
    models_dir = Path(settings.MODELS_DIR).resolve()
    if folder == models_dir or models_dir in folder.parents:
        return None
    if not any(folder == root or root in folder.parents for root in roots):
        return None
    if not folder.is_dir() or not ((folder / "modules.json").is_file() or (folder / "config.json").is_file()):
        return None
    return folder


def base_model_path(*, run: TrainingRun) -> str:
    """What the worker loads for the run's base model: the parent version's folder for
    `version:<id>` (downloaded from the artifact store if this machine lacks it), else the
    name as finetune resolves it. Ownership is checked again: the version may be gone."""
    match = VERSION_REF.match(run.base_model)
    if match is None:
        return finetune.resolve_base_model(run.base_model)
    parent = ModelVersion.objects.filter(pk=int(match[1]), owner_id=run.owner_id).first()
    if parent is None:
        raise ServiceError(f"base_model: model version {match[1]} was deleted after the run was queued; "
                           "start a new run from another version.")
    return artifacts.ensure_local(parent.artifact_path)


def start_run(
    *, owner, dataset: Dataset, base_model: str = "", hyperparameters: dict | None = None, enqueue: bool = True
) -> TrainingRun:
    """Validate and queue a training run; the worker picks it up after commit.

    Side effects: creates a queued TrainingRun and (unless enqueue=False, as the
    `train` command does to run it in-process) sends `training.run_training`
    once the transaction commits (jobs.enqueue: with the broker down the run
    stays queued, "waiting for the queue", and the reaper sends it later).
    Raises ServiceError or HyperparameterError.
    """
    if dataset.owner_id != owner.pk:
        raise ServiceError("dataset: not found.")
    hyper = parse(hyperparameters)
    base_model = check_base_model(owner=owner, name=base_model)
    doc_count = dataset.documents.count()
    if doc_count < MIN_TRAINING_PAIRS:
        raise ServiceError(f"dataset: {dataset.name} has {doc_count} document(s); training needs at least 2.")
    shape = expected_shape(dataset=dataset, hyper=hyper)
    try:
        finetune.choose_loss(hyper.loss, shape)
    except ValueError as exc:
        raise ServiceError(str(exc)) from exc
    run = TrainingRun.objects.create(owner=owner, dataset=dataset, base_model=base_model, hyperparameters=hyper.as_dict())
    if enqueue:
        jobs.enqueue(run)
        run.refresh_from_db()  # outside a transaction it was sent already: the phase says whether the broker took it
    return run


STRATEGY_SHAPES = {"tickets": finetune.PAIRS, "qa": finetune.PAIRS, "pairs": finetune.PAIRS,
                   "labels": finetune.TRIPLETS, "triplets": finetune.TRIPLETS}


def expected_shape(*, dataset: Dataset, hyper: Hyperparameters) -> str:
    """The training data's shape for this dataset and settings (checked against the loss at submission)."""
    strategy = hyper.strategy or pairs.DEFAULT_STRATEGY.get(dataset.kind, "tickets")
    shape = STRATEGY_SHAPES.get(strategy, finetune.PAIRS)
    return finetune.TRIPLETS if hyper.hard_negatives and shape == finetune.PAIRS else shape


def build_training_data(*, run: TrainingRun, hyper: Hyperparameters, log: Callable[[str], None]):
    """The run's training examples and validation set, through training.pairs.build_pairs.

    Tickets without max_pairs are capped at every link pair plus as many
    summary -> description pairs again (at least 1,000), so a default run on
    20k tickets takes minutes rather than an hour on CPU (Hadoop: ~3,400
    pairs). The TEST split is never used; validation rows never train.
    """
    from training.heldout import validation_from_pairs

    options = {"dataset": run.dataset, "strategy": hyper.strategy, "seed": hyper.seed,
               "weak_positives": hyper.weak_positives, "duplicate_anchor": hyper.duplicate_anchor}
    cap = hyper.max_pairs
    if cap is None and (hyper.strategy or pairs.DEFAULT_STRATEGY.get(run.dataset.kind)) == "tickets":
        counts = pairs.build_pairs(**options).counts
        strong = sum(v for k, v in counts.items() if k == "duplicate" or k.startswith("link:"))
        cap = max(1000, 2 * strong)
    hard = pairs.HardNegatives(model=base_model_path(run=run)) if hyper.hard_negatives else None
    pair_set = pairs.build_pairs(**options, max_pairs=cap, hard_negatives=hard)
    if len(pair_set.train) < MIN_TRAINING_PAIRS:
        raise ServiceError(
            f"Only {len(pair_set.train)} training example(s) could be built from {run.dataset.name} with the "
            f"{pair_set.strategy} strategy; tickets need descriptions of at least 30 characters or Duplicate "
            "links, Q&A rows need answers, labelled rows need two labels."
        )
    data = finetune.TrainingData({name: [row[i] for row in pair_set.train] for i, name in enumerate(pair_set.columns)})
    validation = validation_from_pairs(pair_set.validation, [row[1] for row in pair_set.train])
    log(f"{len(data)} training {data.shape} ({pair_set.strategy} strategy, cap {cap}; {pair_set.counts}); "
        + (f"validation: {len(validation.queries)} queries over {len(validation.corpus)} texts" if validation
           else "no validation rows"))
    return pair_set, data, validation


def run_folder(*, run: TrainingRun) -> Path:
    """The run's folder; each attempt works in its own attempt-<n> inside it (jobs.Attempt.workdir)."""
    return Path(settings.MODELS_DIR) / f"run-{int(run.pk)}"


def execute_run(*, run: TrainingRun, device: str | None = None, echo: Callable[[str], None] | None = None) -> TrainingRun:
    """Train a queued run to the end, evaluate it, and register its model version: one attempt of the job.

    Claimed through embedportal.jobs (a redelivered message finds the run
    running or finished and does nothing); the job system's heartbeat beats
    through every phase. Side effects: queued -> running ->
    succeeded/failed/cancelled (attempt + 1); writes the phase (pairs,
    evaluation, training, model card, registration), progress, validation
    history and the log into the row in batches, every write fenced by the
    attempt (a reaped, stale attempt stops with LostClaim); keeps its
    checkpoints and model under MODELS_DIR/run-N/attempt-<n>/ and resumes from
    the previous attempt's checkpoint_path by reading it; evaluates base and
    fine-tuned models on the held-out TEST split into run.evaluation; saves the
    model with a model card; registers a ModelVersion (see register_trained_model).
    A run that is not queued is left alone. Returns the run as it ended.
    """
    jobs.run_job(TrainingRun, run.pk, lambda attempt: _train(attempt, device=device, echo=echo))
    return TrainingRun.objects.filter(pk=run.pk).first() or run


def _train(attempt: jobs.Attempt, *, device: str | None, echo: Callable[[str], None] | None) -> None:
    """The body of one attempt (jobs.run_job finishes the run by how this returns or raises)."""
    from training import heldout

    run = TrainingRun.objects.select_related("dataset", "owner").get(pk=attempt.pk)
    hyper = Hyperparameters.from_stored(run.hyperparameters)
    device = finetune.pick_device(device or settings.TRAINING_DEVICE)
    output_dir = attempt.workdir(run_folder(run=run))
    progress = _ProgressWriter(run, attempt=attempt, echo=echo)
    # Read only: this attempt writes its own checkpoints into its own folder.
    resume_from = run.checkpoint_path if run.checkpoint_path and Path(run.checkpoint_path).is_dir() else None
    try:
        progress.phase("pairs")
        if run.error:  # why the previous attempt stopped (the reaper's note), kept in the log
            progress.log(run.error)
        progress.log(f"attempt {attempt.number} of {run.max_attempts} on {device}"
                     + (f", resuming from {resume_from}" if resume_from else ""))
        base_path = base_model_path(run=run)
        if VERSION_REF.match(run.base_model):
            progress.log(f"continuing from {run.base_model} ({base_path})")
        pair_set, data, validation = build_training_data(run=run, hyper=hyper, log=progress.log)
        if pair_set.strategy == "tickets":
            # What this model trained on: fusion is tuned on none of it (training.evaluation.trained_keys).
            progress.metrics["training_split"] = {"seed": hyper.seed, "trained_keys": pair_set.trained_keys}
        held_out = (heldout.for_run(dataset=run.dataset, strategy=pair_set.strategy, seed=hyper.seed,
                                    log=progress.log) if hyper.evaluate else None)
        evaluation = dict(run.evaluation or {})
        if held_out is not None and held_out.available and "base" not in evaluation.get("systems", {}):
            progress.phase("evaluation of the base model")
            base = held_out.model(base_path, max_seq_length=hyper.max_seq_length, device=device)
            evaluation = {
                "queries": len(held_out.eval_set.queries),
                "kind": "qa" if isinstance(held_out, heldout.QAHeldOutEvaluation) else "tickets",
                "systems": held_out.before_systems(base),
            }
            attempt.update(evaluation=evaluation)
            progress.log(f"base model nDCG@10 {base.vector.metrics['ndcg@10']:.4f}")
        progress.phase("training")
        devices, capped = distributed.devices_for(requested=hyper.devices, device=device,
                                                  max_cpu_processes=settings.MAX_CPU_PROCESSES)
        if capped:
            progress.log(capped)
        # One device: fine_tune in this process; several: the same code under torchrun, rank 0 reporting here.
        result = distributed.train(
            devices=devices,
            base_model=base_path,
            data=data,
            output_dir=output_dir,
            hyper=hyper,
            device=device,
            validation=validation,
            resume_from=resume_from,
            on_progress=progress.update,
            on_checkpoint=progress.checkpoint,
            on_log=progress.log,
            should_stop=progress.cancel_requested,
        )
        stored_embeddings = None
        if held_out is not None and held_out.available:
            progress.phase("evaluation of the fine-tuned model")
            tuned = held_out.model(str(output_dir / "model"), max_seq_length=hyper.max_seq_length, device=device)
            stored_embeddings = held_out.stored_embeddings(tuned)
            # The base model's per-query results (cached in this process, recomputed after a resume).
            base_result = held_out.model(base_path, max_seq_length=hyper.max_seq_length, device=device).vector
            evaluation["systems"].update(held_out.after_systems(tuned))
            evaluation["per_query"] = held_out.drilldown(base_result, tuned.vector)
            progress.log(f"fine-tuned model nDCG@10 {tuned.vector.metrics['ndcg@10']:.4f}")
            served = held_out.served(str(output_dir / "model"), trained_keys=_lineage_trained_keys(run, pair_set),
                                     max_seq_length=hyper.max_seq_length, device=device)
            if served is not None:
                evaluation["systems"]["served"] = served["system"]
                evaluation["served_fusion"] = served["fusion"]
                progress.log(f"served (tuned {fusion_name(served['fusion'])} on {served['fusion']['queries']} "
                             f"untrained validation queries) nDCG@10 {served['system']['ndcg@10']:.4f}")
        elif held_out is not None:
            evaluation = {"unavailable": held_out.unavailable}
        elif hyper.evaluate:
            evaluation = {"unavailable": "Before/after evaluation on a TEST split is made for ticket and Q&A "
                                         "datasets; this run's validation nDCG@10 (above) is measured on held-out "
                                         "groups."}
        progress.phase("model card")
        finetune.write_model_card(
            model_dir=output_dir / "model",
            title=f"EmbedPortal: {run.dataset.name}, run #{run.pk}",
            data={"dataset": run.dataset.name, "documents": run.dataset.documents.count(),
                  "strategy": pair_set.strategy, "training examples": len(data), "counts": pair_set.counts,
                  "base model": run.base_model, "loss": result.loss},
            hyperparameters=hyper.as_dict(),
            metrics=evaluation.get("systems", {}),
        )
    except (jobs.Cancelled, finetune.TrainingCancelled):
        progress.metrics["cancelled"] = True
        progress.log("cancelled; checkpoints kept")
        raise jobs.Cancelled() from None
    except jobs.LostClaim:
        raise  # another attempt owns the run now: write nothing more
    except Exception as exc:  # any failure ends the run with a reason a person can act on
        logger.exception("training run %s failed", run.pk)
        progress.log(f"failed: {type(exc).__name__}: {exc}")
        error = explain_failure(exc)
        if resume_from:
            error += (f"\nThe run was resuming from {resume_from}; if that checkpoint is damaged, "
                      "start a new run (it begins from the base model).")
        raise jobs.JobFailed(error) from exc

    result_fields = {k: v for k, v in result.__dict__.items() if k != "validation_history"}
    progress.metrics = {**progress.metrics, **result_fields}
    register_trained_model(
        attempt=attempt, progress=progress, model_dir=output_dir / "model", dimensions=result.dimensions,
        evaluation=evaluation,
        embeddings=stored_embeddings,
    )


def _lineage_trained_keys(run: TrainingRun, pair_set) -> set[str]:
    """Ticket keys this run trained on, plus those of the versions it continued from."""
    keys = set(pair_set.trained_keys)
    match = VERSION_REF.match(run.base_model)
    parent = ModelVersion.objects.filter(pk=int(match[1])).select_related("source_run").first() if match else None
    if parent is not None:
        keys |= evaluation_module.trained_keys(parent)[0]
    return keys


def register_trained_model(*, attempt: jobs.Attempt, model_dir: Path, dimensions: int, evaluation: dict | None = None,
                           embeddings: tuple | None = None, progress: "_ProgressWriter | None" = None) -> ModelVersion:
    """Register the attempt's trained model and finish the run as succeeded, fenced and all or nothing.

    The fence: one transaction that first locks the run row while it is
    running *with this attempt* (else LostClaim: a stale attempt never
    registers a version) and holds the lock until the run is succeeded, so the
    reaper cannot take the run back halfway. Side effects: writes the final
    metrics and evaluation, creates the ModelVersion (registry.register_version,
    which uploads the artifact when a store is configured), logs it, marks the
    run succeeded. A failure leaves no version and raises JobFailed
    ("registration failed: ..."): the run fails once, it is not retrained.
    """
    run_qs = TrainingRun.objects.filter(pk=attempt.pk)
    progress = progress or _ProgressWriter(run_qs.get(), attempt=attempt)
    progress.phase("registration")
    try:
        with transaction.atomic():
            run = (run_qs.select_for_update(of=("self",)).select_related("dataset", "owner")
                   .filter(status=TrainingRun.Status.RUNNING, attempt=attempt.number).first())
            if run is None:
                attempt.lost = True
                raise jobs.LostClaim(f"training run {attempt.pk} attempt {attempt.number} lost its claim")
            fields = {"metrics": progress.metrics, **({"evaluation": evaluation} if evaluation is not None else {})}
            attempt.update(phase="registration", **fields)
            for name, value in fields.items():
                setattr(run, name, value)  # register_version reads the final metrics and evaluation
            version = registry.register_version(
                run=run, artifact_path=Path(model_dir), dimensions=dimensions, embeddings=embeddings,
            )
            progress.log(f"registered {version} ({version.get_stage_display()})")
            attempt.finish(phase="done", error="")  # a retried run's "attempt 1 stopped..." is in its log
    except jobs.LostClaim:
        raise
    except Exception as exc:
        logger.exception("training run %s: registration failed", attempt.pk)
        reason = f"registration failed: {type(exc).__name__}: {exc}"
        progress.log(reason)
        raise jobs.JobFailed(f"{reason}\nThe trained model is kept in {model_dir}; fix the cause and "
                             "start a new run.") from exc
    return version


def explain_failure(exc: Exception) -> str:
    """The error text plus the likely fix for the failures we know."""
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if "out of memory" in lowered or isinstance(exc, MemoryError):
        return text + "\nLikely fix: lower batch_size or max_seq_length, or use loss cached_mnrl."
    if "can't load" in lowered or "does not appear to have" in lowered or "repository not found" in lowered:
        return text + "\nLikely fix: check base_model; this machine may not reach the Hugging Face hub."
    if "checkpoint" in lowered and ("corrupt" in lowered or "unexpected eof" in lowered or "invalid" in lowered):
        return text + "\nLikely fix: the checkpoint is damaged; start a new run."
    return text


# How often the worker reads the run's cancel flag between training steps: a person who
# presses Cancel expects the run to stop within seconds, sooner than the heartbeat's beat.
CANCEL_CHECK_INTERVAL_S = 1.0


class _ProgressWriter:
    """Batches progress and log lines into at most one UPDATE per PROGRESS_WRITE_INTERVAL_S.

    Every write goes through the attempt (jobs.Attempt.update): fenced, so a
    stale attempt raises LostClaim at its next write and stops. Without an
    attempt (bench/train_speed.py measures fine_tune with this writer on an
    unclaimed row) writes are plain.
    """

    def __init__(self, run: TrainingRun, *, attempt: jobs.Attempt | None = None,
                 echo: Callable[[str], None] | None = None):
        self.run = run
        self.attempt = attempt
        self.echo = echo
        self.metrics: dict[str, Any] = dict(run.metrics or {})
        self.metrics.setdefault("loss_history", [])
        self.metrics.setdefault("validation_history", [])
        self.metrics.pop("cancel_requested", None)
        self.metrics.pop("phase", None)  # runs from before the job system kept their phase here
        self._log_lines: list[str] = []
        self._last_write = 0.0
        self._last_cancel_check = 0.0
        self._cancelled = False
        self._checkpoint = ""
        self._progress: float | None = None

    def log(self, line: str) -> None:
        stamped = f"{timezone.now():%H:%M:%S} {line}"
        self._log_lines.append(stamped)
        if self.echo:
            self.echo(stamped)
        # Log lines are rare (phases, logging steps, checkpoints) and often
        # precede a long silent phase such as encoding: write them at once.
        self.flush()

    def update(self, point: dict) -> None:
        if "validation" in point:
            self.metrics["validation_history"].append(point["validation"])
        else:
            self.metrics.update({k: v for k, v in point.items()})
            self.metrics["loss_history"].append([point["step"], round(point["loss"], 5)])
            if point.get("total_steps"):
                self._progress = round(min(1.0, point["step"] / point["total_steps"]), 4)
        self._maybe_write()

    def phase(self, name: str) -> None:
        """What the run is doing now (shown with its progress); written at once.

        Also a safe point: a cancel or a lost claim the heartbeat saw stops the run here.
        """
        self._progress = None
        self.flush(phase=name)
        if self.attempt is not None:
            self.attempt.check()

    def checkpoint(self, path: str) -> None:
        self._checkpoint = path
        self.flush()

    def _maybe_write(self) -> None:
        if time.monotonic() - self._last_write >= PROGRESS_WRITE_INTERVAL_S:
            self.flush()

    def flush(self, **extra: Any) -> None:
        self._last_write = time.monotonic()
        fields: dict[str, Any] = {"metrics": self.metrics, "progress": self._progress, **extra}
        if self._log_lines:
            fields["log"] = Concat(F("log"), Value("\n".join(self._log_lines) + "\n"))
            self._log_lines = []
        if self._checkpoint:
            fields["checkpoint_path"] = self._checkpoint
        if self.attempt is None:
            TrainingRun.objects.filter(pk=self.run.pk).update(heartbeat_at=timezone.now(), **fields)
        else:
            self.attempt.update(**fields)  # fenced: LostClaim when another attempt owns the run

    def cancel_requested(self) -> bool:
        """fine_tune's should_stop, between steps: reads the cancel flag about once a second.

        With an attempt it raises jobs.Cancelled (the user asked) or
        jobs.LostClaim (the heartbeat found the run taken back) via attempt.check().
        """
        now = time.monotonic()
        if not self._cancelled and now - self._last_cancel_check >= CANCEL_CHECK_INTERVAL_S:
            self._last_cancel_check = now
            # Cancellation is a flag the API/UI sets on the row (jobs.request_cancel).
            flag = TrainingRun.objects.filter(pk=self.run.pk).values_list("cancel_requested", flat=True).first()
            self._cancelled = bool(flag)
        if self.attempt is not None:
            self.attempt.cancel_seen = self.attempt.cancel_seen or self._cancelled
            self.attempt.check()
        return self._cancelled


def cancel_run(*, run: TrainingRun) -> TrainingRun:
    """Cancel a queued run at once; ask a running one to stop at its next step (within ~1 s).

    Side effects: jobs.request_cancel (queued -> cancelled, or the running
    run's cancel_requested flag, which the worker reads between steps).
    """
    jobs.request_cancel(run)
    run.refresh_from_db()
    return run
