"""Training runs on the one job system (issue #11): the broker down at commit, stale attempts, attempt folders."""

from __future__ import annotations

import base64
import json
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from django.utils import timezone

from embedportal import jobs
from tests.conftest import SHARED_DATA
from training import runs
from training.models import Dataset, Document, ModelVersion, TrainingRun

TINY_HYPER = {"batch_size": 8, "max_seq_length": 32, "evaluate": False}


@pytest.fixture
def dataset(user):
    ds = Dataset.objects.create(owner=user, name="tickets")
    Document.objects.bulk_create(
        [Document(dataset=ds, external_key=f"T-{i}", title=f"title {i}", body="a description long enough " * 3)
         for i in range(5)]
    )
    return ds


@pytest.fixture
def gpu_queue(settings):
    """The messages waiting on the broker's gpu queue (emptied before and after the test)."""
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    broker.delete(settings.GPU_QUEUE)
    yield lambda: [json.loads(raw) for raw in broker.lrange(settings.GPU_QUEUE, 0, -1)]
    broker.delete(settings.GPU_QUEUE)


@pytest.fixture
def broker(settings):
    """Switch the broker off (a closed port) and on again, for both the Celery app and the reaper."""
    from embedportal.celery import app

    original = app.conf.broker_url
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]

    def use(url: str) -> None:
        # jobs.send_now opens a connection of its own from the app's setting (no pooled connection to
        # drop); jobs.broker_task_ids reads the Django setting.
        app.conf.broker_url = settings.CELERY_BROKER_URL = url

    class Switch:
        def off(self) -> None:
            use(f"redis://127.0.0.1:{closed_port}/13")

        def on(self) -> None:
            use(original)

    switch = Switch()
    yield switch
    switch.on()


@pytest.mark.django_db(transaction=True)
def test_run_committed_while_redis_is_down_waits_for_the_queue_then_is_sent(api, web, dataset, broker, gpu_queue):
    # Given a broker that cannot be reached
    broker.off()
    # When a run is started through the API
    response = api.post("/api/runs/", {"dataset": dataset.pk, "hyperparameters": {"max_steps": 1}}, format="json")
    # Then the request succeeds and the run says it waits for the queue
    assert response.status_code == 201, response.content
    assert (response.json()["status"], response.json()["phase"]) == ("queued", "waiting for the queue")
    run = TrainingRun.objects.get()
    assert (run.status, run.phase, run.task_id, run.enqueued_at) == ("queued", "waiting for the queue", "", None)
    page = web.get(f"/runs/{run.pk}/").content.decode()
    assert "<tr><th>Phase</th><td>waiting for the queue <span" in page
    # And the reaper cannot send it while the broker is still down
    assert jobs.reap(TrainingRun) == {"requeued": 0, "failed": 0, "resent": 0, "cancelled": 0}
    # When the broker is back, the reaper's next pass sends it onto the gpu queue
    broker.on()
    assert jobs.reap(TrainingRun) == {"requeued": 0, "failed": 0, "resent": 1, "cancelled": 0}
    run.refresh_from_db()
    assert (run.status, run.phase) == ("queued", "")
    [message] = gpu_queue()
    assert (message["headers"]["id"], message["headers"]["task"]) == (run.task_id, "training.run_training")
    assert json.loads(base64.b64decode(message["body"]))[1] == {"job_id": run.pk}
    # And a later pass does not send it twice
    assert jobs.reap(TrainingRun)["resent"] == 0


def test_stale_attempt_cannot_register_a_version(user, dataset, tiny_model_dir, gpu_queue):
    # Given a run whose first attempt was reaped while alive and claimed again by a second attempt
    run = TrainingRun.objects.create(owner=user, dataset=dataset, base_model="m")
    stale = jobs.claim(TrainingRun, run.pk)
    TrainingRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    assert jobs.reap(TrainingRun, timeout_s=300)["requeued"] == 1
    live = jobs.claim(TrainingRun, run.pk)
    assert (stale.number, live.number) == (1, 2)
    # When the stale attempt reaches registration, then it is stopped and registers nothing
    with pytest.raises(jobs.LostClaim):
        runs.register_trained_model(attempt=stale, model_dir=tiny_model_dir, dimensions=32)
    assert ModelVersion.objects.count() == 0
    # And the live attempt registers the one version and finishes the run
    version = runs.register_trained_model(attempt=live, model_dir=tiny_model_dir, dimensions=32)
    run.refresh_from_db()
    assert (run.status, run.attempt, run.phase, run.error) == ("succeeded", 2, "done", "")
    assert list(ModelVersion.objects.values_list("pk", "source_run_id")) == [(version.pk, run.pk)]
    assert f"registered {version} (Candidate)" in run.log
    # And the stale attempt can neither finish nor write progress afterwards
    assert stale.finish(TrainingRun.FAILED, error="late") is False
    with pytest.raises(jobs.LostClaim):
        stale.update(metrics={"step": 999})


@pytest.mark.django_db(transaction=True)
def test_falsely_reaped_run_resumes_in_its_own_attempt_folder(api, settings, user, tiny_model_dir, gpu_queue):
    # Given a run whose first attempt saves a checkpoint at step 2 and is then reaped while still alive
    settings.BASE_MODEL_DIRS = [str(tiny_model_dir.parent)]
    with open(SHARED_DATA / "qa" / "bank-faq.csv", "rb") as fh:
        created = api.post("/api/datasets/", {"name": "bank", "file": fh}, format="multipart")
    dataset = Dataset.objects.get(pk=created.json()["id"])
    run = runs.start_run(owner=user, dataset=dataset, base_model=str(tiny_model_dir), enqueue=False,
                             hyperparameters={**TINY_HYPER, "max_steps": 6, "checkpoint_steps": 2})
    reaped = []

    def reaper_strikes_after_the_checkpoint(line: str) -> None:
        if " step 3/6 loss" in line and not reaped:
            TrainingRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
            reaped.append(jobs.reap(TrainingRun, timeout_s=60))

    first = runs.execute_run(run=run, device="cpu", echo=reaper_strikes_after_the_checkpoint)
    # Then the first attempt stopped at its next write and left the run to the next attempt
    assert reaped == [{"requeued": 1, "failed": 0, "resent": 0, "cancelled": 0}]
    assert (first.status, first.attempt, first.phase) == ("queued", 1, "training")
    run_dir = Path(settings.MODELS_DIR) / f"run-{run.pk}"
    assert first.checkpoint_path == str(run_dir / "attempt-1" / "checkpoints" / "checkpoint-2")
    before = _tree(run_dir / "attempt-1")

    # When the second attempt runs
    done = runs.execute_run(run=run, device="cpu")

    # Then it resumed from the first attempt's checkpoint and wrote only into attempt-2
    assert (done.status, done.attempt, done.error) == ("succeeded", 2, ""), done.error
    assert f"attempt 2 of 3 on cpu, resuming from {first.checkpoint_path}" in done.log
    assert (done.metrics["resumed_from_step"], done.metrics["steps"]) == (2, 6)
    assert done.checkpoint_path == str(run_dir / "attempt-2" / "checkpoints" / "checkpoint-6")
    assert done.model_version.artifact_path == str(run_dir / "attempt-2" / "model")
    assert _tree(run_dir / "attempt-1") == before
    assert not (run_dir / "attempt-1" / "model").exists()


def test_run_page_shows_attempt_of_max_and_phase(web, user, dataset):
    run = TrainingRun.objects.create(owner=user, dataset=dataset, base_model="m", status=TrainingRun.Status.RUNNING,
                                     attempt=2, phase="training", heartbeat_at=timezone.now())
    page = web.get(f"/runs/{run.pk}/").content.decode()
    assert '<span class="muted">attempt 2 of 3 (resumed)</span>' in page
    assert "<tr><th>Phase</th><td>training <span" in page


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}
