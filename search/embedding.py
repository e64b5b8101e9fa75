"""The embedding job: a dataset's new and changed documents into pgvector.

Batch inference path of the registry: documents without a vector for the
version, or whose content hash changed since theirs was made, are encoded
in chunks (each encoder batches longest-first: less padding) and COPY-ed into
search_embedding. Each chunk commits on its own, so a crash loses at most one
chunk and the next job resumes (it only sees what is still pending).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from django.conf import settings
from django.db.models import Exists, OuterRef

from search import encoders
from search.models import Embedding
from search.vectors import store_embeddings
from training.corpus import MAX_EMBED_CHARS, ticket_text
from training.models import Dataset, Document, ModelVersion

# Documents per chunk: encoded together (sorted by length) and written in one
# COPY. 1,024 MiniLM texts take ~30-60 s on 2 CPU cores; progress and the
# heartbeat are saved after each chunk.
EMBED_CHUNK_SIZE = 1024
ENCODE_BATCH_SIZE = 64


def document_text(title: str, body: str) -> str:
    return ticket_text(title, body)[:MAX_EMBED_CHARS]


def pending_documents(*, dataset: Dataset, model_version: ModelVersion, id_range: tuple[int, int] | None = None):
    """Documents of the dataset with no vector for the version, or one made from older content.

    id_range: only documents with first <= id <= last (an index build's chunk).
    """
    fresh = Embedding.objects.filter(
        model_version=model_version, document=OuterRef("pk"), content_hash=OuterRef("content_hash")
    )
    documents = Document.objects.filter(dataset=dataset)
    if id_range is not None:
        documents = documents.filter(id__range=id_range)
    return documents.exclude(Exists(fresh))


def pin_threads() -> None:
    """Limit this process's PyTorch intra-op threads to EMBEDPORTAL_EMBED_THREADS (0: leave torch's default).

    Several embed workers on one machine each take a chunk of a build; with
    one thread each they split the cores instead of fighting over them.
    """
    threads = int(getattr(settings, "EMBED_THREADS", 0) or 0)
    if threads > 0:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@dataclass
class EmbedProgress:
    done: int
    total: int
    docs_per_s: float
    backend: str = "torch"


def embed_documents(
    *, dataset: Dataset, model_version: ModelVersion, on_chunk: Callable[[EmbedProgress], None] | None = None,
    backend: str | None = None, id_range: tuple[int, int] | None = None,
) -> EmbedProgress:
    """Encode and store every pending document; returns counts, throughput and the backend used.

    backend: "auto" (default: EMBEDPORTAL_EMBED_BACKEND), "torch", "onnx" or
    "onnx-int8" (search.encoders.get_job_encoder). id_range: only the
    documents with ids in [first, last] (one chunk of a sharded build;
    done/total then count that range).
    """
    pin_threads()
    model, used = encoders.get_job_encoder(model_version.artifact_path, backend or settings.EMBED_BACKEND)
    in_scope = Document.objects.filter(dataset=dataset)
    if id_range is not None:
        in_scope = in_scope.filter(id__range=id_range)
    total = in_scope.count()
    ids = list(pending_documents(dataset=dataset, model_version=model_version, id_range=id_range)
               .order_by("id").values_list("id", flat=True))
    done = total - len(ids)
    started = time.perf_counter()
    written = 0
    for start in range(0, len(ids), EMBED_CHUNK_SIZE):
        rows = list(
            Document.objects.filter(id__in=ids[start : start + EMBED_CHUNK_SIZE]).values_list(
                "id", "title", "body", "content_hash"
            )
        )
        # Both encoders batch longest-first themselves (less padding) and return vectors in input order.
        vectors = model.encode(
            [document_text(title, body) for _, title, body, _ in rows],
            batch_size=getattr(model, "preferred_batch_size", ENCODE_BATCH_SIZE),
            normalize_embeddings=True, convert_to_numpy=True,
        )
        store_embeddings(
            model_version=model_version,
            doc_ids=[r[0] for r in rows],
            vectors=vectors.astype(np.float32),
            content_hashes=[r[3] for r in rows],
        )
        done += len(rows)
        written += len(rows)
        if on_chunk:
            on_chunk(EmbedProgress(done=done, total=total, docs_per_s=written / (time.perf_counter() - started),
                                   backend=used))
    elapsed = time.perf_counter() - started
    return EmbedProgress(done=done, total=total, docs_per_s=round(written / elapsed, 2) if written else 0.0,
                         backend=used)
