"""Two worker hosts and no shared disk: train on host A, import and index on host B, search on the web.

Host B is a Linux network namespace (tests/second_host.py) that reaches
PostgreSQL, Redis and an S3 stand-in (moto's server) over TCP on the host's
veth address, with its own empty var folder and host A's and the web's var
folders hidden from it. Skipped, with the reason, where a namespace cannot be
created (needs root); `python -m bench hosts` runs the same setup and times it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import quote

import boto3
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection

from embedportal.health import system_health
from search.models import SearchIndex
from tests.second_host import SecondHost, Unavailable
from tests.waiting import wait_for
from training import import_jobs, runs
from training.models import Document, ImportJob, ModelVersion, TrainingRun

BUCKET = "embedportal-hosts"
TINY_HYPER = {"max_steps": 3, "batch_size": 8, "max_seq_length": 64}


@pytest.fixture
def hosts(transactional_db, tmp_path, settings, monkeypatch):
    """The second host, the store (bucket made) and the web's settings pointed at it."""
    import redis

    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    for queue in ("default", settings.GPU_QUEUE, settings.EMBED_QUEUE):
        broker.delete(queue)
    db = connection.settings_dict
    try:
        host = SecondHost(pg_socket_dir=db["HOST"], logs=tmp_path / "logs").__enter__()
    except Unavailable as exc:
        pytest.skip(f"no second host: {exc}")
    try:
        for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        settings.ARTIFACT_STORE = f"s3://{BUCKET}/store"
        settings.S3_ENDPOINT_URL = host.s3_endpoint
        boto3.client("s3", endpoint_url=host.s3_endpoint).create_bucket(Bucket=BUCKET)
        yield host
    finally:
        for log in sorted((tmp_path / "logs").glob("worker-*.log")):
            print(f"--- {log.name} (last 3000 bytes)\n{log.read_bytes()[-3000:].decode(errors='replace')}")
        host.__exit__(None, None, None)
        # The test database is dropped at the end: end the sessions still open on it (the workers' end with their
        # processes; the search's encoding thread in this process keeps one, as a web process's thread would).
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")


def test_train_on_host_a_index_on_host_b_without_a_shared_disk(hosts, tmp_path, settings, user, api,
                                                               small_jira_file, tiny_model_dir):
    db = connection.settings_dict
    var_a, var_b = tmp_path / "host-a", tmp_path / "host-b"
    var_a.mkdir()
    var_b.mkdir()
    redis_db = int(settings.CELERY_BROKER_URL.rsplit("/", 1)[1])
    # Given host A (this side, the database over its Unix socket) with the gpu queue
    worker_a = hosts.worker(name="hostA", queues=settings.GPU_QUEUE, env=hosts.worker_env(
        var=var_a, database_url=f"postgres://{db['USER']}@{quote(db['HOST'], safe='')}/{db['NAME']}",
        redis_url=settings.CELERY_BROKER_URL, bucket=BUCKET))
    # and host B (the namespace: TCP to 10.231.x.1 only) with the default and embed queues, which cannot
    # see host A's var folder nor the web's
    hosts.worker(name="hostB", queues=f"default,{settings.EMBED_QUEUE}", inside=True,
                 hidden=(var_a, Path(settings.VAR_DIR)),
                 env=hosts.worker_env(var=var_b, database_url=hosts.database_url(db["NAME"], db["USER"]),
                                      redis_url=hosts.redis_url(redis_db), bucket=BUCKET))
    # Both appear among the workers the dashboard lists
    workers = wait_for(lambda: [w["name"].split("@")[0] for w in system_health()["workers"]],
                       lambda names: {"hostA", "hostB"} <= set(names), timeout=120, every=2)
    assert sorted(workers) == ["hostA", "hostB"]

    # When the web stages a big upload, host B imports it from the store (the web's folder is hidden from it)
    job = import_jobs.submit(owner=user, upload=SimpleUploadedFile("hadoop.json", small_jira_file.read_bytes()),
                             name="hadoop")
    assert not Path(job.file_path).exists()  # the web keeps no copy: the store has it
    job = wait_for(lambda: ImportJob.objects.get(pk=job.pk), lambda j: j.is_terminal, timeout=180)
    assert (job.status, job.error) == (ImportJob.Status.SUCCEEDED, "")
    assert job.dataset.documents.count() == 200

    # And host A trains on it
    run = runs.start_run(owner=user, dataset=job.dataset, base_model=str(tiny_model_dir), hyperparameters=TINY_HYPER)
    run = wait_for(lambda: TrainingRun.objects.get(pk=run.pk), lambda r: r.is_terminal, timeout=300)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    version = ModelVersion.objects.get(source_run=run)
    assert version.artifact_path.startswith(str(var_a))
    assert version.storage_uri == f"s3://{BUCKET}/store/{user.pk}/version-{version.pk}/"
    # and host A goes away with its disk
    hosts.stop(worker_a)
    shutil.rmtree(var_a)

    # Then host B builds the first version's index from the store's copy, in its own cache
    index = wait_for(lambda: SearchIndex.objects.filter(model_version=version).first(),
                     lambda i: i is not None and i.is_terminal, timeout=300)
    assert (index.status, index.error) == (SearchIndex.Status.READY, "")
    assert index.embedded_count == index.total_count == 200
    assert (var_b / "models" / "store" / f"version-{version.pk}" / "modules.json").is_file()
    log_a, log_b = hosts.log("hostA"), hosts.log("hostB")
    ran_a = {task for task in ("training.run_training", "training.run_import", "search.build_index")
             if f"Task {task}[" in log_a and "succeeded" in log_a}
    ran_b = {task for task in ("training.run_training", "training.run_import", "search.build_index")
             if f"Task {task}[" in log_b}
    assert (ran_a, ran_b) == ({"training.run_training"}, {"training.run_import", "search.build_index"})
    assert f"downloaded {version}" in log_b
    # The import's upload left the store and host B's disk
    s3 = boto3.client("s3", endpoint_url=hosts.s3_endpoint)
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="store/uploads/")["KeyCount"] == 0
    assert list((var_b / "uploads").glob("*.upload")) == []

    # And the web (a third host: host A's folder is gone) searches with its own copy of the model
    doc = Document.objects.filter(dataset=job.dataset).order_by("id")[5]
    found = api.get(f"/api/indexes/{index.pk}/search/", {"q": doc.title, "mode": "hybrid", "k": 5})
    assert found.status_code == 200, found.content
    assert found.json()["results"][0]["key"] == doc.external_key
    assert (Path(settings.MODELS_DIR) / "store" / f"version-{version.pk}" / "modules.json").is_file()
