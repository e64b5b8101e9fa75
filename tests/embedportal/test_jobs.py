"""The one job system (embedportal.jobs) as users meet it: broker down at commit, lost messages, job pages and API."""

from __future__ import annotations

import pytest
import redis
from django.conf import settings
from django.db import transaction
from rest_framework.test import APIClient

from embedportal import jobs
from embedportal.celery import app as celery_app
from search import duplicates, indexing
from search.models import IndexJob, SearchIndex
from tests.waiting import wait_for
from training.datasets import refresh_search_vectors
from training.models import Dataset, Document, ModelVersion, TrainingRun

pytestmark = pytest.mark.django_db(transaction=True)

DEAD_BROKER = "redis://127.0.0.1:1/0"  # nothing listens on port 1: "Redis is down"


@pytest.fixture
def index(user, tiny_model_dir):
    ds = Dataset.objects.create(owner=user, name="mini")
    Document.objects.bulk_create([
        Document(dataset=ds, external_key=f"HDFS-{i}", title=f"DataNode disk {i} full", body="volume fills up")
        for i in range(6)
    ])
    refresh_search_vectors(dataset=ds)
    version = ModelVersion.objects.create(owner=user, name="mini", version=1, base_model="tiny",
                                          artifact_path=str(tiny_model_dir), dimensions=32, dataset=ds)
    return indexing.build_index(index=SearchIndex.objects.create(owner=user, dataset=ds, model_version=version))


@pytest.fixture
def broker():
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    client.delete("default", settings.GPU_QUEUE)
    yield client
    client.delete("default", settings.GPU_QUEUE)


@pytest.fixture
def broker_down(settings):
    """Point the Celery app (and the reaper's broker reads) at a port where nothing listens; yields "bring it back"."""
    before = celery_app.conf.broker_url

    def back_up() -> None:
        celery_app.conf.broker_url = settings.CELERY_BROKER_URL = before

    celery_app.conf.broker_url = settings.CELERY_BROKER_URL = DEAD_BROKER
    yield back_up
    back_up()


def test_job_committed_while_redis_is_down_answers_202_and_waits_for_the_queue(api, index, broker, broker_down):
    # Given Redis is down, when a user starts a duplicate scan
    response = api.post(f"/api/indexes/{index.pk}/duplicates/scan/", {"threshold": 0.95}, format="json")
    # Then the job is saved and shown as waiting for the queue, not a 500
    assert response.status_code == 202
    job = IndexJob.objects.get(pk=response.json()["id"])
    assert (job.status, job.phase, job.task_id) == ("queued", jobs.WAITING_FOR_QUEUE, "")
    body = api.get(f"/api/index-jobs/{job.pk}/").json()
    assert (body["status"], body["waiting_for_queue"]) == ("queued", True)
    # When Redis is back and the reaper runs, then the job's message is sent and the phase cleared
    broker_down()
    assert jobs.reap(IndexJob)["resent"] == 1
    job.refresh_from_db()
    assert (job.status, job.phase, len(job.task_id)) == ("queued", "", 32)
    assert broker.llen("default") == 1
    assert job.task_id in jobs.broker_task_ids()
    # And a second reaper pass sends nothing twice (the message is in the queue)
    assert jobs.reap(IndexJob)["resent"] == 0


def test_lost_message_of_a_queued_job_is_sent_again(index, user, broker):
    # Given a queued scan whose message the broker lost (e.g. Redis restarted without persistence)
    job = duplicates.start_duplicate_scan(index=index, owner=user, threshold=0.95)
    jobs.send_now(IndexJob, job.pk)
    broker.delete("default")
    IndexJob.objects.filter(pk=job.pk).update(enqueued_at=job.created_at.replace(year=2020))
    # When the reaper runs, then it is sent again, once
    assert jobs.reap(IndexJob)["resent"] == 1
    assert broker.llen("default") == 1


def test_redelivered_message_never_runs_a_job_twice(index, user):
    job = duplicates.start_duplicate_scan(index=index, owner=user, threshold=0.95)
    first = jobs.claim(IndexJob, job.pk)
    assert first is not None and first.number == 1
    # A second delivery of the same message finds the job running: nothing to do
    assert jobs.claim(IndexJob, job.pk) is None
    assert jobs.run_job(IndexJob, job.pk, lambda attempt: pytest.fail("ran twice")) is None


def test_cancel_of_a_queued_job_is_immediate_and_a_new_one_can_start(api, index, user):
    job = duplicates.start_duplicate_scan(index=index, owner=user, threshold=0.95)
    body = api.post(f"/api/index-jobs/{job.pk}/cancel/").json()
    assert (body["status"], body["phase"]) == ("cancelled", "cancelled")
    # The worker that later gets the message does nothing
    assert jobs.claim(IndexJob, job.pk) is None
    assert duplicates.start_duplicate_scan(index=index, owner=user, threshold=0.95).status == "queued"


def test_job_that_keeps_failing_is_failed_with_a_reason_after_max_attempts(index, user):
    job = duplicates.start_duplicate_scan(index=index, owner=user, threshold=0.95)
    IndexJob.objects.filter(pk=job.pk).update(attempt=3)
    assert jobs.claim(IndexJob, job.pk) is None
    job.refresh_from_db()
    assert (job.status, job.error) == ("failed", "Stopped after 3 attempts.")


def test_index_jobs_are_owner_scoped_with_one_answer(api, index, user, other_user):
    job = duplicates.start_duplicate_scan(index=index, owner=user, threshold=0.95)
    other = APIClient()
    other.force_authenticate(other_user)
    assert other.get(f"/api/index-jobs/{job.pk}/").status_code == 404
    assert other.get("/api/index-jobs/999999/").status_code == 404
    assert other.post(f"/api/index-jobs/{job.pk}/cancel/").status_code == 404
    assert other.get("/api/index-jobs/").json()["count"] == 0


def test_index_job_page_shows_status_and_polls_while_running(web, index, user, client, other_user):
    job = duplicates.start_duplicate_scan(index=index, owner=user, threshold=0.95)
    html = web.get(f"/search/jobs/{job.pk}/").content.decode()
    assert "Duplicate scan #" in html and 'hx-trigger="every 2s"' in html
    client.force_login(other_user)
    assert client.get(f"/search/jobs/{job.pk}/").status_code == 404


@pytest.mark.parametrize("count", [1, 3])
def test_index_job_list_endpoint_query_count_is_flat(api, index, user, count, django_assert_num_queries):
    for kind in list(IndexJob.Kind)[:count]:
        IndexJob.objects.create(index=index, owner=user, kind=kind, status="succeeded")
    # token auth, count, page
    with django_assert_num_queries(3):
        body = api.get("/api/index-jobs/").json()
    assert body["count"] == count


def test_reported_progress_is_written_by_the_heartbeat_while_the_jobs_transaction_is_open(user, settings):
    # Given a job whose body works inside one long transaction, with a beat every 0.25 s
    settings.RUN_HEARTBEAT_TIMEOUT_S = 1
    dataset = Dataset.objects.create(owner=user, name="d")
    run = TrainingRun.objects.create(owner=user, dataset=dataset, base_model="m")
    seen = []

    def body(attempt: jobs.Attempt) -> None:
        with transaction.atomic():
            Document.objects.create(dataset=dataset, external_key="K-1", title="uncommitted work")
            # When it reports its phase from inside the transaction
            attempt.report(phase="merging", progress=0.5)
            # Then the row shows it before the transaction commits (read committed: the heartbeat's own commit)
            seen.append(wait_for(lambda: TrainingRun.objects.values_list("phase", "progress").get(pk=run.pk),
                                 lambda row: row == ("merging", 0.5), timeout=10, every=0.05))
            attempt.report(phase="last words")

    jobs.run_job(TrainingRun, run.pk, body)
    # And what the heartbeat had not written yet is written by finish()
    run.refresh_from_db()
    assert seen == [("merging", 0.5)]
    assert (run.status, run.phase, run.progress) == ("succeeded", "last words", 1.0)


def test_a_stale_attempts_report_is_not_written_and_marks_it_lost(user, settings):
    # Given a running job that the reaper took back and a second attempt claimed
    settings.RUN_HEARTBEAT_TIMEOUT_S = 1
    dataset = Dataset.objects.create(owner=user, name="d")
    run = TrainingRun.objects.create(owner=user, dataset=dataset, base_model="m")
    outcome = []

    def body(attempt: jobs.Attempt) -> None:
        assert jobs.reap(TrainingRun, timeout_s=0)["requeued"] == 1
        live = jobs.claim(TrainingRun, run.pk)
        # When the stale attempt reports progress
        attempt.report(phase="stale", progress=0.9)
        # Then its heartbeat finds the fence gone, writes nothing, and the next safe point stops it
        outcome.append(wait_for(lambda: attempt.lost, bool, timeout=10, every=0.05))
        outcome.append(live.number)
        attempt.check()

    jobs.run_job(TrainingRun, run.pk, body)
    run.refresh_from_db()
    assert outcome == [True, 2]
    assert (run.status, run.attempt, run.phase, run.progress) == ("running", 2, "starting", None)  # the reaper's note
