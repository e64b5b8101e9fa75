"""`bin/worker [QUEUES]` (embedportal.launcher.worker): one more worker, seen by the dashboard, taking work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from urllib.parse import quote

import pytest
import redis
from django.conf import settings
from django.db import connection

from embedportal import launcher
from embedportal.health import system_health
from tests.waiting import wait_for


@pytest.mark.parametrize("queues", ["gpu;rm -rf /", "Embed", "embed,", "-Q", "embed default"])
def test_queue_list_other_than_names_is_refused(queues):
    with pytest.raises(SystemExit, match="QUEUES must look like 'embed' or 'gpu,embed'"):
        launcher.worker([queues])


def test_second_worker_appears_among_the_workers_and_takes_work(transactional_db, tmp_path):
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    broker.delete("default")
    db = connection.settings_dict
    env = {**{k: v for k, v in os.environ.items() if k != "SECRET_KEY"}, "REDIS_URL": settings.CELERY_BROKER_URL, "EMBEDPORTAL_VAR_DIR": str(tmp_path / "var"),
           "DATABASE_URL": f"postgres://{db['USER']}@{quote(db['HOST'], safe='')}/{db['NAME']}"}
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "embedportal.launcher", "worker", "default"], env=env,
                            cwd=settings.BASE_DIR, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        name = f"default-{proc.pid}@"  # the launcher execs celery: same pid
        workers = wait_for(lambda: {w["name"]: w["queues"] for w in system_health()["workers"]},
                           lambda found: any(n.startswith(name) for n in found), timeout=120, every=1)
        assert [queues for n, queues in workers.items() if n.startswith(name)] == [["default"]]
        # It takes work from its queue: the reaper's task, run on it
        from embedportal.tasks import reap_jobs

        reap_jobs.apply_async(queue="default")
        wait_for(lambda: (tmp_path / "worker.log").read_text(errors="replace"),
                 lambda text: "Task embedportal.reap_jobs[" in text and "succeeded" in text, timeout=60)
        assert (tmp_path / "var" / "secret_key").is_file()  # var/'s keys, as bin/run makes them
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
