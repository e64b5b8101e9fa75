"""Q&A imports: the same question answered twice is kept as two documents or merged, by the user's choice
(issue 16); every merged row is listed with its reason and read = accepted + rejected + merged."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from hypothesis import HealthCheck, given, settings as hsettings
from hypothesis import strategies as st

from tests.conftest import SHARED_DATA
from training import datasets, importers
from training.errors import ServiceError
from training.importers import ImportReport, RowLimitReached
from training.models import Dataset

FAQ = (
    "question,answer,category\n"
    "How do I reset my password?,Use the reset link on the login page.,account\n"
    "Where is my card?,Cards arrive within 5 days.,cards\n"
    "How do I reset my password?,Call the help desk.,account\n"
    "how do I   reset my password?,Use the reset link on the login page.,account\n"
    "Where is my card?,Cards arrive within 5 days.,cards\n"
)


def read(path: Path, mode: str, **kwargs):
    report = ImportReport(**kwargs)
    upload = importers.read_upload(path, path.name, report, repeated_questions=mode)
    return list(importers.validate_rows(upload.documents, report)), report


@pytest.fixture
def faq(tmp_path) -> Path:
    path = tmp_path / "faq.csv"
    path.write_text(FAQ)
    return path


def test_keep_makes_each_answer_its_own_document_and_merges_identical_rows(faq):
    rows, report = read(faq, "keep")
    assert [(r.row, r.title, r.body) for r in rows] == [
        (1, "How do I reset my password?", "Use the reset link on the login page."),
        (2, "Where is my card?", "Cards arrive within 5 days."),
        (3, "How do I reset my password?", "Call the help desk."),
        (4, "how do I   reset my password?", "Use the reset link on the login page."),
    ]
    # Row 4 has row 1's key (the key ignores case and spacing) but other text: kept under a key of its own.
    assert rows[3].external_key == rows[0].external_key + "-2"
    assert (report.rows_read, report.rows_accepted, report.rows_rejected, report.duplicates) == (5, 4, 0, 1)
    assert report.merged == [{"row": 5, "key": rows[1].external_key, "reason": "the same as row 2: merged into it"}]


def test_merge_makes_one_document_per_question_listing_each_merged_row(faq):
    rows, report = read(faq, "merge")
    assert [(r.row, r.title, r.body) for r in rows] == [
        (1, "How do I reset my password?", "Use the reset link on the login page.\n\nCall the help desk."),
        (2, "Where is my card?", "Cards arrive within 5 days."),
    ]
    assert (report.rows_read, report.rows_accepted, report.rows_rejected, report.duplicates) == (5, 2, 0, 3)
    assert [(m["row"], m["reason"]) for m in report.merged] == [
        (3, "the same question as row 1: its answer was added to that row's document"),
        (4, "the same question and answer as row 1: merged into it"),
        (5, "the same question and answer as row 2: merged into it"),
    ]
    assert [(e["row"], e["field"]) for e in report.all_errors] == [(3, "(merged)"), (4, "(merged)"), (5, "(merged)")]


def test_unknown_choice_is_refused_naming_the_field(faq):
    with pytest.raises(importers.UploadError, match="^repeated_questions: 'drop' is not one of keep, merge"):
        read(faq, "drop")


def test_merge_in_a_preview_still_yields_the_rows_read_before_the_limit(faq):
    rows, report = [], ImportReport(row_limit=3)
    upload = importers.read_upload(faq, faq.name, report, repeated_questions="merge")
    with pytest.raises(RowLimitReached):
        for row in importers.validate_rows(upload.documents, report):
            rows.append(row)
    assert [r.row for r in rows] == [1, 2]
    assert report.duplicates == 1


def test_merge_refuses_a_file_too_big_to_hold_saying_what_to_do(faq):
    report = ImportReport()
    upload = importers.read_upload(faq, faq.name, report)
    with pytest.raises(importers.UploadError, match="^repeated_questions: the file is too big to merge"):
        list(importers.merge_repeated_questions(upload.documents, report, max_chars=50))


@pytest.mark.parametrize("mode, documents, merged", [("keep", 1487, 277), ("merge", 1316, 448)])
def test_bank_faq_rows_all_accounted_for(mode, documents, merged):
    rows, report = read(SHARED_DATA / "qa" / "bank-faq.csv", mode)
    assert (report.rows_read, len(rows), report.rows_rejected, report.duplicates) == (1764, documents, 0, merged)


@pytest.mark.parametrize("mode, documents, merged", [("keep", 212, 1), ("merge", 208, 5)])
def test_covid_faq_rows_all_accounted_for(mode, documents, merged):
    rows, report = read(SHARED_DATA / "qa" / "covid-faq.csv", mode)
    assert (report.rows_read, len(rows), report.rows_rejected, report.duplicates) == (213, documents, 0, merged)


def test_stackfaq_question_asked_twice_with_other_answers_is_kept_or_merged(tmp_path):
    path = tmp_path / "faq.json"
    path.write_text(json.dumps({"root": {"qapair": [
        {"question": "Why?", "answer": ["Because."]}, {"question": "Why?", "answer": ["Just so."]}]}}))
    kept, report = read(path, "keep")
    assert [(r.body, r.external_key.endswith("-2")) for r in kept] == [("Because.", False), ("Just so.", True)]
    assert report.rows_rejected == 0
    merged, report = read(path, "merge")
    assert [r.body for r in merged] == ["Because.\n\nJust so."]


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.sampled_from(["A?", "a?", "B?", " A? "]), st.sampled_from(["x", "y", "X", ""])),
                     min_size=1, max_size=12),
       mode=st.sampled_from(["keep", "merge"]))
def test_fuzzed_qa_rows_are_all_accounted_for(tmp_path, rows, mode):
    path = tmp_path / "fuzz.csv"
    path.write_text("question,answer\n" + "".join(f"{q},{a}\n" for q, a in rows))
    staged, report = read(path, mode)
    assert report.rows_read == report.rows_accepted + report.rows_rejected + report.duplicates == len(rows)
    assert len(staged) == report.rows_accepted
    assert len({r.external_key for r in staged}) == len(staged)


# --- Through the service, the pages and the API -------------------------------------------------------------


@pytest.mark.django_db
def test_import_dataset_remembers_the_choice_for_the_next_version(user, faq):
    dataset = datasets.import_dataset(owner=user, name="faq", path=faq, filename="faq.csv", repeated_questions="merge")
    assert (dataset.repeated_questions, dataset.documents.count()) == ("merge", 2)
    assert dataset.import_report["rows_merged"] == 3
    version = datasets.add_version(dataset=dataset, path=faq, filename="faq.csv")
    assert (version.report["rows_merged"], version.added, version.unchanged) == (3, 0, 2)
    version = datasets.add_version(dataset=dataset, path=faq, filename="faq.csv", repeated_questions="keep")
    dataset.refresh_from_db()
    assert (dataset.repeated_questions, version.added, dataset.documents.count()) == ("keep", 2, 4)


@pytest.mark.django_db
def test_upload_page_offers_the_choice_with_its_default_and_imports_by_it(web, faq):
    page = web.get("/datasets/").content.decode()
    assert re.search(r'name="repeated_questions" value="keep"[^>]*checked', page)
    assert not re.search(r'name="repeated_questions" value="merge"[^>]*checked', page)
    assert "Keep each answer as its own document (default)" in page
    response = web.post("/datasets/", {"name": "faq", "kind": "qa", "repeated_questions": "merge", "language": "english",
                                       "file": SimpleUploadedFile("faq.csv", FAQ.encode()), "action": "import"})
    assert response.status_code == 302
    dataset = Dataset.objects.get(name="faq")
    assert (dataset.repeated_questions, dataset.documents.count()) == ("merge", 2)
    detail = web.get(f"/datasets/{dataset.pk}/").content.decode()
    assert "the same question as row 1: its answer was added to that row&#x27;s document" in detail
    assert "read 5 = accepted 2 + rejected 0 + merged 3" in detail


@pytest.mark.django_db
def test_upload_page_preview_shows_the_merged_rows(web, faq):
    response = web.post("/datasets/", {"name": "faq", "kind": "qa", "repeated_questions": "merge", "language": "english",
                                       "file": SimpleUploadedFile("faq.csv", FAQ.encode()), "action": "preview"})
    page = response.content.decode()
    assert response.status_code == 200
    assert "Merged rows" in page and "the same question and answer as row 2: merged into it" in page


@pytest.mark.django_db
def test_api_upload_takes_the_choice_and_refuses_an_unknown_one_naming_the_field(api, faq):
    response = api.post("/api/datasets/", {"name": "faq", "file": SimpleUploadedFile("faq.csv", FAQ.encode()),
                                           "repeated_questions": "merge"}, format="multipart")
    assert response.status_code == 201
    body = response.json()
    assert (body["document_count"], body["repeated_questions"], body["import_report"]["rows_merged"]) == (2, "merge", 3)
    refused = api.post("/api/datasets/", {"name": "faq2", "file": SimpleUploadedFile("faq.csv", FAQ.encode()),
                                          "repeated_questions": "drop"}, format="multipart")
    assert refused.status_code == 400
    assert list(refused.json()["fields"]) == ["repeated_questions"]
    assert not Dataset.objects.filter(name="faq2").exists()


@pytest.mark.django_db
def test_api_preview_default_keeps_each_answer(api, faq):
    response = api.post("/api/datasets/preview/", {"file": SimpleUploadedFile("faq.csv", FAQ.encode())},
                        format="multipart")
    assert response.status_code == 200
    report = response.json()["report"]
    assert (report["rows_accepted"], report["rows_merged"]) == (4, 1)


@pytest.mark.django_db
def test_staged_import_uses_the_choice_made_at_preview(user, faq):
    from training import import_jobs

    job, preview = import_jobs.stage_and_preview(owner=user, upload=SimpleUploadedFile("faq.csv", FAQ.encode()),
                                                 name="faq", repeated_questions="merge")
    assert (job.repeated_questions, preview["report"]["rows_merged"]) == ("merge", 3)
    job = import_jobs.start(job=job, background=False)
    assert (job.dataset.repeated_questions, job.dataset.documents.count()) == ("merge", 2)


def test_service_check_names_the_field():
    with pytest.raises(ServiceError, match="^repeated_questions: 'x' is not one of keep, merge"):
        datasets.check_repeated_questions("x")
