"""Training on several devices: the same fine_tune under torchrun (DistributedDataParallel), driven by the worker.

What sentence-transformers documents for SentenceTransformerTrainer on
several GPUs: start the training script with `torchrun --nproc_per_node N`;
the trainer (transformers + accelerate) wraps the model in DDP, shards the
batches and averages the gradients. Here the Celery worker holding the run's
job attempt starts `python -m torch.distributed.run --standalone
--nproc-per-node N -m training.distributed SPEC` and stays the only writer
of the run's row:

- **rank 0 reports, the worker writes.** Every rank runs finetune.fine_tune on
  the same spec (a JSON file in the attempt's folder: data, validation,
  hyperparameters); only rank 0 passes callbacks, which print one
  `@embedportal {...}` line per progress point, checkpoint, log line and the
  final result. The worker reads them and writes them through the attempt
  (fenced, batched) exactly as a one-device run does, so the loss curve is
  recorded once. Rank 0 alone saves the model; the trainer saves checkpoints
  from rank 0 as well.
- **Cancel and the reaper reach every rank.** A cancel (or a lost claim) seen
  by the worker kills torchrun's process group and each rank's own one
  (torch's elastic agent starts every rank in a session of its own; each rank
  writes its pid into the attempt's folder, `ranks/rank-<n>.pid`). A worker killed outright takes torchrun with it
  (PR_SET_PDEATHSIG), and torchrun its ranks (the same, set by each rank):
  nothing trains on for a run the reaper has re-queued.
- **A killed rank fails the run cleanly.** torchrun (--max-restarts 0) stops
  the other ranks and exits non-zero; the worker fails the attempt with the
  last lines torchrun printed; the checkpoints stay for a new run.

This module knows torch and the fine-tuning code; like finetune it knows
nothing of Django (the worker passes the settings it needs).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from training import finetune
from training.hyperparameters import Hyperparameters

logger = logging.getLogger(__name__)

LINE_PREFIX = "@embedportal "
SPEC_NAME = "ddp-spec.json"
# Seconds between SIGTERM and SIGKILL when the ranks are stopped.
STOP_GRACE_S = 10.0


def devices_for(*, requested: int | None, device: str, max_cpu_processes: int) -> tuple[int, str]:
    """How many processes this worker trains the run on, and a note when that is fewer than asked.

    Default (requested None): every GPU on a CUDA worker, 1 elsewhere. Capped
    by the GPUs the worker sees, or on CPU by EMBEDPORTAL_MAX_CPU_PROCESSES.
    """
    if device.startswith("cuda"):
        import torch

        have, what = max(1, torch.cuda.device_count()), "GPU(s)"
    elif device == "cpu":
        have, what = max(1, int(max_cpu_processes)), "CPU process(es) allowed (EMBEDPORTAL_MAX_CPU_PROCESSES)"
    else:  # mps and others: one device
        have, what = 1, f"{device} device"
    wanted = requested or (have if device.startswith("cuda") else 1)
    n = max(1, min(int(wanted), have))
    note = f"devices: {wanted} asked, this worker has {have} {what}; training on {n}" if n < wanted else ""
    return n, note


def train(*, devices: int, should_stop: Callable[[], bool] | None = None, **kwargs) -> finetune.FineTuneResult:
    """finetune.fine_tune on one device here, or on `devices` processes under torchrun (see the module docstring)."""
    if devices <= 1:
        return finetune.fine_tune(should_stop=should_stop, **kwargs)
    return _launch(devices=devices, should_stop=should_stop, **kwargs)


def _launch(*, devices: int, base_model: str, data: finetune.TrainingData, output_dir: Path, hyper: Hyperparameters,
            device: str = "auto", validation: finetune.Validation | None = None, resume_from: str | None = None,
            on_progress=None, on_checkpoint=None, on_log=None, should_stop=None) -> finetune.FineTuneResult:
    log = on_log or (lambda line: logger.info(line))
    output_dir = Path(output_dir)
    device = finetune.pick_device(device)
    spec = {
        "base_model": base_model, "columns": data.columns, "output_dir": str(output_dir), "hyper": hyper.as_dict(),
        "device": device, "resume_from": resume_from,
        "validation": None if validation is None else {
            "queries": validation.queries, "corpus": validation.corpus,
            "relevant": {k: sorted(v) for k, v in validation.relevant.items()},
        },
    }
    spec_path = output_dir / SPEC_NAME
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    if device == "cpu":  # the ranks split the cores instead of each taking them all
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // devices))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
               "--max-restarts=0", "-m", "training.distributed", str(spec_path)]
    log(f"starting {devices} training processes under torchrun (DDP{', gloo' if device == 'cpu' else ''})")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, preexec_fn=_die_with_parent, cwd=str(_project_root()))
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True, name="torchrun-output")
    reader.start()
    tail: collections.deque[str] = collections.deque(maxlen=30)
    result: dict | None = None
    try:
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            if line is None:  # torchrun closed its output: it has ended
                break
            message = _message(line)
            if message is not None:
                if "progress" in message and on_progress:
                    on_progress(message["progress"])
                elif "checkpoint" in message and on_checkpoint:
                    on_checkpoint(message["checkpoint"])
                elif "log" in message:
                    log(message["log"])
                elif "result" in message:
                    result = message["result"]
            elif line.strip():
                tail.append(line.rstrip())
            if should_stop and should_stop():  # may raise jobs.Cancelled / LostClaim: the finally stops the ranks
                raise finetune.TrainingCancelled()
        code = proc.wait()
    finally:
        if proc.poll() is None:
            stop(proc, output_dir)
    if code != 0 or result is None:
        detail = "\n".join(tail) or "(no output)"
        raise RuntimeError(f"distributed training on {devices} processes stopped (torchrun exit code {code}); "
                           f"its last lines:\n{detail}")
    return finetune.FineTuneResult(**result)


def _message(line: str) -> dict | None:
    """A rank 0 line for the worker, or None for anything else torchrun or a library printed."""
    if not line.startswith(LINE_PREFIX):
        return None
    try:
        message = json.loads(line[len(LINE_PREFIX):])
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def rank_pids(output_dir: Path) -> list[int]:
    """The pids the ranks wrote into the attempt's folder."""
    pids = []
    for path in sorted((Path(output_dir) / "ranks").glob("rank-*.pid")):
        try:
            pids.append(int(path.read_text().strip()))
        except (OSError, ValueError):
            continue
    return pids


def stop(proc: subprocess.Popen, output_dir: Path) -> None:
    """SIGTERM torchrun's process group and each rank's, then SIGKILL what is left after STOP_GRACE_S."""
    ranks = rank_pids(output_dir)
    groups = [proc.pid, *ranks]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and (proc.poll() is None or any(_alive(pid) for pid in ranks)):
            time.sleep(0.1)
    proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A rank that exited but is not reaped yet is a zombie: gone for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the process that started it dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


# --- One rank (run by torchrun) ---------------------------------------------------------------


def _emit(kind: str, value) -> None:
    print(LINE_PREFIX + json.dumps({kind: value}, default=str), flush=True)


def main(argv: list[str]) -> int:
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # torchrun died before the line above: stop now
        return 1
    spec = json.loads(Path(argv[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    ranks_dir = Path(spec["output_dir"]) / "ranks"  # for the worker's stop(): ranks run in sessions of their own
    ranks_dir.mkdir(parents=True, exist_ok=True)
    (ranks_dir / f"rank-{rank}.pid").write_text(str(os.getpid()))
    device = spec["device"]
    if device.startswith("cuda"):
        import torch

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    validation = None
    if spec["validation"]:
        v = spec["validation"]
        validation = finetune.Validation(queries=v["queries"], corpus=v["corpus"],
                                         relevant={k: set(ids) for k, ids in v["relevant"].items()})
    chief = rank == 0
    result = finetune.fine_tune(
        base_model=spec["base_model"], data=finetune.TrainingData(spec["columns"]),
        output_dir=Path(spec["output_dir"]), hyper=Hyperparameters.from_stored(spec["hyper"]), device=device,
        validation=validation, resume_from=spec["resume_from"],
        on_progress=(lambda point: _emit("progress", point)) if chief else None,
        on_checkpoint=(lambda path: _emit("checkpoint", path)) if chief else None,
        on_log=(lambda line: _emit("log", line)) if chief else (lambda line: None),
    )
    if chief:
        _emit("result", asdict(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
