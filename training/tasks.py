import logging

from celery import shared_task

from training import services
from training.models import TrainingRun

logger = logging.getLogger(__name__)


@shared_task(name="training.run_training")
def run_training(*, job_id: int) -> None:
    run = TrainingRun.objects.filter(pk=job_id).first()
    if run is None:
        logger.warning("training run %s is gone; nothing to do", job_id)
        return
    services.execute_run(run=run)


@shared_task(name="training.run_import")
def run_import(*, job_id: int) -> None:
    from training import imports
    from training.models import ImportJob

    job = ImportJob.objects.select_related("owner", "dataset").filter(pk=job_id).first()
    if job is None:
        logger.warning("import job %s is gone; nothing to do", job_id)
        return
    imports.execute(job=job)


@shared_task(name="training.reap_stale_runs")
def reap_stale_runs() -> None:
    # Training runs are reaped by embedportal.reap_jobs (the one reaper); only import jobs are
    # left here until they join the job system, then this task and its beat entry go.
    from training import imports

    imports.reap_stale()
