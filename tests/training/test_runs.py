from __future__ import annotations

import json
from datetime import timedelta

import pytest
import redis
from django.utils import timezone

from embedportal import jobs
from training import runs
from training.models import Dataset, Document, TrainingRun


@pytest.fixture
def gpu_queue(settings):
    """The messages waiting on the broker's gpu queue (emptied before and after the test)."""
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    broker.delete(settings.GPU_QUEUE)
    yield lambda: [json.loads(raw) for raw in broker.lrange(settings.GPU_QUEUE, 0, -1)]
    broker.delete(settings.GPU_QUEUE)


@pytest.fixture
def dataset(user):
    ds = Dataset.objects.create(owner=user, name="tickets")
    Document.objects.bulk_create(
        [Document(dataset=ds, external_key=f"T-{i}", title=f"title {i}", body="a description long enough " * 3)
         for i in range(5)]
    )
    return ds


def test_start_run_rejects_out_of_range_hyperparameters(api, dataset):
    response = api.post("/api/runs/", {"dataset": dataset.pk, "hyperparameters": {
        "batch_size": 1, "learning_rate": "fast", "epochs": 2.5, "colour": "red"}}, format="json")
    assert response.status_code == 400
    assert response.json()["fields"] == {
        "batch_size": "must be between 2 and 4096, got 1",
        "learning_rate": "must be a number, got 'fast'",
        "epochs": "must be a whole number, got 2.5",
        "colour": "unknown hyperparameter; allowed: batch_size, checkpoint_steps, devices, duplicate_anchor, "
                  "early_stopping_patience, epochs, evaluate, gradient_accumulation_steps, hard_negatives, keep_checkpoints, learning_rate, loss, "
                  "matryoshka_dims, max_pairs, max_seq_length, max_steps, no_duplicates, seed, strategy, "
                  "triplet_margin, warmup_ratio, weak_positives, weight_decay",
    }
    assert TrainingRun.objects.count() == 0


def test_start_run_rejects_missing_local_model(api, dataset, tmp_path):
    response = api.post("/api/runs/", {"dataset": dataset.pk, "base_model": str(tmp_path / "nope")}, format="json")
    assert response.status_code == 400
    assert response.json()["fields"]["base_model"].startswith("not found or not available to you.")
    assert TrainingRun.objects.count() == 0


def test_start_run_on_someone_elses_dataset_is_refused(api, other_user):
    theirs = Dataset.objects.create(owner=other_user, name="theirs")
    response = api.post("/api/runs/", {"dataset": theirs.pk}, format="json")
    assert response.status_code == 400
    assert response.json() == {"error": f"dataset: No dataset {theirs.pk} of yours.",
                               "fields": {"dataset": f"No dataset {theirs.pk} of yours."}}


def test_start_run_queues_with_defaults(api, dataset, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = api.post("/api/runs/", {"dataset": dataset.pk, "hyperparameters": {"max_steps": "5"}}, format="json")
    assert response.status_code == 201
    run = TrainingRun.objects.get()
    assert run.status == TrainingRun.Status.QUEUED
    assert run.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert run.hyperparameters == {
        "loss": "auto", "epochs": 1, "batch_size": 32, "learning_rate": 2e-5, "warmup_ratio": 0.1,
        "weight_decay": 0.01, "max_seq_length": 256, "gradient_accumulation_steps": 1, "max_steps": 5,
        "max_pairs": None, "seed": 42, "no_duplicates": True, "early_stopping_patience": None,
        "checkpoint_steps": None, "keep_checkpoints": 2, "triplet_margin": 0.5, "matryoshka_dims": [],
        "evaluate": True, "strategy": "", "weak_positives": "", "hard_negatives": False, "duplicate_anchor": "title", "devices": None,
    }
    assert len(callbacks) == 1  # enqueued only after commit


def test_run_form_shows_field_error(web, dataset):
    response = web.post(f"/datasets/{dataset.pk}/", {"batch_size": "100000"})
    assert response.status_code == 400
    assert "must be between 2 and 4096, got 100000" in response.content.decode()
    assert TrainingRun.objects.count() == 0


def test_claim_runs_a_queued_run_once(user, dataset):
    run = TrainingRun.objects.create(owner=user, dataset=dataset, base_model="m", status=TrainingRun.Status.SUCCEEDED)
    result = runs.execute_run(run=run)
    assert result.status == TrainingRun.Status.SUCCEEDED
    assert result.started_at is None


def test_cancel_queued_run_is_immediate(api, user, dataset):
    run = TrainingRun.objects.create(owner=user, dataset=dataset, base_model="m")
    response = api.post(f"/api/runs/{run.pk}/cancel/")
    assert response.json()["status"] == "cancelled"


def test_cancel_running_run_sets_flag_for_worker(api, user, dataset):
    run = TrainingRun.objects.create(owner=user, dataset=dataset, base_model="m", status=TrainingRun.Status.RUNNING)
    body = api.post(f"/api/runs/{run.pk}/cancel/").json()
    assert (body["status"], body["cancel_requested"]) == ("running", True)


def test_start_run_accepts_triplet_loss_with_hard_negatives(api, dataset, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        response = api.post("/api/runs/", {"dataset": dataset.pk, "hyperparameters": {
            "loss": "triplet", "hard_negatives": "true", "strategy": "tickets"}}, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["hyperparameters"]["hard_negatives"] is True


def test_start_run_rejects_unknown_strategy_and_bad_dims(api, dataset):
    response = api.post("/api/runs/", {"dataset": dataset.pk, "hyperparameters": {
        "strategy": "magic", "matryoshka_dims": "64,128"}}, format="json")
    assert response.json()["fields"] == {
        "strategy": "must be one of tickets, qa, labels, pairs, triplets, got 'magic'",
        "matryoshka_dims": "must be a list of whole numbers from largest to smallest, got '64,128'",
    }


def test_start_run_refuses_loss_that_does_not_fit_ticket_pairs(api, dataset):
    response = api.post("/api/runs/", {"dataset": dataset.pk, "hyperparameters": {"loss": "triplet"}}, format="json")
    assert response.status_code == 400
    assert response.json()["fields"]["loss"].startswith("TripletLoss (cosine distance) needs triplets but this dataset gives pairs")
    assert TrainingRun.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_reaper_requeues_stale_runs_and_fails_after_max_attempts(user, dataset, gpu_queue):
    # Given a silent run on its first attempt, one silent on its last, and one still beating
    old = timezone.now() - timedelta(seconds=600)
    silent = {"status": TrainingRun.Status.RUNNING, "heartbeat_at": old, "phase": "training"}
    stale = TrainingRun.objects.create(owner=user, dataset=dataset, base_model="m", attempt=1, **silent)
    exhausted = TrainingRun.objects.create(owner=user, dataset=dataset, base_model="m", attempt=3, **silent)
    fresh = TrainingRun.objects.create(owner=user, dataset=dataset, base_model="m", attempt=1,
                                       status=TrainingRun.Status.RUNNING, heartbeat_at=timezone.now())
    # When the one reaper runs
    counts = jobs.reap(TrainingRun, timeout_s=300)
    # Then the first is queued again (one message sent), the last failed with the phase it died in
    assert counts == {"requeued": 1, "failed": 1, "resent": 0, "cancelled": 0}
    for run in (stale, exhausted, fresh):
        run.refresh_from_db()
    assert (stale.status, stale.phase, stale.error) == (
        TrainingRun.Status.QUEUED, "training", "Attempt 1 stopped reporting during 'training'; retrying.")
    assert [message["headers"]["id"] for message in gpu_queue()] == [stale.task_id]
    assert exhausted.status == TrainingRun.Status.FAILED
    assert exhausted.error == (
        "The worker stopped reporting during 'training' on attempt 3 of 3 (no heartbeat for 300 s). Check the "
        "worker's log and memory, then start it again.")
    assert fresh.status == TrainingRun.Status.RUNNING


@pytest.mark.parametrize("count", [1, 3])
def test_run_list_query_count(api, user, dataset, django_assert_num_queries, count):
    for _ in range(count):
        TrainingRun.objects.create(owner=user, dataset=dataset, base_model="m")
    with django_assert_num_queries(3):
        response = api.get("/api/runs/")
    assert len(response.json()["results"]) == count
