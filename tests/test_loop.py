"""The whole loop through a real Celery worker, real Redis and real pgvector:
upload -> train -> register + promote -> embed -> hybrid search."""

from __future__ import annotations

import pytest

from search.models import Embedding, SearchIndex
from tests.waiting import wait_for
from training.models import Document, ModelVersion, TrainingRun


@pytest.mark.django_db(transaction=True)
def test_loop_upload_train_index_search_through_real_worker(celery_worker, api, small_jira_file, tiny_model_dir):
    # Given a Jira export uploaded through the API
    with open(small_jira_file, "rb") as fh:
        created = api.post("/api/datasets/", {"name": "hadoop-slice", "kind": "tickets", "file": fh}, format="multipart")
    assert created.status_code == 201, created.content
    dataset = created.json()
    assert dataset["document_count"] == 200
    assert dataset["import_report"]["rows_accepted"] == 200

    # When a capped training run on the tiny model is started
    started = api.post(
        "/api/runs/",
        {"dataset": dataset["id"], "base_model": str(tiny_model_dir),
         "hyperparameters": {"max_steps": 3, "batch_size": 8, "max_seq_length": 64}},
        format="json",
    )
    assert started.status_code == 201, started.content
    assert started.json()["status"] == "queued"

    # Then the worker trains it, registers a production version and builds its index
    run = wait_for(lambda: api.get(f"/api/runs/{started.json()['id']}/").json(),
                   lambda r: r["status"] in ("succeeded", "failed", "cancelled"))
    assert run["status"] == "succeeded", run["error"]
    assert run["metrics"]["steps"] == 3
    assert isinstance(run["metrics"]["final_loss"], float)
    assert run["metrics"]["device"] == "cpu"
    assert run["metrics"]["loss"] == "mnrl"
    assert (run["attempt"], run["max_attempts"], run["phase"]) == (1, 3, "done")
    # The proof: held-out TEST queries of the slice, before and after, keyword and hybrid
    systems = run["evaluation"]["systems"]
    assert set(systems) == {"keyword", "base", "hybrid_base", "fine_tuned", "hybrid_fine_tuned", "served"}
    assert set(systems["fine_tuned"]) == {"recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "map@100", "queries"}
    assert systems["keyword"]["queries"] == run["evaluation"]["queries"] > 0
    assert len(run["evaluation"]["per_query"]) == run["evaluation"]["queries"]
    assert "base model nDCG@10" in run["log"] and "registered hadoop-slice v1" in run["log"]
    index = wait_for(lambda: api.get("/api/indexes/").json()["results"][0],
                     lambda i: i["status"] in ("ready", "failed"))
    assert index["status"] == "ready", index["error"]
    # The first version of a dataset was asked to be promoted; it switched when its index completed
    version = api.get(f"/api/models/{run['model_version']}/").json()
    assert version["stage"] == "production"
    assert version["promotion_requested_at"] is None
    assert version["dimensions"] == 32
    assert version["version"] == 1
    assert version["metrics"]["held_out"]["queries"] == run["evaluation"]["queries"]
    assert index["embedded_count"] == index["total_count"] == 200
    assert Embedding.objects.filter(model_version_id=version["id"]).count() == 200

    # And hybrid search finds a ticket by its own summary, with both ranks shown
    doc = Document.objects.filter(dataset_id=dataset["id"]).order_by("id")[5]
    found = api.get(f"/api/indexes/{index['id']}/search/", {"q": doc.title, "mode": "hybrid", "k": 5})
    assert found.status_code == 200, found.content
    body = found.json()
    assert len(body["results"]) == 5
    top = body["results"][0]
    assert top["key"] == doc.external_key
    assert top["keyword_rank"] == 1
    assert top["vector_rank"] is not None
    assert set(body["timings_ms"]) >= {"keyword", "embed", "vector", "total"}

    vector_only = api.get(f"/api/indexes/{index['id']}/search/", {"q": doc.title, "mode": "vector", "k": 3}).json()
    assert [r["keyword_rank"] for r in vector_only["results"]] == [None, None, None]
    assert [r["vector_rank"] for r in vector_only["results"]] == [1, 2, 3]


@pytest.mark.django_db(transaction=True)
def test_run_with_unloadable_model_fails_with_reason(celery_worker, api, user, small_jira_file, tmp_path):
    from training import runs

    with open(small_jira_file, "rb") as fh:
        dataset_id = api.post("/api/datasets/", {"name": "s", "file": fh}, format="multipart").json()["id"]
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    run = runs.start_run(owner=user, dataset=user.datasets.get(pk=dataset_id), base_model=str(broken),
                             hyperparameters={"max_steps": 1})
    final = wait_for(lambda: TrainingRun.objects.get(pk=run.pk), lambda r: r.is_terminal, timeout=60)
    assert final.status == TrainingRun.Status.FAILED
    assert final.error != ""
    assert ModelVersion.objects.count() == 0
    assert SearchIndex.objects.count() == 0
