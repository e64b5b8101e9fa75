"""Celery tasks of search: ids in, the service does the work (state lives in our job tables)."""

from celery import shared_task

from search import index_jobs, indexing


@shared_task(name="search.build_index")
def build_index(*, job_id: int) -> None:
    indexing.run_build(index_id=job_id)


@shared_task(name="search.run_index_job")
def run_index_job(*, job_id: int) -> None:
    index_jobs.run(job_id=job_id)
