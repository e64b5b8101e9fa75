"""The ONNX Runtime encoders of the embedding job against the PyTorch model they were exported from."""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from search import encoders, onnx_encoder
from search.embedding import embed_documents
from search.models import Embedding
from training.models import Dataset, Document, ModelVersion

TEXTS = [
    "NameNode fails to start after upgrade",
    "",
    "DataNode disk full; the node stops accepting blocks " * 40,  # longer than max_seq_length: truncated
    "ResourceManager web UI shows wrong memory",
    "Ünïcödé text — with punctuation!",
]


@pytest.fixture(autouse=True)
def models_dir(settings, tmp_path):
    settings.MODELS_DIR = tmp_path / "models"
    encoders._cache.clear()
    yield
    encoders._cache.clear()


@pytest.fixture
def torch_model(tiny_model_dir):
    return SentenceTransformer(str(tiny_model_dir), device="cpu")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_fp32_export_reproduces_the_pytorch_vectors(torch_model, tiny_model_dir):
    encoder = onnx_encoder.OnnxEncoder(torch_model, model_dir=tiny_model_dir, quantized=False)
    expected = torch_model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    got = encoder.encode(TEXTS, batch_size=2)
    assert got.shape == expected.shape == (len(TEXTS), 32)
    assert np.allclose(got, expected, atol=1e-4)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_int8_export_stays_close_and_is_cached(torch_model, tiny_model_dir):
    encoder = onnx_encoder.OnnxEncoder(torch_model, model_dir=tiny_model_dir, quantized=True)
    expected = torch_model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    got = encoder.encode(TEXTS, batch_size=3)
    cos = _cosines(got, expected)
    assert cos.min() > 0.95, cos
    assert encoder.path.name == "model-int8.onnx" and encoder.path.stat().st_size > 0
    exported_at = encoder.path.stat().st_mtime_ns
    again = onnx_encoder.OnnxEncoder(torch_model, model_dir=tiny_model_dir, quantized=True)
    assert again.path == encoder.path and again.path.stat().st_mtime_ns == exported_at  # no second export


def test_a_changed_model_folder_is_exported_anew(torch_model, tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    torch_model.save(str(copy))
    first = onnx_encoder.OnnxEncoder(torch_model, model_dir=copy, quantized=True).path
    (copy / "config_sentence_transformers.json").write_text((copy / "config_sentence_transformers.json").read_text()
                                                            + "\n")
    second = onnx_encoder.OnnxEncoder(torch_model, model_dir=copy, quantized=True).path
    assert first != second


def test_unsupported_pipeline_is_refused_and_the_job_falls_back_to_pytorch(tiny_model_dir, tmp_path):
    from sentence_transformers.sentence_transformer import modules

    base = SentenceTransformer(str(tiny_model_dir), device="cpu")
    with_dense = SentenceTransformer(modules=[base[0], base[1], modules.Dense(32, 8)], device="cpu")
    with pytest.raises(onnx_encoder.UnsupportedModel, match="Transformer -> Pooling"):
        onnx_encoder.OnnxEncoder(with_dense, model_dir=tiny_model_dir)
    saved = tmp_path / "dense"
    with_dense.save(str(saved))
    encoder, used = encoders.get_job_encoder(str(saved), "onnx-int8")
    assert used == "torch" and isinstance(encoder, SentenceTransformer)


def test_backend_choice():
    assert onnx_encoder.resolve_backend("auto", "cpu") == "onnx-int8"
    assert onnx_encoder.resolve_backend("auto", "cuda") == "torch"
    assert onnx_encoder.resolve_backend("onnx", "cuda") == "onnx"
    with pytest.raises(ValueError, match="use auto, torch, onnx, onnx-int8"):
        onnx_encoder.resolve_backend("tensorrt", "cpu")


@pytest.mark.django_db
def test_embedding_job_on_int8_stores_vectors_and_names_the_backend(user, tiny_model_dir):
    dataset = Dataset.objects.create(owner=user, name="mini")
    Document.objects.bulk_create([
        Document(dataset=dataset, external_key=f"K-{i}", title=text or "untitled", body="", content_hash=f"h{i}")
        for i, text in enumerate(TEXTS)
    ])
    version = ModelVersion.objects.create(owner=user, name="mini", version=1, base_model="tiny",
                                          artifact_path=str(tiny_model_dir), dimensions=32, dataset=dataset)
    result = embed_documents(dataset=dataset, model_version=version, backend="onnx-int8")
    assert (result.done, result.total, result.backend) == (len(TEXTS), len(TEXTS), "onnx-int8")
    stored = np.asarray(list(Embedding.objects.filter(model_version=version).order_by("document__external_key")
                             .values_list("embedding", flat=True)), dtype=np.float32)
    reference = SentenceTransformer(str(tiny_model_dir), device="cpu").encode(
        [t or "untitled" for t in TEXTS], normalize_embeddings=True)
    assert _cosines(stored, reference).min() > 0.95
    # Nothing pending: a second job writes nothing.
    assert embed_documents(dataset=dataset, model_version=version, backend="onnx-int8").docs_per_s == 0.0
