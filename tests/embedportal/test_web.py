from __future__ import annotations

from pathlib import Path

import yaml
from django.conf import settings

from training.models import Dataset, Document, ModelVersion, TrainingRun

ROOT = Path(__file__).resolve().parents[2]


def test_dashboard_requires_login(client):
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == "/login/?next=/"


def test_dashboard_lists_datasets_runs_and_production_model(web, user, other_user):
    ds = Dataset.objects.create(owner=user, name="hadoop")
    Document.objects.create(dataset=ds, external_key="H-1", title="t")
    run = TrainingRun.objects.create(owner=user, dataset=ds, base_model="m", status=TrainingRun.Status.RUNNING,
                                     metrics={"step": 3, "total_steps": 10, "loss": 1.25})
    ModelVersion.objects.create(owner=user, name="hadoop", version=2, base_model="m", artifact_path="/x",
                                dimensions=384, dataset=ds, stage=ModelVersion.Stage.PRODUCTION)
    Dataset.objects.create(owner=other_user, name="not-mine")
    html = web.get("/").content.decode()
    assert "hadoop v2" in html
    assert f'href="/runs/{run.pk}/"' in html
    assert "3/10 steps" in html
    assert "not-mine" not in html


def test_health_partial_reports_broker_and_queues(web):
    html = web.get("/partials/health").content.decode()
    assert "Broker (Redis)" in html
    assert "Queue “default”" in html and "Queue “gpu”" in html


def test_api_health_json(api):
    body = api.get("/api/health/").json()
    assert body["broker"] == "ok"
    assert body["database"] == "ok"
    assert set(body["queues"]) == {"default", "gpu", "embed"}


def test_search_page_without_index_explains_next_step(web):
    html = web.get("/search/").content.decode()
    assert "No search index yet" in html


def test_openapi_schema_lists_search_endpoint(api):
    response = api.get("/api/schema/")
    assert response.status_code == 200
    assert "/api/indexes/{id}/search/" in response.content.decode()


def test_token_endpoint_returns_token(client, user):
    response = client.post("/api/auth/token/", {"username": "alice", "password": "pw-alice-123"})
    assert response.status_code == 200
    assert len(response.json()["token"]) == 40


def test_admin_registers_models(admin_client):
    for path in ["training/dataset", "training/datasetversion", "training/document", "training/trainingrun", "training/modelversion",
                 "search/searchindex", "search/embedding", "search/duplicatepair"]:
        assert admin_client.get(f"/admin/{path}/").status_code == 200


def test_docker_compose_matches_settings():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"db", "redis", "web", "gpu-worker", "embed-worker", "cpu-worker", "beat"}
    assert services["db"]["image"].startswith("pgvector/pgvector:")
    gpu = services["gpu-worker"]
    assert "-Q gpu" in gpu["command"] and "--pool solo" in gpu["command"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    # Index builds have their own queue and worker: never behind a training run (issue 16)
    embed = services["embed-worker"]
    assert "-Q embed" in embed["command"] and "--pool solo" in embed["command"]
    assert settings.CELERY_TASK_ROUTES["search.build_index"] == {"queue": "embed"}
    for name in ("web", "gpu-worker", "embed-worker", "cpu-worker", "beat"):
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgres://")
        assert env["REDIS_URL"].startswith("redis://redis:6379")


def test_health_lists_running_jobs_of_owner_only(web, user, other_user):
    from django.utils import timezone

    mine = Dataset.objects.create(owner=user, name="mine")
    theirs = Dataset.objects.create(owner=other_user, name="theirs")
    run = TrainingRun.objects.create(owner=user, dataset=mine, base_model="m", status=TrainingRun.Status.RUNNING,
                                     heartbeat_at=timezone.now(), metrics={"step": 3, "total_steps": 10})
    TrainingRun.objects.create(owner=other_user, dataset=theirs, base_model="m", status=TrainingRun.Status.RUNNING)
    html = web.get("/partials/health").content.decode()
    assert f"Training run #{run.pk} on mine" in html
    assert "step 3/10" in html
    assert "theirs" not in html
