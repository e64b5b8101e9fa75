from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from search import hybrid, indexing
from search.models import Embedding, SearchIndex
from training.models import Dataset, Document, ModelVersion


# Building creates the HNSW index (DDL), which PostgreSQL refuses inside the
# transaction of a plain django_db test while FK triggers are pending.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def index(user, tiny_model_dir):
    ds = Dataset.objects.create(owner=user, name="mini")
    services_docs = [
        ("HDFS-1", "NameNode fails to start after upgrade", "The namenode crashes with an IOException on startup"),
        ("HDFS-2", "DataNode disk full", "A datanode volume fills up and the node stops"),
        ("YARN-3", "ResourceManager web UI shows wrong memory", "Memory column is off by 1024"),
    ]
    Document.objects.bulk_create([Document(dataset=ds, external_key=k, title=t, body=b) for k, t, b in services_docs])
    from training.datasets import refresh_search_vectors

    refresh_search_vectors(dataset=ds)
    version = ModelVersion.objects.create(owner=user, name="mini", version=1, base_model="tiny",
                                          artifact_path=str(tiny_model_dir), dimensions=32, dataset=ds)
    return SearchIndex.objects.create(owner=user, dataset=ds, model_version=version)


def test_build_index_embeds_all_and_resumes_without_duplicates(index):
    built = indexing.build_index(index=index)
    assert (built.status, built.embedded_count, built.total_count) == ("ready", 3, 3)
    # A second build of the same index (e.g. after a crash) writes no duplicate row.
    SearchIndex.objects.filter(pk=index.pk).update(status=SearchIndex.Status.QUEUED)
    index.refresh_from_db()
    again = indexing.build_index(index=index)
    assert again.status == "ready"
    assert Embedding.objects.filter(model_version=index.model_version).count() == 3


def test_keyword_search_finds_identifier_like_words(index):
    indexing.build_index(index=index)
    index.refresh_from_db()
    result = hybrid.hybrid_search(index=index, query="namenode upgrade", mode="keyword", k=3)
    assert [h.document.external_key for h in result.hits] == ["HDFS-1"]
    assert result.hits[0].keyword_rank == 1


@pytest.mark.parametrize("query, message", [("", "Type some words to search for."),
                                            ("?!* --", "The query has no words to search for.")])
def test_empty_and_punctuation_queries_answer_with_message(index, query, message):
    indexing.build_index(index=index)
    index.refresh_from_db()
    result = hybrid.hybrid_search(index=index, query=query)
    assert (result.hits, result.message) == ([], message)


def test_vector_search_on_unbuilt_index_is_refused_with_reason(index):
    with pytest.raises(hybrid.SearchError, match="vector and hybrid search need a ready index"):
        hybrid.hybrid_search(index=index, query="disk", mode="vector")


def test_search_api_rejects_bad_mode_and_k(api, index):
    response = api.get(f"/api/indexes/{index.pk}/search/", {"q": "disk", "mode": "magic", "k": 1000})
    assert response.status_code == 400
    assert set(response.json()["fields"]) == {"mode", "k"}


def test_search_api_is_owner_scoped(client, other_user, index):
    from rest_framework.test import APIClient

    other = APIClient()
    other.force_authenticate(other_user)
    assert other.get(f"/api/indexes/{index.pk}/search/", {"q": "disk"}).status_code == 404


def test_stale_running_build_is_requeued_then_failed_after_max_attempts(index):
    import redis
    from django.conf import settings

    from embedportal import jobs

    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    broker.delete(settings.EMBED_QUEUE)
    # Given a build whose worker stopped beating on its first attempt
    SearchIndex.objects.filter(pk=index.pk).update(status=SearchIndex.Status.RUNNING, attempt=1, phase="embedding",
                                                   heartbeat_at=timezone.now() - timedelta(seconds=900))
    # When the reaper runs, then it is queued again and its task is on the embed queue (never behind training)
    assert jobs.reap(SearchIndex, timeout_s=300)["requeued"] == 1
    index.refresh_from_db()
    assert (index.status, index.attempt) == (SearchIndex.Status.QUEUED, 1)
    assert broker.llen(settings.EMBED_QUEUE) == 1
    broker.delete(settings.EMBED_QUEUE)
    # Given the last attempt also stopped, when reaped, then it fails with the phase it died in
    SearchIndex.objects.filter(pk=index.pk).update(status=SearchIndex.Status.RUNNING, attempt=3,
                                                   heartbeat_at=timezone.now() - timedelta(seconds=900))
    assert jobs.reap(SearchIndex, timeout_s=300)["failed"] == 1
    index.refresh_from_db()
    assert index.status == SearchIndex.Status.FAILED
    assert index.error.startswith("The worker stopped reporting during 'embedding' on attempt 3 of 3")
    assert broker.llen(settings.EMBED_QUEUE) == 0


def test_bm25_ranks_the_duplicate_of_a_ticket_first(user):
    from training import evaluation as ev
    from training.datasets import refresh_search_vectors

    ds = Dataset.objects.create(owner=user, name="bm25")
    rows = [
        ("A-1", "NameNode crashes on startup after upgrade", "fsimage load fails with IOException", [("B-1",)]),
        ("B-1", "Namenode startup crash following upgrade", "IOException while loading fsimage", []),
        ("C-1", "DataNode volume full", "disk usage reaches 100 percent", []),
        ("D-1", "ResourceManager UI slow", "the scheduler page takes seconds", []),
    ]
    Document.objects.bulk_create([
        Document(dataset=ds, external_key=k, title=t, body=b,
                 metadata={"links": [{"type": "Duplicate", "direction": "outward", "key": o[0]} for o in links]})
        for k, t, b, links in rows
    ])
    refresh_search_vectors(dataset=ds)
    eval_set = ev.ticket_eval_set(dataset=ds, split="test" if ev.ticket_eval_set(dataset=ds).queries else "train")
    rankings = ev.bm25_rankings(dataset=ds, eval_set=eval_set)
    ids = {d.external_key: d.pk for d in ds.documents.all()}
    assert rankings[ids["A-1"]][0] == ids["B-1"]  # the query itself is left out, as search leaves it out
    assert ids["D-1"] not in rankings[ids["A-1"]]  # no shared lexeme, no score
