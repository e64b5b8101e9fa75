"""Resource limits and bad input (security issue #10, items 7 and 8).

Each of these once gave a 500 or burnt CPU or memory in a web worker; each
must now be a 400 (or 413) naming the row or field and what to do, or a
bounded answer.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import sys
import time
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from hypothesis import HealthCheck, given, settings as hsettings
from hypothesis import strategies as st

from embedportal import json_limits
from search.vectors import store_embeddings
from training import datasets, importers
from training.errors import ServiceError
from training.importers import CellError, ImportReport, UploadError, tabular
from training.models import Dataset, Document, ImportJob, ModelVersion

pytestmark = pytest.mark.django_db

FAQ = b"question,answer\nHow do I reset my password?,Use the reset link.\n"


def _upload(api, name: str, content: bytes, filename: str, **extra):
    return api.post("/api/datasets/", {"name": name, "file": SimpleUploadedFile(filename, content), **extra},
                    format="multipart")


def _nested(depth: int, leaf=None):
    value = leaf if leaf is not None else "a"
    for _ in range(depth):
        value = [value]
    return value


# --- Item 8: the Q&A cell flattener ------------------------------------------------------------


def test_a_qa_cell_nested_past_the_limit_rejects_its_row_naming_the_column(api):
    # Given a JSON list of Q&A rows whose first question is a list nested 23 deep (2^23 calls before)
    rows = [{"question": _nested(23), "answer": "b"}, {"question": "Reset password?", "answer": "Use the link."}]
    started = time.process_time()
    response = _upload(api, "faq", json.dumps(rows).encode(), "faq.json")
    assert time.process_time() - started < 5
    # Then the row is rejected with its column and the reason; the good row is imported
    assert response.status_code == 201, response.content
    report = response.json()["import_report"]
    assert (report["rows_read"], report["rows_accepted"], report["rows_rejected"]) == (2, 1, 1)
    assert report["errors"] == [{"row": 1, "key": "", "field": "question",
                                 "reason": "a list nested more than 20 levels deep; flatten it"}]


@pytest.mark.parametrize("depth", [23, 500])
def test_a_jsonl_line_nested_past_the_limit_is_a_400_naming_the_row(api, depth):
    # 107 bytes at depth 23 cost 7.4 s of CPU; depth 500 raised RecursionError (a 500)
    line = json.dumps({"question": _nested(depth), "answer": "b"}).encode() + b"\n"
    response = _upload(api, "faq", line, "faq.jsonl")
    assert response.status_code == 400
    assert response.json()["error"] == (
        "faq.jsonl: no usable row in the file (first problem: row 1, field (row): "
        "the JSON nests more than 20 levels deep; send flatter data.).")


def test_flattening_is_linear_in_the_size_of_the_cell(tmp_path):
    # 60 rows of questions nested 19 deep: allowed, and each used to cost 2^19 calls
    path = tmp_path / "deep.json"
    path.write_text(json.dumps([{"question": _nested(19, f"q{i}"), "answer": [["a"], [], [None, "b"]]}
                                for i in range(60)]))
    report = ImportReport()
    started = time.process_time()
    rows = list(importers.validate_rows(importers.read_upload(path, "deep.json", report).documents, report))
    assert time.process_time() - started < 2
    assert [(r.title, r.body) for r in rows[:2]] == [("q0", "a, b"), ("q1", "a, b")]
    assert report.rows_accepted == 60


def _reference_cell(value) -> str:
    """The old recursive definition, for values shallow enough to run it."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        return ", ".join(_reference_cell(v) for v in value if _reference_cell(v))
    return str(value)


cell_values = st.recursive(
    st.none() | st.integers(-10**6, 10**6) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4),
    max_leaves=30,
)


def _list_depth(value) -> int:
    return 1 + max((_list_depth(v) for v in value), default=0) if isinstance(value, list) else 0


@hsettings(max_examples=200, deadline=None)
@given(value=cell_values)
def test_flattened_cells_match_the_recursive_definition(value):
    assert tabular._cell(value) == _reference_cell(value)


@hsettings(max_examples=50, deadline=None)
@given(depth=st.integers(min_value=0, max_value=400), leaf=st.text(max_size=5))
def test_any_depth_is_flattened_or_refused_never_recursed(depth, leaf):
    value = _nested(depth, leaf)
    if depth <= json_limits.MAX_DEPTH:
        assert tabular._cell(value) == leaf.strip()
    else:
        with pytest.raises(CellError, match="nested more than 20 levels deep"):
            tabular._cell(value)


# --- Item 8: JSON that raised RecursionError or ValueError ---------------------------------------


@pytest.mark.parametrize("bad_line", [1, 2])
def test_deep_json_in_any_jsonl_line_rejects_that_row(api, bad_line):
    good = json.dumps({"question": "Reset password?", "answer": "Use the link."})
    deep = '{"question": ' + "[" * 5000 + "]" * 5000 + ', "answer": "b"}'
    lines = [deep, good] if bad_line == 1 else [good, deep]
    response = _upload(api, "faq", "\n".join(lines).encode() + b"\n", "faq.jsonl")
    assert response.status_code == 201, response.content
    assert response.json()["import_report"]["errors"] == [
        {"row": bad_line, "key": "", "field": "(row)",
         "reason": "the JSON nests more than 20 levels deep; send flatter data."}]


def test_a_deeply_nested_mapping_form_field_is_a_400_naming_it(api):
    mapping = '{"title": ' + "[" * 5000 + "]" * 5000 + "}"
    for url in ("/api/datasets/", "/api/datasets/preview/"):
        response = api.post(url, {"name": "x", "kind": "qa", "mapping": mapping,
                                  "file": SimpleUploadedFile("f.csv", FAQ)}, format="multipart")
        assert response.status_code == 400, url
        assert response.json() == {
            "error": "mapping: the JSON nests more than 20 levels deep; send flatter data.",
            "fields": {"mapping": "the JSON nests more than 20 levels deep; send flatter data."}}


def test_a_5000_digit_number_in_an_export_is_a_400_naming_the_file(api):
    export = ('{"issues": [{"key": "A-1", "fields": {"summary": "Disk full", "votes": ' + "9" * 5000 + "}}]}")
    response = _upload(api, "jira", export.encode(), "export.json")
    assert response.status_code == 400
    assert response.json()["error"] == (
        "export.json: a number in the JSON is too long to read (Exceeds the limit (4300 digits) for integer "
        "string conversion: value has 5000 digits); export it as text.")


def test_a_5000_digit_number_in_a_jsonl_line_rejects_its_row(api):
    lines = ['{"question": "q?", "answer": "a", "votes": ' + "9" * 5000 + "}",
             '{"question": "Reset?", "answer": "Use the link."}']
    response = _upload(api, "faq", "\n".join(lines).encode(), "faq.jsonl")
    assert response.status_code == 201, response.content
    assert response.json()["import_report"]["errors"][0]["reason"] == (
        f"a number in the JSON has more than {sys.get_int_max_str_digits():,} digits; send it as a string.")


@pytest.mark.parametrize("body, message", [
    ('{"dataset": 1, "hyperparameters": ' + "[" * 5000 + "]" * 5000 + "}",
     "request body: the JSON nests more than 20 levels deep; send flatter data."),
    ('{"dataset": ' + "9" * 5000 + "}",
     "request body: a number in the JSON has more than 4,300 digits; send it as a string."),
    ('{"dataset": NaN}', "request body: NaN is not a JSON number."),
])
def test_json_bodies_that_crashed_the_parser_are_a_400(api, body, message):
    response = api.post("/api/runs/", body, content_type="application/json")
    assert response.status_code == 400
    assert response.json() == {"error": message}


def test_nul_is_removed_from_values_and_a_typed_backslash_u0000_is_kept(api, web):
    # Given an export whose labels hold a real NUL and the typed text \u0000 (a Windows path, say)
    issue = {"key": "A-1", "fields": {"summary": "Disk full", "labels": ["C:\\u0000dir", "a\u0000b"],
                                      "created": {"when\u0000": "x\\u0000"}}}
    content = json.dumps({"issues": [issue]}).encode()
    preview = api.post("/api/datasets/preview/", {"file": SimpleUploadedFile("e.json", content)}, format="multipart")
    assert preview.status_code == 200
    assert preview.json()["rows"][0]["metadata"]["labels"] == ["C:\\u0000dir", "ab"]
    # When it is imported, Then the import succeeds with the same values (it was a 500 after a clean preview)
    response = _upload(api, "nul", content, "e.json")
    assert response.status_code == 201, response.content
    metadata = Document.objects.get(external_key="A-1").metadata
    assert (metadata["labels"], metadata["created"]) == (["C:\\u0000dir", "ab"], {"when": "x\\u0000"})


@hsettings(max_examples=150, deadline=None)
@given(value=st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.sampled_from(["a", "\x00", "\\", "u", "0", "é"])),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.text(alphabet=st.sampled_from(["k", "\x00", "\\"]), max_size=3), children, max_size=3),
    max_leaves=20,
))
def test_canonical_metadata_is_valid_json_with_nul_removed_from_every_string(value):
    def without_nul(v):
        if isinstance(v, str):
            return v.replace("\x00", "")
        if isinstance(v, list):
            return [without_nul(x) for x in v]
        if isinstance(v, dict):
            return {without_nul(k): without_nul(x) for k, x in v.items()}
        return v

    text = importers.canonical_json({"m": value})
    assert "\x00" not in text and "\\u0000" not in text.replace("\\\\", "")
    assert json.loads(text) == {"m": without_nul(value)}


@pytest.mark.parametrize("mapping, message", [
    ({"title": ["question"], "body": "answer"}, 'mapping: the title column must be a column name (text), got ["question"].'),
    ({"title": 5, "body": "answer"}, "mapping: the title column must be a column name (text), got 5."),
    ({"title": "q", "body": "a", "attributes": 5}, "mapping: attributes must be a column name or a list of column "
                                                   "names (text), got 5."),
    ({"title": "q", "body": "a", "attributes": ["x", {"y": 1}]}, "mapping: attributes must be a column name or a "
                                                                 'list of column names (text), got ["x", {"y": 1}].'),
])
def test_put_mapping_with_a_non_text_column_is_a_400_naming_mapping(api, user, mapping, message):
    dataset = Dataset.objects.create(owner=user, name="faq", kind="qa")
    response = api.put(f"/api/datasets/{dataset.pk}/mapping/", {"mapping": mapping}, format="json")
    assert response.status_code == 400
    assert response.json() == {"error": message, "fields": {"mapping": message.partition(": ")[2]}}


# --- Item 8: files joined end to end, spreadsheet formulas -------------------------------------


def test_two_gzip_members_joined_do_not_import_the_second_header_as_a_document(api):
    part1 = gzip.compress(b"question,answer\nHow do I reset my password?,Use the reset link.\n")
    part2 = gzip.compress(b"question,answer\nWhere is my invoice?,Under Billing.\n")
    response = _upload(api, "joined", part1 + part2, "faq.csv.gz")
    assert response.status_code == 201, response.content
    report = response.json()["import_report"]
    assert (report["rows_read"], report["rows_accepted"], report["rows_rejected"]) == (3, 2, 1)
    reason = ("repeats the header row (two files joined together?); remove this line or upload the files one by one")
    assert report["errors"] == [{"row": 2, "key": "", "field": "(row)", "reason": reason}]
    assert sorted(Document.objects.values_list("title", flat=True)) == ["How do I reset my password?",
                                                                        "Where is my invoice?"]
    strict = _upload(api, "joined-strict", part1 + part2, "faq.csv.gz", strict="true")
    assert strict.status_code == 400
    assert strict.json()["error"] == ("strict: 1 row(s) rejected, so nothing was imported (strict mode). "
                                      f"First: row 2, field (row): {reason}.")


def test_vector_csv_export_neutralises_every_formula_prefix(api, user):
    dataset = Dataset.objects.create(owner=user, name="cells")
    titles = ["=1+1", "+1", "-1", "@SUM(A1)", "\tcmd", "\r=1+1", "plain"]
    docs = Document.objects.bulk_create([Document(dataset=dataset, external_key=f"K-{i}", title=t, body="",
                                                  content_hash=f"h{i}") for i, t in enumerate(titles)])
    version = ModelVersion.objects.create(owner=user, name="cells", version=1, base_model="x", artifact_path="/x",
                                          dimensions=4, dataset=dataset)
    store_embeddings(model_version=version, doc_ids=[d.pk for d in docs], vectors=np.eye(len(docs), 4, dtype=np.float32))
    response = api.get(f"/api/models/{version.pk}/embeddings/?as=csv")
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode(), newline="")))
    assert [r[1] for r in rows[1:]] == ["'=1+1", "'+1", "'-1", "'@SUM(A1)", "'\tcmd", "'\r=1+1", "plain"]


# --- Item 7: pagination ----------------------------------------------------------------------------


@pytest.fixture
def many_datasets(user):
    Dataset.objects.bulk_create([Dataset(owner=user, name=f"d{i:03}") for i in range(230)])


@pytest.mark.parametrize("query, count", [
    ("limit=10000000", 200),
    ("limit=99999999999999999999", 200),
    ("limit=" + "9" * 5000, 200),
    ("limit=0", 1),
    ("offset=99999999999999999999", 0),
    ("offset=225&limit=99999999999999999999", 5),
    ("", 50),
])
def test_list_pages_are_clamped_to_200_rows(api, many_datasets, query, count):
    response = api.get(f"/api/datasets/?{query}")
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["count"], len(body["results"])) == (230, count)


@pytest.mark.parametrize("url", ["/api/datasets/", "/api/imports/", "/api/runs/", "/api/models/", "/api/indexes/",
                                 "/api/duplicates/", "/api/index-jobs/"])
def test_every_list_endpoint_takes_a_huge_limit_and_offset(api, url):
    for query in ("limit=99999999999999999999", "offset=99999999999999999999", "limit=-1"):
        response = api.get(f"{url}?{query}")
        if query == "limit=-1":
            assert response.status_code == 400
            assert response.json()["fields"] == {"limit": "must be a whole number from 1 to 200, got '-1'."}
        else:
            assert response.status_code == 200, (url, query, response.content)
            assert response.json()["results"] == []


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.one_of(st.none(), st.text(max_size=30), st.integers(-5, 10**30).map(str)),
       offset=st.one_of(st.none(), st.text(max_size=30), st.integers(-5, 10**30).map(str)))
def test_any_pagination_parameters_give_a_bounded_page_or_a_400_naming_them(api, user, limit, offset):
    if not Dataset.objects.filter(owner=user).exists():
        Dataset.objects.bulk_create([Dataset(owner=user, name=f"d{i}") for i in range(3)])
    params = {k: v for k, v in (("limit", limit), ("offset", offset)) if v is not None}
    response = api.get("/api/datasets/", params)
    assert response.status_code in (200, 400), response.content
    if response.status_code == 200:
        assert len(response.json()["results"]) <= 3
    else:
        assert set(response.json()["fields"]) <= {"limit", "offset"} and response.json()["fields"]


# --- Item 7: request bodies ------------------------------------------------------------------------


def test_a_json_body_above_the_cap_is_refused_unread(api, settings):
    settings.MAX_JSON_BODY_MB = 1
    message = ("The request body is larger than the 1 MB limit for JSON and form data "
               "(EMBEDPORTAL_MAX_JSON_BODY_MB); send less per request, or upload a file.")
    big = json.dumps({"texts": ["x" * 1000] * 1100})
    response = api.post("/api/embed", big, content_type="application/json")
    assert (response.status_code, response.json()) == (413, {"error": message})
    form = api.post("/api/runs/", "dataset=1&base_model=" + "x" * 1_100_000,
                    content_type="application/x-www-form-urlencoded")
    assert (form.status_code, form.json()) == (413, {"error": message})
    small = api.post("/api/runs/", {"dataset": 999}, format="json")
    assert small.json() == {"error": "dataset: No dataset 999 of yours.", "fields": {"dataset": "No dataset 999 of yours."}}


# --- Item 7: decompression guards ----------------------------------------------------------------------


def _rows_csv(n: int) -> bytes:
    # Varied text: gzip shrinks it ~4x, far below the 200x bomb ratio.
    return b"question,answer\n" + b"".join(b"question %d about %x?,answer %d\n" % (i, i * 7919, i) for i in range(n))


def _lying_gzip(content: bytes) -> bytes:
    packed = gzip.compress(content)
    return packed[:-4] + (1000).to_bytes(4, "little")  # the trailer claims 1,000 bytes


EXPANDS = re.compile(r"x\.csv\.gz: the compressed file expands to more than 2 MB, the limit for a compressed upload "
                     r"here \(EMBEDPORTAL_MAX_DECOMPRESSED_MB; during a web request, twice "
                     r"EMBEDPORTAL_BACKGROUND_IMPORT_MB\)\. Upload it uncompressed, or split it into smaller files\.")


def test_a_gzip_below_the_threshold_cannot_expand_in_a_web_request(api, web, settings, tmp_path):
    # Given a 1 MB background threshold (so at most 2 MB may expand in a request) and a gzip whose
    # trailer lies about its size: 0.9 MB on the wire, 3 MB of CSV inside
    settings.BACKGROUND_IMPORT_MB = 1
    settings.UPLOADS_DIR = tmp_path / "uploads"
    content = _lying_gzip(_rows_csv(90_000))
    assert len(content) < 1024 * 1024 < 2 * 1024 * 1024 < len(gzip.decompress(gzip.compress(_rows_csv(90_000))))
    # When it is uploaded through the API, previewed, or uploaded on the page, Then each is a 400 naming the file
    response = _upload(api, "bomb", content, "x.csv.gz")
    assert response.status_code == 400
    assert EXPANDS.match(response.json()["error"]), response.json()
    # (a preview reads only its first 10,000 rows, 0.3 MB: it stops long before the cap)
    preview = api.post("/api/datasets/preview/", {"file": SimpleUploadedFile("x.csv.gz", content)}, format="multipart")
    assert (preview.status_code, preview.json()["partial"], preview.json()["rows_checked"]) == (200, True, 10_000)
    page = web.post("/datasets/", {"name": "bomb", "file": SimpleUploadedFile("x.csv.gz", content)})
    assert page.status_code == 400 and EXPANDS.search(page.content.decode())
    assert Dataset.objects.count() == 0


def test_an_honest_gzip_that_expands_past_the_request_cap_goes_to_a_background_job(api, settings, tmp_path):
    settings.BACKGROUND_IMPORT_MB = 1
    settings.UPLOADS_DIR = tmp_path / "uploads"
    content = gzip.compress(_rows_csv(90_000))
    response = _upload(api, "honest", content, "x.csv.gz")
    assert response.status_code == 202, response.content
    assert ImportJob.objects.get().status == ImportJob.Status.QUEUED


def test_the_worker_cap_stops_a_gzip_that_expands_past_the_decompressed_limit(user, settings, tmp_path):
    settings.MAX_DECOMPRESSED_MB = 2
    path = tmp_path / "x.csv.gz"
    path.write_bytes(gzip.compress(_rows_csv(90_000)))
    with pytest.raises(ServiceError) as exc:
        datasets.import_dataset(owner=user, name="big", path=path, filename="x.csv.gz", background=True)
    assert EXPANDS.match(str(exc.value))


def test_a_zip_member_declaring_more_than_the_cap_is_refused_before_reading(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.csv", _rows_csv(90_000))
    path = tmp_path / "x.zip"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UploadError) as exc:
        importers.read_upload(path, "x.zip", ImportReport(), max_bytes=2 * 1024 * 1024)
    assert str(exc.value).startswith("x.zip: a.csv: the compressed file expands to more than 2 MB")


def test_a_parquet_file_whose_rows_expand_past_the_cap_is_a_400(api, settings, tmp_path):
    # 20,000 rows of one 1,000-character answer: a few KB with dictionary encoding, 20 MB decoded
    settings.BACKGROUND_IMPORT_MB = 1
    answers = pa.DictionaryArray.from_arrays(pa.array(np.zeros(20_000, dtype=np.int32)), pa.array(["a" * 1000]))
    table = pa.table({"question": [f"q{i}?" for i in range(20_000)], "answer": answers})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    assert len(buffer.getvalue()) < 200_000
    response = _upload(api, "pq", buffer.getvalue(), "x.parquet")
    assert response.status_code == 400
    assert response.json()["error"].startswith("x.parquet: the compressed file expands to more than 2 MB")


# --- Item 7: previews and kept uploads --------------------------------------------------------------


def test_a_preview_checks_a_bounded_number_of_rows(api):
    response = api.post("/api/datasets/preview/", {"file": SimpleUploadedFile("big.csv", _rows_csv(10_050))},
                        format="multipart")
    assert response.status_code == 200
    body = response.json()
    assert (body["partial"], body["rows_checked"], body["report"]["rows_read"], len(body["rows"])) == (
        True, 10_000, 10_000, 10)
    small = api.post("/api/datasets/preview/", {"file": SimpleUploadedFile("f.csv", FAQ)}, format="multipart")
    assert (small.json()["partial"], small.json()["rows_checked"]) == (False, 1)


def test_kept_uploads_count_against_a_per_user_quota(api, other_user, settings, tmp_path):
    settings.STAGED_UPLOAD_QUOTA_MB = 1
    settings.UPLOADS_DIR = tmp_path / "uploads"
    content = _rows_csv(16_000)  # 0.6 MB
    first = api.post("/api/datasets/preview/", {"file": SimpleUploadedFile("a.csv", content), "keep": "true",
                                                "name": "a"}, format="multipart")
    assert first.status_code == 200, first.content
    second = api.post("/api/datasets/preview/", {"file": SimpleUploadedFile("b.csv", content), "keep": "true",
                                                 "name": "b"}, format="multipart")
    assert second.status_code == 400
    assert second.json()["error"] == (
        "file: b.csv (0.6 MB) does not fit: your kept and running uploads take 0.6 MB of your 1 MB "
        "(EMBEDPORTAL_STAGED_UPLOAD_QUOTA_MB). Import or wait for them, or let unused previews expire (after a day).")
    assert len(list(settings.UPLOADS_DIR.iterdir())) == 1
    # Another user's quota is their own
    from training import import_jobs

    job = import_jobs.stage(owner=other_user, upload=SimpleUploadedFile("c.csv", content), name="c")
    assert job.status == ImportJob.Status.STAGED


# --- Item 7: /setup/ -----------------------------------------------------------------------------------


def test_setup_details_are_for_staff_only(client, user, settings, tiny_model_dir):
    settings.DEFAULT_BASE_MODEL = str(tiny_model_dir)
    client.force_login(user)
    page = client.get("/setup/").content.decode()
    assert "package django" in page and "database" in page
    for secret in (sys.executable, "PostgreSQL", "GB free", str(settings.MODELS_DIR),
                   settings.CELERY_BROKER_URL.split("@")[-1]):
        assert secret not in page, secret
    staff = get_user_model().objects.create_user(username="ops", password="pw-ops-12345", is_staff=True)
    client.force_login(staff)
    details = client.get("/setup/").content.decode()
    assert sys.executable in details and "PostgreSQL" in details and str(settings.MODELS_DIR) in details
