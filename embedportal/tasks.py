"""Project-wide tasks: the one reaper of the job system (beat runs it every minute)."""

from celery import shared_task

from embedportal import jobs


@shared_task(name="embedportal.reap_jobs")
def reap_jobs() -> None:
    jobs.reap_all()


@shared_task(name="embedportal.setup_checks")
def setup_checks() -> None:
    from embedportal.setup_check import check_in_worker

    check_in_worker()
