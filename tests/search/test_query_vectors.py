"""Query vectors (search.query_vectors): the ONNX query path against PyTorch, the cache's bounds and keys."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from sentence_transformers import SentenceTransformer

from search import encoders, hybrid, query_vectors
from search.models import SearchIndex
from tests.search.test_serving import other_tiny_model_dir  # noqa: F401 (fixture)
from training.datasets import refresh_search_vectors
from training.models import Dataset, Document, ModelVersion

QUERIES = ["namenode fails to start after upgrade", "DataNode disk full", "HDFS-1234 NullPointerException in FSNamesystem",
           "Ünïcödé — punctuation!", "balancer " * 100]


@pytest.fixture(autouse=True)
def fresh(settings, tmp_path):
    settings.MODELS_DIR = tmp_path / "models"
    settings.QUERY_BACKEND = "auto"
    settings.QUERY_CACHE_SIZE = 1024
    encoders._cache.clear()
    query_vectors.query_cache().clear()
    yield
    encoders._cache.clear()
    query_vectors.query_cache().clear()


def _fp32(model_dir, texts):
    return SentenceTransformer(str(model_dir), device="cpu").encode(texts, normalize_embeddings=True)


def test_query_backend_auto_is_onnx_int8_on_one_thread_and_close_to_pytorch(tiny_model_dir):
    encoder, used = encoders.get_query_encoder(str(tiny_model_dir), "auto")
    assert used == "onnx-int8"
    assert encoder.session.get_session_options().intra_op_num_threads == 1
    got = np.asarray([query_vectors.encode(artifact_path=str(tiny_model_dir), text=q)[0] for q in QUERIES])
    expected = _fp32(tiny_model_dir, QUERIES)
    cosines = (got * expected).sum(axis=1)
    assert cosines.min() > 0.95, cosines
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_onnx_fp32_query_path_reproduces_pytorch(settings, tiny_model_dir):
    got = np.asarray([query_vectors.encode(artifact_path=str(tiny_model_dir), text=q, backend="onnx")[0]
                      for q in QUERIES])
    assert np.allclose(got, _fp32(tiny_model_dir, QUERIES), atol=1e-4)


def test_torch_backend_and_an_unexportable_model_encode_with_pytorch(tiny_model_dir, tmp_path):
    vector, used = query_vectors.encode(artifact_path=str(tiny_model_dir), text=QUERIES[0], backend="torch")
    assert used == "torch"
    assert np.allclose(vector, _fp32(tiny_model_dir, QUERIES[:1])[0], atol=1e-6)
    from sentence_transformers.sentence_transformer import modules

    base = SentenceTransformer(str(tiny_model_dir), device="cpu")
    dense = tmp_path / "dense"
    SentenceTransformer(modules=[base[0], base[1], modules.Dense(32, 8)], device="cpu").save(str(dense))
    vector, used = query_vectors.encode(artifact_path=str(dense), text=QUERIES[0])
    assert (used, len(vector)) == ("torch", 8)


def test_cache_keeps_the_most_recently_used_entries_up_to_its_size():
    cache = query_vectors.QueryVectorCache(2)
    cache.put(("a",), (1.0,), "onnx-int8")
    cache.put(("b",), (2.0,), "onnx-int8")
    assert cache.get(("a",)) == ((1.0,), "onnx-int8")  # a is now the most recent
    cache.put(("c",), (3.0,), "torch")
    assert (len(cache), cache.get(("b",)), cache.get(("a",)), cache.get(("c",))) == (
        2, None, ((1.0,), "onnx-int8"), ((3.0,), "torch"))
    assert (cache.hits, cache.misses) == (3, 1)
    off = query_vectors.QueryVectorCache(0)
    off.put(("a",), (1.0,), "torch")
    assert (len(off), off.get(("a",))) == (0, None)


def test_cache_size_follows_the_setting(settings):
    settings.QUERY_CACHE_SIZE = 3
    assert query_vectors.query_cache().size == 3
    settings.QUERY_CACHE_SIZE = 0
    assert query_vectors.query_cache().size == 0


@pytest.mark.django_db
def test_a_new_model_version_never_gets_an_old_vector(user, tiny_model_dir, other_tiny_model_dir):  # noqa: F811
    dataset = Dataset.objects.create(owner=user, name="mini")
    v1 = ModelVersion.objects.create(owner=user, name="mini", version=1, base_model="tiny",
                                     artifact_path=str(tiny_model_dir), dimensions=32, dataset=dataset)
    v2 = ModelVersion.objects.create(owner=user, name="mini", version=2, base_model="tiny",
                                     artifact_path=str(other_tiny_model_dir), dimensions=32, dataset=dataset)
    text = "namenode fails to start"
    first = query_vectors.query_vector(model_version_id=v1.pk, artifact_path=v1.artifact_path, text=text)
    again = query_vectors.query_vector(model_version_id=v1.pk, artifact_path=v1.artifact_path, text=f"  {text} ")
    second = query_vectors.query_vector(model_version_id=v2.pk, artifact_path=v2.artifact_path, text=text)
    assert (first.cached, again.cached, second.cached) == (False, True, False)
    assert again.vector == first.vector
    assert second.vector == query_vectors.encode(artifact_path=v2.artifact_path, text=text)[0]
    assert second.vector != first.vector
    # Same version id, retrained model at another path (a re-created row): encoded anew too.
    moved = query_vectors.query_vector(model_version_id=v1.pk, artifact_path=v2.artifact_path, text=text)
    assert (moved.cached, moved.vector) == (False, second.vector)


def test_a_new_backend_setting_never_gets_the_other_backends_vector(settings, tiny_model_dir):
    text = "datanode disk full"
    int8 = query_vectors.query_vector(model_version_id=1, artifact_path=str(tiny_model_dir), text=text)
    settings.QUERY_BACKEND = "torch"
    fp32 = query_vectors.query_vector(model_version_id=1, artifact_path=str(tiny_model_dir), text=text)
    assert (int8.backend, int8.cached, fp32.backend, fp32.cached) == ("onnx-int8", False, "torch", False)


@hsettings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.text(min_size=1, max_size=12).filter(lambda w: w.split() == [w]), min_size=1, max_size=6),
       gaps=st.lists(st.sampled_from([" ", "  ", "\t", "\n", " \r\n "]), min_size=6, max_size=6))
def test_whitespace_variants_share_one_entry_with_the_same_vector(tiny_model_dir, words, gaps):
    plain = " ".join(words)
    spaced = gaps[0] + "".join(w + gaps[i % 5 + 1] for i, w in enumerate(words))
    assert query_vectors.normalized_query(spaced) == plain
    fresh = query_vectors.encode(artifact_path=str(tiny_model_dir), text=spaced)[0]
    query_vectors.query_cache().clear()
    query_vectors.query_vector(model_version_id=7, artifact_path=str(tiny_model_dir), text=plain)
    hit = query_vectors.query_vector(model_version_id=7, artifact_path=str(tiny_model_dir), text=spaced)
    assert hit.cached
    assert np.allclose(hit.vector, fresh, atol=1e-6)


@pytest.mark.django_db(transaction=True)  # the index build creates an HNSW index (no pending triggers)
def test_hybrid_search_reports_the_query_encoder_and_reuses_the_cached_vector(user, tiny_model_dir):
    dataset = Dataset.objects.create(owner=user, name="mini")
    Document.objects.bulk_create([
        Document(dataset=dataset, external_key=f"HDFS-{i}", title=title, body="", metadata={})
        for i, title in enumerate(["NameNode fails to start", "DataNode disk full", "Balancer too slow"], start=1)
    ])
    refresh_search_vectors(dataset=dataset)
    version = ModelVersion.objects.create(owner=user, name="mini", version=1, base_model="tiny",
                                          artifact_path=str(tiny_model_dir), dimensions=32, dataset=dataset)
    from search import indexing

    index = indexing.build_index(index=SearchIndex.objects.create(owner=user, dataset=dataset, model_version=version))
    first = hybrid.hybrid_search(index=index, query="disk full", k=3)
    second = hybrid.hybrid_search(index=index, query="disk   full", k=3)
    keyword = hybrid.hybrid_search(index=index, query="disk full", k=3, mode="keyword")
    assert (first.query_encoder, second.query_encoder, keyword.query_encoder) == (
        {"backend": "onnx-int8", "cached": False}, {"backend": "onnx-int8", "cached": True}, {})
    assert [h.document.external_key for h in second.hits] == [h.document.external_key for h in first.hits]
    assert [h.vector_similarity for h in second.hits] == [h.vector_similarity for h in first.hits]


@pytest.mark.parametrize("env, message", [
    ({"EMBEDPORTAL_QUERY_BACKEND": "tensorrt"}, "EMBEDPORTAL_QUERY_BACKEND='tensorrt': use auto, torch, onnx or onnx-int8."),
    ({"EMBEDPORTAL_QUERY_CACHE_SIZE": "-5"}, "EMBEDPORTAL_QUERY_CACHE_SIZE=-5: use 0 (off) or more entries."),
    ({"EMBEDPORTAL_KEYWORD_RANK_CAP": "-1"}, "EMBEDPORTAL_KEYWORD_RANK_CAP=-1: use 0 (rank every match) or more."),
    ({"EMBEDPORTAL_HNSW_EF_SEARCH": "5000"}, "EMBEDPORTAL_HNSW_EF_SEARCH=5000: use 10 to 1000."),
    ({"EMBEDPORTAL_HNSW_BUILD_MEMORY_MB": "8"}, "EMBEDPORTAL_HNSW_BUILD_MEMORY_MB=8: use 64 or more."),
    ({"EMBEDPORTAL_HNSW_BUILD_WORKERS": "-2"},
     "EMBEDPORTAL_HNSW_BUILD_WORKERS=-2: use -1 (the server's setting) or 0-64."),
])
def test_bad_query_settings_stop_the_process_at_start(env, message):
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "embedportal.settings", "SECRET_KEY": "x" * 50,
             "DATABASE_URL": "postgres://nobody@127.0.0.1:1/none", **env},
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"django.core.exceptions.ImproperlyConfigured: {message}"
