"""Writing vectors into pgvector in bulk."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from django.db import connection

from training.models import ModelVersion

# Rows per COPY batch; 5,000 384-dim vectors are ~8 MB of text.
COPY_BATCH_ROWS = 5000


def store_embeddings(*, model_version: ModelVersion, doc_ids: Sequence[int], vectors: np.ndarray) -> int:
    """COPY (document, version, vector) rows into search_embedding, skipping ones that exist.

    Idempotent: rows already stored for (document, version) are kept as they
    are. Returns how many rows were added.
    """
    if len(doc_ids) != len(vectors):
        raise ValueError(f"{len(doc_ids)} document ids but {len(vectors)} vectors")
    added = 0
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TEMP TABLE IF NOT EXISTS embedding_load (document_id bigint, embedding vector) ON COMMIT DROP"
        )
        for start in range(0, len(doc_ids), COPY_BATCH_ROWS):
            cursor.execute("TRUNCATE embedding_load")
            ids = doc_ids[start : start + COPY_BATCH_ROWS]
            block = vectors[start : start + COPY_BATCH_ROWS]
            with cursor.cursor.copy("COPY embedding_load (document_id, embedding) FROM STDIN") as copy:
                for doc_id, vec in zip(ids, block):
                    copy.write_row((int(doc_id), "[" + ",".join(f"{x:.7g}" for x in vec.tolist()) + "]"))
            cursor.execute(
                "INSERT INTO search_embedding (document_id, model_version_id, embedding) "
                "SELECT document_id, %s, embedding FROM embedding_load "
                "ON CONFLICT (document_id, model_version_id) DO NOTHING",
                [model_version.pk],
            )
            added += cursor.rowcount
    return added
