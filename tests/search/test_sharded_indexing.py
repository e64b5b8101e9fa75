"""Sharded index builds: chunks taken by real embed workers in parallel, kill -9 mid-chunk, READY once."""

from __future__ import annotations

import os
import shutil
import signal
import time

import numpy as np
import pytest
from django.db import connection

from embedportal import jobs
from search import indexing
from search.models import EmbedChunk, Embedding, SearchIndex
from tests.waiting import wait_for
from training.finetune import resolve_base_model
from training.models import ModelVersion

pytestmark = pytest.mark.django_db(transaction=True)

CHUNK = 40  # the 200-ticket slice in 5 chunks


@pytest.fixture
def dataset(small_jira_dataset):
    return small_jira_dataset


@pytest.fixture
def ready_log(transactional_db):
    """A real trigger that records every transition of an index into READY (to count them)."""
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE test_ready_log (index_id bigint, attempt int)")
        cursor.execute(
            "CREATE FUNCTION test_log_ready() RETURNS trigger AS $$ BEGIN "
            "INSERT INTO test_ready_log VALUES (NEW.id, NEW.attempt); RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        cursor.execute(
            "CREATE TRIGGER test_ready_once AFTER UPDATE OF status ON search_searchindex FOR EACH ROW "
            "WHEN (NEW.status = 'ready' AND OLD.status IS DISTINCT FROM 'ready') EXECUTE FUNCTION test_log_ready()"
        )

    def transitions(index_id: int) -> list[int]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT attempt FROM test_ready_log WHERE index_id = %s", [index_id])
            return [row[0] for row in cursor.fetchall()]

    yield transitions
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE test_ready_log")
        cursor.execute("DROP TRIGGER test_ready_once ON search_searchindex")
        cursor.execute("DROP FUNCTION test_log_ready()")


def _version(user, dataset, path, dims, name="v") -> ModelVersion:
    return ModelVersion.objects.create(owner=user, name=name, version=1, base_model="test", artifact_path=str(path),
                                       dimensions=dims, dataset=dataset)


def _hnsw_exists(version: ModelVersion) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_indexes WHERE indexname = %s", [indexing.hnsw_index_name(version.pk)])
        return cursor.fetchone()[0] == 1


def _vectors(version: ModelVersion) -> dict[int, np.ndarray]:
    return {doc: np.asarray(vec, dtype=np.float32)
            for doc, vec in Embedding.objects.filter(model_version=version).values_list("document_id", "embedding")}


def test_build_in_process_is_split_ready_once_and_redelivery_does_nothing(settings, user, dataset, tiny_model_dir,
                                                                          ready_log, web):
    # Given chunks of 40 and a 200-ticket dataset
    settings.EMBED_CHUNK_DOCS = CHUNK
    settings.EMBED_BACKEND = "torch"
    version = _version(user, dataset, tiny_model_dir, 32)
    index = SearchIndex.objects.create(owner=user, dataset=dataset, model_version=version)
    # When the build runs, then it hands the documents to 5 chunks and stays running, with no HNSW index yet
    indexing.run_build(index_id=index.pk)
    index.refresh_from_db()
    assert (index.status, index.attempt, index.phase) == ("running", 1, "embedding in chunks: 0 of 5 done")
    chunks = list(EmbedChunk.objects.filter(index=index).order_by("number"))
    assert [c.documents for c in chunks] == [40] * 5
    assert [c.status for c in chunks] == ["queued"] * 5
    assert not _hnsw_exists(version)
    # and the dataset page says how far the chunks are
    page = web.get(f"/datasets/{dataset.pk}/").content.decode()
    assert "0/200 embedded · embedding in chunks: 0 of 5 done" in page
    # and the reaper leaves it alone however old its heartbeat, while chunks are alive
    assert jobs.reap(SearchIndex, timeout_s=0)["requeued"] == 0
    # When the chunks run (any order), then the last one finishes the build: HNSW once, READY once
    for chunk in reversed(chunks):
        indexing.run_chunk(chunk_id=chunk.pk, worker="test@here")
        assert ready_log(index.pk) == ([] if chunk.number > 1 else [1])
    index.refresh_from_db()
    assert (index.status, index.embedded_count, index.total_count, index.phase) == ("ready", 200, 200, "done")
    assert _hnsw_exists(version)
    assert Embedding.objects.filter(model_version=version).count() == 200
    # When a chunk's message is delivered again, then nothing runs and the index is not finished twice
    indexing.run_chunk(chunk_id=chunks[0].pk)
    assert EmbedChunk.objects.get(pk=chunks[0].pk).attempt == 1
    assert ready_log(index.pk) == [1]
    # And the vectors equal those of a build in one go (chunking changes nothing but who computes them)
    settings.EMBED_CHUNK_DOCS = 0
    whole = _version(user, dataset, tiny_model_dir, 32, name="whole")
    indexing.build_index(index=SearchIndex.objects.create(owner=user, dataset=dataset, model_version=whole))
    sharded, single = _vectors(version), _vectors(whole)
    cosines = [float(sharded[d] @ single[d]) for d in single]
    assert len(cosines) == 200 and min(cosines) >= 0.9999
    # And a later build of the same index (a refresh starts at attempt 1 again) plans its own chunks
    settings.EMBED_CHUNK_DOCS = CHUNK
    Embedding.objects.filter(model_version=version).delete()
    assert jobs.requeue(SearchIndex.objects.get(pk=index.pk))
    indexing.run_build(index_id=index.pk)
    assert set(EmbedChunk.objects.filter(index=index).values_list("build_attempt", "status")) == {(1, "queued")}
    assert EmbedChunk.objects.filter(index=index).count() == 5


def test_failed_chunk_fails_the_build_with_its_reason_and_stops_the_others(settings, user, dataset, tiny_model_dir,
                                                                           tmp_path):
    settings.EMBED_CHUNK_DOCS = CHUNK
    settings.EMBED_BACKEND = "torch"
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    version = _version(user, dataset, copy, 32)
    index = SearchIndex.objects.create(owner=user, dataset=dataset, model_version=version)
    indexing.run_build(index_id=index.pk)
    # Given the version's files vanish after the chunks were planned (a disk cleaned up under the worker)
    gone = tmp_path / "gone"
    ModelVersion.objects.filter(pk=version.pk).update(artifact_path=str(gone))
    first = EmbedChunk.objects.get(index=index, number=1)
    # When a chunk runs, then it fails, the build fails naming the chunk, and the queued chunks are cancelled
    indexing.run_chunk(chunk_id=first.pk)
    index.refresh_from_db()
    assert index.status == "failed"
    assert index.error.startswith(f"Chunk 1 of 5 (documents {first.first_document_id}-{first.last_document_id}) "
                                  "failed: ")
    assert sorted(EmbedChunk.objects.filter(index=index).values_list("status", flat=True)) == (
        ["cancelled"] * 4 + ["failed"])


@pytest.fixture
def chunked_worker_env(monkeypatch):
    """What the workers started after it get: chunks of 40, one thread each, PyTorch (no ONNX export to wait for)."""
    monkeypatch.setenv("EMBEDPORTAL_EMBED_CHUNK_DOCS", str(CHUNK))
    monkeypatch.setenv("EMBEDPORTAL_EMBED_THREADS", "1")
    monkeypatch.setenv("EMBEDPORTAL_EMBED_BACKEND", "torch")
    # Beats every 1.5 s, so a chunk silent for 6 s is the killed one.
    monkeypatch.setenv("EMBEDPORTAL_JOB_HEARTBEAT_TIMEOUT_S", "6")


def test_chunks_spread_over_worker_processes_and_survive_kill_9(chunked_worker_env, start_worker, user, dataset,
                                                                ready_log):
    from embedportal.celery import app

    # Given three real embed workers pinned to one thread, chunks of 40 and the real MiniLM (slow enough to kill mid-chunk)
    version = _version(user, dataset, resolve_base_model("sentence-transformers/all-MiniLM-L6-v2"), 384)
    workers = {name: start_worker(name) for name in ("w1", "w2", "w3")}
    wait_for(lambda: len(app.control.ping(timeout=1.0)), lambda n: n == 3, timeout=120, every=0.5)
    index = indexing.create_index(owner=user, dataset=dataset, model_version=version)
    # When a worker is killed (SIGKILL) while it embeds a chunk
    killed = wait_for(lambda: EmbedChunk.objects.filter(index=index, status="running").exclude(worker="").first(),
                      bool, timeout=180, every=0.02)
    victim = killed.worker.split("@")[0]
    os.killpg(workers[victim].pid, signal.SIGKILL)
    workers[victim].wait()
    killed.refresh_from_db()
    assert (killed.status, killed.attempt) == ("running", 1)  # nobody told the row
    assert not _hnsw_exists(version)  # HNSW waits for the bulk load
    # Then the reaper re-queues the chunk, and leaves the build alone (its chunks carry it)
    time.sleep(6.5)
    assert jobs.reap(SearchIndex, timeout_s=0)["requeued"] == 0
    assert jobs.reap(EmbedChunk, timeout_s=6)["requeued"] == 1
    # And the two other workers share the chunks and finish the build once
    done = wait_for(lambda: SearchIndex.objects.get(pk=index.pk), lambda i: i.is_terminal, timeout=300, every=0.2)
    assert done.status == "ready", done.error
    assert (done.attempt, done.embedded_count, done.total_count) == (1, 200, 200)
    assert ready_log(index.pk) == [1]
    assert _hnsw_exists(version)
    chunks = EmbedChunk.objects.filter(index=index)
    assert set(chunks.values_list("status", flat=True)) == {"succeeded"}
    assert chunks.get(pk=killed.pk).attempt == 2
    assert Embedding.objects.filter(model_version=version).count() == 200
    survivors = {w.split("@")[0] for w in chunks.values_list("worker", flat=True)}
    assert survivors == set(workers) - {victim}, survivors
