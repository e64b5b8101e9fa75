"""Model registry: zero-downtime promotion, guard, rollback, delete, export, serving with hot reload."""

from __future__ import annotations

import csv
import io
import json
import zipfile

import pytest
import urllib.request
from django.contrib.auth import get_user_model

from search import encoders, hybrid, indexing, serving
from search.embedding import pending_documents
from search.models import Embedding, SearchIndex
from training.errors import ServiceError
from training.models import Dataset, Document, ModelVersion

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with different weights: a second, distinguishable version."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    out = tmp_path_factory.mktemp("tiny-st-2")
    model.save(str(out))
    return out


@pytest.fixture
def dataset(user):
    ds = Dataset.objects.create(owner=user, name="mini")
    Document.objects.bulk_create([
        Document(dataset=ds, external_key=f"K-{i}", title=f"ticket {i} about disk {i % 3}", body="body " * i,
                 content_hash=f"h{i}")
        for i in range(1, 13)
    ])
    return ds


def _version(user, dataset, path, number, stage=ModelVersion.Stage.CANDIDATE, ndcg=None):
    return ModelVersion.objects.create(
        owner=user, name="mini", version=number, base_model="tiny", artifact_path=str(path), dimensions=32,
        dataset=dataset, stage=stage, metrics={"held_out": {"ndcg@10": ndcg}} if ndcg is not None else {},
    )


def _build(version):
    index = SearchIndex.objects.get(model_version=version)
    return indexing.build_index(index=index)


def _serving_version_id(dataset) -> int | None:
    """The model version whose index serves the dataset (the production one)."""
    return (SearchIndex.objects.filter(dataset=dataset, model_version__stage=ModelVersion.Stage.PRODUCTION)
            .values_list("model_version_id", flat=True).first())


def test_promotion_waits_for_complete_index_then_switches_atomically(user, dataset, tiny_model_dir, other_tiny_model_dir):
    v1 = _version(user, dataset, tiny_model_dir, 1)
    serving.request_promotion(version=v1, user=user)
    _build(v1)
    v1.refresh_from_db()
    assert v1.stage == ModelVersion.Stage.PRODUCTION

    # When v2 is promoted, v1 keeps serving until v2's index is complete
    v2 = _version(user, dataset, other_tiny_model_dir, 2)
    serving.request_promotion(version=v2, user=user)
    v1.refresh_from_db(), v2.refresh_from_db()
    assert (v1.stage, v2.stage) == ("production", "candidate")
    assert v2.promotion_requested_at is not None
    assert _serving_version_id(dataset) == v1.pk
    built = _build(v2)
    assert (built.status, built.embedded_count, built.total_count) == ("ready", 12, 12)
    v1.refresh_from_db(), v2.refresh_from_db()
    assert (v1.stage, v2.stage) == ("archived", "production")
    assert v2.promotion_requested_at is None and v2.promoted_at is not None
    assert _serving_version_id(dataset) == v2.pk

    # Rollback is instant: v1's vectors were kept
    back = serving.rollback(dataset=dataset, user=user)
    assert back.pk == v1.pk
    v2.refresh_from_db()
    assert (back.stage, v2.stage) == ("production", "archived")
    assert Embedding.objects.filter(model_version=v2).count() == 12


def test_guard_refuses_candidate_worse_than_production(user, dataset, tiny_model_dir):
    _version(user, dataset, tiny_model_dir, 1, stage=ModelVersion.Stage.PRODUCTION, ndcg=0.5)
    worse = _version(user, dataset, tiny_model_dir, 2, ndcg=0.4)
    with pytest.raises(ServiceError, match=r"scores nDCG@10 0\.4000 on held-out tickets, below production mini v1 \(0\.5000\)"):
        serving.request_promotion(version=worse, user=user, require_not_worse=True)
    worse.refresh_from_db()
    assert worse.promotion_requested_at is None
    assert SearchIndex.objects.filter(model_version=worse).count() == 0


def test_rollback_without_previous_version_says_so(user, dataset):
    with pytest.raises(ServiceError, match="no earlier production version with a ready index"):
        serving.rollback(dataset=dataset)


def test_delete_refused_for_production_and_cleans_up_archived(api, user, dataset, tiny_model_dir, other_tiny_model_dir):
    v1 = _version(user, dataset, tiny_model_dir, 1)
    serving.request_promotion(version=v1, user=user)
    _build(v1)
    v2 = _version(user, dataset, other_tiny_model_dir, 2)
    serving.request_promotion(version=v2, user=user)
    _build(v2)
    refused = api.delete(f"/api/models/{v2.pk}/")
    assert refused.status_code == 409
    assert refused.json() == {"error": "mini v2 is in production; promote another version or roll back first.", "fields": {}}
    assert api.delete(f"/api/models/{v1.pk}/").status_code == 204
    assert not ModelVersion.objects.filter(pk=v1.pk).exists()
    assert Embedding.objects.filter(model_version_id=v1.pk).count() == 0
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_indexes WHERE indexname = %s", [indexing.hnsw_index_name(v1.pk)])
        assert cursor.fetchone()[0] == 0


def test_incremental_embedding_only_redoes_changed_documents(user, dataset, tiny_model_dir):
    v1 = _version(user, dataset, tiny_model_dir, 1)
    serving.request_promotion(version=v1, user=user)
    _build(v1)
    assert pending_documents(dataset=dataset, model_version=v1).count() == 0
    changed = Document.objects.get(dataset=dataset, external_key="K-3")
    before = list(Embedding.objects.get(document=changed, model_version=v1).embedding)
    Document.objects.filter(pk=changed.pk).update(title="a completely different title", content_hash="new")
    Document.objects.create(dataset=dataset, external_key="K-99", title="brand new", content_hash="n99")
    assert sorted(pending_documents(dataset=dataset, model_version=v1).values_list("external_key", flat=True)) == [
        "K-3", "K-99"]
    SearchIndex.objects.filter(model_version=v1).update(status=SearchIndex.Status.QUEUED)
    rebuilt = _build(v1)
    assert (rebuilt.embedded_count, rebuilt.total_count) == (13, 13)
    after = Embedding.objects.get(document=changed, model_version=v1)
    assert after.content_hash == "new" and list(after.embedding) != before


def test_download_zip_loads_with_sentence_transformers(api, user, dataset, tiny_model_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    v1 = _version(user, dataset, tiny_model_dir, 1)
    response = api.get(f"/api/models/{v1.pk}/download/")
    assert response.status_code == 200
    assert response["Content-Disposition"] == "attachment; filename=\"mini-v1.zip\"; filename*=UTF-8''mini-v1.zip"
    zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))).extractall(tmp_path / "unzipped")
    model = SentenceTransformer(str(tmp_path / "unzipped"), device="cpu")
    assert model.encode(["disk full"]).shape == (1, 32)


def test_export_embeddings_in_three_formats(api, user, dataset, tiny_model_dir):
    import pyarrow.parquet as pq

    v1 = _version(user, dataset, tiny_model_dir, 1)
    serving.request_promotion(version=v1, user=user)
    _build(v1)
    Document.objects.filter(dataset=dataset, external_key="K-1").update(title="=HYPERLINK(evil)")
    jsonl = b"".join(api.get(f"/api/models/{v1.pk}/embeddings/", {"as": "jsonl"}).streaming_content).decode()
    rows = [json.loads(line) for line in jsonl.splitlines()]
    assert [r["key"] for r in rows] == [f"K-{i}" for i in range(1, 13)]
    assert all(len(r["embedding"]) == 32 for r in rows)
    text = b"".join(api.get(f"/api/models/{v1.pk}/embeddings/", {"as": "csv"}).streaming_content).decode()
    first = list(csv.reader(io.StringIO(text)))[1]
    assert first[:2] == ["K-1", "'=HYPERLINK(evil)"]
    raw = b"".join(api.get(f"/api/models/{v1.pk}/embeddings/", {"as": "parquet"}).streaming_content)
    table = pq.read_table(io.BytesIO(raw))
    assert table.num_rows == 12 and table.column_names == ["key", "title", "embedding"]
    bad = api.get(f"/api/models/{v1.pk}/embeddings/", {"as": "xlsx"})
    assert bad.status_code == 400
    assert bad.json()["fields"] == {"format": "must be one of parquet, jsonl, csv, got 'xlsx'."}


def test_embed_api_limits_and_errors(api, user, dataset, tiny_model_dir):
    assert api.post("/api/embed", {"texts": ["x"]}, format="json").json() == {
        "error": "version: You have no production model yet; pass a version id.",
        "fields": {"version": "You have no production model yet; pass a version id."}}
    v1 = _version(user, dataset, tiny_model_dir, 1)
    too_many = api.post("/api/embed", {"texts": ["x"] * 257, "version": v1.pk}, format="json")
    assert too_many.status_code == 400
    assert too_many.json()["error"] == "texts: at most 256 texts per request, got 257; split the batch."
    too_long = api.post("/api/embed", {"texts": ["ok", "y" * 9000], "version": v1.pk}, format="json")
    assert too_long.json()["error"] == "texts: item 1 has 9000 characters; the limit is 8192."
    scores = api.post("/api/similarity", {"pairs": [["disk full", "disk full"], ["disk full", "zebra"]],
                                          "version": v1.pk}, format="json").json()
    assert scores["scores"][0] == pytest.approx(1.0, abs=1e-5)
    assert len(scores["scores"]) == 2


def test_served_model_hot_reloads_on_promotion_without_restart(live_server, user, dataset, tiny_model_dir,
                                                              other_tiny_model_dir):
    from rest_framework.authtoken.models import Token

    token = Token.objects.create(user=user).key
    url = f"{live_server.url}/api/embed"

    def embed(texts):
        request = urllib.request.Request(url, data=json.dumps({"texts": texts}).encode(), method="POST", headers={
            "Authorization": f"Token {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    v1 = _version(user, dataset, tiny_model_dir, 1)
    serving.request_promotion(version=v1, user=user)
    _build(v1)
    first = embed(["namenode crash"])
    assert first["model"] == "mini v1"

    v2 = _version(user, dataset, other_tiny_model_dir, 2)
    serving.request_promotion(version=v2, user=user)
    # Still v1 while v2's index is incomplete
    assert embed(["namenode crash"])["model"] == "mini v1"
    _build(v2)
    second = embed(["namenode crash"])
    assert second["model"] == "mini v2"
    assert second["embeddings"] != first["embeddings"]
    assert str(other_tiny_model_dir) in encoders.loaded_models()


def test_idle_models_are_unloaded(settings, tiny_model_dir):
    settings.MODEL_IDLE_UNLOAD_S = 0
    encoders.get_model(str(tiny_model_dir))
    encoders._evict_idle(now=__import__("time").monotonic() + 1)
    assert str(tiny_model_dir) not in encoders.loaded_models()


def test_models_are_owner_scoped(api, other_user, tiny_model_dir):
    ds = Dataset.objects.create(owner=other_user, name="theirs")
    theirs = _version(other_user, ds, tiny_model_dir, 1)
    assert api.get(f"/api/models/{theirs.pk}/").status_code == 404
    assert api.post(f"/api/models/{theirs.pk}/promote/").status_code == 404
    assert api.post("/api/embed", {"texts": ["x"], "version": theirs.pk}, format="json").status_code == 400
    assert get_user_model().objects.count() == 2


def test_models_over_2000_dimensions_are_indexed_and_queried_as_halfvec(user, dataset):
    import numpy as np
    from django.db import connection

    from search.vectors import store_embeddings

    version = ModelVersion.objects.create(owner=user, name="wide", version=1, base_model="x", artifact_path="/x",
                                          dimensions=2050, dataset=dataset)
    docs = list(dataset.documents.order_by("id"))
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(docs), 2050)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store_embeddings(model_version=version, doc_ids=[d.pk for d in docs], vectors=vectors)
    indexing.ensure_hnsw_index(model_version=version)
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", [indexing.hnsw_index_name(version.pk)])
        assert "halfvec(2050)) halfvec_cosine_ops" in cursor.fetchone()[0]
    sql = hybrid._vector_sql(2050, version.pk, "")
    query = "[" + ",".join(f"{x:.6f}" for x in vectors[3]) + "]"
    ranked = hybrid._run_knn(sql, [query, dataset.pk, query, 3], 3)
    assert ranked[0][0] == docs[3].pk and ranked[0][1] == pytest.approx(1.0, abs=1e-3)
