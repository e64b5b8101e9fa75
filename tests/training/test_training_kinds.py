"""Training on every dataset kind goes through the same service (no worker needed here)."""

from __future__ import annotations

import pytest

from tests.conftest import SHARED_DATA
from training import runs
from training.models import Dataset, TrainingRun

pytestmark = pytest.mark.django_db(transaction=True)


def _upload(api, name, path, kind):
    with open(path, "rb") as fh:
        response = api.post("/api/datasets/", {"name": name, "kind": kind, "file": fh}, format="multipart")
    assert response.status_code == 201, response.content
    return Dataset.objects.get(pk=response.json()["id"])


def test_qa_dataset_trains_with_validation_and_registers(api, user, tiny_model_dir):
    dataset = _upload(api, "bank", SHARED_DATA / "qa" / "bank-faq.csv", "qa")
    run = runs.start_run(owner=user, dataset=dataset, base_model=str(tiny_model_dir),
                             hyperparameters={"max_steps": 3, "batch_size": 8, "max_seq_length": 32})
    run = runs.execute_run(run=run, device="cpu")
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert "training pairs (qa strategy" in run.log
    assert run.metrics["best_validation_ndcg"] is not None
    # Held-out questions of answer groups it never trained on, base vs fine-tuned (tests/training/test_heldout_qa.py)
    assert (run.evaluation["kind"], list(run.evaluation["systems"])) == ("qa", ["base", "fine_tuned"])
    assert run.model_version.dimensions == 32


def test_label_triplets_train_with_triplet_loss(api, user, tiny_model_dir):
    dataset = _upload(api, "bank-labels", SHARED_DATA / "qa" / "bank-faq.csv", "qa")
    run = runs.start_run(owner=user, dataset=dataset, base_model=str(tiny_model_dir), hyperparameters={
        "strategy": "labels", "loss": "triplet", "max_steps": 2, "batch_size": 8, "max_seq_length": 32})
    run = runs.execute_run(run=run, device="cpu")
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert run.metrics["loss"] == "triplet"
    assert "training triplets (labels strategy" in run.log


def test_matryoshka_and_cached_loss_run(api, user, small_jira_file, tiny_model_dir):
    dataset = _upload(api, "slice", small_jira_file, "tickets")
    run = runs.start_run(owner=user, dataset=dataset, base_model=str(tiny_model_dir), hyperparameters={
        "loss": "cached_mnrl", "matryoshka_dims": "32,16", "max_steps": 2, "batch_size": 8, "max_seq_length": 32,
        "evaluate": "false"})
    run = runs.execute_run(run=run, device="cpu")
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert run.metrics["loss"] == "cached_mnrl"
    assert run.evaluation == {}


def test_corrupt_checkpoint_fails_with_reason_and_fix(api, user, small_jira_file, tiny_model_dir, tmp_path):
    dataset = _upload(api, "slice", small_jira_file, "tickets")
    run = runs.start_run(owner=user, dataset=dataset, base_model=str(tiny_model_dir), hyperparameters={
        "max_steps": 4, "batch_size": 8, "max_seq_length": 32, "evaluate": "false"}, enqueue=False)
    broken = tmp_path / "checkpoint-2"
    broken.mkdir()
    (broken / "trainer_state.json").write_text("{truncated")
    (broken / "model.safetensors").write_bytes(b"\x00garbage")
    TrainingRun.objects.filter(pk=run.pk).update(checkpoint_path=str(broken))
    run.refresh_from_db()
    run = runs.execute_run(run=run, device="cpu")
    assert run.status == TrainingRun.Status.FAILED
    assert f"The run was resuming from {broken}; if that checkpoint is damaged, start a new run" in run.error


def test_symmetric_loss_trains_ticket_pairs_and_refuses_triplets(api, user, small_jira_file, tiny_model_dir):
    dataset = _upload(api, "slice", small_jira_file, "tickets")
    run = runs.start_run(owner=user, dataset=dataset, base_model=str(tiny_model_dir), hyperparameters={
        "loss": "mnrl_symmetric", "max_steps": 2, "batch_size": 8, "max_seq_length": 32, "evaluate": "false"})
    run = runs.execute_run(run=run, device="cpu")
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert run.metrics["loss"] == "mnrl_symmetric"
    assert "with MultipleNegativesSymmetricRankingLoss on cpu" in run.log
    # Mined negatives make triplets, which the symmetric loss does not take: refused before anything is queued.
    response = api.post("/api/runs/", {"dataset": dataset.pk, "hyperparameters": {
        "loss": "mnrl_symmetric", "hard_negatives": True}}, format="json")
    assert response.status_code == 400
    assert "MultipleNegativesSymmetricRankingLoss needs pairs but this dataset gives triplets" in response.content.decode()
