"""Multi-device training: DDP on 2 CPU processes (gloo) under torchrun, from a real Celery worker process."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from tests.waiting import wait_for
from training import runs
from training.hyperparameters import HyperparameterError, parse
from training.models import ModelVersion, TrainingRun


@pytest.fixture
def dataset(small_jira_dataset):
    return small_jira_dataset


@pytest.fixture
def two_cpu_processes(monkeypatch):
    """Workers started after it may train a run on 2 CPU processes."""
    monkeypatch.setenv("EMBEDPORTAL_MAX_CPU_PROCESSES", "2")


def _run(user, dataset, tiny_model_dir, **hyper) -> TrainingRun:
    params = {"batch_size": 8, "max_seq_length": 64, "evaluate": False, "devices": 2, **hyper}
    return runs.start_run(owner=user, dataset=dataset, base_model=str(tiny_model_dir), hyperparameters=params)


def _ranks(run: TrainingRun) -> list[psutil.Process]:
    """The rank processes (python -m training.distributed <spec>) of this run, wherever they are in the tree."""
    marker = f"run-{run.pk}"
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "training.distributed" in cmdline and "torch.distributed.run" not in cmdline and any(marker in part for part in cmdline):
            found.append(proc)
    return found


def _training(run: TrainingRun) -> TrainingRun:
    """The run once rank 0 has said it is training (or ended)."""
    return wait_for(lambda: TrainingRun.objects.get(pk=run.pk),
                    lambda r: r.is_terminal or " x 2 processes (DDP) " in r.log, timeout=300, every=0.2)


@pytest.mark.django_db(transaction=True)
def test_two_process_run_succeeds_registers_one_version_and_records_loss_once(two_cpu_processes, start_worker, user,
                                                                             dataset, tiny_model_dir):
    # Given a worker allowed 2 CPU processes
    start_worker("ddp")
    # When a run asks for 2 devices
    run = _run(user, dataset, tiny_model_dir, max_steps=6, checkpoint_steps=3)
    done = wait_for(lambda: TrainingRun.objects.get(pk=run.pk), lambda r: r.is_terminal, timeout=420, every=0.5)
    # Then it trains under torchrun on 2 gloo processes and succeeds with one version
    assert done.status == TrainingRun.Status.SUCCEEDED, done.error + done.log[-3000:]
    assert "starting 2 training processes under torchrun (DDP, gloo)" in done.log
    assert done.log.count(" x 2 processes (DDP) ") == 1  # rank 0 alone reports
    assert ModelVersion.objects.filter(source_run=done).count() == 1
    # And its loss curve is recorded once: one point per logging step, no rank's copy
    steps = [step for step, _ in done.metrics["loss_history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert done.metrics["steps"] == 6
    # And the checkpoint and model were written by rank 0 into the attempt's folder
    assert done.checkpoint_path.endswith("attempt-1/checkpoints/checkpoint-6")
    assert ModelVersion.objects.get(source_run=done).dimensions == 32
    assert _ranks(done) == []


@pytest.mark.django_db(transaction=True)
def test_cancel_stops_every_rank(two_cpu_processes, start_worker, user, dataset, tiny_model_dir):
    start_worker("ddp-cancel")
    run = _run(user, dataset, tiny_model_dir, max_steps=100000)
    assert _training(run).status == TrainingRun.Status.RUNNING
    assert len(_ranks(run)) == 2
    # When the run is cancelled, then it ends cancelled and no rank is left running
    runs.cancel_run(run=TrainingRun.objects.get(pk=run.pk))
    done = wait_for(lambda: TrainingRun.objects.get(pk=run.pk), lambda r: r.is_terminal, timeout=60, every=0.2)
    assert done.status == TrainingRun.Status.CANCELLED
    assert wait_for(lambda: _ranks(run), lambda ranks: ranks == [], timeout=30, every=0.2) == []
    assert ModelVersion.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_killed_rank_fails_the_run_cleanly_and_a_killed_worker_takes_its_ranks_along(two_cpu_processes, start_worker,
                                                                                    user, dataset, tiny_model_dir):
    worker = start_worker("ddp-kill")
    run = _run(user, dataset, tiny_model_dir, max_steps=100000)
    assert _training(run).status == TrainingRun.Status.RUNNING
    # When one rank is killed outright
    os.kill(_ranks(run)[-1].pid, signal.SIGKILL)
    # Then the run fails with torchrun's account, the other rank is stopped, and no version is registered
    done = wait_for(lambda: TrainingRun.objects.get(pk=run.pk), lambda r: r.is_terminal, timeout=120, every=0.2)
    assert done.status == TrainingRun.Status.FAILED
    assert "distributed training on 2 processes stopped (torchrun exit code 1)" in done.error
    assert wait_for(lambda: _ranks(run), lambda ranks: ranks == [], timeout=30, every=0.2) == []
    assert ModelVersion.objects.count() == 0

    # Given a second run training on 2 ranks, when its worker is killed with SIGKILL, then no rank trains on
    second = _run(user, dataset, tiny_model_dir, max_steps=100000)
    assert _training(second).status == TrainingRun.Status.RUNNING
    assert len(_ranks(second)) == 2
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    assert wait_for(lambda: _ranks(second), lambda ranks: ranks == [], timeout=30, every=0.2) == []


@pytest.mark.parametrize("value", [0, 65, -1, 1.5, "two", True, [2]])
def test_devices_out_of_range_or_not_a_whole_number_is_refused_naming_the_field(value):
    with pytest.raises(HyperparameterError) as raised:
        parse({"devices": value})
    assert set(raised.value.errors) == {"devices"}


@pytest.mark.django_db
def test_api_answers_400_naming_devices(api, dataset):
    response = api.post("/api/runs/", {"dataset": dataset.pk, "hyperparameters": {"devices": 0}}, format="json")
    assert response.status_code == 400
    assert "devices" in response.json()["fields"]
    assert TrainingRun.objects.count() == 0


@hsettings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=8), st.booleans(),
                 st.none()))
def test_devices_fuzzed_is_a_whole_number_from_1_to_64_or_a_400_naming_devices(value):
    try:
        hyper = parse({"devices": value})
    except HyperparameterError as exc:
        assert set(exc.errors) == {"devices"}
        return
    assert hyper.devices is None or (isinstance(hyper.devices, int) and 1 <= hyper.devices <= 64)
    if hyper.devices is not None:
        assert float(value) == hyper.devices


def test_devices_default_and_caps():
    from training.distributed import devices_for

    assert devices_for(requested=None, device="cpu", max_cpu_processes=2) == (1, "")
    assert devices_for(requested=2, device="cpu", max_cpu_processes=2) == (2, "")
    n, note = devices_for(requested=4, device="cpu", max_cpu_processes=1)
    assert n == 1 and note.startswith("devices: 4 asked, this worker has 1 CPU process(es) allowed")
