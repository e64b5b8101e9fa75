"""One job system for every long task: state in our tables, fenced attempts, one heartbeat, one reaper.

After netbox's `core/models/jobs.py`: a job row has a status with a terminal
set, created/started/finished times, an error a person can act on, a phase
and progress, an attempt number and a max_attempts, and a heartbeat. What
makes it survive faults:

- **Claims are conditional.** A worker turns QUEUED into RUNNING under a row
  lock and gets the new attempt number; a redelivered or duplicate message
  finds the row RUNNING (or finished) and does nothing, so a job never runs
  twice at once.
- **Every write from a worker is fenced by its attempt.** `Attempt.update()`
  and `Attempt.finish()` only touch the row while it is RUNNING with *their*
  attempt number; a worker that was reaped by mistake (a long GC pause, a
  network split) finds its fence gone, raises `LostClaim` and stops, so a
  stale attempt can never finish, overwrite files (attempt-specific working
  folders) or flip a status.
- **A heartbeat thread runs for the whole life of an attempt**, whatever the
  phase, on its own database connection (the job's own transaction may hold
  its writes back for minutes). It also reads the cancel flag, and writes the
  progress a job inside one long transaction hands it (`Attempt.report`).
- **One reaper for all kinds** (`reap_all`, run by beat every minute): a
  RUNNING job whose heartbeat is older than its kind's timeout is re-queued
  (resuming from its checkpoint where the kind has one) until max_attempts,
  then failed with the phase it died in. A QUEUED job whose message is in
  neither the broker's queue nor its unacked set (Redis was down at commit,
  or lost the message on a restart) is sent again.
- **Enqueueing never fails a request.** The message is sent after commit; if
  the broker cannot be reached the job stays QUEUED with the phase
  "waiting for the queue" and the reaper sends it when the broker is back.

A concrete job model subclasses `Job`, sets `task_name` (the Celery task that
runs it, taking `job_id`) and may override the status values it uses (a
search index is READY, not SUCCEEDED) and its timeouts.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, ClassVar

from django.apps import apps
from django.conf import settings
from django.db import close_old_connections, connections, models, transaction
from django.db.models import F, Q
from django.utils import timezone

logger = logging.getLogger(__name__)

WAITING_FOR_QUEUE = "waiting for the queue"
# A QUEUED job younger than this is not re-sent even if its message is not
# seen in the broker: a worker may have taken it and not yet claimed the row.
RESEND_GRACE_S = 60


class LostClaim(Exception):
    """This attempt no longer owns the job (reaped and re-queued, cancelled or deleted): stop quietly."""


class Cancelled(Exception):
    """The user asked to cancel; raised by `Attempt.check_cancel()` at a safe point."""


class JobFailed(Exception):
    """A failure with a message a person can act on (no traceback class name in front)."""


class HandedOff(Exception):
    """The body handed the job to child jobs (an index build's chunks): leave it RUNNING, write nothing.

    The kind's `held_by_children()` keeps the reaper off it while a child is
    alive; the child that completes the set finishes the parent (see
    search.indexing). Raised after the hand-off has committed.
    """


class JobStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


class Job(models.Model):
    """Abstract base of every long task's row. Subclasses add what the task works on and produces.

    A kind with other status values (a search index is READY, an import can
    be STAGED) declares its own `Status`, `status` field, the constants below
    that differ, and `TERMINAL`.
    """

    Status = JobStatus
    QUEUED: ClassVar[str] = JobStatus.QUEUED
    RUNNING: ClassVar[str] = JobStatus.RUNNING
    SUCCEEDED: ClassVar[str] = JobStatus.SUCCEEDED
    FAILED: ClassVar[str] = JobStatus.FAILED
    CANCELLED: ClassVar[str] = JobStatus.CANCELLED
    TERMINAL: ClassVar[frozenset[str]] = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
    # The Celery task that runs this kind; it takes one keyword argument, job_id.
    task_name: ClassVar[str] = ""
    # Seconds without a heartbeat after which the reaper takes the job back.
    heartbeat_timeout_s: ClassVar[int | None] = None  # None: settings.JOB_HEARTBEAT_TIMEOUT_S
    # Seconds between two beats; None: four times per timeout, at most every 15 s (heartbeat_every).
    heartbeat_every_s: ClassVar[float | None] = None
    # Shown to people as "what kind of job".
    kind_label: ClassVar[str] = "job"

    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.QUEUED, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # A reason a person can act on, when the job failed (or the reaper's note while it retries).
    error = models.TextField(blank=True)
    phase = models.CharField(max_length=64, blank=True)
    # 0..1 where the kind can tell; None while unknown.
    progress = models.FloatField(null=True, blank=True)
    attempt = models.PositiveSmallIntegerField(default=0)
    max_attempts = models.PositiveSmallIntegerField(default=3)
    cancel_requested = models.BooleanField(default=False)
    # Id of the last Celery message sent for this job, and when: the reaper
    # re-sends a QUEUED job whose message the broker no longer holds.
    task_id = models.CharField(max_length=64, blank=True)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True

    @classmethod
    def timeout_s(cls) -> int:
        return int(cls.heartbeat_timeout_s or settings.JOB_HEARTBEAT_TIMEOUT_S)

    @classmethod
    def held_by_children(cls, pks: list[int]) -> set[int]:
        """Those of these RUNNING jobs that handed their work to child jobs still queued or running.

        The reaper leaves them alone however old their heartbeat: their
        children are reaped (and re-queued) on their own. None by default.
        """
        return set()

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL

    @property
    def waiting_for_queue(self) -> bool:
        return self.status == self.QUEUED and self.phase == WAITING_FOR_QUEUE


def job_models() -> list[type[Job]]:
    """Every concrete job model of the project."""
    return [m for m in apps.get_models() if issubclass(m, Job) and m.task_name]


# --- Sending -------------------------------------------------------------------------


def enqueue(job: Job) -> None:
    """Send the job's task after the current transaction commits (now when there is none).

    Never raises: with the broker down the job stays QUEUED, its phase says
    "waiting for the queue", and the reaper sends it once the broker answers.
    """
    cls, pk = type(job), job.pk
    transaction.on_commit(lambda: send_now(cls, pk))


def send_now(cls: type[Job], pk: int) -> bool:
    """Publish the job's message; record its id, or mark the job as waiting for the queue."""
    from embedportal.celery import app

    task_id = uuid.uuid4().hex
    try:
        # A connection of its own, tried once: with the broker down a request
        # answers in ~0.1 s instead of waiting through kombu's retries (~6 s).
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=2)
            app.send_task(cls.task_name, kwargs={"job_id": pk}, task_id=task_id, retry=False, connection=connection)
    except Exception as exc:  # kombu/redis raise several types for "broker unreachable"
        logger.warning("could not queue %s %s (%s: %s); the reaper will send it", cls.kind_label, pk, type(exc).__name__, exc)
        cls.objects.filter(pk=pk, status=cls.QUEUED).update(phase=WAITING_FOR_QUEUE)
        return False
    cls.objects.filter(pk=pk, status=cls.QUEUED).update(
        task_id=task_id, enqueued_at=timezone.now(),
        phase=models.Case(models.When(phase=WAITING_FOR_QUEUE, then=models.Value("")), default=F("phase")),
    )
    return True


def requeue(job: Job, **fields: Any) -> bool:
    """Put a finished (or never-started) job back in the queue: a retry asked for by a person.

    Conditional: only a job that is not queued or running is re-queued.
    Resets attempt and error; `fields` are written too; finished_at is kept
    (a search index refreshed in place keeps serving because it finished
    once). Returns False when it was already queued or running.
    """
    cls = type(job)
    updated = cls.objects.filter(pk=job.pk).exclude(status__in=[cls.RUNNING, cls.QUEUED]).update(
        status=cls.QUEUED, attempt=0, error="", phase="", progress=None, cancel_requested=False, **fields,
    )
    if updated:
        enqueue(job)
    return bool(updated)


def request_cancel(job: Job) -> bool:
    """Cancel a job: at once while QUEUED, at the worker's next safe point while RUNNING.

    Returns False when the job had already finished.
    """
    cls = type(job)
    now = timezone.now()
    if cls.objects.filter(pk=job.pk, status=cls.QUEUED).update(
        status=cls.CANCELLED, cancel_requested=True, finished_at=now, phase="cancelled"
    ):
        return True
    return bool(cls.objects.filter(pk=job.pk, status=cls.RUNNING).update(cancel_requested=True))


# --- Running -------------------------------------------------------------------------


@dataclass
class Attempt:
    """What a worker holds while it runs one attempt of a job: the fence for all its writes."""

    model: type[Job]
    pk: int
    number: int
    lost: bool = False
    cancel_seen: bool = False
    _phase: str = ""
    _extra: dict[str, Any] = field(default_factory=dict)
    # Fields handed to the heartbeat thread by report(), written (fenced) on its next beat.
    _reported: dict[str, Any] = field(default_factory=dict)
    _reported_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def _mine(self):
        return self.model.objects.filter(pk=self.pk, status=self.model.RUNNING, attempt=self.number)

    def update(self, **fields: Any) -> None:
        """Write fields (and the heartbeat) while this attempt still owns the job; else raise LostClaim."""
        if "phase" in fields:
            self._phase = fields["phase"]
        if not self._mine.update(heartbeat_at=timezone.now(), **fields):
            self.lost = True
            raise LostClaim(f"{self.model.kind_label} {self.pk} attempt {self.number} lost its claim")

    def set_phase(self, phase: str, progress: float | None = None) -> None:
        self.update(phase=phase[:64], progress=progress)

    def report(self, **fields: Any) -> None:
        """Hand fields (phase, rows read...) to the heartbeat thread, which writes them fenced on its next beat.

        For a job that works inside one long transaction: an update() from its
        own connection would stay invisible until commit and would hold the job
        row's lock against the heartbeat. Raises nothing; check() tells a lost claim.
        """
        if "phase" in fields:
            self._phase = fields["phase"]
        with self._reported_lock:
            self._reported.update(fields)

    def _take_reported(self) -> dict[str, Any]:
        with self._reported_lock:
            taken, self._reported = self._reported, {}
        return taken

    def check(self) -> None:
        """Raise LostClaim or Cancelled if the heartbeat saw either; call at safe points in long loops."""
        if self.lost:
            raise LostClaim(f"{self.model.kind_label} {self.pk} attempt {self.number} lost its claim")
        if self.cancel_seen:
            raise Cancelled()

    def workdir(self, base: Path) -> Path:
        """A working folder of this attempt only: a stale attempt never writes where the live one does."""
        path = Path(base) / f"attempt-{int(self.number)}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def finish(self, status: str | None = None, **fields: Any) -> bool:
        """Move to a terminal status (SUCCEEDED by default), fenced; False when the claim was lost."""
        status = status or self.model.SUCCEEDED
        fields = {**self._take_reported(), **fields}  # what the heartbeat had not written yet
        if status == self.model.SUCCEEDED:
            # A job that succeeded on a retry no longer carries the reaper's "retrying" note.
            fields = {"progress": 1.0, "phase": "done", "error": "", **fields}
        return bool(self._mine.update(status=status, finished_at=timezone.now(), heartbeat_at=timezone.now(), **fields))


def claim(model: type[Job], pk: int) -> Attempt | None:
    """QUEUED -> RUNNING under a row lock, with the attempt counted; None when not claimable.

    A job that has used up its attempts is failed here instead of run again.
    """
    now = timezone.now()
    with transaction.atomic():
        row = model.objects.select_for_update().filter(pk=pk).first()
        if row is None or row.status != model.QUEUED:
            return None
        if row.cancel_requested:
            model.objects.filter(pk=pk).update(status=model.CANCELLED, finished_at=now, phase="cancelled")
            return None
        if row.attempt >= row.max_attempts:
            model.objects.filter(pk=pk).update(
                status=model.FAILED, finished_at=now,
                error=row.error or f"Stopped after {row.attempt} attempts.",
            )
            return None
        number = row.attempt + 1
        fields = {"status": model.RUNNING, "attempt": number, "heartbeat_at": now, "cancel_requested": False}
        if number == 1 or row.started_at is None:
            fields["started_at"] = now
        model.objects.filter(pk=pk).update(**fields)
    return Attempt(model=model, pk=pk, number=number, _phase=row.phase)


class _Heartbeat(threading.Thread):
    """Touches heartbeat_at every `every` seconds while the attempt owns the job, with what the attempt
    reported since the last beat; reads the cancel flag."""

    def __init__(self, attempt: Attempt, every: float):
        super().__init__(name=f"heartbeat-{attempt.model.__name__}-{attempt.pk}", daemon=True)
        self.attempt = attempt
        self.every = every
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.wait(self.every):
                mine = self.attempt._mine
                if not mine.update(heartbeat_at=timezone.now(), **self.attempt._take_reported()):
                    self.attempt.lost = True
                    return
                if mine.filter(cancel_requested=True).exists():
                    self.attempt.cancel_seen = True
        except Exception:  # a database hiccup must not kill the job; the next beat tries again
            logger.exception("heartbeat of %s %s failed", self.attempt.model.kind_label, self.attempt.pk)
        finally:
            connections.close_all()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=max(self.every, 5.0))


def heartbeat_every(model: type[Job]) -> float:
    """The kind's heartbeat_every_s, else four times per timeout, at most every 15 s."""
    return model.heartbeat_every_s or max(0.2, min(15.0, model.timeout_s() / 4))


def run_job(model: type[Job], pk: int, body: Callable[[Attempt], Any]) -> Attempt | None:
    """Claim the job, run `body(attempt)` with a heartbeat, and finish it by what happened.

    body returning normally: SUCCEEDED (unless body finished the job itself);
    Cancelled: CANCELLED; LostClaim: nothing is written (the live attempt owns
    the row); JobFailed or any other exception: FAILED with the phase and the
    reason. A worker killed outright leaves RUNNING with a stale heartbeat:
    the reaper's case. Returns the attempt, or None when there was nothing to run.
    """
    attempt = claim(model, pk)
    if attempt is None:
        logger.info("%s %s is not queued; nothing to run", model.kind_label, pk)
        return None
    return run_attempt(attempt, body)


def run_attempt(attempt: Attempt, body: Callable[[Attempt], Any]) -> Attempt:
    """Run `body(attempt)` for an attempt already held, with a heartbeat, and finish it as run_job says.

    run_job's second half; also used to carry on an attempt adopted by a
    conditional update (the chunk that completes an index build finishes the
    build's attempt). HandedOff leaves the job RUNNING untouched.
    """
    model, pk = attempt.model, attempt.pk
    beat = _Heartbeat(attempt, heartbeat_every(model))
    beat.start()
    try:
        body(attempt)
    except Cancelled:
        attempt.finish(model.CANCELLED, phase="cancelled", error="")
    except LostClaim:
        logger.warning("%s %s attempt %s stopped: the job was taken back", model.kind_label, pk, attempt.number)
    except HandedOff:
        logger.info("%s %s attempt %s handed its work to child jobs", model.kind_label, pk, attempt.number)
    except JobFailed as exc:
        attempt.finish(model.FAILED, error=_with_phase(attempt, str(exc)))
    except Exception as exc:
        logger.exception("%s %s failed", model.kind_label, pk)
        attempt.finish(model.FAILED, error=_with_phase(attempt, f"{type(exc).__name__}: {exc}"))
    else:
        attempt.finish()
    finally:
        beat.stop()
    return attempt


def _with_phase(attempt: Attempt, message: str) -> str:
    return f"{message} (phase: {attempt._phase})" if attempt._phase and "(phase:" not in message else message


# --- Reaping -------------------------------------------------------------------------


def reap(model: type[Job], *, timeout_s: int | None = None) -> dict[str, int]:
    """Take back this kind's silent RUNNING jobs and re-send its lost QUEUED ones.

    A RUNNING job whose heartbeat is older than the timeout is re-queued
    (attempt kept: the next claim counts it) while attempts remain, else
    failed with the phase it died in. Returns counts.
    """
    timeout_s = model.timeout_s() if timeout_s is None else timeout_s
    now = timezone.now()
    cutoff = now - timedelta(seconds=timeout_s)
    stale = model.objects.filter(status=model.RUNNING).filter(
        Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True)
    )
    out = {"requeued": 0, "failed": 0, "resent": 0, "cancelled": 0}
    requeued: set[int] = set()
    stale_pks = list(stale.values_list("pk", flat=True))
    held = model.held_by_children(stale_pks) if stale_pks else set()
    for pk in [pk for pk in stale_pks if pk not in held]:
        with transaction.atomic():
            row = stale.select_for_update().filter(pk=pk).first()
            if row is None:
                continue
            died_in = row.phase or "starting"
            if row.cancel_requested:
                model.objects.filter(pk=pk).update(status=model.CANCELLED, finished_at=now, phase="cancelled")
                out["cancelled"] += 1
            elif row.attempt < row.max_attempts:
                model.objects.filter(pk=pk).update(
                    status=model.QUEUED, phase=died_in,
                    error=f"Attempt {row.attempt} stopped reporting during '{died_in}'; retrying.",
                )
                enqueue(row)
                requeued.add(pk)
                out["requeued"] += 1
            else:
                model.objects.filter(pk=pk).update(
                    status=model.FAILED, finished_at=now,
                    error=(f"The worker stopped reporting during '{died_in}' on attempt {row.attempt} of "
                           f"{row.max_attempts} (no heartbeat for {timeout_s} s). Check the worker's log and "
                           f"memory, then start it again."),
                )
                out["failed"] += 1
    # Jobs re-queued just now are sent by their enqueue (after commit), not twice here.
    out["resent"] = _resend_lost(model, now, skip=requeued)
    return out


def _resend_lost(model: type[Job], now, *, skip: set[int]) -> int:
    queued = model.objects.filter(status=model.QUEUED).exclude(pk__in=skip).filter(
        Q(enqueued_at__isnull=True) | Q(enqueued_at__lt=now - timedelta(seconds=RESEND_GRACE_S))
    )
    rows = list(queued.values_list("pk", "task_id", "phase"))
    if not rows:
        return 0
    in_broker = broker_task_ids()
    if in_broker is None:  # broker unreachable: nothing can be sent now anyway
        model.objects.filter(pk__in=[pk for pk, *_ in rows]).update(phase=WAITING_FOR_QUEUE)
        return 0
    resent = 0
    for pk, task_id, _phase in rows:
        if task_id and task_id in in_broker:
            continue
        if send_now(model, pk):
            resent += 1
    return resent


def broker_task_ids() -> set[str] | None:
    """Ids of the messages waiting in every queue of the Redis broker, or taken from one by a worker less
    than RESEND_GRACE_S ago and not acknowledged yet.

    None when the broker cannot be reached. Reads kombu's Redis layout: one
    list per queue, plus the `unacked` hash of delivered, unacknowledged
    messages and the `unacked_index` of when each was delivered. A message
    taken longer ago whose job is still QUEUED was taken by a worker that died
    (or hangs) before claiming the job: Redis gives it back only after the
    visibility timeout (hours, settings.BROKER_VISIBILITY_TIMEOUT_S), so it
    counts as lost here and the reaper sends the job again (a second message
    for one job is harmless: only one claim wins).
    """
    import redis

    queues = {"default", settings.GPU_QUEUE, *getattr(settings, "EXTRA_QUEUES", ())}
    try:
        client = redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_timeout=5, socket_connect_timeout=5)
        raw: list[bytes] = []
        for queue in queues:
            raw.extend(client.lrange(queue, 0, -1))
        taken = client.hgetall("unacked")
        taken_at = dict(client.zrange("unacked_index", 0, -1, withscores=True))
    except Exception as exc:
        logger.warning("cannot read the broker's queues: %s", exc)
        return None
    recent = time.time() - RESEND_GRACE_S
    raw.extend(item for tag, item in taken.items() if taken_at.get(tag, time.time()) >= recent)
    ids: set[str] = set()
    for item in raw:
        try:
            message = json.loads(item)
            if isinstance(message, list):  # unacked entries are [message, exchange, routing_key]
                message = message[0]
            ids.add(str(message["headers"]["id"]))
        except (ValueError, KeyError, TypeError, IndexError):
            continue
    return ids


# Chores that run with every reaper pass (expiring kept uploads...). This module imports no app, so an
# app registers its chore here from its AppConfig.ready() instead of adding a beat entry of its own.
_housekeeping: list[Callable[[], Any]] = []


def register_housekeeping(chore: Callable[[], Any]) -> None:
    """Run `chore()` after every reaper pass (reap_all); registering it twice runs it once."""
    if chore not in _housekeeping:
        _housekeeping.append(chore)


def reap_all() -> dict[str, dict[str, int]]:
    """Run the reaper for every job kind, then the registered housekeeping; the beat task calls this every minute."""
    out = {}
    for model in job_models():
        try:
            out[model._meta.label] = reap(model)
        except Exception:  # one kind's trouble must not stop the others from being reaped
            logger.exception("reaping %s failed", model._meta.label)
    for chore in _housekeeping:
        try:
            chore()
        except Exception:  # nor one chore's trouble the next chore
            logger.exception("housekeeping %s failed", getattr(chore, "__qualname__", chore))
    close_old_connections()
    return out

