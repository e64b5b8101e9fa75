"""The launcher's supervisor with real child processes, and the dashboard's Processes card."""

from __future__ import annotations

import json
import os
import sys
import threading

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model

from embedportal.launcher import Supervisor, status_path
from tests.waiting import wait_for

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited all the same.
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def supervise(tmp_path):
    """Run a Supervisor in a thread; stop it (and join) at the end."""
    running: list[tuple[Supervisor, threading.Thread]] = []

    def start(processes: dict[str, list[str]]) -> tuple[Supervisor, threading.Thread]:
        supervisor = Supervisor(processes, tmp_path / "launcher" / "status.json")
        thread = threading.Thread(target=supervisor.run, daemon=True)
        thread.start()
        running.append((supervisor, thread))
        return supervisor, thread

    yield start
    for supervisor, thread in running:
        supervisor.stop()
        thread.join(timeout=30)


def _status(supervisor: Supervisor) -> dict:
    try:
        return json.loads(supervisor.status_path.read_text())
    except FileNotFoundError:
        return {}


def test_supervisor_restarts_killed_child_and_keeps_the_other(supervise):
    # Given two running children
    supervisor, thread = supervise({"gpu-worker": SLEEPER, "web": SLEEPER})
    first = wait_for(lambda: _status(supervisor), lambda s: s and all(p["pid"] for p in s.values()), timeout=20)
    killed, other = first["gpu-worker"]["pid"], first["web"]["pid"]

    # When one is SIGKILLed
    os.kill(killed, 9)

    # Then it is restarted with a new pid, restarts == 1 and its exit recorded; the other kept running
    after = wait_for(lambda: _status(supervisor),
                     lambda s: s["gpu-worker"]["restarts"] == 1 and s["gpu-worker"]["pid"], timeout=20)
    restarted = after["gpu-worker"]
    assert restarted["pid"] != killed
    assert restarted["last_exit"] == -9
    assert restarted["last_restart_at"] == restarted["up_since"]
    assert after["web"] == {**first["web"], "restarts": 0}
    assert _alive(other) and _alive(restarted["pid"])
    assert not _alive(killed)

    # When the supervisor is stopped
    supervisor.stop()
    thread.join(timeout=30)

    # Then both children are gone and the status file with them
    assert not thread.is_alive()
    assert not _alive(other)
    assert not _alive(restarted["pid"])
    assert not supervisor.status_path.exists()


def test_supervisor_stop_kills_what_a_child_started(supervise, tmp_path):
    # Given a child that started a process of its own (like gunicorn's workers)
    pidfile = tmp_path / "grandchild.pid"
    spawner = [sys.executable, "-c",
               "import subprocess, sys, time; "
               f"p = subprocess.Popen({SLEEPER!r}); open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)"]
    supervisor, thread = supervise({"web": spawner})
    grandchild = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), bool, timeout=20))

    # When the supervisor stops
    supervisor.stop()
    thread.join(timeout=30)

    # Then the grandchild is gone too (its process group was signalled)
    assert not _alive(grandchild)


def test_supervisor_backs_off_a_crashing_child(supervise, capfd):
    # Given a child that exits with 3 at once, every time
    supervisor, _ = supervise({"crasher": [sys.executable, "-c", "raise SystemExit(3)"]})

    # When it has been restarted twice (after 1 s, then 2 s)
    status = wait_for(lambda: _status(supervisor), lambda s: s and s["crasher"]["restarts"] >= 2, timeout=20)

    # Then the exit code is kept and each exit was logged with a doubling delay
    assert status["crasher"]["last_exit"] == 3
    out = capfd.readouterr().out
    assert "[launcher] crasher exited with 3; restarting in 1 s (restart 1)\n" in out
    assert "[launcher] crasher exited with 3; restarting in 2 s (restart 2)\n" in out


@pytest.mark.django_db
def test_dashboard_shows_processes_card_from_status_file(client):
    # Given a launcher status file under VAR_DIR
    path = status_path(settings.VAR_DIR)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "web": {"pid": 4101, "restarts": 0, "last_exit": None, "last_restart_at": None,
                "up_since": "2025-01-02T03:04:05+00:00"},
        "gpu-worker": {"pid": None, "restarts": 3, "last_exit": -9, "last_restart_at": "2025-01-02T03:10:00+00:00",
                       "up_since": None},
    }))
    try:
        staff = get_user_model().objects.create_user(username="ops", password="pw-ops-12345", is_staff=True)
        client.force_login(staff)

        # When staff opens the dashboard
        html = client.get("/").content.decode()
    finally:
        path.unlink()

    # Then the card lists each process with its restarts, pid and last exit
    assert "<h2 style=\"margin-top:0\">Processes</h2>" in html
    assert '<td>gpu-worker</td><td><span class="badge failed">restarting</span></td><td>3</td>' in html
    assert '<td>web</td><td><span class="badge ok">up</span></td><td>0</td>' in html
    assert "<td>4101</td>" in html
    assert "<td>-9</td>" in html


@pytest.mark.django_db
def test_dashboard_hides_processes_card_without_launcher_and_pids_from_non_staff(client, user):
    # Given no status file
    client.force_login(user)
    path = status_path(settings.VAR_DIR)
    assert not path.exists()

    # Then no Processes card
    assert "Processes</h2>" not in client.get("/").content.decode()

    # Given a status file, a user who is not staff sees restarts but no pids
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"web": {"pid": 4101, "restarts": 2, "last_exit": -9, "last_restart_at": None,
                                        "up_since": "2025-01-02T03:04:05+00:00"}}))
    try:
        html = client.get("/").content.decode()
    finally:
        path.unlink()
    assert '<td>web</td><td><span class="badge ok">up</span></td><td>2</td>' in html
    assert "4101" not in html
