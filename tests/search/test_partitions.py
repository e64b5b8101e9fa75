"""search_embedding partitioned by model version (#14): the migration, new versions' partitions, drops, pruning."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from django.db import connection, connections
from django.db.migrations.executor import MigrationExecutor

from search import hybrid, indexing, serving
from search.models import Embedding
from search.vectors import drop_orphan_partitions, ensure_partition, partition_name, store_embeddings
from training.models import Dataset, Document, ModelVersion

pytestmark = pytest.mark.django_db(transaction=True)

DIMS = 16
BEFORE = ("search", "0008_embed_chunks")
AFTER = ("search", "0009_partition_embeddings_by_version")


@pytest.fixture
def dataset(user):
    dataset = Dataset.objects.create(owner=user, name="tickets", kind=Dataset.Kind.TICKETS)
    Document.objects.bulk_create(
        [Document(dataset=dataset, external_key=f"T-{i}", title=f"ticket {i}", body="body") for i in range(40)]
    )
    return dataset


def _version(user, dataset, n: int, dims: int = DIMS) -> ModelVersion:
    return ModelVersion.objects.create(owner=user, name="m", version=n, base_model="x", artifact_path="/x",
                                       dimensions=dims, dataset=dataset)


def _store(version: ModelVersion, dataset: Dataset, seed: int) -> np.ndarray:
    docs = list(dataset.documents.order_by("id").values_list("id", flat=True))
    vectors = np.random.default_rng(seed).normal(size=(len(docs), version.dimensions)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store_embeddings(model_version=version, doc_ids=docs, vectors=vectors)
    return vectors


def _knn(version: ModelVersion, dataset: Dataset, query: np.ndarray, k: int = 5) -> list[int]:
    sql = hybrid._vector_sql(version.dimensions, version.pk, "")
    literal = "[" + ",".join(f"{x:.6f}" for x in query) + "]"
    return [doc_id for doc_id, _ in hybrid._run_knn(sql, [literal, dataset.pk, literal, k], k)]


def _relkind() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT relkind FROM pg_class WHERE oid = 'search_embedding'::regclass")
        return cursor.fetchone()[0]


def _partitions() -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                       "WHERE i.inhparent = 'search_embedding'::regclass")
        return {name for (name,) in cursor.fetchall()}


def _index_table(name: str) -> str | None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT tablename FROM pg_indexes WHERE indexname = %s", [name])
        row = cursor.fetchone()
    return row[0] if row else None


def _migrate(target) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate([target])


def test_migration_keeps_every_vector_and_ranking_and_can_be_reversed(user, dataset):
    versions = [_version(user, dataset, n) for n in (1, 2, 3)]
    stored = {v.pk: _store(v, dataset, seed=v.pk) for v in versions}
    for v in versions[:2]:
        indexing.ensure_hnsw_index(model_version=v)
    queries = np.random.default_rng(7).normal(size=(4, DIMS)).astype(np.float32)
    before = {v.pk: [_knn(v, dataset, q) for q in queries] for v in versions}
    ids_before = sorted(Embedding.objects.values_list("id", "document_id", "model_version_id"))
    assert _relkind() == "p"

    try:
        _migrate(BEFORE)
        assert _relkind() == "r"  # one plain table again, the partial HNSW indexes on it
        assert sorted(Embedding.objects.values_list("id", "document_id", "model_version_id")) == ids_before
        assert _index_table(indexing.hnsw_index_name(versions[0].pk)) == "search_embedding"
        assert {v.pk: [_knn(v, dataset, q) for q in queries] for v in versions} == before
    finally:
        _migrate(AFTER)

    assert _relkind() == "p"
    assert {partition_name(v.pk) for v in versions} <= _partitions()
    assert sorted(Embedding.objects.values_list("id", "document_id", "model_version_id")) == ids_before
    for v in versions:
        assert Embedding.objects.filter(model_version=v).count() == len(stored[v.pk])
    # The HNSW indexes were rebuilt on the versions' own partitions; the third version never had one.
    assert _index_table(indexing.hnsw_index_name(versions[0].pk)) == partition_name(versions[0].pk)
    assert _index_table(indexing.hnsw_index_name(versions[1].pk)) == partition_name(versions[1].pk)
    assert _index_table(indexing.hnsw_index_name(versions[2].pk)) is None
    assert {v.pk: [_knn(v, dataset, q) for q in queries] for v in versions} == before
    # The id sequence goes on above the copied rows: a new version's vectors get fresh ids.
    fresh = _version(user, dataset, 4)
    _store(fresh, dataset, seed=4)
    assert Embedding.objects.filter(model_version=fresh).order_by("id").first().pk > max(i for i, _, _ in ids_before)


def test_a_new_version_has_its_partition_and_its_hnsw_index_on_it(user, dataset):
    version = _version(user, dataset, 1)
    assert partition_name(version.pk) in _partitions()  # created with the version, before any vector
    vectors = _store(version, dataset, seed=1)
    other = _version(user, dataset, 2)
    _store(other, dataset, seed=2)
    indexing.ensure_hnsw_index(model_version=version)
    assert _index_table(indexing.hnsw_index_name(version.pk)) == partition_name(version.pk)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {partition_name(version.pk)}")
        assert cursor.fetchone()[0] == len(vectors)
        cursor.execute(f"SELECT count(*) FROM {partition_name(other.pk)} WHERE model_version_id <> {other.pk}")
        assert cursor.fetchone()[0] == 0

    # The kNN query reads one partition: the version's, through its own HNSW index.
    sql = hybrid._vector_sql(DIMS, version.pk, "")
    literal = "[" + ",".join(f"{x:.6f}" for x in vectors[3]) + "]"
    with connection.cursor() as cursor:
        # 40 rows are cheaper to sort than to walk a graph: make the planner show the index it can use.
        cursor.execute("SET enable_seqscan = off; SET enable_sort = off")
        try:
            cursor.execute("EXPLAIN " + sql, [literal, dataset.pk, literal, 5])
            plan = "\n".join(row[0] for row in cursor.fetchall())
        finally:
            cursor.execute("RESET enable_seqscan; RESET enable_sort")
    assert partition_name(version.pk) in plan
    assert partition_name(other.pk) not in plan
    assert indexing.hnsw_index_name(version.pk) in plan, plan
    assert _knn(version, dataset, vectors[3])[0] == dataset.documents.order_by("id")[3].pk


def test_hnsw_build_memory_is_sized_to_the_vectors_and_capped(settings):
    settings.HNSW_BUILD_MEMORY_MB = 4096
    assert indexing.hnsw_build_memory_mb(100, 384) == 64  # never under PostgreSQL's default
    assert indexing.hnsw_build_memory_mb(1_000_000, 384) == 2189  # the graph of a million MiniLM vectors
    settings.HNSW_BUILD_MEMORY_MB = 1024
    assert indexing.hnsw_build_memory_mb(1_000_000, 384) == 1024


def test_hnsw_build_sets_its_memory_and_workers_for_its_own_transaction_only(user, dataset, settings):
    settings.HNSW_BUILD_WORKERS = 0
    version = _version(user, dataset, 1)
    _store(version, dataset, seed=1)
    with connection.cursor() as cursor:
        cursor.execute("SHOW maintenance_work_mem")
        before = cursor.fetchone()[0]
        indexing.ensure_hnsw_index(model_version=version)
        indexing.ensure_hnsw_index(model_version=version)  # exists: nothing to do
        cursor.execute("SHOW maintenance_work_mem")
        assert cursor.fetchone()[0] == before  # SET LOCAL: the session keeps its own
    assert _index_table(indexing.hnsw_index_name(version.pk)) == partition_name(version.pk)


def test_a_missing_partition_is_created_once_when_two_workers_store_at_once(user, dataset):
    version = _version(user, dataset, 1)
    with connection.cursor() as cursor:  # a version whose partition is gone (e.g. dropped by hand)
        cursor.execute(f"DROP TABLE {partition_name(version.pk)}")
    assert partition_name(version.pk) not in _partitions()
    barrier = threading.Barrier(2)
    created, errors = [], []

    def worker() -> None:
        try:
            barrier.wait()
            created.append(ensure_partition(version.pk))
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(created) == [False, True]
    assert partition_name(version.pk) in _partitions()
    _store(version, dataset, seed=1)
    assert Embedding.objects.filter(model_version=version).count() == dataset.documents.count()


def test_deleting_a_version_or_its_owner_drops_the_partitions(user, dataset):
    v1, v2 = _version(user, dataset, 1), _version(user, dataset, 2)
    for v in (v1, v2):
        _store(v, dataset, seed=v.pk)
        indexing.ensure_hnsw_index(model_version=v)
    serving.delete_version(version=v1)
    assert partition_name(v1.pk) not in _partitions()
    assert _index_table(indexing.hnsw_index_name(v1.pk)) is None
    assert Embedding.objects.filter(model_version_id=v2.pk).count() == dataset.documents.count()

    user.delete()  # the version goes by cascade; its partition when the deletion commits
    assert not ModelVersion.objects.filter(pk=v2.pk).exists()
    assert partition_name(v2.pk) not in _partitions()


def test_the_sweep_drops_partitions_left_by_deleted_versions_only(user, dataset):
    keep = _version(user, dataset, 1)
    gone = _version(user, dataset, 2)
    with connection.cursor() as cursor:  # the row deleted without the receiver (e.g. a drop that timed out)
        cursor.execute("DELETE FROM training_modelversion WHERE id = %s", [gone.pk])
    assert partition_name(gone.pk) in _partitions()
    assert drop_orphan_partitions() >= 1
    assert partition_name(gone.pk) not in _partitions()
    assert partition_name(keep.pk) in _partitions()
    assert drop_orphan_partitions() == 0
