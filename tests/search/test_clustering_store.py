"""A fitted clustering model crosses hosts through the artifact store (training/artifacts.py; moto in-process)."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from search.clustering import assignment
from tests.search.test_clustering import _fit, grouped  # noqa: F401  (the fixture)

pytestmark = pytest.mark.django_db(transaction=True)


def test_assignment_on_another_host_uses_the_stores_copy_of_the_model(grouped, user, settings, monkeypatch, tmp_path):  # noqa: F811
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    settings.ARTIFACT_STORE = "s3://models/embedportal"
    settings.S3_ENDPOINT_URL = ""
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="models")
        # Given a run fitted on one host, its model published by ids
        run = _fit(grouped, user, "kmeans", k=3, seed=1)
        key = f"embedportal/{user.pk}/clustering-{run.pk}/attempt-{run.attempt}/model.npz"
        assert s3.head_object(Bucket="models", Key=key)["ContentLength"] == Path(run.artifact_path).stat().st_size
        expected = assignment.assign_texts(run=run, texts=["NameNode fails to start"])

        # When another host (its own MODELS_DIR, without the fitting host's file) assigns texts
        Path(run.artifact_path).unlink()
        assignment._models.clear()
        settings.MODELS_DIR = tmp_path / "other-host" / "models"
        found = assignment.assign_texts(run=run, texts=["NameNode fails to start"])

    # Then it fetched the model into its own cache and assigns as the fitting host did
    assert found == expected
    assert (settings.MODELS_DIR / "clustering" / f"run-{run.pk}" / f"attempt-{run.attempt}" / "model.npz").is_file()
