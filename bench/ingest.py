"""Import speed and memory (issue: datasets).

Two parts, each run in its own process (peak RSS is per process) with its
own throwaway database:

- json: the 20,859-issue Hadoop Jira export parsed, validated and stored
  (COPY into a staging table, merged by key, full-text vectors filled).
  Baseline in the same run: a bare json.load of the same file.
  Targets: <= 15 s, peak RSS <= 400 MB on 2 cores.
- csv: a generated Jira CSV export of 1,000,000 rows (about 1 GB: multi-line
  quoted descriptions, repeated Component/s columns, Jira dates) imported the
  same way. Target: peak RSS <= 1 GB. The file is written to a temporary
  folder and deleted afterwards.
- http: the same generated CSV uploaded over HTTP (curl, multipart) to the
  product's web app under gunicorn (one worker), as a user would: the upload
  streams to disk, is staged and answered 202 with a background import job
  (the import itself is what the csv part measures). Target: the web
  worker's peak RSS <= 1 GB (it should stay near its idle size); the
  baseline is that worker's RSS before the upload.

`python -m bench ingest [--part all|json|csv|http] [--rows N] [--data PATH]`
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import SHARED_DATA, emit, peak_rss_mb, setup_django, summary

PARTS = ("json", "csv", "http")
_WORDS = (
    "namenode datanode block replica lease heartbeat safemode quota snapshot checkpoint journal yarn "
    "container scheduler queue memory vcore shuffle reducer mapper split codec compression timeout "
    "socket kerberos token delegation audit metrics jmx webhdfs fsck balancer decommission rack "
    "storage policy erasure coding stripe parity cache eviction throttle retry backoff exception "
    "null pointer deadlock race condition regression upgrade rollback configuration default"
).split()


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench ingest")
    parser.add_argument("--part", choices=("all", *PARTS), default="all")
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "jira" / "apache-hadoop.jira.json.gz")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the generated CSV")
    args = parser.parse_args(argv)
    if args.part == "json":
        return _json_part(args.data)
    if args.part == "csv":
        return _csv_part(args.rows)
    if args.part == "http":
        return _http_part(args.rows)
    figures: dict = {}
    targets: dict = {}
    for part in PARTS:
        child = subprocess.run(
            [sys.executable, "-m", "bench", "ingest", "--part", part, "--data", str(args.data), "--rows", str(args.rows)],
            capture_output=True, text=True,
        )
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise SystemExit(f"part {part} printed no result (exit {child.returncode}):\n{child.stderr[-3000:]}")
        for line in lines[:-1]:
            print(line, flush=True)
        result = json.loads(lines[-1])
        figures.update({f"{part}_{name}": value for name, value in result["figures"].items()})
        targets.update({f"{part}_{name}": check["target"] for name, check in result["targets"].items()})
    return summary("ingest", figures, targets)


def _owner():
    from django.contrib.auth import get_user_model

    owner, _ = get_user_model().objects.get_or_create(username="bench")
    return owner


def _json_part(data: Path) -> dict:
    setup_django()
    from training import datasets

    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    with gzip.open(data, "rt") if data.suffix == ".gz" else open(data) as fh:
        baseline_count = len(json.load(fh)["issues"])
    baseline_s = time.perf_counter() - t0
    emit({"part": "json", "system": "baseline json.load", "seconds": round(baseline_s, 2), "issues": baseline_count})

    t1 = time.perf_counter()
    dataset = datasets.import_dataset(owner=_owner(), name=f"bench-{time.time()}", kind="tickets", path=data,
                                      filename=data.name)
    import_s = time.perf_counter() - t1
    documents = dataset.documents.count()
    figures = {
        "documents": documents,
        "import_seconds": round(import_s, 2),
        "documents_per_second": round(documents / import_s, 1),
        "baseline_json_load_seconds": round(baseline_s, 2),
        "import_vs_json_load_ratio": round(import_s / baseline_s, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_before_mb": round(rss_before, 1),
    }
    emit({"part": "json", "system": "embedportal import", **figures})
    return summary("ingest-json", figures, {"import_seconds": "<= 15", "peak_rss_mb": "<= 400"})


def generate_jira_csv(path: Path, rows: int, *, seed: int = 0) -> int:
    """A Jira-CSV-shaped export of `rows` issues, ~1 KB each; returns its size in bytes."""
    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "."
                 for _ in range(2000)]
    descriptions = []
    for _ in range(500):
        parts = [rng.choice(sentences) for _ in range(rng.randint(8, 14))]
        # Multi-line cells, a quote and a comma: what real descriptions hold.
        descriptions.append("\n".join(parts[:3]) + "\r\n\r\n{code}\n\"quoted\", value\n{code}\n" + " ".join(parts[3:]))
    statuses = ("Open", "Resolved", "Closed", "In Progress")
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Summary", "Issue key", "Issue id", "Issue Type", "Priority", "Status", "Component/s",
                         "Component/s", "Labels", "Created", "Outward issue link (Duplicate)", "Description"])
        for i in range(rows):
            writer.writerow([
                f"{rng.choice(sentences)[:80]} #{i}", f"GEN-{i}", str(100000 + i), rng.choice(("Bug", "Task")),
                rng.choice(("Major", "Minor")), rng.choice(statuses), rng.choice(_WORDS), rng.choice(_WORDS),
                "generated", f"{1 + i % 28:02d}/Sep/21 17:{i % 60:02d}",
                f"GEN-{i - 1}" if i % 50 == 1 else "", f"{descriptions[i % 500]} ({i})",
            ])
    return path.stat().st_size


def _csv_part(rows: int) -> dict:
    setup_django()
    from training import datasets

    folder = Path(tempfile.mkdtemp(prefix="embedportal-bench-csv-"))
    try:
        path = folder / "generated-jira-export.csv"
        t0 = time.perf_counter()
        size = generate_jira_csv(path, rows)
        generate_s = time.perf_counter() - t0
        emit({"part": "csv", "system": "generate", "rows": rows, "megabytes": round(size / 1e6, 1),
              "seconds": round(generate_s, 1)})
        rss_before = peak_rss_mb()
        t1 = time.perf_counter()
        dataset = datasets.import_dataset(owner=_owner(), name=f"bench-csv-{time.time()}", path=path,
                                          filename=path.name)
        import_s = time.perf_counter() - t1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    documents = dataset.documents.count()
    figures = {
        "rows": rows,
        "file_mb": round(size / 1e6, 1),
        "documents": documents,
        "rows_rejected": dataset.import_report["rows_rejected"],
        "import_seconds": round(import_s, 1),
        "rows_per_second": round(documents / import_s, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_before_import_mb": round(rss_before, 1),
    }
    emit({"part": "csv", "system": "embedportal import", **figures})
    return summary("ingest-csv", figures, {"peak_rss_mb": "<= 1024", "documents": f">= {rows}"})


def _rss_mb(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} for process {pid}")


def _http_part(rows: int) -> dict:
    import os
    import socket
    import urllib.request

    setup_django()
    from rest_framework.authtoken.models import Token

    from training.models import ImportJob

    folder = Path(tempfile.mkdtemp(prefix="embedportal-bench-http-"))
    server = None
    try:
        path = folder / "generated-jira-export.csv"
        size = generate_jira_csv(path, rows)
        emit({"part": "http", "system": "generate", "rows": rows, "megabytes": round(size / 1e6, 1)})
        token = Token.objects.get_or_create(user=_owner())[0].key
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        (folder / "tmp").mkdir()
        env = {**os.environ, "DEBUG": "0", "LOG_LEVEL": "WARNING", "FILE_UPLOAD_TEMP_DIR": str(folder / "tmp"),
               "EMBEDPORTAL_UPLOADS_DIR": str(folder / "uploads"),
               # The job message goes to a broker database no worker of a running product reads.
               "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")}
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "embedportal.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", "1",
             "--timeout", "600"], env=env, cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/login/", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"gunicorn did not start: {server.stderr.read()[-2000:] if server.stderr else ''}")
                time.sleep(0.5)
        worker = int(Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()[0])
        rss_idle = _rss_mb(worker, "VmRSS")
        t0 = time.perf_counter()
        answer = subprocess.run(
            ["curl", "-sS", "-o", str(folder / "answer.json"), "-w", "%{http_code}", "-H",
             f"Authorization: Token {token}", "-F", "name=bench-http", "-F", "kind=tickets", "-F", "background=true",
             "-F", f"file=@{path};type=text/csv", f"http://127.0.0.1:{port}/api/datasets/"],
            capture_output=True, text=True, check=True,
        )
        upload_s = time.perf_counter() - t0
        worker_peak = _rss_mb(worker, "VmHWM")
        body = json.loads((folder / "answer.json").read_text())
        job = ImportJob.objects.get(pk=body["id"]) if answer.stdout == "202" else None
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
    import redis
    from django.conf import settings

    redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")).delete(
        settings.CELERY_TASK_DEFAULT_QUEUE)
    figures = {
        "rows": rows,
        "file_mb": round(size / 1e6, 1),
        "http_status": int(answer.stdout),
        "accepted_202": answer.stdout == "202",
        "upload_seconds": round(upload_s, 1),
        "upload_mb_per_s": round(size / 1e6 / upload_s, 1),
        "staged_bytes_match": bool(job and job.size_bytes == size),
        "web_worker_idle_rss_mb": round(rss_idle, 1),
        "web_worker_peak_rss_mb": round(worker_peak, 1),
        "peak_vs_idle_ratio": round(worker_peak / rss_idle, 2),
    }
    emit({"part": "http", "system": "upload to gunicorn, 202 + background job", **figures})
    return summary("ingest-http", figures, {"web_worker_peak_rss_mb": "<= 1024", "accepted_202": ">= 1",
                                            "staged_bytes_match": ">= 1"})
