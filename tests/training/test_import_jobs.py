"""Background import jobs for big uploads: page, API, a real worker, failures, the one job system's reaper."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from django.conf import settings as django_settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection, connections, transaction
from django.utils import timezone
from rest_framework.test import APIClient

from embedportal import jobs
from embedportal.celery import app as celery_app
from tests.waiting import wait_for
from training import import_jobs
from training.models import Dataset, ImportJob

DEAD_BROKER = "redis://127.0.0.1:1/0"  # nothing listens on port 1: "Redis is down"


@pytest.fixture(autouse=True)
def uploads_dir(settings, tmp_path):
    settings.UPLOADS_DIR = tmp_path / "uploads"
    return settings.UPLOADS_DIR


def _staged(uploads_dir: Path) -> list[Path]:
    return sorted(uploads_dir.glob("*.upload")) if uploads_dir.exists() else []


@pytest.mark.django_db(transaction=True)
def test_api_background_upload_is_imported_by_a_real_worker(celery_worker, api, small_jira_file, uploads_dir):
    with open(small_jira_file, "rb") as fh:
        answer = api.post("/api/datasets/", {"name": "hadoop-bg", "kind": "tickets", "file": fh, "background": "true"},
                          format="multipart")
    assert answer.status_code == 202, answer.content
    job = answer.json()
    assert job["status"] in ("queued", "running", "succeeded") and job["url"] == f"/api/imports/{job['id']}/"
    done = wait_for(lambda: api.get(job["url"]).json(), lambda j: j["status"] in ("succeeded", "failed"), timeout=120)
    assert done["status"] == "succeeded", done
    assert (done["rows_read"], done["phase"], done["attempt"], done["error"]) == (200, "done", 1, "")
    dataset = Dataset.objects.get(pk=done["dataset"])
    assert dataset.name == "hadoop-bg" and dataset.documents.count() == 200
    assert done["version"] == dataset.versions.get().pk
    assert _staged(uploads_dir) == []  # the staged file is removed when the job ends
    assert [j["id"] for j in api.get("/api/imports/").json()["results"]] == [job["id"]]


@pytest.mark.django_db
def test_page_upload_above_the_threshold_goes_to_the_job_page(settings, web, small_jira_file, uploads_dir):
    settings.BACKGROUND_IMPORT_MB = 0  # every upload is "big"
    with open(small_jira_file, "rb") as fh:
        answer = web.post("/datasets/", {"name": "big-one", "kind": "tickets", "file": fh})
    job = ImportJob.objects.get()
    assert answer.status_code == 302 and answer["Location"] == f"/imports/{job.pk}/"
    assert (job.status, job.action, job.name, job.size_bytes) == ("queued", "create", "big-one",
                                                                  small_jira_file.stat().st_size)
    assert len(_staged(uploads_dir)) == 1
    page = web.get(answer["Location"])
    assert page.status_code == 200 and b"waiting for a worker" in page.content
    assert b"big-one" in web.get("/datasets/").content  # listed under recent imports
    # The page polls itself (HTMX) while the job is not finished; the partial alone comes back.
    partial = web.get(answer["Location"], HTTP_HX_REQUEST="true")
    assert partial.status_code == 200 and b'id="import-status"' in partial.content and b"<html" not in partial.content
    # The job runs through the same service as a small upload.
    finished = import_jobs.execute(job=job)
    assert finished.status == "succeeded" and finished.dataset.documents.count() == 200
    assert b"200 of 200 rows accepted" in web.get(answer["Location"]).content
    assert _staged(uploads_dir) == []


@pytest.mark.django_db
def test_a_new_version_in_the_background_upserts_by_key(api, small_jira_file, hadoop_issues, tmp_path):
    import json

    with open(small_jira_file, "rb") as fh:
        dataset_id = api.post("/api/datasets/", {"name": "v", "kind": "tickets", "file": fh},
                              format="multipart").json()["id"]
    known = json.loads(small_jira_file.read_text())["issues"]
    newer = known[:150]
    newer[0] = {**newer[0], "fields": {**newer[0]["fields"], "summary": "Changed summary"}}
    keys = {i["key"] for i in known}
    added = [i for i in hadoop_issues if i["key"] not in keys][-10:]
    path = tmp_path / "newer.json"
    path.write_text(json.dumps({"issues": newer + added}))
    with open(path, "rb") as fh:
        answer = api.post(f"/api/datasets/{dataset_id}/upload/", {"file": fh, "background": "true"},
                          format="multipart")
    assert answer.status_code == 202, answer.content
    job = import_jobs.execute(job=ImportJob.objects.get(pk=answer.json()["id"]))
    assert job.status == "succeeded", job.error
    assert (job.version.number, job.version.added, job.version.changed, job.version.unchanged) == (2, 10, 1, 149)


@pytest.mark.django_db
def test_a_bad_file_fails_the_job_with_the_reason_and_stores_nothing(api, uploads_dir):
    junk = SimpleUploadedFile("tickets.json", b"\x00\x01\x02 not json at all" * 100)
    answer = api.post("/api/datasets/", {"name": "junk", "kind": "tickets", "file": junk, "background": "true"},
                      format="multipart")
    assert answer.status_code == 202
    job = import_jobs.execute(job=ImportJob.objects.get(pk=answer.json()["id"]))
    assert job.status == "failed" and "tickets.json" in job.error
    assert not Dataset.objects.filter(name="junk").exists()
    assert _staged(uploads_dir) == []
    shown = api.get(f"/api/imports/{job.pk}/").json()
    assert shown["status"] == "failed" and shown["error"] == job.error


@pytest.mark.django_db
def test_what_is_known_up_front_is_refused_before_a_job_is_queued(api, user, small_jira_file, uploads_dir):
    Dataset.objects.create(owner=user, name="taken")
    with open(small_jira_file, "rb") as fh:
        answer = api.post("/api/datasets/", {"name": "taken", "file": fh, "background": "true"}, format="multipart")
    assert answer.status_code == 400 and answer.json()["fields"]["name"].startswith("you already have a dataset")
    with open(small_jira_file, "rb") as fh:
        answer = api.post("/api/datasets/", {"name": "x", "file": fh, "background": "true", "language": "klingon"},
                          format="multipart")
    assert answer.status_code == 400 and "language" in answer.json()["fields"]
    assert ImportJob.objects.count() == 0 and _staged(uploads_dir) == []
    # A name being imported right now is taken too.
    with open(small_jira_file, "rb") as fh:
        assert api.post("/api/datasets/", {"name": "pending", "file": fh, "background": "true"},
                        format="multipart").status_code == 202
    with open(small_jira_file, "rb") as fh:
        again = api.post("/api/datasets/", {"name": "pending", "file": fh, "background": "true"}, format="multipart")
    assert again.status_code == 400 and "being imported" in again.json()["error"]


@pytest.mark.django_db
def test_jobs_are_owner_scoped(api, other_user, small_jira_file):
    with open(small_jira_file, "rb") as fh:
        job_id = api.post("/api/datasets/", {"name": "mine", "file": fh, "background": "true"},
                          format="multipart").json()["id"]
    other = APIClient()
    other.force_authenticate(other_user)
    assert other.get(f"/api/imports/{job_id}/").status_code == 404
    assert other.get("/api/imports/").json()["results"] == []


@pytest.mark.django_db(transaction=True)  # reap_all closes old connections
def test_reaper_fails_an_import_after_its_last_attempt_and_removes_its_file_but_leaves_previews(user, uploads_dir):
    # Given a running import on its last attempt whose worker went silent, and a fresh kept preview
    uploads_dir.mkdir(parents=True)
    staged = uploads_dir / "x.upload"
    staged.write_text("{}")
    job = ImportJob.objects.create(owner=user, name="n", filename="f.json", file_path=str(staged), phase="merging",
                                   status=ImportJob.Status.RUNNING, heartbeat_at=timezone.now() - timedelta(hours=1),
                                   attempt=3)
    preview = import_jobs.stage(owner=user, upload=SimpleUploadedFile("a.csv", b"Summary\nx\n"), name="p")
    # When the one reaper runs (with its housekeeping)
    reaped = jobs.reap_all()
    # Then the import failed with the phase it died in, its file is gone, and the preview is untouched
    assert reaped["training.ImportJob"] == {"requeued": 0, "failed": 1, "resent": 0, "cancelled": 0}
    job.refresh_from_db()
    assert job.status == "failed" and job.error.startswith("The worker stopped reporting during 'merging' on "
                                                           "attempt 3 of 3")
    assert not staged.exists()
    preview.refresh_from_db()
    assert preview.status == "staged" and Path(preview.file_path).exists()


@pytest.fixture
def broker_down(settings):
    """Point the Celery app (and the reaper's broker reads) at a port where nothing listens; yields "bring it back"."""
    before = celery_app.conf.broker_url

    def back_up() -> None:
        celery_app.conf.broker_url = settings.CELERY_BROKER_URL = before

    celery_app.conf.broker_url = settings.CELERY_BROKER_URL = DEAD_BROKER
    yield back_up
    back_up()


@pytest.fixture
def default_queue():
    """The messages on the broker's default queue (emptied before and after the test)."""
    broker = redis.Redis.from_url(django_settings.CELERY_BROKER_URL)
    broker.delete("default")
    yield lambda: [json.loads(raw) for raw in broker.lrange("default", 0, -1)]
    broker.delete("default")


@pytest.mark.django_db(transaction=True)
def test_import_committed_while_redis_is_down_waits_for_the_queue_then_runs(api, web, small_jira_file, default_queue,
                                                                            broker_down, uploads_dir):
    # Given Redis is down, when a big upload is sent
    with open(small_jira_file, "rb") as fh:
        answer = api.post("/api/datasets/", {"name": "later", "file": fh, "background": "true"}, format="multipart")
    # Then it is accepted and the job says it waits for the queue, on the API and on its page
    assert answer.status_code == 202, answer.content
    body = answer.json()
    assert (body["status"], body["phase"], body["waiting_for_queue"]) == ("queued", "waiting for the queue", True)
    page = web.get(f"/imports/{body['id']}/").content.decode()
    assert "waiting for the queue (the broker cannot be reached; it is sent when it answers)" in page
    # And the reaper cannot send it while Redis is still down
    assert jobs.reap(ImportJob) == {"requeued": 0, "failed": 0, "resent": 0, "cancelled": 0}
    # When Redis is back, then the reaper's next pass sends the import task once
    broker_down()
    assert jobs.reap(ImportJob)["resent"] == 1
    job = ImportJob.objects.get(pk=body["id"])
    assert (job.status, job.phase) == ("queued", "")
    [message] = default_queue()
    assert (message["headers"]["id"], message["headers"]["task"]) == (job.task_id, "training.run_import")
    assert json.loads(base64.b64decode(message["body"]))[1] == {"job_id": job.pk}
    assert jobs.reap(ImportJob)["resent"] == 0
    # And the worker that takes it imports the file
    done = import_jobs.execute(job=job)
    assert (done.status, done.attempt, done.phase, done.rows_read) == ("succeeded", 1, "done", 200)
    assert done.dataset.name == "later" and done.dataset.documents.count() == 200
    assert _staged(uploads_dir) == []


def _newer_export(small_jira_file: Path, hadoop_issues: list, tmp_path: Path) -> Path:
    """The slice again with one summary changed and 10 issues added."""
    known = json.loads(small_jira_file.read_text())["issues"]
    newer = known[:150]
    newer[0] = {**newer[0], "fields": {**newer[0]["fields"], "summary": "Changed summary"}}
    keys = {i["key"] for i in known}
    path = tmp_path / "newer.json"
    path.write_text(json.dumps({"issues": newer + [i for i in hadoop_issues if i["key"] not in keys][-10:]}))
    return path


def _lock_waiters() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
        return cursor.fetchone()[0]


class _DatasetLock:
    """Holds a row lock on a dataset from a connection of its own until released, as a slow writer would."""

    def __init__(self, dataset_id: int):
        self._held, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._hold, args=(dataset_id,), daemon=True)
        self._thread.start()
        assert self._held.wait(10)

    def _hold(self, dataset_id: int) -> None:
        try:
            with transaction.atomic():
                # NO KEY: new rows may still point at the dataset (an upload's ImportJob), as with a slow update.
                Dataset.objects.select_for_update(no_key=True).get(pk=dataset_id)
                self._held.set()
                self._release.wait(120)
        finally:
            connections.close_all()

    def release(self) -> None:
        self._release.set()
        self._thread.join(30)


@pytest.mark.django_db(transaction=True)
def test_a_stale_attempts_import_rolls_back_and_stores_nothing(api, small_jira_file, hadoop_issues, tmp_path,
                                                               uploads_dir, default_queue):
    # Given a dataset and a background upload of a newer export, whose first attempt is inside its
    # transaction (waiting for the dataset's lock) when the reaper takes the job back
    with open(small_jira_file, "rb") as fh:
        dataset_id = api.post("/api/datasets/", {"name": "v", "file": fh}, format="multipart").json()["id"]
    with open(_newer_export(small_jira_file, hadoop_issues, tmp_path), "rb") as fh:
        job_id = api.post(f"/api/datasets/{dataset_id}/upload/", {"file": fh, "background": "true"},
                          format="multipart").json()["id"]
    job = ImportJob.objects.get(pk=job_id)
    lock = _DatasetLock(dataset_id)
    first: list = []

    def first_attempt() -> None:
        try:
            first.append(import_jobs.execute(job=job))
        finally:
            connections.close_all()

    worker = threading.Thread(target=first_attempt)
    worker.start()
    wait_for(_lock_waiters, lambda waiting: waiting >= 1, timeout=30, every=0.1)
    assert jobs.reap(ImportJob, timeout_s=0)["requeued"] == 1  # as if its heartbeat had stopped
    # When the stale attempt gets the lock and goes on
    lock.release()
    worker.join(60)
    # Then it stored nothing: no second version, no changed document, and the job is left to the next attempt
    [stale] = first
    assert (stale.status, stale.attempt) == ("queued", 1)
    assert list(Dataset.objects.get(pk=dataset_id).versions.values_list("number", flat=True)) == [1]
    assert Dataset.objects.get(pk=dataset_id).documents.filter(title="Changed summary").count() == 0
    assert Path(job.file_path).exists()  # the next attempt reads it
    # And the next attempt imports the version once
    done = import_jobs.execute(job=job)
    assert (done.status, done.attempt, done.error) == ("succeeded", 2, "")
    assert (done.version.number, done.version.added, done.version.changed, done.version.unchanged) == (2, 10, 1, 149)
    assert list(Dataset.objects.get(pk=dataset_id).versions.values_list("number", flat=True)) == [2, 1]
    assert not Path(job.file_path).exists()


@pytest.mark.django_db(transaction=True)
def test_the_reaper_resumes_a_killed_import_and_the_dataset_has_each_row_once(api, start_worker, small_jira_file,
                                                                              hadoop_issues, tmp_path, uploads_dir):
    # Given a worker process inside an import's transaction (waiting for the dataset's lock)
    with open(small_jira_file, "rb") as fh:
        dataset_id = api.post("/api/datasets/", {"name": "v", "file": fh}, format="multipart").json()["id"]
    lock = _DatasetLock(dataset_id)
    worker = start_worker("importer")
    with open(_newer_export(small_jira_file, hadoop_issues, tmp_path), "rb") as fh:
        job_id = api.post(f"/api/datasets/{dataset_id}/upload/", {"file": fh, "background": "true"},
                          format="multipart").json()["id"]
    wait_for(lambda: (ImportJob.objects.get(pk=job_id).status, _lock_waiters()),
             lambda seen: seen == ("running", 1), timeout=120, every=0.2)
    # When the worker is killed outright, and the reaper finds its heartbeat silent
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    lock.release()
    assert jobs.reap(ImportJob, timeout_s=0) == {"requeued": 1, "failed": 0, "resent": 0, "cancelled": 0}
    # Then the next attempt imports the file, and every row is in the dataset once
    job = import_jobs.execute(job=ImportJob.objects.get(pk=job_id))
    assert (job.status, job.attempt, job.phase, job.rows_read) == ("succeeded", 2, "done", 160)
    dataset = Dataset.objects.get(pk=dataset_id)
    assert list(dataset.versions.values_list("number", flat=True)) == [2, 1]
    assert (job.version.added, job.version.changed, job.version.unchanged) == (10, 1, 149)
    keys = list(dataset.documents.values_list("external_key", flat=True))
    assert len(keys) == len(set(keys)) == 210
    assert _staged(uploads_dir) == []


@pytest.mark.django_db
def test_preview_keeps_the_file_and_import_needs_no_second_upload(web, uploads_dir):
    csv_text = "Summary,Issue key,Description\nNameNode crash,HDFS-1,It crashes\nDisk full,HDFS-2,Volume fills\n"
    upload = SimpleUploadedFile("export.csv", csv_text.encode(), content_type="text/csv")
    page = web.post("/datasets/", {"name": "kept", "kind": "tickets", "file": upload, "action": "preview"})
    assert page.status_code == 200 and b"Import this file" in page.content
    job = ImportJob.objects.get()
    assert job.status == "staged" and len(_staged(uploads_dir)) == 1 and not Dataset.objects.exists()
    assert b"kept" not in web.get("/datasets/").content.split(b"Upload an export")[0]  # previews are not listed
    # Import it under another name, with no file in the request: small, so it is imported right away.
    done = web.post("/datasets/", {"action": "import_staged", "staged": job.pk, "name": "kept-renamed"})
    dataset = Dataset.objects.get(name="kept-renamed")
    assert done.status_code == 302 and done["Location"] == f"/datasets/{dataset.pk}/"
    assert dataset.documents.count() == 2 and _staged(uploads_dir) == []
    job.refresh_from_db()
    assert job.status == "succeeded" and job.version == dataset.versions.get()
    # A second click cannot import it twice.
    again = web.post("/datasets/", {"action": "import_staged", "staged": job.pk})
    assert again.status_code == 404 and Dataset.objects.count() == 1


@pytest.mark.django_db
def test_api_preview_keep_then_start(api, small_jira_file, uploads_dir):
    with open(small_jira_file, "rb") as fh:
        preview = api.post("/api/datasets/preview/", {"file": fh, "keep": "true", "name": "via-api"},
                           format="multipart")
    assert preview.status_code == 200, preview.content
    staged = preview.json()["staged_import"]
    assert staged["status"] == "staged" and preview.json()["report"]["rows_accepted"] == 200
    # Refused start (the name is taken by then) leaves it staged, with the reason.
    Dataset.objects.create(owner=ImportJob.objects.get().owner, name="via-api")
    refused = api.post(f"{staged['url']}start/", {}, format="json")
    assert refused.status_code == 400 and "already have a dataset" in refused.json()["error"]
    assert ImportJob.objects.get().status == "staged"
    started = api.post(f"{staged['url']}start/", {"name": "via-api-2"}, format="json")
    assert started.status_code == 200 and started.json()["status"] == "succeeded"
    assert Dataset.objects.get(name="via-api-2").documents.count() == 200
    assert api.post(f"{staged['url']}start/", {}, format="json").status_code == 400  # already started


@pytest.mark.django_db(transaction=True)  # reap_all closes old connections
def test_stale_previews_are_discarded_by_the_reaper(user, uploads_dir):
    job = import_jobs.stage(owner=user, upload=SimpleUploadedFile("a.csv", b"Summary\nx\n"), name="n")
    ImportJob.objects.filter(pk=job.pk).update(created_at=timezone.now() - timedelta(days=2))
    jobs.reap_all()  # its housekeeping: import_jobs.expire_staged
    assert not ImportJob.objects.exists() and _staged(uploads_dir) == []


@pytest.mark.django_db
def test_a_file_needing_a_mapping_is_mapped_from_its_own_columns_without_a_second_upload(web, uploads_dir):
    csv_text = ("ticket_no,headline,details,team\n"
                "T-1,Login page times out,After 30 s the login page shows a gateway error,web\n"
                "T-2,Invoice PDF is blank,The exported invoice has no lines,billing\n")
    upload = SimpleUploadedFile("helpdesk.csv", csv_text.encode(), content_type="text/csv")
    page = web.post("/datasets/", {"name": "helpdesk", "file": upload, "action": "preview"})
    body = page.content.decode()
    job = ImportJob.objects.get()
    assert job.status == "staged" and len(_staged(uploads_dir)) == 1
    assert 'name="action" value="remap_staged"' in body and "Import this file" not in body
    assert '<select id="remap-title" name="map_title">' in body and '<option value="headline"' in body
    # Choose the roles from the file's own columns; no file in this request.
    mapped = web.post("/datasets/", {"action": "remap_staged", "staged": job.pk, "kind": "tickets",
                                     "map_key": "ticket_no", "map_title": "headline", "map_body": "details",
                                     "map_attributes": ["team"]})
    assert mapped.status_code == 200 and "Import this file" in mapped.content.decode()
    assert "Login page times out" in mapped.content.decode()
    done = web.post("/datasets/", {"action": "import_staged", "staged": job.pk})
    dataset = Dataset.objects.get(name="helpdesk")
    assert done.status_code == 302 and dataset.documents.count() == 2
    assert dataset.column_mapping["title"] == "headline" and dataset.column_mapping["attributes"] == ["team"]
    assert dataset.documents.get(external_key="T-2").metadata["attributes"]["team"] == "billing"


@pytest.mark.django_db
def test_a_mapping_naming_no_usable_column_shows_the_columns_again(web, uploads_dir):
    upload = SimpleUploadedFile("odd.csv", b"colA,colB\nx,y\n", content_type="text/csv")
    web.post("/datasets/", {"name": "odd", "file": upload, "action": "preview"})
    job = ImportJob.objects.get()
    again = web.post("/datasets/", {"action": "remap_staged", "staged": job.pk, "map_title": "nope"})
    body = again.content.decode()
    assert again.status_code == 400 and 'name="map_title"' in body and '<option value="colA"' in body
    assert ImportJob.objects.get().status == "staged"
