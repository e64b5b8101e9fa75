"""Security issue #10, training runs: base models of other owners (2), runs reaped while alive (3),
and what one request may ask of the workers (8)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
from django.db import connections
from django.utils import timezone
from django.utils.html import escape

from tests.conftest import SHARED_DATA
from embedportal import jobs
from training import runs
from training.models import Dataset, Document, ModelVersion, TrainingRun

UNAVAILABLE = (
    "not found or not available to you. Give a Hugging Face id like 'sentence-transformers/all-MiniLM-L6-v2', "
    "one of your model versions as 'version:<id>' (or base_version), or a folder under a directory your "
    "administrator allows (EMBEDPORTAL_BASE_MODEL_DIRS)."
)
TINY_HYPER = {"max_steps": 1, "batch_size": 8, "max_seq_length": 32}


@pytest.fixture
def dataset(user):
    ds = Dataset.objects.create(owner=user, name="tickets")
    Document.objects.bulk_create(
        [Document(dataset=ds, external_key=f"T-{i}", title=f"title {i}", body="a description long enough " * 3)
         for i in range(5)]
    )
    return ds


def _model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "modules.json").write_text("[]")
    return path


def _upload(api, path: Path, name: str = "slice") -> Dataset:
    with open(path, "rb") as fh:
        response = api.post("/api/datasets/", {"name": name, "file": fh}, format="multipart")
    assert response.status_code == 201, response.content
    return Dataset.objects.get(pk=response.json()["id"])


# --- 2. Base models -----------------------------------------------------------------


def test_base_model_refusals_share_one_message(api, settings, tmp_path, dataset, other_user):
    # Given an allowed root that (carelessly) contains MODELS_DIR with another owner's fine-tuned model
    root = tmp_path / "allowed"
    settings.BASE_MODEL_DIRS = [str(root)]
    settings.MODELS_DIR = root / "models"
    theirs = _model_folder(root / "models" / "run-7" / "model")
    outside = _model_folder(tmp_path / "outside" / "model")
    (root / "link").symlink_to(outside)
    (root / "empty").mkdir()
    their_version = ModelVersion.objects.create(owner=other_user, name="theirs", version=1, base_model="b",
                                                artifact_path=str(theirs), dimensions=32)
    attempts = [
        str(theirs),                                # another owner's run folder, by path
        str(root / "missing"),                      # nothing there
        str(outside),                               # a model outside every root
        f"{root}/../outside/model",                 # .. out of the root
        str(root / "link"),                         # a symlink out of the root
        str(root / "empty"),                        # a folder that holds no model
        "../outside/model", "./missing", "org/..",  # relative paths and a fake hub id
        f"version:{their_version.pk}",              # another owner's version
        "version:999999",                           # no such version
    ]
    # When each is asked for as base model
    answers = {value: api.post("/api/runs/", {"dataset": dataset.pk, "base_model": value}, format="json")
               for value in attempts}
    # Then every answer is the same 400, which tells nothing about what exists
    assert {value: (r.status_code, r.json()) for value, r in answers.items()} == {
        value: (400, {"error": f"base_model: {UNAVAILABLE}", "fields": {"base_model": UNAVAILABLE}})
        for value in attempts
    }
    assert TrainingRun.objects.count() == 0


def test_base_model_folder_under_allowed_root_is_stored_resolved(api, settings, tmp_path, dataset,
                                                                  django_capture_on_commit_callbacks):
    settings.BASE_MODEL_DIRS = [str(tmp_path / "shared")]
    folder = _model_folder(tmp_path / "shared" / "team-model")
    with django_capture_on_commit_callbacks(execute=False):
        response = api.post("/api/runs/", {"dataset": dataset.pk, "base_model": f"{tmp_path}/shared/../shared/team-model"},
                            format="json")
    assert response.status_code == 201, response.content
    assert response.json()["base_model"] == str(folder.resolve())


def test_hub_id_and_default_are_accepted(api, dataset, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        hub = api.post("/api/runs/", {"dataset": dataset.pk, "base_model": "BAAI/bge-small-en-v1.5"}, format="json")
        default = api.post("/api/runs/", {"dataset": dataset.pk}, format="json")
    assert (hub.status_code, hub.json()["base_model"]) == (201, "BAAI/bge-small-en-v1.5")
    assert (default.status_code, default.json()["base_model"]) == (201, "sentence-transformers/all-MiniLM-L6-v2")


def test_base_version_of_your_own_is_recorded_as_lineage(api, user, dataset, django_capture_on_commit_callbacks):
    parent = ModelVersion.objects.create(owner=user, name="mine", version=1, base_model="b", artifact_path="/x",
                                         dimensions=32)
    with django_capture_on_commit_callbacks(execute=False):
        by_field = api.post("/api/runs/", {"dataset": dataset.pk, "base_version": parent.pk}, format="json")
        by_name = api.post("/api/runs/", {"dataset": dataset.pk, "base_model": f"version:{parent.pk}"}, format="json")
    both = api.post("/api/runs/", {"dataset": dataset.pk, "base_version": parent.pk, "base_model": "org/m"},
                    format="json")
    assert (by_field.status_code, by_field.json()["base_model"]) == (201, f"version:{parent.pk}")
    assert (by_name.status_code, by_name.json()["base_model"]) == (201, f"version:{parent.pk}")
    assert (both.status_code, both.json()) == (400, {
        "error": "base_version: Give base_model or base_version, not both.",
        "fields": {"base_version": "Give base_model or base_version, not both."}})


def test_run_form_continues_from_your_version_and_refuses_theirs(web, user, other_user, dataset):
    mine = ModelVersion.objects.create(owner=user, name="mine", version=1, base_model="b", artifact_path="/x",
                                       dimensions=32)
    theirs = ModelVersion.objects.create(owner=other_user, name="theirs", version=1, base_model="b",
                                         artifact_path="/y", dimensions=32)
    form = {"base_model": "sentence-transformers/all-MiniLM-L6-v2", "max_steps": "1", "evaluate": "on"}
    refused = web.post(f"/datasets/{dataset.pk}/", {**form, "base_version": theirs.pk})
    accepted = web.post(f"/datasets/{dataset.pk}/", {**form, "base_version": mine.pk})
    assert refused.status_code == 400
    assert escape(UNAVAILABLE[1:]) in refused.content.decode()  # "Not found …" or "not found …"
    run = TrainingRun.objects.get()
    assert (accepted.status_code, accepted["Location"]) == (302, f"/runs/{run.pk}/")
    assert run.base_model == f"version:{mine.pk}"


@pytest.mark.django_db(transaction=True)
def test_run_continues_from_own_version_folder(api, settings, user, tiny_model_dir, tmp_path):
    # Given one of the user's versions whose folder is outside every allowed root
    settings.BASE_MODEL_DIRS = []
    dataset = _upload(api, SHARED_DATA / "qa" / "bank-faq.csv",
                      name="bank")
    folder = tmp_path / "v1" / "model"
    shutil.copytree(tiny_model_dir, folder)
    parent = ModelVersion.objects.create(owner=user, name="bank", version=1, base_model=str(tiny_model_dir),
                                         artifact_path=str(folder), dimensions=32, dataset=dataset)
    # When a run continues from it
    run = runs.start_run(owner=user, dataset=dataset, base_model=f"version:{parent.pk}",
                             hyperparameters=TINY_HYPER, enqueue=False)
    run = runs.execute_run(run=run, device="cpu")
    # Then it trains from that folder and the new version records its parent
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert f"continuing from version:{parent.pk} ({folder})" in run.log
    child = run.model_version
    assert (child.name, child.version, child.base_model) == ("bank", 2, f"version:{parent.pk}")


@pytest.mark.django_db(transaction=True)
def test_run_whose_parent_version_was_deleted_fails_with_reason(api, user, dataset):
    parent = ModelVersion.objects.create(owner=user, name="gone", version=1, base_model="b", artifact_path="/x",
                                         dimensions=32)
    parent_id = parent.pk
    run = runs.start_run(owner=user, dataset=dataset, base_model=f"version:{parent_id}", enqueue=False)
    parent.delete()
    run = runs.execute_run(run=run, device="cpu")
    assert (run.status, run.attempt) == (TrainingRun.Status.FAILED, 1)
    assert run.error == (f"ServiceError: base_model: model version {parent_id} was deleted after the run was queued; "
                         "start a new run from another version. (phase: pairs)")


# --- 3. Heartbeats through every phase ---------------------------------------------------


class _Reaper(threading.Thread):
    """Beat's reaper, called every 0.25 s from its own thread (and database connection)."""

    def __init__(self, run_id: int):
        super().__init__(daemon=True)
        self.run_id = run_id
        self.results: list[dict] = []
        self.heartbeats: list = []
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.wait(0.25):
                self.results.append(jobs.reap(TrainingRun))
                self.heartbeats.append(TrainingRun.objects.values_list("heartbeat_at", flat=True).get(pk=self.run_id))
        finally:
            connections.close_all()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


@pytest.mark.django_db(transaction=True)
def test_live_run_is_not_reaped_during_a_slow_evaluation(api, settings, user, small_jira_file, tiny_model_dir):
    # Given a reaper that requeues runs silent for 4 s (so the run beats every 1 s), polling all along;
    # 4 s, not less, so a loaded CI machine delaying one beat by a second cannot fail the test
    settings.RUN_HEARTBEAT_TIMEOUT_S = 4
    settings.BASE_MODEL_DIRS = [str(tiny_model_dir.parent)]
    dataset = _upload(api, small_jira_file)
    run = runs.start_run(owner=user, dataset=dataset, base_model=str(tiny_model_dir),
                             hyperparameters={**TINY_HYPER, "max_steps": 2}, enqueue=False)
    reaper = _Reaper(run.pk)

    def slow_evaluation(line: str) -> None:
        # The fine-tuned model's held-out encoding starts; 12 s of silence (three timeouts)
        # stands for the ~11 minutes that 20k tickets take on 2 CPU cores.
        if "encoding" in line and line.endswith(f"run-{run.pk}/attempt-1/model"):
            time.sleep(12)

    # When the run executes with a silent 12 s evaluation phase
    reaper.start()
    try:
        run = runs.execute_run(run=run, device="cpu", echo=slow_evaluation)
    finally:
        reaper.stop()
    # Then the reaper never touched it, its heartbeat never went stale, and its result was kept
    assert len(reaper.results) >= 24
    assert [r for r in reaper.results if r != {"requeued": 0, "failed": 0, "resent": 0, "cancelled": 0}] == []
    beats = sorted(set(reaper.heartbeats))
    assert max((b - a).total_seconds() for a, b in zip(beats, beats[1:])) < 4
    assert (run.status, run.attempt, run.error) == (TrainingRun.Status.SUCCEEDED, 1, "")
    assert run.phase == "done"
    assert run.model_version.source_run_id == run.pk
    assert run.evaluation["systems"]["fine_tuned"]["queries"] == run.evaluation["queries"]


@pytest.mark.django_db(transaction=True)
def test_heartbeat_does_not_revive_a_finished_run(user, dataset):
    finished_at = timezone.now()
    run = TrainingRun.objects.create(owner=user, dataset=dataset, base_model="m", status=TrainingRun.Status.FAILED,
                                     heartbeat_at=finished_at, attempt=1)
    heartbeat = jobs._Heartbeat(jobs.Attempt(model=TrainingRun, pk=run.pk, number=1), every=0.05)
    heartbeat.start()
    time.sleep(0.3)
    heartbeat.stop()
    run.refresh_from_db()
    assert (heartbeat.is_alive(), run.status, run.heartbeat_at) == (False, TrainingRun.Status.FAILED, finished_at)


@pytest.mark.django_db(transaction=True)
def test_registration_failure_fails_the_run_once_with_its_reason(api, settings, user, tiny_model_dir):
    # Given an artifact store setting the upload cannot use
    settings.ARTIFACT_STORE = "notes3://x"
    settings.BASE_MODEL_DIRS = [str(tiny_model_dir.parent)]
    dataset = _upload(api, SHARED_DATA / "qa" / "bank-faq.csv",
                      name="bank")
    run = runs.start_run(owner=user, dataset=dataset, base_model=str(tiny_model_dir), hyperparameters=TINY_HYPER,
                             enqueue=False)
    # When the run trains and registers
    run = runs.execute_run(run=run, device="cpu")
    # Then it fails with the registration's reason, keeps no version, and is not retried
    assert (run.status, run.attempt) == (TrainingRun.Status.FAILED, 1)
    assert run.error == (
        "registration failed: ServiceError: EMBEDPORTAL_ARTIFACT_STORE must look like s3://bucket/prefix, got "
        f"'notes3://x'.\nThe trained model is kept in {settings.MODELS_DIR}/run-{run.pk}/attempt-1/model; fix the "
        "cause and start a new run. (phase: registration)"
    )
    assert run.phase == "registration"
    assert ModelVersion.objects.count() == 0
    assert jobs.reap(TrainingRun, timeout_s=0) == {"requeued": 0, "failed": 0, "resent": 0, "cancelled": 0}


# --- 8. Worker caps --------------------------------------------------------------------------


def test_values_above_worker_caps_are_refused_naming_the_setting(api, settings, dataset):
    settings.MAX_EPOCHS = 10
    response = api.post("/api/runs/", {"dataset": dataset.pk, "hyperparameters": {
        "batch_size": 1024, "max_seq_length": 1024, "max_steps": 300000, "max_pairs": 2000000, "epochs": 20,
    }}, format="json")
    assert response.status_code == 400
    assert response.json()["fields"] == {
        "epochs": "must be at most 10 on this server, got 20; an administrator can raise EMBEDPORTAL_MAX_EPOCHS",
        "batch_size": "must be at most 512 on this server, got 1024; an administrator can raise "
                      "EMBEDPORTAL_MAX_BATCH_SIZE",
        "max_seq_length": "must be at most 512 on this server, got 1024; an administrator can raise "
                          "EMBEDPORTAL_MAX_SEQ_LENGTH",
        "max_steps": "must be at most 200000 on this server, got 300000; an administrator can raise "
                     "EMBEDPORTAL_MAX_STEPS",
        "max_pairs": "must be at most 1000000 on this server, got 2000000; an administrator can raise "
                     "EMBEDPORTAL_MAX_PAIRS",
    }
    assert TrainingRun.objects.count() == 0


def test_admin_raised_cap_allows_the_value(api, settings, dataset, django_capture_on_commit_callbacks):
    settings.MAX_BATCH_SIZE = 2048
    with django_capture_on_commit_callbacks(execute=False):
        response = api.post("/api/runs/", {"dataset": dataset.pk, "hyperparameters": {"batch_size": 1024}},
                            format="json")
    assert (response.status_code, response.json()["hyperparameters"]["batch_size"]) == (201, 1024)


def test_run_form_refuses_value_above_worker_cap(web, dataset):
    response = web.post(f"/datasets/{dataset.pk}/", {"max_seq_length": "1024"})
    assert response.status_code == 400
    assert ("must be at most 512 on this server, got 1024; an administrator can raise EMBEDPORTAL_MAX_SEQ_LENGTH"
            in response.content.decode())
    assert TrainingRun.objects.count() == 0
