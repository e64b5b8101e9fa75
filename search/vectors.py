"""Writing vectors into pgvector in bulk, and how a version's vectors are indexed.

pgvector's HNSW indexes `vector` up to 2,000 dimensions; larger models are
indexed (and queried) as `halfvec` (up to 4,000), at half the memory.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from django.db import connection

from training.models import ModelVersion

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
