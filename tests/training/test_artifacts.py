"""The S3-compatible artifact store, against moto's in-process S3 (no S3 is reachable here)."""

from __future__ import annotations

import shutil

import boto3
import pytest
from moto import mock_aws

from search import encoders
from training import artifacts
from training.models import ModelVersion


@pytest.fixture
def s3(monkeypatch, settings):
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    settings.ARTIFACT_STORE = "s3://models/embedportal"
    settings.S3_ENDPOINT_URL = ""
    with mock_aws():
        boto3.client("s3").create_bucket(Bucket="models")
        yield boto3.client("s3")


def test_version_is_published_and_fetched_where_missing(s3, user, tiny_model_dir, tmp_path):
    folder = tmp_path / "run-1" / "model"
    shutil.copytree(tiny_model_dir, folder)
    version = ModelVersion.objects.create(owner=user, name="mini", version=3, base_model="tiny",
                                          artifact_path=str(folder), dimensions=32)
    uri = artifacts.publish(version=version)
    assert uri == f"s3://models/embedportal/{user.pk}/version-{version.pk}/"  # ids, never the name
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="models")["Contents"]}
    assert f"embedportal/{user.pk}/version-{version.pk}/modules.json" in keys
    expected = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    # A machine without the folder downloads it on first use, then serves from it
    shutil.rmtree(folder)
    encoders._cache.clear()
    model = encoders.get_model(str(folder))
    assert model.encode(["disk full"]).shape == (1, 32)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == expected


def test_bad_store_setting_is_explained(settings, user, tiny_model_dir):
    settings.ARTIFACT_STORE = "bucket-without-scheme"
    version = ModelVersion.objects.create(owner=user, name="m", version=1, base_model="t",
                                          artifact_path=str(tiny_model_dir), dimensions=32)
    from training.errors import ServiceError

    with pytest.raises(ServiceError, match="must look like s3://bucket/prefix, got 'bucket-without-scheme'"):
        artifacts.publish(version=version)
