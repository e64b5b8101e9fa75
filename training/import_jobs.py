"""Background import jobs: big uploads imported by a worker, not inside the request.

A million-row export takes many minutes to validate and merge, far beyond
any HTTP timeout. Such an upload (bigger than BACKGROUND_IMPORT_MB, or sent
with background=true) is moved from Django's streaming temp file into
UPLOADS_DIR, recorded as an ImportJob and queued; the request returns at once
with the job, whose page and API show the phase, rows read and the outcome.

The job runs the same services as a small upload (datasets.import_dataset /
add_version), so validation, strict mode, upsert by key, versions and the
all-or-nothing guarantee are identical. It runs on the one job system
(embedportal.jobs): claimed, beaten, reaped and retried like every other
kind. The import is one long transaction, so its progress goes to the
heartbeat thread (Attempt.report), which writes it on its own connection;
and right before that transaction commits the job row is locked and the
attempt checked (the fence), so a stale attempt, reaped while still alive,
rolls its whole import back instead of storing a second version. The staged
file is removed when the job ends; previews nobody imported expire after a
day (expire_staged, run with the reaper). With an artifact store the staged
file is also put there, so the worker (or web process) that reads it may be
on another host (training.artifacts: local folders are then caches).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from embedportal import jobs
from training import artifacts, datasets, importers
from training.errors import ServiceError
from training.models import Dataset, ImportJob

logger = logging.getLogger(__name__)

STAGED_TTL = timedelta(days=1)
# Files kept on disk for one user (previews kept to import, queued and running
# imports) count against settings.STAGED_UPLOAD_QUOTA_MB: its default, 4 GB,
# holds two uploads at the default 2 GB upload limit.
_HOLDING_FILES = (ImportJob.Status.STAGED, ImportJob.Status.QUEUED, ImportJob.Status.RUNNING)


def _is_big(size_bytes: int) -> bool:
    return size_bytes > settings.BACKGROUND_IMPORT_MB * 1024 * 1024


def _expands_big(source) -> bool:
    """A compressed file (path or open upload) whose header declares more than a web request may expand
    (datasets.expanded_limit)."""
    if source is None or (isinstance(source, Path) and not source.exists()):
        return False
    declared = importers.declared_expanded_size(source)
    if declared is None:
        return False
    size = source.stat().st_size if isinstance(source, Path) else _stream_size(source)
    if declared > size * importers.MAX_ZIP_RATIO + importers.BOMB_SLACK_BYTES:
        return False  # a claim the bomb guard refuses anyway (or a truncated file): read it now, fail fast
    return declared > datasets.expanded_limit(background=False)


def _stream_size(stream) -> int:
    position = stream.tell()
    try:
        return stream.seek(0, os.SEEK_END)
    finally:
        stream.seek(position)


def wants_background(upload, requested: bool | None = None) -> bool:
    """True when the upload should be imported by a job: asked for, above the size threshold, or compressed
    and declaring that it expands beyond what a web request may (so an honest big .gz never meets that cap)."""
    if requested is not None:
        return requested
    return _is_big(getattr(upload, "size", 0) or 0) or _expands_big(getattr(upload, "file", None))


def _stage(upload) -> tuple[Path, int]:
    """Move (or copy) an uploaded file into UPLOADS_DIR; returns its path and size."""
    directory = Path(settings.UPLOADS_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{uuid.uuid4().hex}.upload"
    if hasattr(upload, "temporary_file_path"):
        # A hard link on the same filesystem (no second copy of a 1 GB file), else a copy.
        # Django deletes its temp name after the request; the link keeps the data.
        try:
            os.link(upload.temporary_file_path(), target)
        except OSError:
            shutil.copyfile(upload.temporary_file_path(), target)
    else:
        with open(target, "wb") as out:
            for chunk in upload.chunks():
                out.write(chunk)
    return target, target.stat().st_size


def _prune_copies() -> None:
    """With an artifact store, files in this host's UPLOADS_DIR are copies of the store's: those older than
    STAGED_TTL go (a preview kept on a web host that the reaper, running on another host, expired)."""
    if not artifacts.configured():
        return
    cutoff = (timezone.now() - STAGED_TTL).timestamp()
    for copy in Path(settings.UPLOADS_DIR).glob("*.upload"):
        try:
            if copy.stat().st_mtime < cutoff:
                copy.unlink(missing_ok=True)
        except OSError:
            continue  # removed meanwhile by another process


def staged_quota_bytes() -> int:
    return int(settings.STAGED_UPLOAD_QUOTA_MB) * 1024 * 1024


def stage(
    *, owner, upload, dataset: Dataset | None = None, name: str = "", kind: str = "", strict: bool = False,
    mapping: dict | None = None, language: str = "english", repeated_questions: str = "",
) -> ImportJob:
    """Keep an upload on disk as a STAGED job (a preview the user may import next, without uploading again).

    The files a user has on disk (staged, queued and running imports) may
    take at most EMBEDPORTAL_STAGED_UPLOAD_QUOTA_MB together: above it the
    upload is refused (ServiceError naming the file) and nothing is kept.
    Staged files expire after STAGED_TTL (expire_staged).
    """
    datasets.check_repeated_questions(repeated_questions)
    size = getattr(upload, "size", 0) or 0
    quota = staged_quota_bytes()
    with transaction.atomic():
        # One user's uploads check the quota one at a time (the row lock), so two cannot both slip under it.
        get_user_model().objects.select_for_update().filter(pk=owner.pk).first()
        held = sum(ImportJob.objects.filter(owner=owner, status__in=_HOLDING_FILES).values_list("size_bytes",
                                                                                                flat=True))
        if held + size > quota:
            raise ServiceError(
                f"file: {upload.name} ({size / 1048576:.1f} MB) does not fit: your kept and running uploads take "
                f"{held / 1048576:.1f} MB of your {quota // 1048576} MB (EMBEDPORTAL_STAGED_UPLOAD_QUOTA_MB). "
                "Import or wait for them, or let unused previews expire (after a day)."
            )
        path, size = _stage(upload)
        _prune_copies()
        try:
            job = ImportJob.objects.create(
                owner=owner, action=ImportJob.Action.VERSION if dataset else ImportJob.Action.CREATE,
                dataset=dataset, name=dataset.name if dataset else name.strip(), kind=kind, language=language,
                strict=strict, mapping=mapping, filename=(upload.name or "upload")[:255], file_path=str(path),
                size_bytes=size, status=ImportJob.Status.STAGED,
                # "" on a new version: the dataset's remembered choice (datasets.add_version).
                repeated_questions=repeated_questions or ("" if dataset else "keep"),
            )
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    try:
        # With an artifact store the worker that imports it may be on another host (artifacts.local_upload).
        artifacts.publish_upload(owner_id=owner.pk, file_path=path)
    except BaseException:
        path.unlink(missing_ok=True)
        ImportJob.objects.filter(pk=job.pk).delete()
        raise
    return job


def stage_and_preview(*, owner, upload, dataset: Dataset | None = None, name: str = "", kind: str = "",
                      strict: bool = False, mapping: dict | None = None,
                      language: str = "english", repeated_questions: str = "") -> tuple[ImportJob, dict]:
    """Stage the upload and preview it from disk (datasets.preview_file); a file that cannot be read is not kept."""
    job = stage(owner=owner, upload=upload, dataset=dataset, name=name, kind=kind, strict=strict, mapping=mapping,
                language=language, repeated_questions=repeated_questions)
    try:
        preview = datasets.preview_file(path=Path(job.file_path), filename=job.filename, kind=kind, mapping=mapping,
                                        dataset=dataset, repeated_questions=job.repeated_questions)
    except ServiceError:
        discard(job=job)
        raise
    return job, preview


def start(*, job: ImportJob, background: bool | None = None, name: str = "") -> ImportJob:
    """Import a staged job: queued for a worker when big (or `background`), else run now in this process.

    `name` renames the new dataset first. What can be checked without reading the file (name free, kind, language)
    is checked first, so a job is not queued only to fail on those; a refused
    start leaves the job staged. Returns the job as it stands afterwards.
    """
    if job.status != ImportJob.Status.STAGED:
        raise ServiceError(f"import #{job.pk} was already started ({job.get_status_display().lower()}).")
    if name.strip() and job.action == ImportJob.Action.CREATE:
        job.name = name.strip()[:200]
        job.save(update_fields=["name"])
    if job.action == ImportJob.Action.CREATE:
        _check_new_dataset(job)
    elif job.dataset_id is None:
        raise ServiceError("dataset: the dataset of this upload was deleted; nothing was imported.")
    if background is None:
        background = _is_big(job.size_bytes) or _expands_big(staged_file(job))
    with transaction.atomic():
        if not ImportJob.objects.filter(pk=job.pk, status=ImportJob.Status.STAGED).update(
            status=ImportJob.Status.QUEUED
        ):
            raise ServiceError(f"import #{job.pk} was already started.")
        if background:
            # Sent after commit; with the broker down the job waits for the queue and the reaper sends it.
            jobs.enqueue(job)
    job.refresh_from_db()
    if background and artifacts.configured():
        # The worker (maybe on another host) reads the store's copy: this host keeps none.
        Path(job.file_path).unlink(missing_ok=True)
    return job if background else execute(job=job, background=False)


def _check_new_dataset(job: ImportJob) -> None:
    datasets.check_new_dataset(owner=job.owner, name=job.name, kind=job.kind, language=job.language)
    if ImportJob.objects.filter(
        owner=job.owner, name=job.name, action=ImportJob.Action.CREATE,
        status__in=[ImportJob.Status.QUEUED, ImportJob.Status.RUNNING],
    ).exclude(pk=job.pk).exists():
        raise ServiceError(f"name: a dataset called {job.name!r} is being imported already; pick another name.")


def submit(
    *, owner, upload, dataset: Dataset | None = None, name: str = "", kind: str = "", strict: bool = False,
    mapping: dict | None = None, language: str = "english", repeated_questions: str = "",
) -> ImportJob:
    """Stage the upload and queue its import at once: a new dataset (no `dataset`) or a new version of `dataset`.

    Refused up front (ServiceError, nothing kept) when the name is taken or the
    kind or language is unknown.
    """
    job = stage(owner=owner, upload=upload, dataset=dataset, name=name, kind=kind, strict=strict, mapping=mapping,
                language=language, repeated_questions=repeated_questions)
    try:
        return start(job=job, background=True)
    except ServiceError:
        discard(job=job)
        raise


def staged_file(job: ImportJob) -> Path:
    """The job's staged upload on this host (fetched from the artifact store when staged on another)."""
    return artifacts.local_upload(owner_id=job.owner_id, file_path=job.file_path)


def discard(*, job: ImportJob) -> None:
    """Forget a staged job and its file."""
    artifacts.remove_uploads([(job.owner_id, job.file_path)])
    ImportJob.objects.filter(pk=job.pk, status=ImportJob.Status.STAGED).delete()


def execute(*, job: ImportJob, background: bool = True) -> ImportJob:
    """Run one attempt of a queued job (the task calls this). A job already claimed or ended is left alone.

    background=False when run inside a web request (start() of a small file):
    a compressed file then expands only as far as a request may (datasets.expanded_limit).
    Side effects: queued -> running -> succeeded/failed/cancelled through
    embedportal.jobs.run_job; on success the dataset (or its new version) and
    the job's outcome commit together; the staged file is removed once the job
    has ended (not when this attempt lost its claim: the live attempt reads it).
    Returns the job as it stands afterwards.
    """
    jobs.run_job(ImportJob, job.pk, lambda attempt: _import(attempt, background=background))
    ended = ImportJob.objects.select_related("owner", "dataset", "version").filter(pk=job.pk).first()
    if ended is None or ended.is_terminal:  # gone with its dataset, or finished
        artifacts.remove_uploads([(job.owner_id, job.file_path)])
    return ended or job


def _import(attempt: jobs.Attempt, *, background: bool) -> None:
    """The body of one attempt; jobs.run_job finishes the job by how this returns or raises."""
    job = ImportJob.objects.select_related("owner", "dataset").get(pk=attempt.pk)
    attempt.update(phase="reading", rows_read=0, progress=None, error="")

    def progress(phase: str, rows: int) -> None:
        # Inside the import's transaction: the heartbeat thread writes it (its own connection).
        attempt.report(phase=phase, rows_read=rows)
        attempt.check()  # a cancel, or a claim the heartbeat found taken back, stops (and rolls back) here

    try:
        path = staged_file(job)
        if not path.exists():
            raise ServiceError(f"file: the staged upload {job.filename} is gone from {path.parent}; upload it again.")
        with transaction.atomic():
            if job.action == ImportJob.Action.CREATE:
                dataset = datasets.import_dataset(
                    owner=job.owner, name=job.name, kind=job.kind, path=path, filename=job.filename,
                    strict=job.strict, mapping=job.mapping, language=job.language, progress=progress,
                    background=background, repeated_questions=job.repeated_questions or "keep",
                )
                version = dataset.versions.first()
            else:
                if job.dataset is None:
                    raise ServiceError("dataset: the dataset of this upload was deleted; nothing was imported.")
                dataset = job.dataset
                version = datasets.add_version(dataset=dataset, path=path, filename=job.filename, strict=job.strict,
                                               mapping=job.mapping, progress=progress, background=background,
                                               repeated_questions=job.repeated_questions)
            _hold_fence(attempt)
            attempt.finish(phase="done", error="", dataset=dataset, version=version,
                           rows_read=(version.report or {}).get("rows_read", 0) if version else 0)
    except (jobs.LostClaim, jobs.Cancelled):
        raise
    except ServiceError as exc:
        raise jobs.JobFailed(str(exc)) from exc
    except Exception as exc:  # unexpected: the reason is shown, nothing was stored (one transaction)
        logger.exception("import job %s failed", attempt.pk)
        raise jobs.JobFailed(f"{type(exc).__name__}: {exc}. Nothing was imported; try again or report this.") from exc


def _hold_fence(attempt: jobs.Attempt) -> None:
    """Lock the job row inside the import's transaction and check that this attempt still owns it.

    Raises LostClaim (a stale attempt: reaped and re-queued, or the job was
    deleted with its dataset) or Cancelled, and the whole import rolls back.
    The lock holds until commit, so the reaper cannot take the job back
    between this check and the commit of the dataset version.
    """
    row = (ImportJob.objects.select_for_update().filter(pk=attempt.pk)
           .values("status", "attempt", "cancel_requested").first())
    if row is None or row["status"] != ImportJob.Status.RUNNING or row["attempt"] != attempt.number:
        attempt.lost = True
        raise jobs.LostClaim(f"import {attempt.pk} attempt {attempt.number} lost its claim; nothing is stored")
    if row["cancel_requested"]:
        raise jobs.Cancelled()


def expire_staged() -> int:
    """Housekeeping run with the reaper (embedportal.jobs.reap_all): staged files nobody needs leave the disk.

    Previews kept more than STAGED_TTL ago and never imported are discarded;
    the files of jobs that ended within STAGED_TTL are removed (a job the
    reaper failed or a queued job that was cancelled never reached execute's
    own cleanup). Returns how many previews expired.
    """
    now = timezone.now()
    expired = 0
    for staged in ImportJob.objects.filter(status=ImportJob.Status.STAGED, created_at__lt=now - STAGED_TTL):
        discard(job=staged)  # a preview nobody imported within a day
        expired += 1
    ended = ImportJob.objects.filter(status__in=ImportJob.TERMINAL, finished_at__gte=now - STAGED_TTL)
    artifacts.remove_uploads(list(ended.exclude(file_path="").values_list("owner_id", "file_path")))
    return expired
