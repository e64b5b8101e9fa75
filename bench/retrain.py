"""Daily retraining, day by day, fed from a Jira stand-in (issue #13): `python -m bench retrain`.

The shared Hadoop export is split by `created` date: an initial export (the
`--limit` issues created last before `--start`, with the issues they are
Duplicate-linked to, so their clusters are whole) and one increment per day
from `--start` on (`--days`, default 6: 2014-01-18..23 holds 2, 0, 7, 10, 8
and 30 issues, so one day is empty). A real local Jira stand-in
(tests/jira_standin.py, Data Center flavour) serves the issues as they were
at the end of each day (`updated` = `created`, links only to issues that
exist by then). The product runs as in production: its own Redis, and
bin/run's Celery workers (embedportal.launcher.product_processes) and beat
with the django-celery-beat scheduler. Each day the dataset's schedule is switched on
with a fast crontab (every minute); the first tick beat sends starts the
day's retrain (sync -> skip or train -> guard), and the schedule is switched
off again until the next day, so each day has exactly one occurrence.

Per day it prints the occurrence (synced issues, outcome, decision), the
production model's held-out nDCG@10 on the product's own TEST queries and on
a fixed held-out set (the initial export's TEST clusters, never changing),
and the wall time. Summary: days, syncs, rows synced, skips (must equal the
empty days), runs, promotions, kept decisions, the fixed-set nDCG@10 per day
(must never drop by more than the guard's tolerance) and wall time per day.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

from bench.harness import SHARED_DATA, emit, setup_django, summary

ROOT = Path(__file__).resolve().parent.parent
PAT = "bench-personal-access-token"
TOLERANCE = 0.01


def split_by_day(issues: list[dict], *, start: date, days: int, limit: int) -> tuple[list[dict], list[list[dict]]]:
    """(initial export, one list per day): the `limit` issues created last before `start` plus their Duplicate
    partners created before it, then the issues created on each of the `days` days from `start`."""
    keys = {i["key"]: i for i in issues}
    before = sorted((i for i in issues if i["fields"]["created"][:10] < start.isoformat()),
                    key=lambda i: i["fields"]["created"])
    chosen = {i["key"] for i in before[-limit:]} if limit else {i["key"] for i in before}
    for key in list(chosen):
        for link in keys[key]["fields"].get("issuelinks") or []:
            other = (link.get("outwardIssue") or link.get("inwardIssue") or {}).get("key")
            if (link.get("type") or {}).get("name") == "Duplicate" and other in keys and \
                    keys[other]["fields"]["created"][:10] < start.isoformat():
                chosen.add(other)
    initial = [i for i in before if i["key"] in chosen]
    increments = [[i for i in issues if i["fields"]["created"][:10] == (start + timedelta(days=n)).isoformat()]
                  for n in range(days)]
    return initial, increments


def as_of(issues: list[dict]) -> list[dict]:
    """The issues as Jira held them then: `updated` = `created`, links only between issues that exist."""
    present = {i["key"] for i in issues}
    out = []
    for issue in issues:
        shown = copy.deepcopy(issue)
        shown["fields"]["updated"] = shown["fields"]["created"]
        shown["fields"]["issuelinks"] = [
            link for link in shown["fields"].get("issuelinks") or []
            if (link.get("outwardIssue") or link.get("inwardIssue") or {}).get("key") in present]
        out.append(shown)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """The product's background processes for this run: its own Redis, then bin/run's workers and beat."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def redis(self) -> str:
        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("bench retrain needs redis-server (apt-get install redis-server).")
        port = _free_port()
        self._spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                              "--dir", str(self.folder)], env=dict(os.environ))
        client = redis.Redis(port=port, socket_connect_timeout=0.5)
        for _ in range(100):
            try:
                if client.ping():
                    return f"redis://127.0.0.1:{port}/0"
            except redis.RedisError:
                time.sleep(0.1)
        raise SystemExit(f"redis-server did not answer on port {port}")

    def product(self, env: dict[str, str]) -> None:
        """bin/run's workers and beat (embedportal.launcher.product_processes), without the web server; beat
        re-reads its schedule every 5 s and keeps its state file here."""
        from embedportal.launcher import product_processes

        for name, command in product_processes(python=sys.executable, host="127.0.0.1", port="0").items():
            if name == "web":
                continue
            if name == "beat":
                command = [*command[:command.index("--schedule")], "--max-interval", "5", "--schedule",
                           str(self.folder / "celerybeat-schedule")]
            self._spawn(name, command, env=env)

    def _spawn(self, name: str, command: list[str], *, env: dict[str, str]) -> None:
        self.procs[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(self.folder / f"{name}.log", "ab"),
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.folder / f"{name}.log").read_text(errors="replace")[-3000:]
                raise SystemExit(f"{name} exited with {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        for name in [n for n in reversed(self.procs) if n != "redis"] + ["redis"]:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench retrain")
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "jira" / "apache-hadoop.jira.json.gz")
    parser.add_argument("--start", type=date.fromisoformat, default=date(2014, 1, 18),
                        help="the first daily increment (2014-01-18..23: 2, 0, 7, 10, 8, 30 issues)")
    parser.add_argument("--days", type=int, default=6)
    parser.add_argument("--limit", type=int, default=1000,
                        help="issues of the initial export (the last before --start, plus their Duplicate partners)")
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="base model of the first run")
    parser.add_argument("--start-from", choices=("production", "base"), default="production")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--day-timeout", type=float, default=1800.0, help="seconds a day may take")
    args = parser.parse_args(argv)

    from cryptography.fernet import Fernet

    folder = Path(tempfile.mkdtemp(prefix="embedportal-bench-retrain-"))
    processes = Processes(folder / "processes")
    load_before = os.getloadavg()
    started = time.perf_counter()
    try:
        os.environ.update({
            "REDIS_URL": processes.redis(),
            "SECRET_KEY": os.environ.get("SECRET_KEY") or secrets.token_urlsafe(50),
            "EMBEDPORTAL_CREDENTIALS_KEY": Fernet.generate_key().decode(),
            "EMBEDPORTAL_DEVICE": args.device,
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        })
        os.environ.pop("CELERY_BROKER_URL", None)
        setup_django()  # a throwaway embedded PostgreSQL under a new EMBEDPORTAL_VAR_DIR, shared with the children
        with gzip.open(args.data, "rt") if args.data.suffix == ".gz" else open(args.data) as fh:
            issues = json.load(fh)["issues"]
        initial, increments = split_by_day(issues, start=args.start, days=args.days, limit=args.limit)
        emit({"initial_export": len(initial), "increments": [len(day) for day in increments],
              "first_day": args.start.isoformat()})
        processes.product(dict(os.environ))
        return _days(args, initial, increments, processes, folder=folder, started=started, load_before=load_before)
    finally:
        processes.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _days(args, initial: list[dict], increments: list[list[dict]], processes: Processes, *, folder: Path,
          started: float, load_before) -> dict:
    from django.contrib.auth import get_user_model

    from tests.jira_standin import DATA_CENTER, JiraStandIn
    from training import retraining
    from training.connectors import jira
    from training.models import Dataset, ModelVersion, RetrainOccurrence
    from training.registry import production_version

    owner, _ = get_user_model().objects.get_or_create(username="bench")
    hyper = {"max_steps": args.max_steps, "batch_size": args.batch_size, "max_seq_length": args.max_seq_length}
    fixed = _fixed_evaluation(owner, initial, args, folder=folder)
    rows: list[dict] = []
    with JiraStandIn(as_of(initial), flavor=DATA_CENTER, token=PAT) as site:
        dataset = Dataset.objects.create(owner=owner, name="hadoop (from Jira)", kind="tickets")
        jira.save_connection(dataset=dataset, base_url=site.base_url, flavor=DATA_CENTER,
                             jql="project in (HADOOP, HDFS, MAPREDUCE, YARN)", token=PAT)
        timing = {"minute": "*", "hour": "*", "time_zone": "UTC", "start_from": args.start_from,
                  "base_model": args.model, "hyperparameters": hyper, "tolerance": TOLERANCE}
        retraining.save_schedule(dataset=dataset, owner=owner, enabled=False, **timing)
        present = list(initial)
        for day in range(len(increments) + 1):
            if day:
                present += increments[day - 1]
            site.set_issues(as_of(present))
            t0 = time.perf_counter()
            seen = set(RetrainOccurrence.objects.filter(dataset=dataset).values_list("pk", flat=True))
            retraining.save_schedule(dataset=dataset, owner=owner, enabled=True, **timing)  # beat ticks next minute
            occurrence = _wait(lambda: RetrainOccurrence.objects.filter(dataset=dataset).exclude(pk__in=seen)
                               .order_by("created_at").first(), processes, args.day_timeout, "beat's tick")
            retraining.save_schedule(dataset=dataset, owner=owner, enabled=False, **timing)
            ticked = time.perf_counter() - t0
            occurrence = _wait(lambda: _ended(occurrence.pk), processes, args.day_timeout, "the retrain")
            if occurrence.outcome == "promoted":  # serving switches once the challenger's index is built
                _wait(lambda: ModelVersion.objects.filter(pk=occurrence.challenger_id, stage="production").first(),
                      processes, args.day_timeout, "the promotion")
            wall = time.perf_counter() - t0
            production = production_version(dataset=dataset)
            record = {
                "day": day, "date": "initial export" if day == 0 else (args.start + timedelta(days=day - 1)).isoformat(),
                "new_issues": len(initial) if day == 0 else len(increments[day - 1]),
                "occurrence": occurrence.pk, "slot": occurrence.scheduled_for.isoformat(),
                "outcome": occurrence.outcome, "summary": occurrence.summary,
                "synced": bool(occurrence.sync and occurrence.sync.status == "succeeded"),
                "issues_synced": occurrence.issues_synced,
                "sync_version": occurrence.sync.version.number if occurrence.sync and occurrence.sync.version_id else None,
                "trained": occurrence.run_id is not None,
                "production": str(production) if production else None,
                "production_ndcg@10": occurrence.production_ndcg,
                "fixed_ndcg@10": fixed(production) if production else None,
                "wall_s": round(wall, 1), "beat_tick_s": round(ticked, 1),
                "retrain_s": round((occurrence.finished_at - occurrence.started_at).total_seconds(), 1)
                if occurrence.started_at else None,
            }
            if occurrence.status != "succeeded":
                record["error"] = occurrence.error
            emit(record)
            rows.append(record)
    return _summary(rows, increments, args, started=started, load_before=load_before)


def _ended(pk: int):
    from training.models import RetrainOccurrence

    row = RetrainOccurrence.objects.select_related("sync", "sync__version").get(pk=pk)
    return row if row.is_terminal else None


def _wait(fetch, processes: Processes, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if value:
            return value
        processes.check()
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(1.0)


def _fixed_evaluation(owner, initial: list[dict], args, *, folder: Path):
    """nDCG@10 of a model version on the initial export's TEST queries, over the initial corpus (cached per version).

    A dataset of its own that no sync touches, evaluated with the product's held-out protocol.
    """
    from training import artifacts, datasets
    from training.heldout import HeldOutEvaluation

    export = folder / "initial.json"  # removed with the run's folder
    export.write_text(json.dumps({"issues": as_of(initial)}))
    frozen = datasets.import_dataset(owner=owner, name="fixed held-out set", kind="tickets", path=export,
                                     filename=export.name)
    held_out = HeldOutEvaluation(dataset=frozen, log=lambda line: None)
    emit({"fixed_held_out": {"documents": len(held_out.eval_set.doc_ids), "queries": len(held_out.eval_set.queries)}})
    scores: dict[int, float] = {}

    def score(version) -> float | None:
        if not held_out.available:
            return None
        if version.pk not in scores:
            result = held_out.model(artifacts.ensure_local(version.artifact_path),
                                    max_seq_length=args.max_seq_length, device=args.device)
            scores[version.pk] = round(result.vector.metrics["ndcg@10"], 4)
        return scores[version.pk]

    return score


def _summary(rows: list[dict], increments: list[list[dict]], args, *, started: float, load_before) -> dict:
    empty_days = sum(1 for day in increments if not day)
    skips = sum(1 for r in rows if r["outcome"] == "skipped")
    fixed = [r["fixed_ndcg@10"] for r in rows if r["fixed_ndcg@10"] is not None]
    drops = [max(0.0, round(a - b, 4)) for a, b in zip(fixed, fixed[1:])]
    figures = {
        "days": len(increments),
        "occurrences": len(rows),
        "syncs": sum(1 for r in rows if r["synced"]),
        "rows_synced": sum(r["issues_synced"] for r in rows),
        "empty_days": empty_days,
        "skips": skips,
        "skips_minus_empty_days": skips - empty_days,
        "empty_days_minus_skips": empty_days - skips,
        "runs": sum(1 for r in rows if r["trained"]),
        "promotions": sum(1 for r in rows if r["outcome"] == "promoted"),
        "kept": sum(1 for r in rows if r["outcome"] == "kept"),
        "failed": sum(1 for r in rows if r["outcome"] not in ("skipped", "promoted", "kept")),
        "production_ndcg@10_per_day": [r["production_ndcg@10"] for r in rows],
        "fixed_ndcg@10_per_day": [r["fixed_ndcg@10"] for r in rows],
        "max_fixed_ndcg@10_drop": max(drops) if drops else 0.0,
        "wall_s_per_day": [r["wall_s"] for r in rows],
        "total_s": round(time.perf_counter() - started, 1),
        "start_from": args.start_from,
        "settings": {"limit": args.limit, "model": args.model, "max_steps": args.max_steps,
                     "batch_size": args.batch_size, "max_seq_length": args.max_seq_length, "device": args.device},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    return summary("retrain", figures, {
        "days": ">= 5", "empty_days": ">= 1", "skips_minus_empty_days": "<= 0", "empty_days_minus_skips": "<= 0",
        "failed": "<= 0",
        "max_fixed_ndcg@10_drop": f"<= {TOLERANCE}",
    })
