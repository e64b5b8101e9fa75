"""Writing vectors into pgvector in bulk, and where a version's vectors live.

pgvector's HNSW indexes `vector` up to 2,000 dimensions; larger models are
indexed (and queried) as `halfvec` (up to 4,000), at half the memory.

search_embedding is LIST-partitioned by model version (migration 0009): each
version's vectors are a table of their own, `search_embedding_v<id>`, with
their own HNSW index. One version's bulk load, index build and vacuum never
lock or scan another's, and deleting a version drops its table instead of
deleting rows. The partition is created when the version is (a post_save
receiver) and again, if missing, before the first vector is stored. Every
query names `model_version_id = <id>` as a literal, so the planner reads one
partition. Partition and index names are built from integer ids only.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from django.db import DatabaseError, connection, transaction

from training.models import ModelVersion

logger = logging.getLogger(__name__)

# Rows per COPY batch; 5,000 384-dim vectors are ~8 MB of text.
COPY_BATCH_ROWS = 5000
HALFVEC_ABOVE_DIMS = 2000


def vector_cast(dims: int) -> tuple[str, str]:
    """(SQL type for the cast, HNSW operator class) for a model of `dims` dimensions."""
    dims = int(dims)
    if dims > HALFVEC_ABOVE_DIMS:
        return f"halfvec({dims})", "halfvec_cosine_ops"
    return f"vector({dims})", "vector_cosine_ops"


def vector_literal(vec) -> str:
    """pgvector's text form "[x,y,...]"."""
    return "[" + ",".join(f"{x:.7g}" for x in np.asarray(vec, dtype=np.float32).tolist()) + "]"


# pg_advisory_xact_lock key taken while a partition is created: two workers
# registering or storing the same new version create it once.
PARTITION_LOCK_KEY = 0x45504D56  # "EPMV"
# How long dropping a deleted version's partition waits for the parent table's
# lock before leaving it to the next sweep (search traffic never queues behind it).
DROP_PARTITION_LOCK_TIMEOUT = "3s"


def partition_name(version_id: int) -> str:
    """The table holding one model version's vectors (an integer id, never user text)."""
    return f"search_embedding_v{int(version_id)}"


def _attached_partitions(cursor) -> dict[int, str]:
    """{version id: partition table} of the partitions attached to search_embedding."""
    cursor.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'search_embedding'::regclass"
    )
    found = {}
    for (name,) in cursor.fetchall():
        suffix = name.removeprefix("search_embedding_v")
        if suffix != name and suffix.isdigit():
            found[int(suffix)] = name
    return found


def ensure_partition(version_id: int) -> bool:
    """Create and attach the version's partition if it is missing; True when this call created it.

    Idempotent and safe when several processes call it at once (an advisory
    lock, then a second look). The new table is made empty with the parent's
    columns and attached, which takes a SHARE UPDATE EXCLUSIVE lock on the
    parent: searches and other versions' inserts go on meanwhile.
    """
    vid = int(version_id)
    name = partition_name(vid)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [name])
        if cursor.fetchone()[0] and vid in _attached_partitions(cursor):
            return False
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [PARTITION_LOCK_KEY])
        if vid in _attached_partitions(cursor):
            return False
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {name} (LIKE search_embedding INCLUDING DEFAULTS)")
        # The constraint the partition bound implies, so ATTACH need not scan the table to prove it.
        cursor.execute(f"ALTER TABLE {name} ADD CONSTRAINT {name}_version CHECK (model_version_id = {vid})")
        cursor.execute(f"ALTER TABLE search_embedding ATTACH PARTITION {name} FOR VALUES IN ({vid})")
        cursor.execute(f"ALTER TABLE {name} DROP CONSTRAINT {name}_version")
    return True


def drop_partition(version_id: int) -> bool:
    """Drop a deleted version's partition (its vectors and HNSW index); True when dropped.

    Called after the version's row is gone (search.receivers, on commit) and
    by the housekeeping sweep. Detaching needs a short exclusive lock on the
    parent: when searches hold it longer than DROP_PARTITION_LOCK_TIMEOUT the
    call gives up and the next sweep (drop_orphan_partitions) tries again.
    """
    vid = int(version_id)
    if ModelVersion.objects.filter(pk=vid).exists():
        return False
    name = partition_name(vid)
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(f"SET LOCAL lock_timeout = '{DROP_PARTITION_LOCK_TIMEOUT}'")
            cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [name])
            if not cursor.fetchone()[0]:
                return False
            cursor.execute(f"DROP TABLE {name}")
    except DatabaseError as exc:  # lock timeout: searches were busy; the sweep retries
        logger.warning("partition %s of deleted version %s not dropped yet: %s", name, vid, exc)
        return False
    return True


def drop_orphan_partitions() -> int:
    """Housekeeping: drop the partitions whose model version no longer exists. Returns how many."""
    with connection.cursor() as cursor:
        attached = _attached_partitions(cursor)
    alive = set(ModelVersion.objects.filter(pk__in=list(attached)).values_list("pk", flat=True))
    return sum(drop_partition(vid) for vid in sorted(set(attached) - alive))


def store_embeddings(
    *,
    model_version: ModelVersion,
    doc_ids: Sequence[int],
    vectors: np.ndarray,
    content_hashes: Sequence[str] | None = None,
) -> int:
    """COPY (document, version, vector, hash) rows into search_embedding.

    A row that exists for (document, version) is replaced only when the
    document's content hash differs (it changed since it was embedded), so the
    call is idempotent. Returns how many rows were written.
    """
    if len(doc_ids) != len(vectors):
        raise ValueError(f"{len(doc_ids)} document ids but {len(vectors)} vectors")
    hashes = list(content_hashes) if content_hashes is not None else [""] * len(doc_ids)
    written = 0
    ensure_partition(model_version.pk)
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TEMP TABLE IF NOT EXISTS embedding_load "
            "(document_id bigint, embedding vector, content_hash varchar(40))"
        )
        for start in range(0, len(doc_ids), COPY_BATCH_ROWS):
            cursor.execute("TRUNCATE embedding_load")
            stop = start + COPY_BATCH_ROWS
            with cursor.cursor.copy("COPY embedding_load (document_id, embedding, content_hash) FROM STDIN") as copy:
                for doc_id, vec, digest in zip(doc_ids[start:stop], vectors[start:stop], hashes[start:stop]):
                    copy.write_row((int(doc_id), vector_literal(vec), digest or ""))
            cursor.execute(
                "INSERT INTO search_embedding (document_id, model_version_id, embedding, content_hash) "
                "SELECT document_id, %s, embedding, content_hash FROM embedding_load "
                "ON CONFLICT (document_id, model_version_id) DO UPDATE "
                "SET embedding = EXCLUDED.embedding, content_hash = EXCLUDED.content_hash "
                "WHERE search_embedding.content_hash IS DISTINCT FROM EXCLUDED.content_hash",
                [model_version.pk],
            )
            written += cursor.rowcount
    return written
