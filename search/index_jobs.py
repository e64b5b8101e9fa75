"""Jobs over a ready index (duplicate scan, fusion tuning, evaluation): start one, run one.

Each is an IndexJob row of the one job system (embedportal.jobs); the
database allows one unfinished job per kind and index, so a second scan is
refused while one is queued or running.
"""

from __future__ import annotations

from django.db import IntegrityError, transaction

from embedportal import jobs
from embedportal.errors import ConflictError, ServiceError
from search.models import IndexJob, SearchIndex


def start(*, index: SearchIndex, owner, kind: str, params: dict) -> IndexJob:
    """Create and queue (after commit) a job of `kind` on the index; refused while one of that kind is under way."""
    if index.status != SearchIndex.Status.READY:
        raise ServiceError(f"This index is {index.status}: {IndexJob.Kind(kind).label.lower()} needs a ready index.")
    try:
        with transaction.atomic():
            job = IndexJob.objects.create(index=index, owner=owner, kind=kind, params=params)
    except IntegrityError:
        raise ConflictError(f"A {IndexJob.Kind(kind).label.lower()} of this index is already queued or running.") from None
    jobs.enqueue(job)
    return job


def run(*, job_id: int) -> None:
    """The worker's side: claim the job and run its kind with a heartbeat (search.tasks calls this)."""
    jobs.run_job(IndexJob, job_id, _body)


def _body(attempt: jobs.Attempt) -> None:
    from search import duplicates, tuning

    job = IndexJob.objects.select_related("index__model_version", "index__dataset").get(pk=attempt.pk)
    if job.kind == IndexJob.Kind.DUPLICATES:
        duplicates.scan_duplicates(attempt, job)
    elif job.kind == IndexJob.Kind.TUNING:
        attempt.set_phase("tuning on validation tickets")
        attempt.update(result=tuning.tune_fusion(index=job.index, max_queries=job.params.get("max_queries")))
    else:
        attempt.set_phase("replaying held-out queries")
        attempt.update(result=tuning.evaluate_search(index=job.index, max_queries=job.params.get("max_queries")))
