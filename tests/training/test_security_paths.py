"""Names never become paths (security issue #10, item 1).

A dataset name is user text. It used to become the file name of model
downloads and vector exports, and the download then deleted that file's
parent folder: "/x" or "../../data/models/x" wrote outside the temporary
folder and deleted "/" or every owner's models. These tests run every
download with such names in a sandbox: the temporary folder and the models
folder live under tmp_path, so a path that escaped would show up there.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from search.vectors import store_embeddings
from training import temporary_files
from training.models import Dataset, Document, ImportJob, ModelVersion

pytestmark = pytest.mark.django_db

# name -> (ASCII fallback, percent-encoded UTF-8) of "<name>-v1.<ext>" in Content-Disposition.
NAMES = {
    "../../x": ("_.._x", "_.._x"),
    "../../data/models/x": ("_.._data_models_x", "_.._data_models_x"),
    "/x": ("_x", "_x"),
    "team/a": ("team_a", "team_a"),
    ".hidden": ("hidden", "hidden"),
    "Données 日本": ("Donn_es___", "Donn%C3%A9es%20%E6%97%A5%E6%9C%AC"),
    # The longest name a dataset can have, 400 bytes of UTF-8: the old file name passed NAME_MAX (255).
    "é" * 200: ("_" * 100, "%C3%A9" * 100),
}


@pytest.fixture
def sandbox(tmp_path, monkeypatch, settings):
    """Temporary files in sandbox/a/b/tmp, models in sandbox/a/b/data/models, each with a file of its own."""
    root = tmp_path / "sandbox"
    temp = root / "a" / "b" / "tmp"
    models = root / "a" / "b" / "data" / "models"
    temp.mkdir(parents=True)
    (models / "run-99" / "model").mkdir(parents=True)
    (models / "run-99" / "model" / "weights.bin").write_bytes(b"another owner's model")
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    settings.MODELS_DIR = models
    return root


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _version(user, name: str, tiny_model_dir: Path, models_dir: Path) -> ModelVersion:
    dataset = Dataset.objects.create(owner=user, name=name)
    docs = Document.objects.bulk_create([
        Document(dataset=dataset, external_key=f"K-{i}", title=title, body="b", content_hash=f"h{i}")
        for i, title in enumerate(["disk full", "=HYPERLINK(1)"], start=1)
    ])
    folder = models_dir / "run-1" / "model"
    shutil.copytree(tiny_model_dir, folder)
    version = ModelVersion.objects.create(owner=user, name=name, version=1, base_model="tiny",
                                          artifact_path=str(folder), dimensions=32, dataset=dataset)
    vectors = np.eye(2, 32, dtype=np.float32)
    store_embeddings(model_version=version, doc_ids=[d.pk for d in docs], vectors=vectors)
    return version


def _body(response) -> bytes:
    return b"".join(response.streaming_content)  # the test client closes the response at the end


@pytest.mark.parametrize("name", list(NAMES))
def test_downloads_of_a_hostile_name_stay_in_their_folder_and_name_the_file_in_the_header(
    api, web, user, sandbox, tiny_model_dir, name
):
    # Given a model version (and vectors) of a dataset whose name looks like a path
    models = sandbox / "a" / "b" / "data" / "models"
    version = _version(user, name, tiny_model_dir, models)
    before = _files(sandbox)
    ascii_name, encoded = NAMES[name]
    urls = {
        "zip": [f"/api/models/{version.pk}/download/", f"/models/{version.pk}/download"],
        **{fmt: [f"/api/models/{version.pk}/embeddings/?as={fmt}", f"/models/{version.pk}/export?as={fmt}"]
           for fmt in ("parquet", "jsonl", "csv")},
    }
    for ext, (api_url, page_url) in urls.items():
        for client, url in ((api, api_url), (web, page_url)):
            # When it is downloaded through the API and the page
            response = client.get(url)
            body = _body(response)

            # Then the file comes whole, named by the header only...
            assert response.status_code == 200, (url, body[:300])
            assert response["Content-Disposition"] == (
                f"attachment; filename=\"{ascii_name}-v1.{ext}\"; filename*=UTF-8''{encoded}-v1.{ext}"), url
            if ext == "zip":
                assert "modules.json" in zipfile.ZipFile(io.BytesIO(body)).namelist()
            elif ext == "parquet":
                assert pq.read_table(io.BytesIO(body)).column("key").to_pylist() == ["K-1", "K-2"]
            elif ext == "jsonl":
                assert [json.loads(line)["key"] for line in body.decode().splitlines()] == ["K-1", "K-2"]
            else:
                rows = list(csv.reader(io.StringIO(body.decode())))
                assert [r[:2] for r in rows] == [["key", "title"], ["K-1", "disk full"], ["K-2", "'=HYPERLINK(1)"]]
            # ...nothing was written outside the temporary folder, which is gone again,
            # and the models folder (another owner's model included) is untouched.
            assert _files(sandbox) == before, url
            assert list(Path(tempfile.gettempdir()).iterdir()) == []
            assert (models / "run-99" / "model" / "weights.bin").read_bytes() == b"another owner's model"


def test_rejected_rows_csv_of_a_hostile_name_is_named_by_the_header_only(api, user):
    dataset = Dataset.objects.create(owner=user, name="../../x")
    dataset.versions.create(number=1, rejected_rows=[{"row": 2, "key": "K", "field": "title", "reason": "=1+1"}])
    response = api.get(f"/api/datasets/{dataset.pk}/rejected-rows/")
    assert response.status_code == 200
    assert response["Content-Disposition"] == (
        "attachment; filename=\"_.._x-v1-rejected.csv\"; filename*=UTF-8''_.._x-v1-rejected.csv")
    assert b"".join(response.streaming_content).decode().splitlines() == ["row,key,field,reason", "2,K,title,'=1+1"]


@pytest.mark.parametrize("name", ["../../x", "/x", "team/a", ".hidden", "Données 日本"])
def test_a_name_that_looks_like_a_path_is_stored_as_plain_text(api, web, name):
    content = b"question,answer\nHow do I reset my password?,Use the reset link.\n"
    response = api.post("/api/datasets/", {"name": name, "file": SimpleUploadedFile("faq.csv", content)},
                        format="multipart")
    assert response.status_code == 201, response.content
    assert response.json()["name"] == name
    page = web.post("/datasets/", {"name": f"{name} (page)", "file": SimpleUploadedFile("faq.csv", content)})
    assert page.status_code == 302
    assert Dataset.objects.filter(name=f"{name} (page)").count() == 1


@pytest.mark.parametrize("name, message", [
    ("bad\x07name", "name: contains the control character U+0007 (at position 4); use printable characters only."),
    ("a\u202etxt.exe", "name: contains the control character U+202E (at position 2); use printable characters only."),
    ("line\nbreak", "name: contains the control character U+000A (at position 5); use printable characters only."),
])
def test_a_name_with_control_characters_is_refused_naming_the_field(api, web, name, message):
    content = b"question,answer\nq?,a\n"
    response = api.post("/api/datasets/", {"name": name, "file": SimpleUploadedFile("faq.csv", content)},
                        format="multipart")
    assert response.status_code == 400
    assert response.json() == {"error": message, "fields": {"name": message.partition(": ")[2]}}
    page = web.post("/datasets/", {"name": name, "file": SimpleUploadedFile("faq.csv", content)})
    assert page.status_code == 400
    assert Dataset.objects.count() == 0


def test_a_300_character_name_is_refused_naming_the_field(api):
    response = api.post("/api/datasets/", {"name": "n" * 300, "file": SimpleUploadedFile("f.csv", b"q,a\nx,y\n")},
                        format="multipart")
    assert response.status_code == 400
    assert response.json()["fields"] == {"name": "Ensure this field has no more than 200 characters."}


def test_a_staged_upload_is_named_by_a_uuid_whatever_its_file_name(api, settings, tmp_path):
    settings.UPLOADS_DIR = tmp_path / "uploads"
    upload = SimpleUploadedFile("../../evil.csv", b"question,answer\nq?,a\n")
    response = api.post("/api/datasets/preview/", {"file": upload, "keep": "true", "name": "kept"},
                        format="multipart")
    assert response.status_code == 200, response.content
    job = ImportJob.objects.get()
    assert Path(job.file_path).parent == settings.UPLOADS_DIR
    assert re.fullmatch(r"[0-9a-f]{32}\.upload", Path(job.file_path).name)
    assert [p.name for p in settings.UPLOADS_DIR.iterdir()] == [Path(job.file_path).name]


def test_cleanup_removes_only_folders_it_made(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with temporary_files.new_folder("export") as ours:
        (ours / "version-1.zip").write_bytes(b"zip")
    foreign = tmp_path / "not-ours"
    foreign.mkdir()
    temporary_files.remove(foreign)
    temporary_files.remove(tmp_path)
    temporary_files.remove(Path("/"))
    assert foreign.is_dir() and ours.is_dir()
    temporary_files.remove(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-ours"]


def test_a_failed_export_leaves_no_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(OSError):
        with temporary_files.new_folder("vectors") as folder:
            (folder / "missing" / "x").write_text("never")
    assert list(tmp_path.iterdir()) == []


# --- The artifact store: keys by id --------------------------------------------------------------


@pytest.fixture
def s3(monkeypatch, settings):
    import boto3
    from moto import mock_aws

    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    settings.ARTIFACT_STORE = "s3://models/embedportal"
    settings.S3_ENDPOINT_URL = ""
    with mock_aws():
        boto3.client("s3").create_bucket(Bucket="models")
        yield boto3.client("s3")


def test_artifact_keys_use_ids_not_the_name(s3, user, tiny_model_dir, tmp_path):
    from training import artifacts

    folder = tmp_path / "run-1" / "model"
    shutil.copytree(tiny_model_dir, folder)
    version = ModelVersion.objects.create(owner=user, name="../../other/x", version=1, base_model="tiny",
                                          artifact_path=str(folder), dimensions=32)
    assert artifacts.publish(version=version) == f"s3://models/embedportal/{user.pk}/version-{version.pk}/"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="models")["Contents"]}
    assert all(key.startswith(f"embedportal/{user.pk}/version-{version.pk}/") for key in keys)


def test_a_stored_key_pointing_outside_its_folder_is_not_downloaded(s3, user, tmp_path):
    from training import artifacts
    from training.errors import ServiceError

    folder = tmp_path / "models" / "run-1" / "model"
    folder.parent.mkdir(parents=True)
    version = ModelVersion.objects.create(owner=user, name="x", version=1, base_model="tiny",
                                          artifact_path=str(folder), dimensions=32,
                                          storage_uri="s3://models/embedportal/1/version-1/")
    s3.put_object(Bucket="models", Key="embedportal/1/version-1/../../../escaped.txt", Body=b"x")
    with pytest.raises(ServiceError, match="points outside its folder"):
        artifacts.ensure_local(version.artifact_path)
    assert not any(p.name == "escaped.txt" for p in tmp_path.rglob("*"))
