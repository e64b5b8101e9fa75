"""`python -m bench hosts`: train on host A, import and index on host B, no shared disk, timed.

The setup of tests/test_hosts.py (tests/second_host.py: host B is a network
namespace reaching PostgreSQL, Redis and moto's S3 server over TCP on the
host's veth address, host A's and the web's folders hidden from it), with
the real all-MiniLM-L6-v2 as base model and the first tickets of the Hadoop export,
so the figures are those of a real model crossing the store:

- import_s: a background import staged by the web, run by host B from the store;
- train_s: the training run on host A (publishing the model to the store included);
- model_mb, publish_s, fetch_ns_s: the model folder, its upload from this side
  and its download from inside the namespace, measured on their own;
- local_copy_s (baseline, same run): copying that folder on local disk;
- index_s: host B's index build, from the version's registration to READY
  (its download of the model from the store included);
- first_search_ms / search_ms: the web's first search (it fetches its own
  copy) and the median of 20 more.

Needs root (namespaces); without it says so and exits.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from bench.harness import SHARED_DATA, emit, setup_django, summary

BUCKET = "embedportal-bench-hosts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(fetch, done, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s; last value: {value!r}")
        time.sleep(every)


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench hosts")
    parser.add_argument("--docs", type=int, default=600, help="Hadoop tickets imported (the export's first N)")
    parser.add_argument("--steps", type=int, default=10, help="training steps on host A")
    args = parser.parse_args(argv)

    os.environ.setdefault("SECRET_KEY", "bench-hosts-" + "x" * 40)
    os.environ.setdefault("EMBEDPORTAL_LOCAL_HTTP", "1")
    os.environ["EMBEDPORTAL_BASE_INDEX"] = "0"
    os.environ["EMBEDPORTAL_DEVICE"] = "cpu"
    redis_port = _free_port()
    redis_dir = Path(tempfile.mkdtemp(prefix="embedportal-bench-redis-"))
    redis_proc = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", str(redis_dir)], stdout=subprocess.DEVNULL,
                                  start_new_session=True)
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    work = Path(tempfile.mkdtemp(prefix="embedportal-bench-hosts-"))
    try:
        setup_django()
        return _measure(args, work, redis_port)
    finally:
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        shutil.rmtree(redis_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _measure(args, work: Path, redis_port: int) -> dict:
    import boto3
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.db import connection

    from embedportal.health import system_health
    from search import hybrid
    from search.models import SearchIndex
    from tests.second_host import SecondHost, Unavailable
    from training import import_jobs, runs
    from training.models import Document, ImportJob, ModelVersion, TrainingRun

    db = connection.settings_dict
    user = get_user_model().objects.create_user(username="bench", password="bench-pw-123")
    var_a, var_b = work / "host-a", work / "host-b"
    var_a.mkdir()
    var_b.mkdir()
    try:
        host = SecondHost(pg_socket_dir=db["HOST"], logs=work / "logs", redis_port=redis_port).__enter__()
    except Unavailable as exc:
        raise SystemExit(f"bench hosts needs a network namespace: {exc}") from None
    try:
        os.environ.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1"})
        settings.ARTIFACT_STORE = f"s3://{BUCKET}/store"
        settings.S3_ENDPOINT_URL = host.s3_endpoint
        s3 = boto3.client("s3", endpoint_url=host.s3_endpoint)
        s3.create_bucket(Bucket=BUCKET)
        worker_a = host.worker(name="hostA", queues=settings.GPU_QUEUE, env=host.worker_env(
            var=var_a, database_url=f"postgres://{db['USER']}@{quote(db['HOST'], safe='')}/{db['NAME']}",
            redis_url=settings.CELERY_BROKER_URL, bucket=BUCKET))
        host.worker(name="hostB", queues=f"default,{settings.EMBED_QUEUE}", inside=True,
                    hidden=(var_a, Path(settings.VAR_DIR)),
                    env=host.worker_env(var=var_b, database_url=host.database_url(db["NAME"], db["USER"]),
                                        redis_url=host.redis_url(0), bucket=BUCKET))
        _wait(lambda: {w["name"].split("@")[0] for w in system_health()["workers"]},
              lambda names: {"hostA", "hostB"} <= names, timeout=180, every=2)
        emit({"phase": "workers up", "hosts": ["hostA (this side)", f"hostB ({host.ns_ip}, namespace {host.ns})"]})

        with gzip.open(SHARED_DATA / "jira" / "apache-hadoop.jira.json.gz", "rt", encoding="utf-8") as fh:
            issues = json.load(fh)["issues"][: args.docs]
        source = work / "hadoop-slice.json"
        source.write_text(json.dumps({"issues": issues}))
        started = time.perf_counter()
        job = import_jobs.submit(owner=user, upload=SimpleUploadedFile("hadoop.json", source.read_bytes()),
                                 name="hadoop")
        job = _wait(lambda: ImportJob.objects.get(pk=job.pk), lambda j: j.is_terminal, timeout=900)
        import_s = time.perf_counter() - started
        if job.status != ImportJob.Status.SUCCEEDED:
            raise SystemExit(f"import failed: {job.error}")
        documents = job.dataset.documents.count()
        emit({"phase": "import on host B", "documents": documents, "seconds": round(import_s, 1)})

        started = time.perf_counter()
        # The default base model (all-MiniLM-L6-v2, shipped offline); no before/after evaluation: this bench
        # is about where the work runs, bench quality about how good it is.
        run = runs.start_run(owner=user, dataset=job.dataset, base_model="", hyperparameters={
            "max_steps": args.steps, "batch_size": 16, "max_seq_length": 128, "evaluate": False})
        run = _wait(lambda: TrainingRun.objects.get(pk=run.pk), lambda r: r.is_terminal, timeout=3600, every=2)
        train_s = time.perf_counter() - started
        if run.status != TrainingRun.Status.SUCCEEDED:
            raise SystemExit(f"training failed: {run.error}")
        version = ModelVersion.objects.get(source_run=run)
        registered = time.perf_counter()
        emit({"phase": "training on host A", "steps": args.steps, "seconds": round(train_s, 1),
              "store": version.storage_uri})
        folder = Path(version.artifact_path)
        model_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
        started = time.perf_counter()
        shutil.copytree(folder, work / "local-copy")
        local_copy_s = time.perf_counter() - started
        started = time.perf_counter()
        for file in folder.rglob("*"):
            if file.is_file():
                s3.upload_file(str(file), BUCKET, f"bench/{file.relative_to(folder).as_posix()}")
        publish_s = time.perf_counter() - started
        fetch = subprocess.run(
            ["ip", "netns", "exec", host.ns, sys.executable, "-c",
             "import boto3, sys, time, pathlib\n"
             f"s3 = boto3.client('s3', endpoint_url={host.s3_endpoint!r}, aws_access_key_id='test', "
             "aws_secret_access_key='test', region_name='us-east-1')\n"
             "t = time.perf_counter()\n"
             f"for o in s3.list_objects_v2(Bucket={BUCKET!r}, Prefix='bench/')['Contents']:\n"
             f"    p = pathlib.Path({str(var_b / 'fetch-probe')!r}) / o['Key']\n"
             "    p.parent.mkdir(parents=True, exist_ok=True)\n"
             f"    s3.download_file({BUCKET!r}, o['Key'], str(p))\n"
             "print(time.perf_counter() - t)"], capture_output=True, text=True, timeout=600)
        if fetch.returncode:
            raise SystemExit(f"fetch inside the namespace failed: {fetch.stderr[-2000:]}")
        fetch_ns_s = float(fetch.stdout.strip().splitlines()[-1])
        shutil.rmtree(var_b / "fetch-probe", ignore_errors=True)
        emit({"phase": "model through the store", "model_mb": round(model_mb, 1), "publish_s": round(publish_s, 2),
              "fetch_in_namespace_s": round(fetch_ns_s, 2), "local_copy_s": round(local_copy_s, 2)})
        host.stop(worker_a)
        shutil.rmtree(var_a)  # host A goes away with its disk

        index = _wait(lambda: SearchIndex.objects.filter(model_version=version).first(),
                      lambda i: i is not None and i.is_terminal, timeout=3600, every=2)
        index_s = time.perf_counter() - registered
        if index.status != SearchIndex.Status.READY:
            raise SystemExit(f"index build failed: {index.error}")
        cached = (var_b / "models" / "store" / f"version-{version.pk}" / "modules.json").is_file()
        emit({"phase": "index on host B", "documents": index.embedded_count, "seconds": round(index_s, 1),
              "model_cached_on_b": cached})

        titles = list(Document.objects.filter(dataset=job.dataset).order_by("id").values_list("title", flat=True)[:21])
        started = time.perf_counter()
        hybrid.hybrid_search(index=index, query=titles[0], k=10)
        first_search_ms = (time.perf_counter() - started) * 1000
        times = []
        for title in titles[1:]:
            started = time.perf_counter()
            hybrid.hybrid_search(index=index, query=title, k=10)
            times.append((time.perf_counter() - started) * 1000)
        search_ms = statistics.median(times)
        emit({"phase": "search on the web", "first_ms": round(first_search_ms), "median_ms": round(search_ms, 1)})
        ran_a, ran_b = host.log("hostA"), host.log("hostB")
        split_ok = ("Task training.run_training[" in ran_a and "Task search.build_index[" not in ran_a
                    and "Task search.build_index[" in ran_b and "Task training.run_import[" in ran_b
                    and "Task training.run_training[" not in ran_b and cached)
        load = os.getloadavg()
    finally:
        host.__exit__(None, None, None)
        connection.close()
    figures = {
        "documents": documents, "import_s": round(import_s, 1), "train_s": round(train_s, 1),
        "model_mb": round(model_mb, 1), "publish_s": round(publish_s, 2), "fetch_ns_s": round(fetch_ns_s, 2),
        "local_copy_s": round(local_copy_s, 2), "index_s": round(index_s, 1),
        "fetch_share_of_index": round(fetch_ns_s / index_s, 3), "first_search_ms": round(first_search_ms),
        "search_ms": round(search_ms, 1), "split_ok": int(split_ok), "load_avg_1m": round(load[0], 1),
    }
    return summary("hosts", figures, {"split_ok": ">= 1", "fetch_share_of_index": "<= 0.25"})
