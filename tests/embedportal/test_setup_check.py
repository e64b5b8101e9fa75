"""The Setup page answers at once (issue 16): no model is loaded by the request (a worker checks the device and
the base model and its answer is kept in Redis), and busy workers are listed; plus the favicon."""

from __future__ import annotations

import time

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from embedportal import setup_check
from training.models import Dataset, TrainingRun

pytestmark = pytest.mark.django_db


@pytest.fixture
def broker():
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    keys = (setup_check.WORKER_CHECKS_KEY, setup_check.WORKER_CHECKS_PENDING_KEY, settings.CELERY_TASK_DEFAULT_QUEUE)
    client.delete(*keys)
    yield client
    client.delete(*keys)


@pytest.fixture
def staff(web, user):
    user.is_staff = True
    user.save(update_fields=["is_staff"])
    return web


def _rows(html: str) -> str:
    return " ".join(html.split())


def test_page_answers_at_once_and_asks_a_worker_for_the_model_check_once(staff, broker):
    html = _rows(staff.get("/setup/").content.decode())
    assert "being checked by a worker (it loads the model once); reload this page in a few seconds" in html
    assert "base model sentence-transformers" not in html
    assert broker.llen(settings.CELERY_TASK_DEFAULT_QUEUE) == 1  # one embedportal.setup_checks task sent
    started = time.perf_counter()  # a running server: its modules and templates are loaded
    staff.get("/setup/")
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"the Setup page took {elapsed:.2f} s"
    assert broker.llen(settings.CELERY_TASK_DEFAULT_QUEUE) == 1  # not sent again while one waits


def test_page_shows_the_workers_model_check_without_loading_a_model(staff, broker):
    checks = setup_check.check_in_worker()  # what the worker's task runs
    assert [c.name for c in checks] == ["device", f"base model {settings.DEFAULT_BASE_MODEL}"]
    assert checks[1].ok and checks[1].detail == "loads, 384 dimensions"
    started = time.perf_counter()
    html = _rows(staff.get("/setup/").content.decode())
    assert time.perf_counter() - started < 1.0
    assert (f"<td>base model {settings.DEFAULT_BASE_MODEL}</td><td><span class=\"badge ok\">ok</span></td>"
            "<td>loads, 384 dimensions</td>") in html
    assert "Device and base model as a worker found them" in html
    assert broker.llen(settings.CELERY_TASK_DEFAULT_QUEUE) == 0
    assert not broker.exists(setup_check.WORKER_CHECKS_PENDING_KEY)


def test_busy_worker_that_cannot_answer_is_listed_by_its_job(staff, user, broker):
    dataset = Dataset.objects.create(owner=user, name="hadoop")
    run = TrainingRun.objects.create(owner=user, dataset=dataset, base_model="m", status=TrainingRun.Status.RUNNING,
                                     heartbeat_at=timezone.now(), metrics={"step": 3, "total_steps": 10})
    checks, _ = setup_check.page_checks()
    workers = next(c for c in checks if c.name == "workers")
    assert workers.ok is True
    assert f"busy, not answering while it works: Training run #{run.pk} on hadoop (step 3/10, heartbeat " in \
        workers.detail


def test_no_worker_and_no_job_is_a_problem_saying_what_to_do(broker):
    check = setup_check._workers_check([], [])
    assert (check.ok, check.detail) == (False, "none answered and no job runs: start bin/run")
    check = setup_check._workers_check([{"name": "default@h", "queues": ["default"], "active": ["a.task"]},
                                        {"name": "embed@h", "queues": ["embed"], "active": []}], [])
    assert (check.ok, check.detail) == (True, "default@h (default): busy with a.task; embed@h (embed): idle")


def test_non_staff_see_which_checks_pass_without_details(web, broker):
    html = _rows(web.get("/setup/").content.decode())
    assert "being checked by a worker" not in html and settings.CELERY_BROKER_URL.split("@")[-1] not in html


def test_every_page_links_the_favicon_and_favicon_ico_redirects_to_it(web):
    html = web.get("/").content.decode()
    assert '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">' in html
    response = web.get("/favicon.ico")
    assert (response.status_code, response["Location"]) == (301, "/static/favicon.svg")
