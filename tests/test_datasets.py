from __future__ import annotations

import gzip
import io
import json

import pytest

from training.models import Dataset, Document


def upload(api, name, content: bytes, filename="export.json"):
    return api.post("/api/datasets/", {"name": name, "kind": "tickets", "file": _named(content, filename)},
                    format="multipart")


def _named(content: bytes, filename: str):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(filename, content)


def test_upload_real_hadoop_export_stores_every_issue(api, hadoop_issues):
    from tests.conftest import HADOOP_JSON

    with open(HADOOP_JSON, "rb") as fh:
        response = api.post("/api/datasets/", {"name": "hadoop", "file": fh}, format="multipart")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["document_count"] == 20859
    assert body["import_report"]["rows_read"] == 20859
    assert body["import_report"]["rows_rejected"] == 0
    first = hadoop_issues[0]
    doc = Document.objects.get(dataset_id=body["id"], external_key=first["key"])
    assert doc.title == first["fields"]["summary"].strip()
    assert doc.metadata["issue_type"] == first["fields"]["issuetype"]["name"]
    assert Document.objects.filter(dataset_id=body["id"], search_vector__isnull=True).count() == 0


@pytest.mark.parametrize(
    "content, filename, expected",
    [
        (b"\x00\x01\x02\x03binary\x00junk" * 20, "export.json", "binary file"),
        (gzip.compress(json.dumps({"issues": [{"key": "A-1"}]}).encode())[:20], "export.json.gz", "damaged or truncated"),
        (json.dumps({"total": 3}).encode(), "export.json", "not a Jira issue export"),
        (b"", "export.json", "file: The submitted file is empty."),
        (b'{"issues": [', "export.json", "not valid JSON (line 1, column 13"),
        (json.dumps({"issues": []}).encode(), "export.json", "contains no issues"),
        (b"Summary,Issue id\nDisk full,1\n", "export.csv", "CSV files cannot be imported yet"),
        (json.dumps({"issues": [{"key": "A-1", "fields": {"summary": ""}}]}).encode(), "e.json",
         "row 1, field fields.summary: empty summary"),
    ],
)
def test_upload_bad_file_gives_400_and_stores_nothing(api, content, filename, expected):
    response = upload(api, "bad", content, filename)
    assert response.status_code == 400
    assert expected in response.json()["error"]
    assert Dataset.objects.count() == 0
    assert Document.objects.count() == 0


def test_upload_keeps_good_rows_and_reports_bad_ones(api):
    issues = [
        {"key": "X-1", "fields": {"summary": "Disk full on datanode", "description": "it fills up"}},
        {"key": "X-2", "fields": {"summary": "  "}},
        {"fields": {"summary": "no key"}},
        {"key": "X-1", "fields": {"summary": "same key again"}},
    ]
    response = upload(api, "mixed", json.dumps(issues).encode())
    assert response.status_code == 201
    body = response.json()
    assert body["document_count"] == 1
    assert body["import_report"]["rows_read"] == 4
    assert body["import_report"]["errors"] == [
        {"row": 2, "key": "X-2", "field": "fields.summary", "reason": "empty summary"},
        {"row": 3, "key": "", "field": "key", "reason": "missing issue key"},
    ]


def test_upload_single_issue_and_zip_are_accepted(api):
    import zipfile

    one = {"key": "Z-9", "fields": {"summary": "Single issue", "issuelinks": [
        {"type": {"name": "Duplicate"}, "outwardIssue": {"key": "Z-8"}}]}}
    assert upload(api, "one", json.dumps(one).encode()).json()["document_count"] == 1
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("issues.json", json.dumps([one, {"key": "Z-10", "fields": {"summary": "Another"}}]))
    response = upload(api, "zipped", buffer.getvalue(), "export.zip")
    assert response.json()["document_count"] == 2
    doc = Document.objects.get(dataset_id=response.json()["id"], external_key="Z-9")
    assert doc.metadata["links"] == [{"type": "Duplicate", "direction": "outward", "key": "Z-8"}]


def test_upload_duplicate_name_is_refused_and_keeps_existing(api):
    content = json.dumps([{"key": "A-1", "fields": {"summary": "first"}}]).encode()
    assert upload(api, "same", content).status_code == 201
    response = upload(api, "same", json.dumps([{"key": "B-1", "fields": {"summary": "x"}}]).encode())
    assert response.status_code == 400
    assert response.json()["fields"] == {"name": "you already have a dataset called 'same'; pick another name."}
    assert list(Document.objects.values_list("external_key", flat=True)) == ["A-1"]


def test_upload_page_shows_error_message(web):
    from django.core.files.uploadedfile import SimpleUploadedFile

    response = web.post("/datasets/", {"name": "bad", "kind": "tickets",
                                       "file": SimpleUploadedFile("x.json.gz", b"\x1f\x8b\x08\x00trunc")})
    assert response.status_code == 400
    assert "damaged or truncated" in response.content.decode()
    assert Dataset.objects.count() == 0


def test_datasets_are_owner_scoped(api, user, other_user):
    theirs = Dataset.objects.create(owner=other_user, name="secret")
    response = api.get(f"/api/datasets/{theirs.pk}/")
    assert response.status_code == 404
    assert response.json() == {"error": "No Dataset matches the given query."}
    assert api.get("/api/datasets/").json()["results"] == []
    assert api.delete(f"/api/datasets/{theirs.pk}/").status_code == 404
    assert Dataset.objects.filter(pk=theirs.pk).exists()


@pytest.mark.parametrize("count", [1, 3])
def test_dataset_list_query_count(api, user, django_assert_num_queries, count):
    for i in range(count):
        ds = Dataset.objects.create(owner=user, name=f"d{i}")
        Document.objects.create(dataset=ds, external_key="K-1", title="t")
    # token auth, count for pagination, page of rows
    with django_assert_num_queries(3):
        response = api.get("/api/datasets/")
    assert [d["document_count"] for d in response.json()["results"]] == [1] * count


def test_delete_dataset_refused_while_run_active(api, user):
    from training.models import TrainingRun

    ds = Dataset.objects.create(owner=user, name="busy")
    TrainingRun.objects.create(owner=user, dataset=ds, base_model="m", status=TrainingRun.Status.RUNNING)
    response = api.delete(f"/api/datasets/{ds.pk}/")
    assert response.status_code == 409
    assert "unfinished training run" in response.json()["error"]
    assert Dataset.objects.filter(pk=ds.pk).exists()
