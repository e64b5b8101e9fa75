import logging

from celery import shared_task

from training import import_jobs, retraining, runs
from training.connectors import jira
from training.models import ImportJob, JiraSync, RetrainOccurrence, TrainingRun

logger = logging.getLogger(__name__)


@shared_task(name="training.run_training")
def run_training(*, job_id: int) -> None:
    run = TrainingRun.objects.filter(pk=job_id).first()
    if run is None:
        logger.warning("training run %s is gone; nothing to do", job_id)
        return
    runs.execute_run(run=run)


@shared_task(name="training.run_import")
def run_import(*, job_id: int) -> None:
    job = ImportJob.objects.filter(pk=job_id).first()
    if job is None:
        logger.warning("import job %s is gone; nothing to do", job_id)
        return
    import_jobs.execute(job=job)


@shared_task(name="training.run_jira_sync")
def run_jira_sync(*, job_id: int) -> None:
    sync = JiraSync.objects.filter(pk=job_id).first()
    if sync is None:
        logger.warning("Jira sync %s is gone; nothing to do", job_id)
        return
    jira.execute_sync(sync=sync)


@shared_task(name="training.run_retrain")
def run_retrain(*, job_id: int) -> None:
    occurrence = RetrainOccurrence.objects.filter(pk=job_id).first()
    if occurrence is None:
        logger.warning("retrain %s is gone; nothing to do", job_id)
        return
    retraining.execute_occurrence(occurrence=occurrence)


@shared_task(name="training.retrain_tick")
def retrain_tick(*, schedule_id: int) -> None:
    # Beat sends this at every slot of a dataset's schedule; two beats may both send it (fire_scheduled claims).
    retraining.fire_scheduled(schedule_id=schedule_id)
