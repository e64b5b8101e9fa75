"""Query vectors for search: the encoder a query runs on, and a bounded cache of recent ones.

Embedding the query was most of a hybrid request's CPU (PyTorch fp32 MiniLM
on one thread: ~25-50 ms of 40-65 ms per request on the 2-core machine). The
default query encoder is the embedding job's own ONNX Runtime int8 export
(search.onnx_encoder) on one intra-op thread; where ONNX Runtime is missing,
the model cannot be exported, or the model runs on a GPU, PyTorch encodes as
before. EMBEDPORTAL_QUERY_BACKEND picks it (auto, torch, onnx, onnx-int8);
docs/benchmarks.md (search) has the speed and the ranking check against fp32.

Recent query vectors are kept per process in an LRU cache keyed by (model
version id, artifact path, backend, the query with its whitespace collapsed):
a team searching together repeats queries, and a promoted or retrained
version has another id or path, so it never gets an older model's vector.
EMBEDPORTAL_QUERY_CACHE_SIZE bounds it (entries; 0 turns it off).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from django.conf import settings

from search import encoders


@dataclass(frozen=True)
class QueryVector:
    vector: list[float]
    # The backend that encoded it ("onnx-int8", "onnx", "torch").
    backend: str
    cached: bool


class QueryVectorCache:
    """A thread-safe LRU map of query keys to vectors, at most `size` entries (0: keeps nothing)."""

    def __init__(self, size: int) -> None:
        self.size = max(0, int(size))
        self._entries: OrderedDict[tuple, tuple[tuple[float, ...], str]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> tuple[tuple[float, ...], str] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: tuple, vector: tuple[float, ...], backend: str) -> None:
        if not self.size:
            return
        with self._lock:
            self._entries[key] = (vector, backend)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)


_cache: QueryVectorCache | None = None
_cache_lock = threading.Lock()


def query_cache() -> QueryVectorCache:
    """This process's cache, sized by settings.QUERY_CACHE_SIZE (re-created when the setting changes)."""
    global _cache
    size = int(getattr(settings, "QUERY_CACHE_SIZE", 0))
    with _cache_lock:
        if _cache is None or _cache.size != max(0, size):
            _cache = QueryVectorCache(size)
        return _cache


def normalized_query(text: str) -> str:
    """The cache's form of a query: whitespace collapsed (tokenizers split on it, so the vector is the same)."""
    return " ".join(text.split())


def cache_key(*, model_version_id: int, artifact_path: str, backend: str, text: str) -> tuple:
    return (int(model_version_id), str(artifact_path), backend, normalized_query(text))


# PyTorch query encoding runs on one intra-op thread, one query at a time per
# process: on the 2 shared cores, MiniLM with torch's default 2 threads took
# p50 290 ms / p95 1,020 ms per query under load (OpenMP threads spinning
# against other processes) and p50 25 ms / p95 34 ms with 1. The lock guards
# torch's process-wide thread setting; ONNX Runtime sessions need no lock.
TORCH_QUERY_THREADS = 1
_torch_lock = threading.Lock()


def encode(*, artifact_path: str, text: str, backend: str | None = None) -> tuple[list[float], str]:
    """(normalized vector of `text`, the backend that encoded it), uncached.

    Side effect: on PyTorch, torch's thread count is 1 while it encodes, then restored.
    """
    encoder, used = encoders.get_query_encoder(artifact_path, backend or settings.QUERY_BACKEND)
    if used != "torch":
        vector = encoder.encode([text], batch_size=1, normalize_embeddings=True)
        return np.asarray(vector[0], dtype=np.float32).tolist(), used
    import torch

    with _torch_lock:
        previous = torch.get_num_threads()
        torch.set_num_threads(TORCH_QUERY_THREADS)
        try:
            vector = encoder.encode([text], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        finally:
            torch.set_num_threads(previous)
    return vector[0].tolist(), used


def cached(*, model_version_id: int, artifact_path: str, text: str) -> QueryVector | None:
    """The cached vector of `text` under this version and the configured backend, or None."""
    cache = query_cache()
    if not cache.size:
        return None
    key = cache_key(model_version_id=model_version_id, artifact_path=artifact_path,
                    backend=settings.QUERY_BACKEND, text=text)
    entry = cache.get(key)
    return None if entry is None else QueryVector(vector=list(entry[0]), backend=entry[1], cached=True)


def query_vector(*, model_version_id: int, artifact_path: str, text: str) -> QueryVector:
    """The query's vector under the model version: from the cache, else encoded (and cached)."""
    hit = cached(model_version_id=model_version_id, artifact_path=artifact_path, text=text)
    if hit is not None:
        return hit
    vector, used = encode(artifact_path=artifact_path, text=text)
    query_cache().put(cache_key(model_version_id=model_version_id, artifact_path=artifact_path,
                                backend=settings.QUERY_BACKEND, text=text), tuple(vector), used)
    return QueryVector(vector=vector, backend=used, cached=False)
