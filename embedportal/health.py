"""What the workers and queues are doing, for the dashboard and /api/health."""

from __future__ import annotations

import logging
from typing import Any

import redis
from django.conf import settings
from django.db import connection

from embedportal.celery import app
from search.models import SearchIndex
from training.models import TrainingRun

logger = logging.getLogger(__name__)

QUEUES = (settings.CELERY_TASK_DEFAULT_QUEUE, settings.GPU_QUEUE, settings.EMBED_QUEUE)
INSPECT_TIMEOUT_S = 1.0


def running_jobs(owner=None) -> list[dict[str, Any]]:
    """Jobs our tables say are running, with their last sign of life.

    A worker with a solo pool (the gpu worker) cannot answer Celery's inspect
    broadcast while it runs a task, so this, not inspect, is what tells that
    it is alive and busy.
    """
    runs = TrainingRun.objects.filter(status=TrainingRun.Status.RUNNING).select_related("dataset")
    indexes = SearchIndex.objects.filter(status=SearchIndex.Status.RUNNING).select_related("dataset", "model_version")
    if owner is not None:
        runs, indexes = runs.filter(owner=owner), indexes.filter(owner=owner)
    jobs = [
        {"kind": "training", "id": r.pk, "label": f"Training run #{r.pk} on {r.dataset.name}",
         "progress": f"step {r.metrics.get('step', 0)}/{r.metrics.get('total_steps', '?')}",
         "last_seen": r.heartbeat_at}
        for r in runs
    ]
    jobs += [
        {"kind": "index", "id": i.pk, "label": f"Embedding {i.dataset.name} with {i.model_version}",
         "progress": f"{i.embedded_count}/{i.total_count} documents", "last_seen": None}
        for i in indexes
    ]
    return jobs


def system_health(owner=None) -> dict[str, Any]:
    """Workers (name -> queues, active tasks), running jobs, queue lengths, broker and database."""
    health: dict[str, Any] = {"broker": "ok", "database": "ok", "workers": [], "queues": {}, "running_jobs": []}
    try:
        client = redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_timeout=1, socket_connect_timeout=1)
        health["queues"] = {queue: client.llen(queue) for queue in QUEUES}
    except redis.RedisError as exc:
        health["broker"] = f"unreachable: {exc}"
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:  # reported on the dashboard, never raised
        health["database"] = f"unreachable: {exc}"
    else:
        health["running_jobs"] = running_jobs(owner)
    if health["broker"] == "ok":
        inspector = app.control.inspect(timeout=INSPECT_TIMEOUT_S)
        try:
            queues = inspector.active_queues() or {}
            active = inspector.active() or {}
        except Exception as exc:  # a broker hiccup must not break the page
            logger.warning("celery inspect failed: %s", exc)
            queues, active = {}, {}
        health["workers"] = [
            {
                "name": name,
                "queues": sorted(q["name"] for q in worker_queues),
                "active": [task.get("name") for task in active.get(name, [])],
            }
            for name, worker_queues in sorted(queues.items())
        ]
    return health
