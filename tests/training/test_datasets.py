"""Dataset services, API and pages: uploads, versions, previews, mappings, reports."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pytest
from django.utils import timezone
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.conftest import SHARED_DATA
from training import datasets
from training.errors import ServiceError
from training.models import Dataset, DatasetVersion, Document

GITBUGS = SHARED_DATA / "jira" / "gitbugs-hadoop-export.csv"
GITBUGS_LINKS = SHARED_DATA / "jira" / "gitbugs-hadoop-duplicates.csv"


def upload(api, name, content: bytes, filename="export.json", **extra):
    data = {"name": name, "kind": "tickets", "file": SimpleUploadedFile(filename, content), **extra}
    return api.post("/api/datasets/", data, format="multipart")


def issues_json(*issues) -> bytes:
    return json.dumps({"issues": [{"key": k, "fields": {"summary": s, "description": d}} for k, s, d in issues]}).encode()


# --- Creating ------------------------------------------------------------------------


def test_upload_real_hadoop_export_stores_every_issue(api, hadoop_issues):
    from tests.conftest import HADOOP_JSON

    with open(HADOOP_JSON, "rb") as fh:
        response = api.post("/api/datasets/", {"name": "hadoop", "file": fh}, format="multipart")
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["document_count"], body["latest_version"], body["kind"]) == (20859, 1, "tickets")
    report = body["import_report"]
    assert (report["rows_read"], report["rows_rejected"], report["added"], report["empty_bodies"]) == (20859, 0, 20859, 555)
    first = hadoop_issues[0]
    doc = Document.objects.get(dataset_id=body["id"], external_key=first["key"])
    assert doc.title == first["fields"]["summary"].strip()
    assert doc.metadata["issue_type"] == first["fields"]["issuetype"]["name"]
    assert (doc.changed_in_version, len(doc.content_hash)) == (1, 40)
    assert Document.objects.filter(dataset_id=body["id"], search_vector__isnull=True).count() == 0


@pytest.mark.parametrize(
    "content, filename, expected",
    [
        (b"\x00\x01\x02\x03binary\x00junk" * 20, "export.json", "binary file"),
        (gzip.compress(json.dumps({"issues": [{"key": "A-1"}]}).encode())[:20], "export.json.gz", "damaged or truncated"),
        (json.dumps({"total": 3}).encode(), "export.json", "this JSON is not an export we can read"),
        (b"", "export.json", "file: The submitted file is empty."),
        (b'{"issues": [', "export.json", "not valid JSON (line 1, column 13"),
        (json.dumps({"issues": []}).encode(), "export.json", "contains no issues"),
        (b"Summary,Issue id\n", "export.csv", "has a header row (Summary, Issue id) but no data rows"),
        (json.dumps({"issues": [{"key": "A-1", "fields": {"summary": ""}}]}).encode(), "e.json",
         "row 1, field fields.summary: empty summary"),
        (b"Issue id,Duplicate id\n1,2\n", "dups.csv", "holds duplicate links, not tickets"),
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
        {"row": 4, "key": "X-1", "field": "key",
         "reason": "duplicate key with different content (first seen in row 1); this row was skipped"},
    ]


def test_strict_upload_with_a_bad_row_stores_nothing(api):
    content = b"question,answer\nOk?,yes\nEmpty answer?,\n"
    response = upload(api, "faq", content, "faq.csv", kind="", strict="true")
    assert response.status_code == 400
    assert response.json() == {
        "error": "strict: 1 row(s) rejected, so nothing was imported (strict mode). "
                 "First: row 2, field answer: empty answer.",
        "fields": {"strict": "1 row(s) rejected, so nothing was imported (strict mode). "
                             "First: row 2, field answer: empty answer."},
    }
    assert (Dataset.objects.count(), Document.objects.count(), DatasetVersion.objects.count()) == (0, 0, 0)


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


def test_qa_upload_detects_kind_and_stores_group_label(api):
    with open(SHARED_DATA / "qa" / "bank-faq.csv", "rb") as fh:
        response = api.post("/api/datasets/", {"name": "bank", "file": fh}, format="multipart")
    assert response.status_code == 201, response.content
    body = response.json()
    # Each answer its own document by default (issue 16): row 1521, row 1501 in other letter case, is kept too.
    assert (body["kind"], body["document_count"], body["repeated_questions"]) == ("qa", 1487, "keep")
    assert (body["import_report"]["duplicates"], body["import_report"]["rows_rejected"]) == (277, 0)
    doc = Document.objects.filter(dataset_id=body["id"]).order_by("id").first()
    assert doc.metadata == {"label": "security"}


def test_upload_over_the_size_limit_is_refused_while_streaming(api, settings):
    settings.MAX_UPLOAD_MB = 1
    content = b"question,answer\n" + b"q,a\n" * 300_000  # 1.2 MB
    response = upload(api, "big", content, "big.csv", kind="")
    assert response.status_code == 400
    assert response.json()["error"] == "big.csv: the file is larger than the 1 MB upload limit (EMBEDPORTAL_MAX_UPLOAD_MB)."
    assert Dataset.objects.count() == 0


# --- Versions ------------------------------------------------------------------------


def test_reupload_upserts_by_key_and_records_a_version(user):
    first = issues_json(("K-1", "Disk full", "old text"), ("K-2", "Slow reads", "same"), ("K-3", "Crash", "same"))
    second = issues_json(("K-1", "Disk full", "new text mentions zookeeper"), ("K-2", "Slow reads", "same"),
                         ("K-4", "New one", ""))
    dataset = _import(user, "ds", first)
    version = _add(dataset, second)
    assert (version.number, version.added, version.changed, version.unchanged) == (2, 1, 1, 1)
    assert version.report["rows_read"] == 3
    docs = {d.external_key: d for d in dataset.documents.all()}
    assert sorted(docs) == ["K-1", "K-2", "K-3", "K-4"]  # K-3 is kept: exports are often partial
    assert (docs["K-1"].body, docs["K-1"].changed_in_version, docs["K-2"].changed_in_version) == (
        "new text mentions zookeeper", 2, 1)
    assert list(dataset.documents.filter(search_vector="zookeeper").values_list("external_key", flat=True)) == ["K-1"]
    assert list(dataset.versions.values_list("number", flat=True)) == [2, 1]
    same = _add(dataset, second)
    assert (same.number, same.added, same.changed, same.unchanged) == (3, 0, 0, 3)


def test_failed_reupload_keeps_the_dataset_as_it_was(user):
    dataset = _import(user, "ds", issues_json(("K-1", "Disk full", "text")))
    with pytest.raises(ServiceError, match="damaged or truncated"):
        _add(dataset, gzip.compress(issues_json(("K-1", "Changed", "x"), ("K-2", "New", "y")))[:30], "e.json.gz")
    with pytest.raises(ServiceError, match=r"^strict: 1 row\(s\) rejected"):
        _add(dataset, issues_json(("K-1", "Changed", "x"), ("K-2", "", "no summary")), strict=True)
    assert list(dataset.documents.values_list("external_key", "title")) == [("K-1", "Disk full")]
    assert dataset.versions.count() == 1


def test_reupload_of_another_kind_is_refused(user):
    dataset = _import(user, "ds", issues_json(("K-1", "Disk full", "text")))
    with pytest.raises(ServiceError, match="makes a 'qa' dataset, not 'tickets'"):
        _add(dataset, b"question,answer\nq?,a\n", "faq.csv")


def test_reupload_keeps_serving_vectors_and_queues_incremental_refresh(user, django_capture_on_commit_callbacks):
    from search.embedding import pending_documents
    from search.models import Embedding, SearchIndex
    from training.models import ModelVersion

    dataset = _import(user, "ds", issues_json(("K-1", "Disk full", "a"), ("K-2", "Slow", "b")))
    model = ModelVersion.objects.create(owner=user, name="m", version=1, base_model="b", artifact_path="/x",
                                        dimensions=3)
    for doc in dataset.documents.all():
        Embedding.objects.create(document=doc, model_version=model, embedding=[0.1, 0.2, 0.3],
                                 content_hash=doc.content_hash)
    index = SearchIndex.objects.create(owner=user, dataset=dataset, model_version=model,
                                       status=SearchIndex.Status.READY, finished_at=timezone.now())
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        _add(dataset, issues_json(("K-1", "Disk full", "changed"), ("K-2", "Slow", "b"), ("K-3", "New", "c")))
    # Old vectors keep serving; only the changed and the new document are pending
    assert sorted(Embedding.objects.values_list("document__external_key", flat=True)) == ["K-1", "K-2"]
    assert sorted(pending_documents(dataset=dataset, model_version=model).values_list("external_key", flat=True)) == [
        "K-1", "K-3"]
    index.refresh_from_db()
    assert index.status == SearchIndex.Status.QUEUED and index.is_searchable
    assert len(callbacks) == 1


def test_gitbugs_csv_then_its_duplicate_links_file(user):
    dataset = _import(user, "gitbugs", GITBUGS.read_bytes(), "gitbugs-hadoop-export.csv")
    assert dataset.documents.count() == 2503
    version = _add(dataset, GITBUGS_LINKS.read_bytes(), "gitbugs-hadoop-duplicates.csv")
    assert (version.number, version.detected_format) == (2, "jira_links")
    assert version.report["rows_read"] == 126
    links_added = version.report["links_added"]
    rejected = version.report["rows_rejected"]
    assert version.report["rows_accepted"] + rejected == 126
    # One cell names two duplicates ("13547000, 13396667"): two links from one row (issue 16)
    assert links_added == version.report["rows_accepted"] + 1
    assert links_added > 100
    assert version.changed == Document.objects.filter(dataset=dataset, changed_in_version=2).count()
    tickets = datasets.dataset_tickets(dataset)
    assert sum(len(t.links) for t in tickets) == 2 * links_added
    # A newer export of the tickets keeps the links of the links upload.
    again = _add(dataset, GITBUGS.read_bytes(), "gitbugs-hadoop-export.csv")
    assert (again.added, again.changed, again.unchanged) == (0, 0, 2503)
    assert sum(len(t.links) for t in datasets.dataset_tickets(dataset)) == 2 * links_added


def test_links_naming_unknown_tickets_are_rejected_with_row_and_field(user):
    dataset = _import(user, "ds", b"Summary,Issue id\nA,1\nB,2\n", "e.csv")
    version = _add(dataset, b"Issue id,Duplicate id\n1,2\n1,99\n", "links.csv")
    assert version.report["errors"] == [
        {"row": 2, "key": "1", "field": "Duplicate id", "reason": "no ticket '99' in dataset ds"}]
    assert [t.links for t in datasets.dataset_tickets(dataset)] == [(("duplicate", "2"),), (("duplicate", "1"),)]


def _import(user, name, content: bytes, filename="export.json", **kwargs) -> Dataset:
    with SimpleUploadedFile(filename, content) as fh:
        return datasets.import_upload(owner=user, name=name, upload=fh, **kwargs)


def _add(dataset, content: bytes, filename="export.json", **kwargs):
    with datasets.upload_on_disk(SimpleUploadedFile(filename, content)) as path:
        return datasets.add_version(dataset=dataset, path=path, filename=filename, **kwargs)


# --- Mapping ---------------------------------------------------------------------------


def test_mapped_upload_is_remembered_for_the_next_upload(api, user):
    content = b"Ref;Subject;Text;Team\nT-1;Printer jam;Paper stuck;it\nT-2;VPN down;No tunnel;net\n"
    mapping = {"key": "Ref", "title": "Subject", "body": "Text", "attributes": ["Team"]}
    response = upload(api, "helpdesk", content, "tickets.csv", mapping=json.dumps(mapping))
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["column_mapping"] == mapping
    dataset_id = body["id"]
    newer = b"Ref;Subject;Text;Team\nT-2;VPN down;Tunnel fixed;net\nT-3;Mail bounce;550;mail\n"
    response = api.post(f"/api/datasets/{dataset_id}/upload/", {"file": SimpleUploadedFile("t2.csv", newer)},
                        format="multipart")
    assert response.status_code == 201, response.content
    assert {k: response.json()[k] for k in ("number", "added", "changed", "unchanged")} == {
        "number": 2, "added": 1, "changed": 1, "unchanged": 0}
    assert Document.objects.get(dataset_id=dataset_id, external_key="T-3").metadata == {"attributes": {"Team": "mail"}}


def test_mapping_endpoint_reads_and_saves_the_mapping(api, user):
    dataset = Dataset.objects.create(owner=user, name="d", kind="qa")
    url = f"/api/datasets/{dataset.pk}/mapping/"
    assert api.get(url).json() == {"mapping": {}}
    response = api.put(url, {"mapping": {"title": "Q", "body": "A", "group": ""}}, format="json")
    assert response.json() == {"mapping": {"title": "Q", "body": "A"}}
    response = api.put(url, {"mapping": {"title": "Q"}}, format="json")
    assert response.status_code == 400
    assert response.json()["error"] == "mapping: a qa dataset needs the body column (answer) mapped."
    dataset.refresh_from_db()
    assert dataset.column_mapping == {"title": "Q", "body": "A"}


# --- Preview, report, versions -------------------------------------------------------------


def test_preview_reads_and_validates_without_storing(api):
    with open(GITBUGS, "rb") as fh:
        response = api.post("/api/datasets/preview/", {"file": fh}, format="multipart")
    assert response.status_code == 200
    body = response.json()
    assert (body["format"], body["kind"], body["needs_mapping"]) == ("jira_csv", "tickets", False)
    assert len(body["rows"]) == 10
    assert body["rows"][0]["key"] == "13404344"
    assert (body["report"]["rows_read"], body["report"]["empty_bodies"]) == (2503, 143)
    assert [b["count"] for b in body["report"]["text_length"]["buckets"]] == [232, 1201, 860, 181, 29]
    assert Dataset.objects.count() == 0


def test_preview_of_unknown_columns_asks_for_a_mapping(api):
    response = api.post("/api/datasets/preview/", {"file": SimpleUploadedFile("x.csv", b"Ref,Subject\n1,Hi\n")},
                        format="multipart")
    body = response.json()
    assert (response.status_code, body["needs_mapping"], body["columns"]) == (200, True, ["Ref", "Subject"])
    assert body["error"].startswith("mapping: the columns of x.csv (Ref, Subject) are not a known export.")


def test_preview_errors_download_as_csv_with_formulas_neutralised(api):
    content = b"id,question,answer\n=HYPERLINK(1),Q?,\n@SUM,Fine?,yes\n"
    response = api.post("/api/datasets/preview/?errors=csv", {"file": SimpleUploadedFile("f.csv", content)},
                        format="multipart")
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    text = b"".join(response.streaming_content).decode()
    assert list(csv.reader(io.StringIO(text))) == [
        ["row", "key", "field", "reason"], ["1", "'=HYPERLINK(1)", "answer", "empty answer"]]


def test_report_versions_and_rejected_rows_csv(api, user):
    dataset = _import(user, "ds", b"question,answer\nQ1?,A1\n+Q2?,\nQ3?,A3\n", "faq.csv")
    _add(dataset, b"question,answer\nQ1?,A1 changed\n-Q4?,\n", "faq2.csv")
    versions = api.get(f"/api/datasets/{dataset.pk}/versions/").json()
    assert [(v["number"], v["added"], v["changed"], v["unchanged"], v["report"]["rows_rejected"]) for v in versions] == [
        (2, 1, 0, 0, 1), (1, 2, 0, 0, 1)]
    # Without a key column the key is question + answer, so a new answer is a new row.
    assert api.get(f"/api/datasets/{dataset.pk}/report/?version=1").json()["errors"] == [
        {"row": 2, "key": "", "field": "answer", "reason": "empty answer"}]
    response = api.get(f"/api/datasets/{dataset.pk}/rejected-rows/")
    assert b"".join(response.streaming_content).decode() == "row,key,field,reason\r\n2,,answer,empty answer\r\n"
    assert api.get(f"/api/datasets/{dataset.pk}/report/?version=9").status_code == 404


def test_pairs_preview_endpoint_counts_and_samples(api, user):
    with open(SHARED_DATA / "qa" / "stackexchange-faq.json", "rb") as fh:
        dataset = datasets.import_upload(owner=user, name="faq", upload=SimpleUploadedFile("faq.json", fh.read()))
    response = api.get(f"/api/datasets/{dataset.pk}/pairs/?sample=3&seed=7")
    assert response.status_code == 200
    body = response.json()
    assert (body["strategy"], body["columns"], len(body["sample"])) == ("qa", ["anchor", "positive"], 3)
    split = body["split"]
    assert split["train_groups"] + split["validation_groups"] + split["test_groups"] == 125
    assert body["train_examples"] == body["counts"]["question_answer"] + body["counts"]["paraphrase_question"]
    assert body["counts"]["question_answer"] == split["train_groups"]
    assert api.get(f"/api/datasets/{dataset.pk}/pairs/?strategy=bogus").status_code == 400


def test_new_endpoints_are_owner_scoped(api, other_user):
    theirs = Dataset.objects.create(owner=other_user, name="secret")
    DatasetVersion.objects.create(dataset=theirs, number=1)
    for url in ("versions/", "report/", "rejected-rows/", "pairs/", "mapping/"):
        assert api.get(f"/api/datasets/{theirs.pk}/{url}").status_code == 404, url
    response = api.post(f"/api/datasets/{theirs.pk}/upload/",
                        {"file": SimpleUploadedFile("x.json", issues_json(("A-1", "t", "")))}, format="multipart")
    assert response.status_code == 404
    response = api.post("/api/datasets/preview/", {"file": SimpleUploadedFile("x.json", b"{}"), "dataset": theirs.pk},
                        format="multipart")
    assert response.json() == {"error": f"dataset: No dataset {theirs.pk} of yours.",
                               "fields": {"dataset": f"No dataset {theirs.pk} of yours."}}
    assert theirs.documents.count() == 0


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
        DatasetVersion.objects.create(dataset=ds, number=1)
        DatasetVersion.objects.create(dataset=ds, number=2)
    # token auth, count for pagination, page of rows (latest version is a subquery)
    with django_assert_num_queries(3):
        response = api.get("/api/datasets/")
    assert [(d["document_count"], d["latest_version"]) for d in response.json()["results"]] == [(1, 2)] * count


@pytest.mark.parametrize("count", [1, 3])
def test_dataset_versions_query_count(api, user, django_assert_num_queries, count):
    ds = Dataset.objects.create(owner=user, name="d")
    for i in range(count):
        DatasetVersion.objects.create(dataset=ds, number=i + 1)
    # token auth, the dataset, its versions
    with django_assert_num_queries(3):
        response = api.get(f"/api/datasets/{ds.pk}/versions/")
    assert [v["number"] for v in response.json()] == list(range(count, 0, -1))


@pytest.mark.django_db(transaction=True)  # files are removed after commit
def test_delete_dataset_cancels_its_jobs_and_removes_its_staged_files_and_unused_run_folders(api, user, settings,
                                                                                              tmp_path):
    from embedportal import jobs
    from training import import_jobs
    from training.models import ImportJob, ModelVersion, TrainingRun

    # Given a dataset with a queued run, a staged upload (a kept preview) on disk, a finished run whose folder
    # nothing uses any more, and a finished run whose model version is registered
    settings.UPLOADS_DIR = tmp_path / "uploads"
    settings.MODELS_DIR = tmp_path / "models"
    ds = Dataset.objects.create(owner=user, name="busy")
    queued = TrainingRun.objects.create(owner=user, dataset=ds, base_model="m")
    staged = import_jobs.stage(owner=user, upload=SimpleUploadedFile("v2.csv", b"Summary\nx\n"), dataset=ds)
    failed = TrainingRun.objects.create(owner=user, dataset=ds, base_model="m", status=TrainingRun.Status.FAILED)
    registered = TrainingRun.objects.create(owner=user, dataset=ds, base_model="m",
                                            status=TrainingRun.Status.SUCCEEDED)
    for run in (failed, registered):
        (settings.MODELS_DIR / f"run-{run.pk}" / "attempt-1" / "model").mkdir(parents=True)
        (settings.MODELS_DIR / f"run-{run.pk}" / "attempt-1" / "model" / "model.safetensors").write_bytes(b"w")
    version = ModelVersion.objects.create(
        owner=user, name="busy", version=1, base_model="m", dimensions=32, source_run=registered, dataset=ds,
        artifact_path=str(settings.MODELS_DIR / f"run-{registered.pk}" / "attempt-1" / "model"))
    assert Path(staged.file_path).exists()
    # When the dataset is deleted through the API
    response = api.delete(f"/api/datasets/{ds.pk}/")
    # Then it answers 204, the rows are gone, and a worker that later gets the queued run's message does nothing
    assert (response.status_code, response.content) == (204, b"")
    assert (Dataset.objects.count(), TrainingRun.objects.count(), ImportJob.objects.count()) == (0, 0, 0)
    assert jobs.claim(TrainingRun, queued.pk) is None
    # And the staged upload and the unused run folder are removed; the registered version keeps its folder
    assert not Path(staged.file_path).exists()
    assert sorted(p.name for p in settings.MODELS_DIR.iterdir()) == [f"run-{registered.pk}"]
    version.refresh_from_db()
    assert (version.dataset_id, version.source_run_id, Path(version.artifact_path).is_dir()) == (None, None, True)


def test_workers_of_a_deleted_datasets_import_and_index_build_lose_their_fence(user, settings, tmp_path):
    from embedportal import jobs
    from search.models import SearchIndex
    from training import import_jobs
    from training.models import ImportJob, ModelVersion

    # Given an import of a new version and a search index build, both running (claimed by a worker)
    settings.UPLOADS_DIR = tmp_path / "uploads"
    ds = Dataset.objects.create(owner=user, name="d")
    job = import_jobs.stage(owner=user, upload=SimpleUploadedFile("v2.csv", b"Summary\nx\n"), dataset=ds)
    ImportJob.objects.filter(pk=job.pk).update(status=ImportJob.Status.QUEUED)
    version = ModelVersion.objects.create(owner=user, name="m", version=1, base_model="m", dimensions=32,
                                          artifact_path="/nonexistent")
    index = SearchIndex.objects.create(owner=user, dataset=ds, model_version=version)
    importing, building = jobs.claim(ImportJob, job.pk), jobs.claim(SearchIndex, index.pk)
    # When the dataset is deleted (search's index goes by cascade)
    datasets.delete_dataset(dataset=ds)
    # Then each worker's next fenced write stops it, and neither can finish the deleted job
    for attempt in (importing, building):
        with pytest.raises(jobs.LostClaim):
            attempt.update(phase="merging")
        assert attempt.finish() is False
    assert (SearchIndex.objects.count(), ImportJob.objects.count(), ModelVersion.objects.count()) == (0, 0, 1)


# --- Pages ---------------------------------------------------------------------------------


def test_upload_page_shows_error_message(web):
    response = web.post("/datasets/", {"name": "bad", "kind": "tickets",
                                       "file": SimpleUploadedFile("x.json.gz", b"\x1f\x8b\x08\x00trunc")})
    assert response.status_code == 400
    assert "damaged or truncated" in response.content.decode()
    assert Dataset.objects.count() == 0


def test_upload_page_preview_shows_format_rows_and_report(web):
    response = web.post("/datasets/", {"name": "faq", "action": "preview",
                                       "file": SimpleUploadedFile("faq.csv", b"question,answer\nHow to reset?,Press it\n")})
    html = response.content.decode()
    assert response.status_code == 200
    assert "<h2 style=\"margin-top:0\">Preview: Q&amp;A (question, answer)</h2>" in html
    assert "<td>How to reset?</td>" in html
    assert "<tr><th>Rows read</th><td>1</td></tr>" in html
    assert Dataset.objects.count() == 0


def test_upload_page_imports_and_detail_lists_versions(web, user):
    response = web.post("/datasets/", {"name": "faq", "action": "import",
                                       "file": SimpleUploadedFile("faq.csv", b"question,answer\nQ?,A\nBad?,\n")})
    dataset = Dataset.objects.get(name="faq")
    assert response.status_code == 302
    assert response["Location"] == f"/datasets/{dataset.pk}/"
    html = web.get(f"/datasets/{dataset.pk}/").content.decode()
    assert f'<a href="/datasets/{dataset.pk}/versions/1/rejected.csv" title="rejected and merged rows with their reasons">CSV</a>' in html
    assert "<td>2</td><td>1</td><td>field answer" not in html
    assert "<td>2</td><td></td><td>answer</td><td>empty answer</td>" in html
    response = web.post(f"/datasets/{dataset.pk}/upload",
                        {"file": SimpleUploadedFile("faq2.csv", b"question,answer\nQ?,A\nNew?,B\n")})
    assert response.status_code == 302
    assert [(v.number, v.added, v.unchanged) for v in dataset.versions.all()] == [(2, 1, 1), (1, 1, 0)]
    csv_response = web.get(f"/datasets/{dataset.pk}/versions/1/rejected.csv")
    assert b"".join(csv_response.streaming_content) == b"row,key,field,reason\r\n2,,answer,empty answer\r\n"


def test_version_upload_page_shows_error_and_keeps_data(web, user):
    dataset = _import(user, "ds", issues_json(("K-1", "Disk", "x")))
    response = web.post(f"/datasets/{dataset.pk}/upload", {"file": SimpleUploadedFile("e.json", b'{"issues": [')})
    assert response.status_code == 400
    assert "not valid JSON (line 1, column 13" in response.content.decode()
    assert dataset.versions.count() == 1


def test_pairs_page_renders_counts_and_sample(web, user):
    dataset = _import(user, "ds", issues_json(*[(f"K-{i}", f"Summary {i}", "d" * 40) for i in range(5)]))
    html = web.get(f"/datasets/{dataset.pk}/pairs").content.decode()
    assert "<h2 style=\"margin-top:0\">tickets: 5 training examples, 0 for validation</h2>" in html
    assert "<tr><td>self</td><td>5</td></tr>" in html
    html = web.get(f"/datasets/{dataset.pk}/pairs?strategy=tickets&link_types=duplicate&seed=1&sample=2").content.decode()
    assert "tickets: 0 training examples" in html  # self pairs unticked


@pytest.mark.parametrize("count", [1, 3])
def test_dataset_list_page_query_count(web, user, django_assert_num_queries, count):
    for i in range(count):
        ds = Dataset.objects.create(owner=user, name=f"d{i}")
        Document.objects.create(dataset=ds, external_key="K-1", title="t")
    # session, user, datasets with counts, recent import jobs: constant whatever the count
    with django_assert_num_queries(4):
        response = web.get("/datasets/")
    assert response.content.decode().count('<tr><td><a href="/datasets/') == count


# --- Fuzz: nothing is ever lost -----------------------------------------------------------

from hypothesis import HealthCheck, given, settings as hsettings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=2000),
    st.text(max_size=400).map(lambda t: ("Summary,Issue key,Description\n" + t).encode("utf-8", "surrogatepass")),
    st.text(max_size=400).map(lambda t: ('{"issues": [' + t).encode("utf-8", "surrogatepass")),
), name=st.sampled_from(["x.json", "x.csv", "x.csv.gz", "x.zip"]))
def test_any_upload_into_a_dataset_gives_a_version_or_a_400_and_loses_nothing(api, user, data, name):
    dataset = Dataset.objects.filter(owner=user, name="keep").first() or _import(
        user, "keep", issues_json(("K-1", "Disk full", "text"), ("K-2", "Slow", "")))
    before = set(dataset.documents.values_list("external_key", "title", "body"))
    response = api.post(f"/api/datasets/{dataset.pk}/upload/", {"file": SimpleUploadedFile(name, data)},
                        format="multipart")
    assert response.status_code in (201, 400), response.content
    if response.status_code == 400:
        assert response.json()["error"]
        assert set(dataset.documents.values_list("external_key", "title", "body")) == before
    else:
        keys = set(dataset.documents.values_list("external_key", flat=True))
        assert {key for key, _, _ in before} <= keys


def test_upload_page_over_the_size_limit_is_refused_with_csrf_enforced(user, settings):
    from django.test import Client

    settings.MAX_UPLOAD_MB = 1
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    page = client.get("/datasets/")
    token = page.cookies["csrftoken"].value
    big = SimpleUploadedFile("big.csv", b"question,answer\n" + b"q,a\n" * 300_000)
    response = client.post("/datasets/", {"name": "big", "file": big, "csrfmiddlewaretoken": token})
    assert response.status_code == 400
    assert "big.csv: the file is larger than the 1 MB upload limit (EMBEDPORTAL_MAX_UPLOAD_MB)." in response.content.decode()
    refused = client.post("/datasets/", {"name": "x", "file": SimpleUploadedFile("a.csv", b"question,answer\nq,a\n")})
    assert refused.status_code == 403  # the CSRF check still runs
    assert Dataset.objects.count() == 0


def test_dataset_language_sets_the_text_search_configuration(api):
    from django.core.files.uploadedfile import SimpleUploadedFile

    german = json.dumps([{"key": "G-1", "fields": {"summary": "Die Festplatten laufen voll",
                                                   "description": "Speicher"}}]).encode()
    response = api.post("/api/datasets/", {"name": "de", "language": "german",
                                           "file": SimpleUploadedFile("de.json", german)}, format="multipart")
    assert response.status_code == 201, response.content
    assert response.json()["language"] == "german"
    doc = Document.objects.get(external_key="G-1")
    assert "festplatt" in str(doc.search_vector)  # German stemming, not English
    bad = api.post("/api/datasets/", {"name": "xx", "language": "klingon",
                                      "file": SimpleUploadedFile("x.json", german)}, format="multipart")
    assert bad.status_code == 400
    assert bad.json()["fields"]["language"].startswith("'klingon' is not a text-search configuration here")
