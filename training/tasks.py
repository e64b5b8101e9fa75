import logging

from celery import shared_task

from training import import_jobs, runs
from training.models import ImportJob, TrainingRun

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
