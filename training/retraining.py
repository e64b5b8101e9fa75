"""Daily retraining that only ever makes search better: schedule, occurrence, champion/challenger, notifications.

- **Schedule.** A dataset's RetrainSchedule (crontab fields + an explicit time
  zone; default daily at 02:00 in the server's zone) is written to a
  django-celery-beat CrontabSchedule and PeriodicTask (`save_schedule`), so
  beat fires `training.retrain_tick` at each slot. Two beat processes send two
  ticks: `fire_scheduled` locks the schedule row and records the slot it
  serves (unique per dataset), so the second finds it taken and does nothing.
- **Occurrence.** Each tick or "run now" is a RetrainOccurrence, a Job of
  embedportal.jobs run by `training.run_retrain` on the gpu queue:
  sync from Jira if linked (a JiraSync job, run in this task) -> skip when no
  document changed since the data the last model was trained on ("skipped:
  no new tickets", no GPU time) -> a TrainingRun starting from the production
  model (`version:<id>`) or the base model (RetrainSchedule.start_from, default
  settings.RETRAIN_START_FROM), run in this task through the runs service ->
  the guard. Every step's job keeps its own row, page and log; a crashed
  worker's occurrence is re-queued by the reaper and goes on where it was
  (the sync from its last page, the run from its checkpoint).
- **Guard.** The challenger is compared with the champion on the same held-out
  TEST queries (the dataset as it is now, new tickets' TEST clusters
  included): training.evaluation.paired_bootstrap over per-query nDCG@10
  (1,000 resamples, fixed seed) and `guard` (95% lower bound of the gain
  above the margin, no metric of the table down by more than the tolerance).
  A pass sends `promotion_approved`; search requests the promotion
  (search.receivers). The decision is recorded with its numbers either way.
- **Notifications.** A webhook per dataset (sealed like a token) gets a
  Slack-compatible JSON POST on promotion and on failure, retried on
  timeouts, 429 and 5xx; every delivery is recorded, failures shown.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import date, datetime, timedelta
from datetime import time as clock
from datetime import timezone as dt_timezone
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import requests
from celery.schedules import crontab
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models.signals import post_delete
from django.dispatch import receiver
from django.utils import timezone

from embedportal import jobs
from training import evaluation as ev
from training import runs
from training.connectors import credentials, jira
from training.errors import ConflictError, NotFoundError, ServiceError
from training.hyperparameters import HyperparameterError
from training.hyperparameters import parse as parse_hyperparameters
from training.models import (
    Dataset,
    JiraConnection,
    JiraSync,
    ModelVersion,
    RetrainOccurrence,
    RetrainSchedule,
    TrainingRun,
    WebhookDelivery,
)
from training.registry import held_out_ndcg, production_version
from training.signals import promotion_approved

logger = logging.getLogger(__name__)

TICK_TASK = "training.retrain_tick"
# How far back a tick looks for the slot that fired it (a tick waits in the queue at most this long).
SLOT_LOOKBACK_DAYS = 2
# How far ahead "next retrain" looks (a yearly crontab still fits).
NEXT_LOOKAHEAD_DAYS = 400
# Seconds between two looks at a sync or run that another worker runs (after a crash and a re-queue).
WAIT_POLL_S = 2.0
WEBHOOK_ATTEMPTS = 3
WEBHOOK_BACKOFF_S = (1.0, 4.0)
WEBHOOK_TIMEOUT_S = 10.0


# --- Schedule ------------------------------------------------------------------------------------


def schedule_of(dataset: Dataset) -> RetrainSchedule:
    """The dataset's schedule, or an unsaved one with the defaults (daily 02:00, server zone, disabled)."""
    found = RetrainSchedule.objects.filter(dataset=dataset).first()
    return found if found is not None else RetrainSchedule(dataset=dataset, enabled=False)


def retrain_tolerance(*, dataset: Dataset | None) -> float:
    """The dataset's guard tolerance, else settings.RETRAIN_TOLERANCE (also the manual promotion's)."""
    found = RetrainSchedule.objects.filter(dataset=dataset).values_list("tolerance", flat=True).first() if dataset else None
    return float(found if found is not None else settings.RETRAIN_TOLERANCE)


def _cron(minute: str, hour: str, day_of_week: str) -> crontab:
    return crontab(minute=minute, hour=hour, day_of_week=day_of_week, day_of_month="*", month_of_year="*")


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ServiceError(f"time_zone: {name!r} is not a time zone; give an IANA name such as Europe/Berlin or UTC.") from None


def check_timing(*, minute: str, hour: str, day_of_week: str, time_zone: str) -> tuple[str, str, str, str]:
    """The crontab fields and time zone, cleaned; ServiceError naming the field (page, API and admin use it)."""
    minute, hour, day_of_week = (str(v).strip() or d for v, d in ((minute, "0"), (hour, "2"), (day_of_week, "*")))
    for name, value, hint in (("minute", minute, "0-59"), ("hour", hour, "0-23"),
                              ("day_of_week", day_of_week, "0-6 or mon-sun, * for every day")):
        if len(value) > 64:
            raise ServiceError(f"{name}: at most 64 characters.")
        try:
            crontab(**{name: value})
        except ValueError as exc:
            raise ServiceError(f"{name}: {exc} (crontab syntax: {hint}).") from None
    time_zone = (time_zone or settings.TIME_ZONE).strip()
    _zone(time_zone)
    return minute, hour, day_of_week, time_zone


def check_webhook_url(url: str) -> str:
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServiceError("webhook_url: give an http(s) address, e.g. https://hooks.slack.com/services/...")
    return url


def save_schedule(
    *, dataset: Dataset, owner, enabled: bool = True, minute: str = "0", hour: str = "2", day_of_week: str = "*",
    time_zone: str = "", start_from: str = "", base_model: str = "", hyperparameters: dict | None = None,
    margin: float | None = None, tolerance: float | None = None, webhook_url: str | None = None,
) -> RetrainSchedule:
    """Create or change the dataset's retrain schedule and its beat entry, in one transaction.

    Raises ServiceError naming the field (crontab fields, time zone, base
    model, hyperparameters, margin, tolerance, webhook URL). webhook_url None
    keeps the stored one, "" removes it. Side effects: the RetrainSchedule, a
    CrontabSchedule with the explicit time zone, and the PeriodicTask beat reads
    (enabled or not).
    """
    if dataset.owner_id != owner.pk:
        raise NotFoundError("dataset: not found.")
    minute, hour, day_of_week, time_zone = check_timing(minute=minute, hour=hour, day_of_week=day_of_week,
                                                        time_zone=time_zone)
    start_from = start_from or settings.RETRAIN_START_FROM
    if start_from not in RetrainSchedule.StartFrom.values:
        raise ServiceError(f"start_from: one of {', '.join(RetrainSchedule.StartFrom.values)}, got {start_from!r}.")
    base_model = (base_model or "").strip()
    if base_model:
        if base_model.startswith("version:"):
            raise ServiceError("base_model: a retrain continues from the production model by itself "
                               "(start_from=production); give a base model here.")
        base_model = runs.check_base_model(owner=owner, name=base_model)
    try:
        checked = parse_hyperparameters(hyperparameters or {}).as_dict()
    except HyperparameterError as exc:
        raise ServiceError(f"hyperparameters: {exc}") from None
    # Only what was set, as parsed: the rest follow the product's defaults when they change.
    hyper = {name: checked[name] for name in (hyperparameters or {}) if name in checked}
    margin = settings.RETRAIN_MARGIN if margin is None else float(margin)
    tolerance = settings.RETRAIN_TOLERANCE if tolerance is None else float(tolerance)
    if not -1.0 <= margin <= 1.0:
        raise ServiceError(f"margin: a gain in nDCG@10 between -1 and 1, got {margin}.")
    if not 0.0 <= tolerance <= 1.0:
        raise ServiceError(f"tolerance: a drop in a metric between 0 and 1, got {tolerance}.")
    sealed = None
    if webhook_url is not None:
        url = webhook_url.strip()
        sealed = ("", "") if not url else (credentials.seal(check_webhook_url(url)), urlsplit(url).hostname or "")
    with transaction.atomic():
        schedule = RetrainSchedule.objects.select_for_update().filter(dataset=dataset).first() or RetrainSchedule(
            dataset=dataset)
        schedule.enabled, schedule.minute, schedule.hour, schedule.day_of_week = bool(enabled), minute, hour, day_of_week
        schedule.time_zone, schedule.start_from, schedule.base_model = time_zone, start_from, base_model
        schedule.hyperparameters, schedule.margin, schedule.tolerance = hyper, margin, tolerance
        if sealed is not None:
            schedule.webhook_sealed, schedule.webhook_host = sealed
        schedule.save()
        sync_periodic_task(schedule=schedule)
    return schedule


def periodic_task_name(schedule: RetrainSchedule) -> str:
    return f"retrain-schedule-{schedule.pk}"


def sync_periodic_task(*, schedule: RetrainSchedule) -> None:
    """Write the schedule to beat's tables: a CrontabSchedule in its time zone and the PeriodicTask that ticks it."""
    from django_celery_beat.models import CrontabSchedule, PeriodicTask

    cron, _ = CrontabSchedule.objects.get_or_create(
        minute=schedule.minute, hour=schedule.hour, day_of_week=schedule.day_of_week, day_of_month="*",
        month_of_year="*", timezone=ZoneInfo(schedule.time_zone),
    )
    task, _ = PeriodicTask.objects.update_or_create(
        name=periodic_task_name(schedule),
        defaults={"task": TICK_TASK, "crontab": cron, "interval": None, "solar": None, "clocked": None,
                  "kwargs": json.dumps({"schedule_id": schedule.pk}), "enabled": schedule.enabled,
                  "description": f"Retrain dataset {schedule.dataset_id} ({schedule.dataset.name})"},
    )
    if schedule.periodic_task_id != task.pk:
        RetrainSchedule.objects.filter(pk=schedule.pk).update(periodic_task=task)
        schedule.periodic_task = task


@receiver(post_delete, sender=RetrainSchedule, dispatch_uid="training.retraining.drop_periodic_task")
def _drop_periodic_task(sender, instance: RetrainSchedule, **kwargs) -> None:
    """A schedule deleted (with its dataset) takes its beat entry along."""
    from django_celery_beat.models import PeriodicTask

    PeriodicTask.objects.filter(name=periodic_task_name(instance)).delete()


def _fire_times(cron: crontab, day: date, zone: ZoneInfo) -> list[datetime]:
    """The schedule's times on one local day, as aware datetimes, in order (celery: day of month AND week)."""
    if day.month not in cron.month_of_year or day.day not in cron.day_of_month:
        return []
    if day.isoweekday() % 7 not in cron.day_of_week:  # celery counts Sunday as 0
        return []
    return [datetime.combine(day, clock(h, m), tzinfo=zone) for h in sorted(cron.hour) for m in sorted(cron.minute)]


def previous_slot(schedule: RetrainSchedule, now: datetime) -> datetime | None:
    """The latest time the schedule fired at or before `now` (UTC, to the minute), within SLOT_LOOKBACK_DAYS."""
    zone = ZoneInfo(schedule.time_zone)
    cron = _cron(schedule.minute, schedule.hour, schedule.day_of_week)
    today = now.astimezone(zone).date()
    for back in range(SLOT_LOOKBACK_DAYS + 1):
        for moment in reversed(_fire_times(cron, today - timedelta(days=back), zone)):
            if moment <= now:
                return moment.astimezone(dt_timezone.utc)
    return None


def next_run_at(schedule: RetrainSchedule, now: datetime | None = None) -> datetime | None:
    """When beat fires the schedule next (aware, UTC); None when it is disabled."""
    if not schedule.enabled:
        return None
    now = now or timezone.now()
    zone = ZoneInfo(schedule.time_zone)
    cron = _cron(schedule.minute, schedule.hour, schedule.day_of_week)
    today = now.astimezone(zone).date()
    for ahead in range(NEXT_LOOKAHEAD_DAYS):
        for moment in _fire_times(cron, today + timedelta(days=ahead), zone):
            if moment > now:
                return moment.astimezone(dt_timezone.utc)
    return None


def describe_schedule(schedule: RetrainSchedule) -> str:
    """"daily at 02:00 (Europe/Berlin)", "at 02:00 on mon-fri (UTC)", or the crontab when it is not that simple."""
    if schedule.minute.isdigit() and schedule.hour.isdigit():
        when = f"{int(schedule.hour):02d}:{int(schedule.minute):02d}"
        days = "daily" if schedule.day_of_week == "*" else f"on {schedule.day_of_week}"
        return f"{days} at {when} ({schedule.time_zone})"
    return f"crontab {schedule.minute} {schedule.hour} * * {schedule.day_of_week} ({schedule.time_zone})"


# --- Occurrences ----------------------------------------------------------------------------------


def fire_scheduled(*, schedule_id: int, now: datetime | None = None) -> RetrainOccurrence | None:
    """Beat's tick: start the retrain of the slot that just fired, once, whoever sends the tick.

    The claim: the schedule row is locked and the slot recorded on the new
    occurrence (unique with the dataset), so a second beat's tick for the same
    slot finds it and returns None. A slot that comes while the previous
    retrain still runs is recorded as skipped ("busy"), not queued behind it.
    Side effects: a queued RetrainOccurrence sent after commit, or a busy one.
    """
    now = now or timezone.now()
    try:
        with transaction.atomic():
            schedule = (RetrainSchedule.objects.select_for_update().select_related("dataset")
                        .filter(pk=schedule_id).first())
            if schedule is None:
                from django_celery_beat.models import PeriodicTask

                PeriodicTask.objects.filter(name=f"retrain-schedule-{int(schedule_id)}").delete()
                return None
            if not schedule.enabled:
                return None
            slot = previous_slot(schedule, now) or now.replace(second=0, microsecond=0)
            dataset = schedule.dataset
            if RetrainOccurrence.objects.filter(dataset=dataset, scheduled_for=slot).exists():
                logger.info("retrain of dataset %s at %s was started by another tick", dataset.pk, slot)
                return None
            active = RetrainOccurrence.objects.filter(dataset=dataset, status__in=RetrainOccurrence.ACTIVE).first()
            if active is not None:
                return RetrainOccurrence.objects.create(
                    owner_id=dataset.owner_id, dataset=dataset, trigger=RetrainOccurrence.Trigger.SCHEDULE,
                    scheduled_for=slot, status=RetrainOccurrence.Status.SUCCEEDED,
                    outcome=RetrainOccurrence.Outcome.BUSY, started_at=now, finished_at=now, phase="done",
                    summary=f"skipped: retrain #{active.pk} was still {active.status}",
                )
            occurrence = RetrainOccurrence.objects.create(
                owner_id=dataset.owner_id, dataset=dataset, trigger=RetrainOccurrence.Trigger.SCHEDULE,
                scheduled_for=slot,
            )
            jobs.enqueue(occurrence)
    except IntegrityError:  # the constraints behind the lock: another tick won after all
        logger.info("retrain tick for schedule %s lost the race", schedule_id)
        return None
    return occurrence


def run_now(*, dataset: Dataset, owner) -> RetrainOccurrence:
    """"Run now": a retrain of the dataset outside its schedule. ConflictError while one is queued or running."""
    if dataset.owner_id != owner.pk:
        raise NotFoundError("dataset: not found.")
    try:
        with transaction.atomic():
            schedule = RetrainSchedule.objects.select_for_update().filter(dataset=dataset).first()
            if schedule is None:  # settings of its own before anything else: the defaults, not scheduled
                schedule = RetrainSchedule.objects.create(dataset=dataset, enabled=False)
                sync_periodic_task(schedule=schedule)
            active = RetrainOccurrence.objects.filter(dataset=dataset, status__in=RetrainOccurrence.ACTIVE).first()
            if active is not None:
                raise ConflictError(f"Retrain #{active.pk} of {dataset.name} is {active.status} already; wait for it "
                                    "or cancel it.")
            occurrence = RetrainOccurrence.objects.create(owner=owner, dataset=dataset,
                                                          trigger=RetrainOccurrence.Trigger.MANUAL)
            jobs.enqueue(occurrence)
    except IntegrityError:
        raise ConflictError(f"A retrain of {dataset.name} was started at the same moment; see its history.") from None
    occurrence.refresh_from_db()
    return occurrence


def cancel_occurrence(*, occurrence: RetrainOccurrence) -> RetrainOccurrence:
    """Cancel a retrain and the sync or run it is waiting on (each stops at its next safe point)."""
    jobs.request_cancel(occurrence)
    for model, pk in ((JiraSync, occurrence.sync_id), (TrainingRun, occurrence.run_id)):
        row = model.objects.filter(pk=pk).first() if pk else None
        if row is not None and not row.is_terminal:
            jobs.request_cancel(row)
    occurrence.refresh_from_db()
    return occurrence


def execute_occurrence(*, occurrence: RetrainOccurrence, device: str | None = None) -> RetrainOccurrence:
    """Run one attempt of a queued retrain (the task calls this); notify the webhook if it failed.

    Side effects: queued -> running -> succeeded (skipped / promoted / kept) or
    failed / cancelled, through jobs.run_job; a JiraSync, a TrainingRun and a
    ModelVersion on the way; promotion_approved when the guard passes; webhook
    deliveries. Returns the occurrence as it ended.
    """
    jobs.run_job(RetrainOccurrence, occurrence.pk, lambda attempt: _retrain(attempt, device=device))
    ended = RetrainOccurrence.objects.filter(pk=occurrence.pk).first()
    if ended is not None and ended.status == RetrainOccurrence.Status.FAILED:
        RetrainOccurrence.objects.filter(pk=ended.pk, outcome="").update(
            outcome=RetrainOccurrence.Outcome.FAILED, summary=f"failed: {ended.error.splitlines()[0][:300]}"
            if ended.error else "failed")
        ended.refresh_from_db()
        notify(occurrence=ended, event="failed")
    return ended or occurrence


def _retrain(attempt: jobs.Attempt, *, device: str | None) -> None:
    """The body of one attempt: sync -> skip or train -> decide (jobs.run_job finishes it by how this ends)."""
    occurrence = RetrainOccurrence.objects.select_related("dataset", "owner").get(pk=attempt.pk)
    dataset = occurrence.dataset
    schedule = schedule_of(dataset)
    if JiraConnection.objects.filter(dataset=dataset).exists() or occurrence.sync_id:
        attempt.set_phase("syncing from Jira")
        if occurrence.sync_id is None:
            sync = jira.create_sync(dataset=dataset, owner=occurrence.owner)
            attempt.update(sync=sync)
            occurrence.sync = sync
        sync = _until_done(attempt, JiraSync, occurrence.sync_id, lambda row: jira.execute_sync(sync=row))
        if sync.status != JiraSync.Status.SUCCEEDED:
            raise jobs.JobFailed(f"Jira sync #{sync.pk} {sync.status}: {sync.error or 'cancelled'}")
        attempt.update(issues_synced=sync.issues_fetched)
    run = TrainingRun.objects.filter(pk=occurrence.run_id).first() if occurrence.run_id else None
    champion = occurrence.champion if run is not None else production_version(dataset=dataset)
    if run is None:
        attempt.set_phase("checking for new tickets")
        data_version, fingerprint = data_state(dataset)
        trained = trained_data_version(dataset)
        if trained is not None and data_version is not None and data_version <= trained:
            attempt.finish(
                outcome=RetrainOccurrence.Outcome.SKIPPED, data_version=data_version, fingerprint=fingerprint,
                champion=champion, production_ndcg=_last_production_ndcg(dataset, champion), phase="done",
                summary=f"skipped: no new tickets (the data of version {data_version} was trained on already)",
            )
            return
        start = (f"version:{champion.pk}" if champion is not None
                 and schedule.start_from == RetrainSchedule.StartFrom.PRODUCTION else schedule.base_model)
        try:
            run = runs.start_run(owner=occurrence.owner, dataset=dataset, base_model=start,
                                 hyperparameters=schedule.hyperparameters, enqueue=False)
        except ServiceError as exc:
            raise jobs.JobFailed(f"The training run could not start: {exc}") from None
        attempt.update(run=run, champion=champion, data_version=data_version, fingerprint=fingerprint)
    attempt.set_phase(f"training (run #{run.pk})")
    run = _until_done(attempt, TrainingRun, run.pk, lambda row: runs.execute_run(run=row, device=device))
    if run.status != TrainingRun.Status.SUCCEEDED:
        raise jobs.JobFailed(f"Training run #{run.pk} {run.status}: {run.error or 'cancelled'}")
    challenger = ModelVersion.objects.filter(source_run=run).first()
    if challenger is None:
        raise jobs.JobFailed(f"Training run #{run.pk} succeeded but registered no model version.")
    attempt.set_phase("deciding")
    fields = decide(occurrence=occurrence, run=run, challenger=challenger, champion=champion, schedule=schedule,
                    device=device)
    with transaction.atomic():
        # The fence: a stale attempt neither promotes nor records a decision.
        if not RetrainOccurrence.objects.select_for_update().filter(
                pk=attempt.pk, status=RetrainOccurrence.Status.RUNNING, attempt=attempt.number).exists():
            attempt.lost = True
            raise jobs.LostClaim(f"retrain {attempt.pk} attempt {attempt.number} lost its claim")
        if fields["outcome"] == RetrainOccurrence.Outcome.PROMOTED and champion is not None:
            promotion_approved.send(sender=RetrainOccurrence, version=challenger, user=occurrence.owner,
                                    decision=fields["decision"])
        attempt.finish(challenger=challenger, phase="done", error="", **fields)
    if fields["outcome"] == RetrainOccurrence.Outcome.PROMOTED:
        notify(occurrence=RetrainOccurrence.objects.get(pk=attempt.pk), event="promoted")


def _until_done(attempt: jobs.Attempt, model, pk: int, execute):
    """Run a queued sync or run in this task, or wait while another worker runs it; returns it once it ended.

    After a crash both this occurrence and its sync or run are re-queued; a
    worker may take the sync or run's own message first: then this waits,
    beating, until it ends.
    """
    while True:
        row = model.objects.get(pk=pk)
        if row.is_terminal:
            return row
        if row.status == model.Status.QUEUED:
            execute(row)  # claimed inside (a redelivered message finds it running and does nothing)
            continue
        attempt.check()
        time.sleep(WAIT_POLL_S)


def data_state(dataset: Dataset) -> tuple[int | None, str]:
    """(the newest dataset version that added or changed a document, a digest of every key and content hash).

    The version number says whether anything changed since a model was
    trained; the digest is the data's fingerprint as recorded on the occurrence.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT max(changed_in_version), count(*), "
            "md5(coalesce(string_agg(external_key || ':' || content_hash, ',' ORDER BY external_key), '')) "
            "FROM training_document WHERE dataset_id = %s",
            [dataset.pk],
        )
        newest, count, digest = cursor.fetchone()
    return newest, f"{count}:{digest}"


def trained_data_version(dataset: Dataset) -> int | None:
    """The newest data a model of this dataset was trained on: production's dataset version, or the data of the
    last retrain that trained (a kept challenger tried the data too: trying it again changes nothing)."""
    numbers = []
    production = production_version(dataset=dataset)
    if production is not None and production.dataset_version_id:
        numbers.append(production.dataset_version.number)
    tried = (RetrainOccurrence.objects.filter(dataset=dataset, outcome__in=[RetrainOccurrence.Outcome.PROMOTED,
                                                                             RetrainOccurrence.Outcome.KEPT])
             .exclude(data_version=None).order_by("-data_version").values_list("data_version", flat=True).first())
    if tried is not None:
        numbers.append(tried)
    return max(numbers) if numbers else None


def _last_production_ndcg(dataset: Dataset, champion: ModelVersion | None) -> float | None:
    last = (RetrainOccurrence.objects.filter(dataset=dataset).exclude(production_ndcg=None)
            .order_by("-finished_at").values_list("production_ndcg", flat=True).first())
    if last is not None:
        return last
    return held_out_ndcg(champion) if champion is not None else None


def decide(*, occurrence: RetrainOccurrence, run: TrainingRun, challenger: ModelVersion,
           champion: ModelVersion | None, schedule: RetrainSchedule, device: str | None = None) -> dict[str, Any]:
    """The champion/challenger decision as the occurrence's fields (outcome, decision, summary, production_ndcg).

    Without a champion the challenger is the dataset's first model (search
    promotes it on registration). With one: per-query nDCG@10 of both on the
    current TEST queries, from the run's own before/after when it started from
    the champion, else by evaluating the champion now; then the guard.
    """
    tuned = ((run.evaluation or {}).get("systems") or {}).get("fine_tuned") or {}
    if champion is None:
        score = tuned.get("ndcg@10")
        return {"outcome": RetrainOccurrence.Outcome.PROMOTED, "production_ndcg": score,
                "decision": {"promote": True, "reason": "first model of the dataset", "challenger_ndcg@10": score,
                             "queries": tuned.get("queries")},
                "summary": f"promoted v{challenger.version}: first model of the dataset"
                           + (f" (nDCG@10 {score:.3f} on {tuned.get('queries')} held-out queries)" if score else "")}
    if run.base_model == f"version:{champion.pk}":
        scores = ev.scores_from_run(run.evaluation)
    else:
        scores = _champion_scores_now(run=run, champion=champion, device=device)
    if scores is None:
        verdict = ev.guard(comparison=None, champion_table={}, challenger_table={}, margin=schedule.margin,
                           tolerance=schedule.tolerance)
    else:
        verdict = ev.guard(comparison=ev.paired_bootstrap(scores.champion, scores.challenger),
                           champion_table=scores.champion_table, challenger_table=scores.challenger_table,
                           margin=schedule.margin, tolerance=schedule.tolerance, basis=scores.basis)
    comparison = verdict.comparison
    serving_after = challenger if verdict.promote else champion
    numbers = f": {comparison.describe()}" if comparison else ""
    production_ndcg = None
    if comparison is not None:
        production_ndcg = comparison.challenger if verdict.promote else comparison.champion
    return {
        "outcome": RetrainOccurrence.Outcome.PROMOTED if verdict.promote else RetrainOccurrence.Outcome.KEPT,
        "decision": {**verdict.as_dict(), "champion": str(champion), "challenger": str(challenger)},
        "summary": f"{'promoted' if verdict.promote else 'kept'} v{serving_after.version}{numbers}",
        "production_ndcg": round(production_ndcg, 4) if production_ndcg is not None else None,
    }


def _champion_scores_now(*, run: TrainingRun, champion: ModelVersion, device: str | None) -> ev.PairedScores | None:
    """The champion evaluated now on the TEST queries the challenger's run used, paired with the challenger by key."""
    from training import artifacts, finetune
    from training.heldout import HeldOutEvaluation
    from training.hyperparameters import Hyperparameters

    rows = (run.evaluation or {}).get("per_query") or []
    systems = (run.evaluation or {}).get("systems") or {}
    if not rows or "fine_tuned" not in systems:
        return None
    held_out = HeldOutEvaluation(dataset=run.dataset, log=lambda line: logger.info("retrain champion: %s", line))
    if not held_out.available:
        return None
    hyper = Hyperparameters.from_stored(run.hyperparameters)
    result = held_out.model(artifacts.ensure_local(champion.artifact_path), max_seq_length=hyper.max_seq_length,
                            device=finetune.pick_device(device or settings.TRAINING_DEVICE))
    keys = held_out.eval_set.keys
    champion_by_key = {keys[q]: values["ndcg@10"] for q, values in result.vector.per_query.items()}
    challenger_by_key = {row["query"]: float(row["after"]) for row in rows}
    common = sorted(set(champion_by_key) & set(challenger_by_key))
    if not common:
        return None
    challenger_table = {"vector": systems["fine_tuned"],
                        **({"hybrid": systems["hybrid_fine_tuned"]} if "hybrid_fine_tuned" in systems else {})}
    return ev.PairedScores(
        champion=[champion_by_key[k] for k in common], challenger=[challenger_by_key[k] for k in common],
        champion_table={"vector": result.vector.summary(), "hybrid": result.hybrid.summary()},
        challenger_table=challenger_table,
        basis=f"the champion evaluated now on the challenger's {len(common)} held-out queries",
    )


# --- Notifications ---------------------------------------------------------------------------------


def _payload(occurrence: RetrainOccurrence, event: str) -> dict[str, Any]:
    name = occurrence.dataset.name
    if event == "promoted":
        text = f"EmbedPortal · {name}: {occurrence.summary}"
    else:
        reason = occurrence.error.splitlines()[0][:300] if occurrence.error else "see its page"
        text = f"EmbedPortal · {name}: retrain #{occurrence.pk} failed: {reason}"
    # Slack reads "text"; other receivers get the facts as fields too.
    return {"text": text, "event": event, "dataset": name, "dataset_id": occurrence.dataset_id,
            "retrain": occurrence.pk, "outcome": occurrence.outcome, "summary": occurrence.summary,
            "decision": occurrence.decision or {}}


def notify(*, occurrence: RetrainOccurrence, event: str) -> WebhookDelivery | None:
    """POST the event to the dataset's webhook, once per (occurrence, event), with retries; None without a webhook.

    Retried WEBHOOK_ATTEMPTS times (1 s, then 4 s apart) on timeouts, refused
    connections, 429 and 5xx; any other answer ends it. The URL (a secret) is
    never stored in the delivery or its error, only its host; nor is the
    answer's body, only its status.
    """
    schedule = RetrainSchedule.objects.filter(dataset_id=occurrence.dataset_id).first()
    if schedule is None or not schedule.webhook_sealed:
        return None
    delivery, _ = WebhookDelivery.objects.get_or_create(
        occurrence=occurrence, event=event,
        defaults={"host": schedule.webhook_host, "payload": _payload(occurrence, event)},
    )
    if delivery.status == WebhookDelivery.Status.DELIVERED:
        return delivery
    try:
        url = credentials.unseal(schedule.webhook_sealed, what="webhook_url")
    except ServiceError as exc:
        WebhookDelivery.objects.filter(pk=delivery.pk).update(status=WebhookDelivery.Status.FAILED, error=str(exc),
                                                               finished_at=timezone.now())
        delivery.refresh_from_db()
        return delivery
    for number in range(1, WEBHOOK_ATTEMPTS + 1):
        status, error, transient = None, "", True
        try:
            response = requests.post(url, json=delivery.payload, timeout=WEBHOOK_TIMEOUT_S)
        except (requests.ConnectionError, requests.Timeout) as exc:
            error = f"{type(exc).__name__}: no answer from {delivery.host}"
        else:
            status = response.status_code
            if 200 <= status < 300:
                WebhookDelivery.objects.filter(pk=delivery.pk).update(
                    status=WebhookDelivery.Status.DELIVERED, attempts=number, response_status=status, error="",
                    finished_at=timezone.now())
                break
            transient = status == 429 or status >= 500
            # The status only: the URL is the owner's to choose, and the body could be any page it reaches.
            error = f"HTTP {status} from {delivery.host}"
        final = not transient or number == WEBHOOK_ATTEMPTS
        WebhookDelivery.objects.filter(pk=delivery.pk).update(
            attempts=number, response_status=status, error=error,
            **({"status": WebhookDelivery.Status.FAILED, "finished_at": timezone.now()} if final else {}))
        if final:
            logger.warning("webhook of retrain %s (%s) not delivered: %s", occurrence.pk, event, error)
            break
        time.sleep(WEBHOOK_BACKOFF_S[min(number - 1, len(WEBHOOK_BACKOFF_S) - 1)])
    delivery.refresh_from_db()
    return delivery


def notify_failed() -> int:
    """Housekeeping (with every reaper pass): notify failures the occurrence's own task could not (the reaper
    failed it after its worker died); returns how many were sent."""
    recent = timezone.now() - timedelta(days=1)
    pending = (RetrainOccurrence.objects.filter(status=RetrainOccurrence.Status.FAILED, finished_at__gte=recent,
                                                dataset__retrain_schedule__webhook_sealed__gt="")
               .exclude(deliveries__event="failed").select_related("dataset")[:20])
    sent = 0
    for occurrence in pending:
        if not occurrence.outcome:
            RetrainOccurrence.objects.filter(pk=occurrence.pk, outcome="").update(
                outcome=RetrainOccurrence.Outcome.FAILED, summary=f"failed: {occurrence.error.splitlines()[0][:300]}"
                if occurrence.error else "failed")
            occurrence.refresh_from_db()
        notify(occurrence=occurrence, event="failed")
        sent += 1
    return sent
