import logging

from celery import shared_task

from training import services
from training.models import TrainingRun

logger = logging.getLogger(__name__)


@shared_task(name="training.run_training")
def run_training(*, run_id: int) -> None:
    run = TrainingRun.objects.select_related("dataset", "owner").filter(pk=run_id).first()
    if run is None:
        logger.warning("training run %s is gone; nothing to do", run_id)
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
    from django.conf import settings

    from search.services import requeue_stale_builds
    from training import imports

    services.reap_stale_runs()
    requeue_stale_builds(timeout_s=settings.RUN_HEARTBEAT_TIMEOUT_S)
    imports.reap_stale()
