"""Serving models in web and worker processes: lazy, one copy per process, hot reload.

Models are loaded on first use and kept per process, keyed by artifact path.
Requests look the version up in the database each time, so a promotion is
picked up by the very next request without a restart (the new path is loaded,
the old one ages out). A model idle for MODEL_IDLE_UNLOAD_S is dropped at the
next access; at most MAX_CACHED_MODELS stay in memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import numpy as np
from django.conf import settings

from training import finetune
from training.errors import ServiceError

logger = logging.getLogger(__name__)

# Two models in memory cover "production + the one being compared".
MAX_CACHED_MODELS = 2
MAX_TEXTS = 256
MAX_TEXT_CHARS = 8192
# key -> (model or encoder, last used, group)
_cache: OrderedDict[str, tuple[object, float, str]] = OrderedDict()
_lock = threading.Lock()


def _evict_idle(now: float) -> None:
    idle = getattr(settings, "MODEL_IDLE_UNLOAD_S", 1800)
    for path in [p for p, (_, used, _) in _cache.items() if now - used > idle]:
        del _cache[path]


def _cached(key: str, load, *, limit: int, group: str = "model"):
    """The process-wide cache: the entry for `key` (marked used now), else load() it.

    At most `limit` entries of `group` stay ("model": the PyTorch models;
    each encoder role its own group), so encoders never push models out.
    """
    now = time.monotonic()
    with _lock:
        _evict_idle(now)
        entry = _cache.get(key)
        if entry is not None:
            _cache[key] = (entry[0], now, entry[2])
            _cache.move_to_end(key)
            return entry[0]
    value = load()
    with _lock:
        _cache[key] = (value, time.monotonic(), group)
        members = [k for k, (_, _, g) in _cache.items() if g == group]  # least recently used first
        for old in members[: max(0, len(members) - limit)]:
            del _cache[old]
    return value


def get_model(artifact_path: str):
    from training.artifacts import ensure_local

    return _cached(artifact_path, lambda: finetune.load_model(ensure_local(artifact_path), device="auto"),
                   limit=MAX_CACHED_MODELS)


def get_job_encoder(artifact_path: str, backend: str = "auto") -> tuple[object, str]:
    """The encoder of the embedding job and the backend it runs on.

    backend "auto" (EMBEDPORTAL_EMBED_BACKEND's default) is ONNX Runtime int8
    on CPU and PyTorch on a GPU; "onnx" / "onnx-int8" force ONNX Runtime,
    "torch" the PyTorch model. A model the ONNX encoder cannot run (another
    module pipeline, a failed export) is encoded with PyTorch and the log says
    why. Cached per process like the serving models.
    """
    # EMBEDPORTAL_EMBED_THREADS (0: every core): one per worker where several embed workers share a machine.
    return _encoder(artifact_path, backend, threads=int(getattr(settings, "EMBED_THREADS", 0) or 0) or None, role="")


def get_query_encoder(artifact_path: str, backend: str = "auto") -> tuple[object, str]:
    """The encoder of search queries and its backend: get_job_encoder's choice, on one intra-op thread.

    One thread: a query is a few dozen tokens, and concurrent requests get
    their parallelism from the web server's processes and threads (ONNX
    Runtime releases the GIL), not from threads spinning inside one query.
    A separate session from the job's (which uses every core), same export.
    """
    return _encoder(artifact_path, backend, threads=QUERY_THREADS, role="query-")


# Intra-op threads of a query encoder (see get_query_encoder).
QUERY_THREADS = 1


def _encoder(artifact_path: str, backend: str, *, threads: int | None, role: str) -> tuple[object, str]:
    from search import onnx_encoder

    model = get_model(artifact_path)
    chosen = onnx_encoder.resolve_backend(backend, str(model.device.type))
    if chosen == "torch":
        return model, "torch"
    from training.artifacts import ensure_local

    def export():
        return onnx_encoder.OnnxEncoder(model, model_dir=finetune.resolve_base_model(ensure_local(artifact_path)),
                                        quantized=chosen == "onnx-int8", threads=threads)

    try:
        return _cached(f"{role}{chosen}:{artifact_path}", export, limit=MAX_CACHED_MODELS,
                       group=f"{role}encoder"), chosen
    except onnx_encoder.UnsupportedModel as exc:
        logger.warning("encoding with PyTorch instead of %s: %s", chosen, exc)
        return model, "torch"


def loaded_models() -> list[str]:
    with _lock:
        return list(_cache)


def _check_texts(texts, field: str, limit: int = MAX_TEXTS) -> list[str]:
    if not isinstance(texts, list) or not texts:
        raise ServiceError(f"{field}: give a non-empty list of texts.")
    if len(texts) > limit:
        raise ServiceError(f"{field}: at most {limit} texts per request, got {len(texts)}; split the batch.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ServiceError(f"{field}: item {i} is not a string.")
        if len(text) > MAX_TEXT_CHARS:
            raise ServiceError(f"{field}: item {i} has {len(text)} characters; the limit is {MAX_TEXT_CHARS}.")
    return texts


def embed_texts(*, artifact_path: str, texts: list) -> np.ndarray:
    """Normalized embeddings of up to MAX_TEXTS texts."""
    texts = _check_texts(texts, "texts")
    return get_model(artifact_path).encode(texts, normalize_embeddings=True, convert_to_numpy=True)


def similarity(*, artifact_path: str, pairs: list) -> list[float]:
    """Cosine similarity of each [text_a, text_b] pair."""
    if not isinstance(pairs, list) or not pairs or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise ServiceError("pairs: give a non-empty list of [text_a, text_b] pairs.")
    if len(pairs) > MAX_TEXTS:
        raise ServiceError(f"pairs: at most {MAX_TEXTS} pairs per request, got {len(pairs)}; split the batch.")
    flat = _check_texts([t for pair in pairs for t in pair], "pairs", limit=2 * MAX_TEXTS)
    vectors = get_model(artifact_path).encode(flat, normalize_embeddings=True, convert_to_numpy=True)
    return [round(float(np.dot(vectors[2 * i], vectors[2 * i + 1])), 6) for i in range(len(pairs))]
