"""The optional read replica (DATABASE_REPLICA_URL, embedportal/db_router.py), pointed at the primary.

The settings read DATABASE_REPLICA_URL when they load, so the search runs in
a fresh Python process whose DATABASE_URL and DATABASE_REPLICA_URL are both
the test database: two aliases, one database, and each alias's queries logged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from urllib.parse import quote

import pytest
from django.conf import settings
from django.db import connection

from search import indexing
from search.models import SearchIndex
from training.datasets import refresh_search_vectors
from training.models import Dataset, Document, ModelVersion

# Building creates the HNSW index (DDL): not inside a test transaction.
pytestmark = pytest.mark.django_db(transaction=True)

SEARCH = textwrap.dedent("""
    import json
    import django

    django.setup()
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    from search import hybrid
    from search.models import SearchIndex
    from training.models import Dataset

    index = SearchIndex.objects.select_related("model_version").get(pk=INDEX_ID)
    vector = [0.1] * index.model_version.dimensions
    with CaptureQueriesContext(connections["default"]) as primary, \\
            CaptureQueriesContext(connections["replica"]) as replica:
        found = hybrid.hybrid_search(index=index, query="replication stalls", k=3, mode="hybrid", query_vector=vector)
        Dataset.objects.filter(pk=index.dataset_id).update(name="renamed")  # a write
        SearchIndex.objects.get(pk=index.pk)  # a job row
    print(json.dumps({"keys": [hit.document.external_key for hit in found.hits],
                      "primary": [q["sql"] for q in primary.captured_queries],
                      "replica": [q["sql"] for q in replica.captured_queries]}))
""")


def _database_url() -> str:
    db = connection.settings_dict
    return f"postgres://{db['USER']}@{quote(db['HOST'], safe='')}/{db['NAME']}"


@pytest.fixture
def index(user, tiny_model_dir):
    dataset = Dataset.objects.create(owner=user, name="replicated")
    Document.objects.bulk_create([
        Document(dataset=dataset, external_key=f"HDFS-{i}", title=f"Replication stalls on node {i}",
                 body=f"Block replication stalls when node {i} restarts.") for i in range(12)
    ])
    refresh_search_vectors(dataset=dataset)
    version = ModelVersion.objects.create(owner=user, name="tiny", version=1, base_model="tiny",
                                          artifact_path=str(tiny_model_dir), dimensions=32, dataset=dataset)
    index = SearchIndex.objects.create(owner=user, dataset=dataset, model_version=version)
    indexing.build_index(index=index)
    index.refresh_from_db()
    assert index.status == SearchIndex.Status.READY
    return index


def test_search_reads_go_to_the_replica_and_writes_and_job_rows_do_not(index, settings):
    env = {**os.environ, "DATABASE_URL": _database_url(), "DATABASE_REPLICA_URL": _database_url(),
           "REDIS_URL": settings.CELERY_BROKER_URL, "DJANGO_SETTINGS_MODULE": "embedportal.settings"}
    done = subprocess.run([sys.executable, "-c", SEARCH.replace("INDEX_ID", str(index.pk))], env=env,
                          capture_output=True, text=True, timeout=300, cwd=settings.BASE_DIR)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])

    assert len(out["keys"]) == 3 and all(key.startswith("HDFS-") for key in out["keys"])
    replica, primary = out["replica"], out["primary"]
    # The kNN and the keyword ranking ran on the replica, and nothing but reads did
    assert any("<=>" in sql for sql in replica)
    assert any("websearch_to_tsquery" in sql for sql in replica)
    writes = ("INSERT", "UPDATE", "DELETE", "COPY", "CREATE", "DROP", "ALTER", "TRUNCATE")
    assert not [sql for sql in replica if sql.lstrip().upper().startswith(writes)]
    # The write and the job row's read went to the primary, and no search query did
    assert any(sql.startswith('UPDATE "training_dataset"') for sql in primary), primary
    assert any('FROM "search_searchindex"' in sql for sql in primary), primary
    assert not any("<=>" in sql or "websearch_to_tsquery" in sql for sql in primary), primary


def test_without_a_replica_url_there_is_one_database():
    assert list(settings.DATABASES) == ["default"]
    assert getattr(settings, "DATABASE_ROUTERS", []) == []
