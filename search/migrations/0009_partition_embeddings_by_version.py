"""search_embedding becomes LIST-partitioned by model version (#14: large tenants).

One table per version (`search_embedding_v<id>`) with its own HNSW index, so
one owner's bulk load, index build and vacuum never touch another's vectors
(search.vectors explains the runtime side). A partitioned table's unique keys
must contain the partition key: the primary key becomes (id, model_version_id);
`id` stays unique through its sequence and stays Django's pk. The model's state
does not change, so this is database-only (SeparateDatabaseAndState).

The rows are copied in this migration's transaction and the HNSW indexes are
rebuilt per partition, so on a large table it needs a maintenance window
(docs/scaling.md has the figures). The reverse turns the table back into one
plain table with partial HNSW indexes. Every name formatted into SQL is built
from integer ids of our own rows.
"""

from django.db import migrations

COLUMNS = "id, embedding, document_id, model_version_id, content_hash"
HNSW_PREFIX = "search_embedding_hnsw_v"


def _cast(dims: int) -> tuple[str, str]:
    # search.vectors.vector_cast, frozen here: halfvec above 2,000 dimensions.
    dims = int(dims)
    return (f"halfvec({dims})", "halfvec_cosine_ops") if dims > 2000 else (f"vector({dims})", "vector_cosine_ops")


def _hnsw_versions(cursor) -> set[int]:
    cursor.execute("SELECT indexname FROM pg_indexes WHERE indexname LIKE %s", [HNSW_PREFIX + "%"])
    return {int(name[len(HNSW_PREFIX):]) for (name,) in cursor.fetchall() if name[len(HNSW_PREFIX):].isdigit()}


def _current(cursor) -> tuple[set[int], dict[int, int], int]:
    """(versions with an HNSW index, {version id: dimensions}, the next embedding id) before the copy."""
    indexed = _hnsw_versions(cursor)
    cursor.execute("SELECT id, dimensions FROM training_modelversion ORDER BY id")
    versions = dict(cursor.fetchall())
    cursor.execute("SELECT COALESCE(max(id), 0) + 1 FROM search_embedding")
    return indexed, versions, int(cursor.fetchone()[0])


def _secondary_keys(cursor) -> None:
    """The constraints and indexes of migration 0001, under the names Django gave them."""
    cursor.execute(
        "ALTER TABLE search_embedding ADD CONSTRAINT embedding_unique_document_version "
        "UNIQUE (document_id, model_version_id)"
    )
    cursor.execute(
        "ALTER TABLE search_embedding ADD CONSTRAINT search_embedding_document_id_17202321_fk_training_document_id "
        "FOREIGN KEY (document_id) REFERENCES training_document (id) DEFERRABLE INITIALLY DEFERRED"
    )
    cursor.execute(
        "ALTER TABLE search_embedding ADD CONSTRAINT search_embedding_model_version_id_f584e623_fk_training_ "
        "FOREIGN KEY (model_version_id) REFERENCES training_modelversion (id) DEFERRABLE INITIALLY DEFERRED"
    )
    cursor.execute("CREATE INDEX search_embedding_document_id_17202321 ON search_embedding (document_id)")
    cursor.execute("CREATE INDEX search_embedding_model_version_id_f584e623 ON search_embedding (model_version_id)")
    cursor.execute("CREATE INDEX embedding_version_document ON search_embedding (model_version_id, document_id)")


def partition(apps, schema_editor):
    with schema_editor.connection.cursor() as cursor:
        indexed, versions, next_id = _current(cursor)
        cursor.execute("CREATE SEQUENCE search_embedding_part_id_seq AS bigint")
        cursor.execute("SELECT setval('search_embedding_part_id_seq', %s, false)", [next_id])
        cursor.execute(
            "CREATE TABLE search_embedding_part ("
            " id bigint NOT NULL DEFAULT nextval('search_embedding_part_id_seq'),"
            " embedding vector NOT NULL, document_id bigint NOT NULL, model_version_id bigint NOT NULL,"
            " content_hash varchar(40) NOT NULL,"
            " CONSTRAINT search_embedding_part_pkey PRIMARY KEY (id, model_version_id)"
            ") PARTITION BY LIST (model_version_id)"
        )
        for vid in versions:
            cursor.execute(
                f"CREATE TABLE search_embedding_v{int(vid)} PARTITION OF search_embedding_part FOR VALUES IN ({int(vid)})"
            )
        cursor.execute(f"INSERT INTO search_embedding_part ({COLUMNS}) SELECT {COLUMNS} FROM search_embedding")
        cursor.execute("DROP TABLE search_embedding")  # its partial HNSW indexes with it
        cursor.execute("ALTER TABLE search_embedding_part RENAME TO search_embedding")
        cursor.execute("ALTER TABLE search_embedding RENAME CONSTRAINT search_embedding_part_pkey TO search_embedding_pkey")
        cursor.execute("ALTER SEQUENCE search_embedding_part_id_seq RENAME TO search_embedding_id_seq")
        cursor.execute("ALTER SEQUENCE search_embedding_id_seq OWNED BY search_embedding.id")
        _secondary_keys(cursor)
        for vid in sorted(indexed & set(versions)):
            cast, ops = _cast(versions[vid])
            cursor.execute(
                f"CREATE INDEX {HNSW_PREFIX}{int(vid)} ON search_embedding_v{int(vid)} USING hnsw ((embedding::{cast}) {ops})"
            )
        cursor.execute("ANALYZE search_embedding")


def unpartition(apps, schema_editor):
    with schema_editor.connection.cursor() as cursor:
        indexed, versions, next_id = _current(cursor)
        cursor.execute(
            "CREATE TABLE search_embedding_plain ("
            " id bigint NOT NULL GENERATED BY DEFAULT AS IDENTITY CONSTRAINT search_embedding_plain_pkey PRIMARY KEY,"
            " embedding vector NOT NULL, document_id bigint NOT NULL, model_version_id bigint NOT NULL,"
            " content_hash varchar(40) NOT NULL)"
        )
        cursor.execute(f"INSERT INTO search_embedding_plain ({COLUMNS}) SELECT {COLUMNS} FROM search_embedding")
        cursor.execute("SELECT setval(pg_get_serial_sequence('search_embedding_plain', 'id'), %s, false)", [next_id])
        cursor.execute("DROP TABLE search_embedding")  # every partition, their indexes and the id sequence
        cursor.execute("ALTER TABLE search_embedding_plain RENAME TO search_embedding")
        cursor.execute("ALTER TABLE search_embedding RENAME CONSTRAINT search_embedding_plain_pkey TO search_embedding_pkey")
        _secondary_keys(cursor)
        for vid in sorted(indexed & set(versions)):
            cast, ops = _cast(versions[vid])
            cursor.execute(
                f"CREATE INDEX {HNSW_PREFIX}{int(vid)} ON search_embedding "
                f"USING hnsw ((embedding::{cast}) {ops}) WHERE model_version_id = {int(vid)}"
            )


class Migration(migrations.Migration):
    dependencies = [
        ("search", "0008_embed_chunks"),
        ("training", "0001_initial"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(partition, unpartition)],
        ),
    ]
