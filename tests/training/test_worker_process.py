"""Kill, resume and cancel with a real Celery worker process (not a thread)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from django.conf import settings

from tests.waiting import wait_for
from embedportal import jobs
from training import runs
from training.models import ModelVersion, TrainingRun

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def dataset(small_jira_dataset):
    return small_jira_dataset


def _run(user, dataset, tiny_model_dir, **hyper) -> TrainingRun:
    params = {"batch_size": 8, "max_seq_length": 128, "evaluate": False, **hyper}
    return runs.start_run(owner=user, dataset=dataset, base_model=str(tiny_model_dir), hyperparameters=params)


def test_worker_killed_mid_run_resumes_from_checkpoint(start_worker, user, dataset, tiny_model_dir):
    # Given a run on a real worker process that has saved a checkpoint
    first = start_worker("first")
    run = _run(user, dataset, tiny_model_dir, max_steps=40, checkpoint_steps=5)
    running = wait_for(lambda: TrainingRun.objects.get(pk=run.pk),
                       lambda r: r.checkpoint_path != "" or r.is_terminal, timeout=120, every=0.05)
    assert running.status == TrainingRun.Status.RUNNING, running.error

    # When the worker is killed with SIGKILL
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed = TrainingRun.objects.get(pk=run.pk)
    assert killed.status == TrainingRun.Status.RUNNING  # nobody told the row
    saved_step = int(Path(killed.checkpoint_path).name.split("-")[1])
    assert Path(killed.checkpoint_path).is_dir()

    # Then the heartbeat reaper re-queues it and a new worker continues from the checkpoint
    assert jobs.reap(TrainingRun, timeout_s=0) == {"requeued": 1, "failed": 0, "resent": 0, "cancelled": 0}
    start_worker("second")
    done = wait_for(lambda: TrainingRun.objects.get(pk=run.pk), lambda r: r.is_terminal, timeout=240, every=0.2)
    assert done.status == TrainingRun.Status.SUCCEEDED, done.error
    assert done.attempt == 2
    assert done.metrics["resumed_from_step"] >= saved_step >= 5
    assert done.metrics["steps"] == 40
    assert f"resuming from {killed.checkpoint_path}" in done.log
    # And the second attempt read the first attempt's checkpoint but wrote only into its own folder
    run_dir = Path(settings.MODELS_DIR) / f"run-{run.pk}"
    assert Path(killed.checkpoint_path).parent.parent == run_dir / "attempt-1"
    assert Path(done.checkpoint_path).parent.parent == run_dir / "attempt-2"
    assert ModelVersion.objects.get(source_run=done).artifact_path == str(run_dir / "attempt-2" / "model")
    assert not (run_dir / "attempt-1" / "model").exists()


def test_cancel_stops_running_run_within_seconds_and_keeps_checkpoints(start_worker, user, dataset, tiny_model_dir):
    start_worker("canceller")
    run = _run(user, dataset, tiny_model_dir, max_steps=100000, checkpoint_steps=5)
    wait_for(lambda: TrainingRun.objects.get(pk=run.pk), lambda r: r.checkpoint_path != "", timeout=120, every=0.2)
    asked = time.monotonic()
    runs.cancel_run(run=TrainingRun.objects.get(pk=run.pk))
    done = wait_for(lambda: TrainingRun.objects.get(pk=run.pk), lambda r: r.is_terminal, timeout=30, every=0.2)
    assert done.status == TrainingRun.Status.CANCELLED
    assert time.monotonic() - asked < 10
    assert Path(done.checkpoint_path).is_dir()
    assert "cancelled; checkpoints kept" in done.log
    assert ModelVersion.objects.count() == 0
