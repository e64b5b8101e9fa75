"""The S3-compatible artifact store, against moto's in-process S3 (no S3 is reachable here)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import boto3
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
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


def test_version_is_published_and_fetched_where_missing(s3, settings, user, tiny_model_dir, tmp_path):
    folder = tmp_path / "run-1" / "model"
    shutil.copytree(tiny_model_dir, folder)
    version = ModelVersion.objects.create(owner=user, name="mini", version=3, base_model="tiny",
                                          artifact_path=str(folder), dimensions=32)
    uri = artifacts.publish(version=version)
    assert uri == f"s3://models/embedportal/{user.pk}/version-{version.pk}/"  # ids, never the name
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="models")["Contents"]}
    assert f"embedportal/{user.pk}/version-{version.pk}/modules.json" in keys
    expected = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    # A machine without the folder downloads it on first use into its own cache, then serves from it
    shutil.rmtree(folder)
    encoders._cache.clear()
    model = encoders.get_model(str(folder))
    assert model.encode(["disk full"]).shape == (1, 32)
    cache = settings.MODELS_DIR / "store" / f"version-{version.pk}"
    assert artifacts.ensure_local(str(folder)) == str(cache)
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()) == expected
    assert not folder.exists()  # the recorded path of the training host is never written here


def test_model_card_is_read_from_the_store_without_the_model(s3, settings, user, tiny_model_dir, tmp_path):
    folder = tmp_path / "run-2" / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "README.md").write_text("# EmbedPortal: mini")
    version = ModelVersion.objects.create(owner=user, name="mini", version=1, base_model="tiny",
                                          artifact_path=str(folder), dimensions=32)
    artifacts.publish(version=version)
    shutil.rmtree(folder)

    assert artifacts.read_text(version=version, name="README.md") == "# EmbedPortal: mini"
    assert not (settings.MODELS_DIR / "store" / f"version-{version.pk}").exists()  # no model download for a card


def test_deleted_version_leaves_the_store(s3, user, tiny_model_dir, tmp_path):
    folder = tmp_path / "run-3" / "model"
    shutil.copytree(tiny_model_dir, folder)
    version = ModelVersion.objects.create(owner=user, name="gone", version=1, base_model="tiny",
                                          artifact_path=str(folder), dimensions=32)
    artifacts.publish(version=version)

    artifacts.forget(version=version)

    assert s3.list_objects_v2(Bucket="models", Prefix=f"embedportal/{user.pk}/version-{version.pk}/")["KeyCount"] == 0


def test_without_a_store_paths_stay_as_they_are(settings, user, tmp_path):
    settings.ARTIFACT_STORE = ""
    missing = tmp_path / "nowhere" / "model"
    version = ModelVersion.objects.create(owner=user, name="local", version=1, base_model="t",
                                          artifact_path=str(missing), dimensions=32)

    assert artifacts.publish(version=version) == ""
    assert artifacts.ensure_local(str(missing)) == str(missing)
    staged = tmp_path / f"{'a' * 32}.upload"
    assert artifacts.local_upload(owner_id=user.pk, file_path=staged) == staged


def test_staged_upload_travels_through_the_store(s3, settings, user, small_jira_file, tmp_path):
    """A big upload staged by a web host is imported by a worker host that never saw the file."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    from training import import_jobs

    upload = SimpleUploadedFile("hadoop.json", small_jira_file.read_bytes())
    job = import_jobs.stage(owner=user, upload=upload, name="Hadoop via store")
    staged = Path(job.file_path)
    key = f"embedportal/uploads/{user.pk}/{staged.name}"
    assert s3.head_object(Bucket="models", Key=key)["ContentLength"] == staged.stat().st_size

    # The worker's host: its own uploads folder, without the web host's file
    settings.UPLOADS_DIR = tmp_path / "worker-uploads"
    staged.unlink()
    import_jobs.ImportJob.objects.filter(pk=job.pk).update(status=import_jobs.ImportJob.Status.QUEUED)
    job.refresh_from_db()
    ended = import_jobs.execute(job=job)

    assert (ended.status, ended.error) == (import_jobs.ImportJob.Status.SUCCEEDED, "")
    assert ended.dataset.documents.count() == 200
    assert s3.list_objects_v2(Bucket="models", Prefix="embedportal/uploads/")["KeyCount"] == 0  # removed at the end
    assert list((tmp_path / "worker-uploads").iterdir()) == []  # and the worker's cached copy


def test_bad_store_setting_is_explained(settings, user, tiny_model_dir):
    settings.ARTIFACT_STORE = "bucket-without-scheme"
    version = ModelVersion.objects.create(owner=user, name="m", version=1, base_model="t",
                                          artifact_path=str(tiny_model_dir), dimensions=32)
    from training.errors import ServiceError

    with pytest.raises(ServiceError, match="must look like s3://bucket/prefix, got 'bucket-without-scheme'"):
        artifacts.publish(version=version)


@given(segment=st.text(max_size=40), name=st.text(max_size=40))
@hypothesis_settings(max_examples=300, deadline=None)
def test_store_keys_are_made_of_id_like_segments_only(segment, name):
    """Whatever text reaches a key (a path's last part, a segment), it is refused or stays one plain segment."""
    from django.test import override_settings

    from training.errors import ServiceError

    with override_settings(ARTIFACT_STORE="s3://models/embedportal"):
        try:
            bucket, key = artifacts._key("7", segment)
        except ServiceError:
            pass
        else:
            assert (bucket, key) == ("models", f"embedportal/7/{segment}")
            assert "/" not in segment and segment not in (".", "..") and "\x00" not in segment
        try:
            parts = artifacts._upload_segments(7, f"/var/uploads/{name}")
        except ServiceError:
            pass
        else:
            assert parts == ("uploads", "7", name) and re.fullmatch(r"[0-9a-f]{32}\.upload", name)
