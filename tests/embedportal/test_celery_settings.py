"""Celery settings for long tasks on many worker hosts (settings.py, Celery section; docs/scaling.md)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from embedportal import jobs
from embedportal.celery import app
from search import duplicates
from search.models import IndexJob, SearchIndex
from training.models import Dataset, ModelVersion


def test_acks_late_is_set_on_every_job_task_and_on_no_other():
    app.loader.import_default_modules()
    job_tasks = {model.task_name for model in jobs.job_models()}
    ours = {name for name in app.tasks if name.split(".")[0] in ("embedportal", "training", "search")}
    assert job_tasks <= ours
    assert {name for name in ours if app.tasks[name].acks_late} == job_tasks
    assert {"embedportal.reap_jobs", "training.retrain_tick"} <= ours - job_tasks


def test_workers_reserve_nothing_beyond_what_they_run_and_redis_waits_past_the_longest_task():
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.worker_disable_prefetch is True
    assert app.conf.broker_transport_options["visibility_timeout"] == settings.BROKER_VISIBILITY_TIMEOUT_S == 86400
    assert app.conf.worker_cancel_long_running_tasks_on_connection_loss is False
    # One reaper, sent by the one beat
    assert list(app.conf.beat_schedule) == ["reap-jobs"]


@pytest.fixture
def queued_scan(transactional_db, user):
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    broker.delete("default", "unacked", "unacked_index")
    dataset = Dataset.objects.create(owner=user, name="d", kind=Dataset.Kind.TICKETS)
    version = ModelVersion.objects.create(owner=user, name="m", version=1, base_model="b", artifact_path="b",
                                          dimensions=8)
    index = SearchIndex.objects.create(owner=user, dataset=dataset, model_version=version,
                                       status=SearchIndex.Status.READY)
    job = duplicates.start_duplicate_scan(index=index, owner=user, threshold=0.95)
    job.refresh_from_db()
    assert broker.llen("default") == 1
    yield job
    broker.delete("default", "unacked", "unacked_index")


def _take_message_and_die() -> None:
    """A real consumer process takes the queued message (not acknowledged) and is killed with SIGKILL."""
    script = textwrap.dedent(f"""
        import os, signal
        from kombu import Connection
        with Connection({settings.CELERY_BROKER_URL!r}) as connection:
            queue = connection.SimpleQueue("default")
            queue.get(timeout=10)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", script], timeout=60).returncode == -9


def test_message_taken_by_a_worker_that_died_before_claiming_is_sent_again(queued_scan, monkeypatch):
    # Given a queued scan whose message a worker took and then died (kill -9) before claiming the job:
    # Redis keeps the message unacknowledged until the visibility timeout (a day)
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    _take_message_and_die()
    assert (broker.llen("default"), broker.hlen("unacked")) == (0, 1)
    IndexJob.objects.filter(pk=queued_scan.pk).update(enqueued_at=timezone.now() - timedelta(minutes=5))
    # When the reaper runs within the grace period of the delivery, then it waits (the worker may be claiming)
    assert queued_scan.task_id in jobs.broker_task_ids()
    assert jobs.reap(IndexJob)["resent"] == 0
    # When the delivery is older than the grace period, then the job is sent again, once
    monkeypatch.setattr(jobs, "RESEND_GRACE_S", 0)
    assert queued_scan.task_id not in jobs.broker_task_ids()
    assert jobs.reap(IndexJob)["resent"] == 1
    queued_scan.refresh_from_db()
    assert queued_scan.status == "queued" and broker.llen("default") == 1
    assert queued_scan.task_id in jobs.broker_task_ids()
