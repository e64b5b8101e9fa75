"""Celery tasks of search: ids in, the service does the work (state lives in our job tables)."""

from celery import shared_task

from search import index_jobs, indexing
from search.clustering import assignment, runs


@shared_task(name="search.build_index", acks_late=True)
def build_index(*, job_id: int) -> None:
    indexing.run_build(index_id=job_id)


# acks_late like the others (a chunk is fenced by its job row), and it matters more here: a worker running
# a chunk reserves no second one (prefetch 1), so an idle worker elsewhere takes it.
@shared_task(name="search.embed_chunk", bind=True, acks_late=True)
def embed_chunk(self, *, job_id: int) -> None:
    # The worker's name is recorded on the chunk: which hosts took which chunks of a build.
    indexing.run_chunk(chunk_id=job_id, worker=self.request.hostname or "")


@shared_task(name="search.run_index_job", acks_late=True)
def run_index_job(*, job_id: int) -> None:
    index_jobs.run(job_id=job_id)


@shared_task(name="search.run_clustering", acks_late=True)
def run_clustering(*, job_id: int) -> None:
    runs.run(job_id=job_id)


@shared_task(name="search.assign_to_clusters", acks_late=True)
def assign_to_clusters(*, job_id: int) -> None:
    assignment.run(job_id=job_id)
