"""ONNX Runtime encoders for the embedding job on CPU (fp32 and int8).

The embedding job spends nearly all its time in the transformer's matrix
products. On a CPU, a dynamically quantized int8 copy of the transformer
(weights int8 per output channel, activations quantized on the fly) run by
ONNX Runtime, fed batches sorted by token count, makes the embedding job 1.65x
as fast as PyTorch fp32 encode + INSERT on the 20,859 Hadoop tickets
(docs/benchmarks.md, `python -m bench embed`), with vectors at cosine 0.993
(mean) to the fp32 ones and the DATA.md protocol's nDCG@10 unchanged.

sentence-transformers' own `backend="onnx"` goes through optimum-onnx, which
pins transformers < 4.58 (this product runs 5.x), so the export is done here
with torch.onnx and onnxruntime.quantization, which need neither. Supported
pipelines: Transformer -> Pooling (mean, cls or max) -> optional Normalize,
which covers MiniLM, MPNet, BGE, E5 and models fine-tuned from them; anything
else raises UnsupportedModel and the caller stays on PyTorch.

Exports are cached under MODELS_DIR/onnx-cache/<key>/, the key covering the
model folder's files, so a new version or a retrained model is exported anew
and two workers exporting at once each write a temp file and rename it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from django.conf import settings

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "onnx-int8")


class UnsupportedModel(Exception):
    """The model's module pipeline cannot be run by the ONNX encoder."""


def available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(requested: str, device: str) -> str:
    """The backend an embedding job uses: "auto" means onnx-int8 on CPU (when installed), PyTorch elsewhere."""
    if requested not in ("auto", *BACKENDS):
        raise ValueError(f"embedding backend {requested!r}: use auto, {', '.join(BACKENDS)}.")
    if requested == "auto":
        return "onnx-int8" if device == "cpu" and available() else "torch"
    return requested


def _pipeline(model) -> dict:
    """What the encoder must reproduce of a SentenceTransformer: tokenizer, pooling, normalize, truncation."""
    modules = list(model)
    names = [type(m).__name__ for m in modules]
    if len(modules) < 2 or names[0] != "Transformer" or names[1] != "Pooling" or any(
        n != "Normalize" for n in names[2:]
    ):
        raise UnsupportedModel(f"modules {' -> '.join(names)}; the ONNX encoder runs Transformer -> Pooling "
                               "[-> Normalize] only")
    pooling = modules[1]
    mode = getattr(pooling, "pooling_mode", None)
    if not isinstance(mode, str):  # sentence-transformers < 6 keeps one flag per mode
        flags = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}
        chosen = [m for m, attr in flags.items() if getattr(pooling, attr, False)]
        mode = chosen[0] if len(chosen) == 1 else None
    if mode not in ("mean", "cls", "max"):
        raise UnsupportedModel(f"pooling {mode!r}; the ONNX encoder supports mean, cls and max pooling")
    transformer = modules[0]
    tokenizer = getattr(transformer, "tokenizer", None)
    auto_model = getattr(transformer, "auto_model", None)
    if tokenizer is None or auto_model is None:
        raise UnsupportedModel("the Transformer module has no tokenizer/auto_model")
    return {
        "transformer": auto_model,
        "tokenizer": tokenizer,
        "pooling": mode,
        "normalize": len(modules) > 2,
        "lower_case": bool(getattr(transformer, "do_lower_case", False)),
        "max_length": int(model.max_seq_length or tokenizer.model_max_length),
        "truncate_dim": getattr(model, "truncate_dim", None),
    }


def _cache_key(model_dir: Path, quantized: bool) -> str:
    import onnxruntime
    import torch

    digest = hashlib.sha1(f"{model_dir.resolve()}|{quantized}|{torch.__version__}|{onnxruntime.__version__}".encode())
    for path in sorted(model_dir.rglob("*")):
        if path.is_file() and path.suffix in {".safetensors", ".bin", ".json", ".txt", ".model"}:
            stat = path.stat()
            digest.update(f"{path.relative_to(model_dir)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def _export(transformer, input_names: list[str], target: Path, quantized: bool) -> None:
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    class Hidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            return self.inner(**dict(zip(input_names, inputs))).last_hidden_state

    wrapper = Hidden(transformer).eval()
    sample = tuple(torch.ones((2, 8), dtype=torch.long) for _ in input_names)
    axes = {name: {0: "batch", 1: "tokens"} for name in [*input_names, "last_hidden_state"]}
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        fp32 = Path(tmp) / "model.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # The TorchScript exporter: one self-contained file, dynamic batch and length.
            torch.onnx.export(wrapper.to("cpu"), sample, str(fp32), input_names=input_names,
                              output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17,
                              dynamo=False)
        result = fp32
        if quantized:
            result = Path(tmp) / "model-int8.onnx"
            quantize_dynamic(str(fp32), str(result), weight_type=QuantType.QInt8, per_channel=True)
        os.replace(result, target)


class OnnxEncoder:
    """encode() like SentenceTransformer.encode (normalized float32 numpy), run by ONNX Runtime."""

    # Batches of 16 token-sorted texts ran int8 MiniLM 13% faster than 64 (18.6 vs 21.5 s per
    # 1,000 Hadoop tickets on the 2-core machine; 128: 26.6 s): activations stay in cache.
    preferred_batch_size = 16

    def __init__(self, model, *, model_dir: str | Path, quantized: bool = True, threads: int | None = None):
        import onnxruntime as ort

        spec = _pipeline(model)
        self.tokenizer = spec["tokenizer"]
        self.pooling = spec["pooling"]
        self.normalize = spec["normalize"]
        self.lower_case = spec["lower_case"]
        self.max_length = spec["max_length"]
        self.truncate_dim = spec["truncate_dim"]
        self.input_names = list(self.tokenizer.model_input_names)
        model_dir = Path(model_dir)
        name = "model-int8.onnx" if quantized else "model.onnx"
        path = Path(settings.MODELS_DIR) / "onnx-cache" / _cache_key(model_dir, quantized) / name
        if not path.exists():
            logger.info("exporting %s to %s", model_dir, path)
            transformer = spec["transformer"]
            device = next(transformer.parameters()).device
            try:
                _export(transformer.to("cpu"), self.input_names, path, quantized)
            except Exception as exc:
                raise UnsupportedModel(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
            finally:
                transformer.to(device)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path
        self.backend = "onnx-int8" if quantized else "onnx"

    def encode(self, texts: list[str], batch_size: int = 64, normalize_embeddings: bool = True,
               convert_to_numpy: bool = True, **_ignored) -> np.ndarray:
        """Vectors of `texts`, in order. Texts are tokenized once and batched by token count
        (longest first), so a batch carries almost no padding: sorting by characters, as
        SentenceTransformer.encode does, left 16% padding tokens on Hadoop tickets."""
        if not texts:
            return np.empty((0, 0), dtype=np.float32)
        if self.lower_case:
            texts = [t.lower() for t in texts]
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        columns = {name: encoded[name] for name in self.input_names if name != "attention_mask"}
        lengths = np.fromiter((len(ids) for ids in encoded["input_ids"]), dtype=np.int64, count=len(texts))
        order = np.argsort(-lengths, kind="stable")
        pad_id = self.tokenizer.pad_token_id or 0
        out: np.ndarray | None = None
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = int(lengths[idx[0]])
            mask = np.zeros((len(idx), width), dtype=np.int64)
            feed = {name: np.full((len(idx), width), pad_id if name == "input_ids" else 0, dtype=np.int64)
                    for name in columns}
            for row, i in enumerate(idx):
                n = int(lengths[i])
                mask[row, :n] = 1
                for name, values in columns.items():
                    feed[name][row, :n] = values[i]
            if "attention_mask" in self.input_names:
                feed["attention_mask"] = mask
            hidden = self.session.run(None, feed)[0]
            vectors = self._pool(hidden, mask)
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[idx] = vectors
        if self.truncate_dim:
            out = out[:, : self.truncate_dim]
        if normalize_embeddings or self.normalize:
            out /= np.clip(np.linalg.norm(out, axis=1, keepdims=True), 1e-12, None)
        return out

    def _pool(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.pooling == "cls":
            return hidden[:, 0].astype(np.float32)
        weights = mask[..., None].astype(np.float32)
        if self.pooling == "max":
            return np.where(weights > 0, hidden, -1e9).max(axis=1).astype(np.float32)
        return ((hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)).astype(np.float32)
