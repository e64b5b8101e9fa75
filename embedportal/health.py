"""What the workers and queues are doing, for the dashboard and /api/health."""

from __future__ import annotations

import logging
from typing import Any

import redis
from django.conf import settings
from django.db import connection

from embedportal.celery import app

logger = logging.getLogger(__name__)

QUEUES = (settings.CELERY_TASK_DEFAULT_QUEUE, settings.GPU_QUEUE)
INSPECT_TIMEOUT_S = 1.0


def system_health() -> dict[str, Any]:
    """Workers (name -> queues, active tasks), queue lengths, broker and database reachability."""
    health: dict[str, Any] = {"broker": "ok", "database": "ok", "workers": [], "queues": {}}
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
