"""Celery tasks of training: ids in, the service does the work (state lives in our job tables)."""

import logging

from celery import shared_task

from training import import_jobs, retraining, runs
from training.connectors import jira
from training.models import ImportJob, JiraSync, RetrainOccurrence, TrainingRun

logger = logging.getLogger(__name__)


def _job(model, job_id: int):
    """The job row, or None (logged) when it was deleted after the message was sent."""
    job = model.objects.filter(pk=job_id).first()
    if job is None:
        logger.warning("%s %s is gone; nothing to do", model._meta.verbose_name, job_id)
    return job


@shared_task(name="training.run_training", acks_late=True)
def run_training(*, job_id: int) -> None:
    if (run := _job(TrainingRun, job_id)) is not None:
        runs.execute_run(run=run)


@shared_task(name="training.run_import", acks_late=True)
def run_import(*, job_id: int) -> None:
    if (job := _job(ImportJob, job_id)) is not None:
        import_jobs.execute(job=job)


@shared_task(name="training.run_jira_sync", acks_late=True)
def run_jira_sync(*, job_id: int) -> None:
    if (sync := _job(JiraSync, job_id)) is not None:
        jira.execute_sync(sync=sync)


@shared_task(name="training.run_retrain", acks_late=True)
def run_retrain(*, job_id: int) -> None:
    if (occurrence := _job(RetrainOccurrence, job_id)) is not None:
        retraining.execute_occurrence(occurrence=occurrence)


@shared_task(name="training.retrain_tick")
def retrain_tick(*, schedule_id: int) -> None:
    # Beat sends this at every slot of a dataset's schedule; two beats may both send it (fire_scheduled claims).
    retraining.fire_scheduled(schedule_id=schedule_id)
