"""Per-process cache of loaded models for query embedding.

Loading MiniLM takes ~1-7 s; a web or worker process keeps the models it has
used, keyed by artifact path, so each query only pays for encoding.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from training import finetune

# Two models in memory cover "production + the one being compared".
MAX_CACHED_MODELS = 2
_cache: OrderedDict[str, object] = OrderedDict()
_lock = threading.Lock()


def get_model(artifact_path: str):
    with _lock:
        model = _cache.get(artifact_path)
        if model is not None:
            _cache.move_to_end(artifact_path)
            return model
    model = finetune.load_model(artifact_path, device="auto")
    with _lock:
        _cache[artifact_path] = model
        while len(_cache) > MAX_CACHED_MODELS:
            _cache.popitem(last=False)
    return model


def encode_query(artifact_path: str, text: str) -> list[float]:
    model = get_model(artifact_path)
    vector = model.encode([text], normalize_embeddings=True, convert_to_numpy=True)[0]
    return vector.tolist()
