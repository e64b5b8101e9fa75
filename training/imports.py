"""Background import jobs: big uploads imported by a worker, not inside the request.

A million-row export takes many minutes to validate and merge, far beyond
any HTTP timeout. Such an upload (bigger than BACKGROUND_IMPORT_MB, or sent
with background=true) is moved from Django's streaming temp file into
UPLOADS_DIR, recorded as an ImportJob and queued; the request returns at once
with the job, whose page and API show the phase, rows read and the outcome.

The job runs the same services as a small upload (datasets.import_dataset /
add_version), so validation, strict mode, upsert by key, versions and the
all-or-nothing guarantee are identical. While it runs, a thread on its own
database connection writes the heartbeat and progress (the import's own
transaction is not committed until the end, so its writes are invisible).
A job whose worker died (no heartbeat for RUN_HEARTBEAT_TIMEOUT_S) is
re-queued by the beat reaper, up to MAX_ATTEMPTS, then failed with the reason;
nothing of an interrupted attempt was stored. The staged file is removed when
the job ends.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connections, transaction
from django.utils import timezone

from training import datasets, importers
from training.errors import ServiceError
from training.models import Dataset, ImportJob

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
STAGED_TTL = timedelta(days=1)
HEARTBEAT_EVERY_S = 5.0
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


def staged_quota_bytes() -> int:
    return int(settings.STAGED_UPLOAD_QUOTA_MB) * 1024 * 1024


def stage(
    *, owner, upload, dataset: Dataset | None = None, name: str = "", kind: str = "", strict: bool = False,
    mapping: dict | None = None, language: str = "english",
) -> ImportJob:
    """Keep an upload on disk as a STAGED job (a preview the user may import next, without uploading again).

    The files a user has on disk (staged, queued and running imports) may
    take at most EMBEDPORTAL_STAGED_UPLOAD_QUOTA_MB together: above it the
    upload is refused (ServiceError naming the file) and nothing is kept.
    Staged files expire after STAGED_TTL (reap_stale).
    """
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
        try:
            return ImportJob.objects.create(
                owner=owner, action=ImportJob.Action.VERSION if dataset else ImportJob.Action.CREATE,
                dataset=dataset, name=dataset.name if dataset else name.strip(), kind=kind, language=language,
                strict=strict, mapping=mapping, filename=(upload.name or "upload")[:255], file_path=str(path),
                size_bytes=size, status=ImportJob.Status.STAGED,
            )
        except BaseException:
            path.unlink(missing_ok=True)
            raise


def stage_and_preview(*, owner, upload, dataset: Dataset | None = None, name: str = "", kind: str = "",
                      strict: bool = False, mapping: dict | None = None,
                      language: str = "english") -> tuple[ImportJob, dict]:
    """Stage the upload and preview it from disk (datasets.preview_file); a file that cannot be read is not kept."""
    job = stage(owner=owner, upload=upload, dataset=dataset, name=name, kind=kind, strict=strict, mapping=mapping,
                language=language)
    try:
        preview = datasets.preview_file(path=Path(job.file_path), filename=job.filename, kind=kind, mapping=mapping,
                                        dataset=dataset)
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
        background = _is_big(job.size_bytes) or _expands_big(Path(job.file_path))
    from training import tasks

    with transaction.atomic():
        if not ImportJob.objects.filter(pk=job.pk, status=ImportJob.Status.STAGED).update(
            status=ImportJob.Status.QUEUED
        ):
            raise ServiceError(f"import #{job.pk} was already started.")
        if background:
            transaction.on_commit(lambda: tasks.run_import.delay(job_id=job.pk))
    job.refresh_from_db()
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
    mapping: dict | None = None, language: str = "english",
) -> ImportJob:
    """Stage the upload and queue its import at once: a new dataset (no `dataset`) or a new version of `dataset`.

    Refused up front (ServiceError, nothing kept) when the name is taken or the
    kind or language is unknown.
    """
    job = stage(owner=owner, upload=upload, dataset=dataset, name=name, kind=kind, strict=strict, mapping=mapping,
                language=language)
    try:
        return start(job=job, background=True)
    except ServiceError:
        discard(job=job)
        raise


def discard(*, job: ImportJob) -> None:
    """Forget a staged job and its file."""
    Path(job.file_path).unlink(missing_ok=True)
    ImportJob.objects.filter(pk=job.pk, status=ImportJob.Status.STAGED).delete()


class _Heartbeat(threading.Thread):
    """Writes heartbeat_at, phase and rows_read on its own connection until stopped."""

    def __init__(self, job_id: int):
        super().__init__(daemon=True, name=f"import-{job_id}-heartbeat")
        self.job_id = job_id
        self.phase = "reading"
        self.rows = 0
        self._halt = threading.Event()

    def update(self, phase: str, rows: int) -> None:
        self.phase, self.rows = phase, rows

    def run(self) -> None:
        try:
            while True:
                ImportJob.objects.filter(pk=self.job_id, status=ImportJob.Status.RUNNING).update(
                    heartbeat_at=timezone.now(), phase=self.phase, rows_read=self.rows
                )
                if self._halt.wait(HEARTBEAT_EVERY_S):
                    return
        except Exception:  # the import goes on; the reaper may requeue it, which the claim tolerates
            logger.exception("import job %s: heartbeat failed", self.job_id)
        finally:
            connections.close_all()  # this thread's connection

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


def execute(*, job: ImportJob, background: bool = True) -> ImportJob:
    """Run a queued job (the task calls this). A job already claimed or ended is left alone.

    background=False when run inside a web request (start() of a small file):
    a compressed file then expands only as far as a request may (datasets.expanded_limit).
    """
    now = timezone.now()
    claimed = ImportJob.objects.filter(pk=job.pk, status=ImportJob.Status.QUEUED).update(
        status=ImportJob.Status.RUNNING, started_at=now, heartbeat_at=now, phase="reading", rows_read=0,
        attempts=job.attempts + 1, error="",
    )
    job.refresh_from_db()
    if not claimed:
        return job
    path = Path(job.file_path)
    heartbeat = _Heartbeat(job.pk)
    heartbeat.start()
    result: dict = {}
    try:
        if not path.exists():
            raise ServiceError(f"file: the staged upload {job.filename} is gone from {path.parent}; upload it again.")
        if job.action == ImportJob.Action.CREATE:
            dataset = datasets.import_dataset(
                owner=job.owner, name=job.name, kind=job.kind, path=path, filename=job.filename, strict=job.strict,
                mapping=job.mapping, language=job.language, progress=heartbeat.update, background=background,
            )
            result = {"dataset": dataset, "version": dataset.versions.first()}
        else:
            if job.dataset is None:
                raise ServiceError("dataset: the dataset of this upload was deleted; nothing was imported.")
            version = datasets.add_version(dataset=job.dataset, path=path, filename=job.filename, strict=job.strict,
                                           mapping=job.mapping, progress=heartbeat.update, background=background)
            result = {"dataset": job.dataset, "version": version}
    except ServiceError as exc:
        _finish(job, heartbeat, status=ImportJob.Status.FAILED, error=str(exc))
    except Exception as exc:  # unexpected: the reason is shown, nothing was stored (one transaction)
        logger.exception("import job %s failed", job.pk)
        _finish(job, heartbeat, status=ImportJob.Status.FAILED,
                error=f"{type(exc).__name__}: {exc}. Nothing was imported; try again or report this.")
    else:
        version = result["version"]
        _finish(job, heartbeat, status=ImportJob.Status.SUCCEEDED, dataset=result["dataset"], version=version,
                rows=(version.report or {}).get("rows_read", heartbeat.rows) if version else heartbeat.rows)
    job.refresh_from_db()
    return job


def _finish(job: ImportJob, heartbeat: _Heartbeat, *, status: str, error: str = "", dataset=None, version=None,
            rows: int | None = None) -> None:
    heartbeat.stop()
    fields = {"status": status, "error": error, "finished_at": timezone.now(), "phase": "done"}
    if dataset is not None:
        fields["dataset"] = dataset
    if version is not None:
        fields["version"] = version
    if rows is not None:
        fields["rows_read"] = rows
    ImportJob.objects.filter(pk=job.pk).update(**fields)
    Path(job.file_path).unlink(missing_ok=True)


def reap_stale(*, timeout_s: int | None = None) -> list[int]:
    """Re-queue running jobs whose heartbeat stopped (worker gone); fail them after MAX_ATTEMPTS.

    Previews staged more than STAGED_TTL ago are discarded. Returns the ids re-queued. Safe to run from several beats: each change is a
    conditional UPDATE on the old heartbeat.
    """
    from training import tasks

    timeout = timeout_s if timeout_s is not None else settings.RUN_HEARTBEAT_TIMEOUT_S
    cutoff = timezone.now() - timedelta(seconds=timeout)
    for staged in ImportJob.objects.filter(status=ImportJob.Status.STAGED,
                                           created_at__lt=timezone.now() - STAGED_TTL):
        discard(job=staged)  # a preview nobody imported within a day
    requeued = []
    for job in ImportJob.objects.filter(status=ImportJob.Status.RUNNING, heartbeat_at__lt=cutoff):
        stale = ImportJob.objects.filter(pk=job.pk, status=ImportJob.Status.RUNNING, heartbeat_at=job.heartbeat_at)
        if job.attempts >= MAX_ATTEMPTS or not Path(job.file_path).exists():
            reason = (f"the worker stopped answering {job.attempts} times (killed or out of memory); nothing was "
                      "imported. Try a smaller file or give the worker more memory.")
            if stale.update(status=ImportJob.Status.FAILED, finished_at=timezone.now(), phase="done", error=reason):
                Path(job.file_path).unlink(missing_ok=True)
        elif stale.update(status=ImportJob.Status.QUEUED, phase="", error=""):
            logger.warning("import job %s: worker vanished; re-queued (attempt %s)", job.pk, job.attempts + 1)
            transaction.on_commit(lambda pk=job.pk: tasks.run_import.delay(job_id=pk))
            requeued.append(job.pk)
    return requeued
