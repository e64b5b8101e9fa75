"""Upload errors appear at the top of the page, at the form that was used, without the API's "field:" prefix or
internal paths (issue 16)."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from training import import_jobs
from training.models import Dataset

pytestmark = pytest.mark.django_db

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 64


def test_datasets_page_shows_the_upload_form_with_its_error_first(web, user):
    Dataset.objects.create(owner=user, name="older")
    response = web.post("/datasets/", {"name": "shots", "file": SimpleUploadedFile("shots.csv", PNG),
                                       "language": "english", "action": "import"})
    html = response.content.decode()
    assert response.status_code == 400
    error = html.index('<div class="error-summary" role="alert"><strong>Nothing was imported.</strong>')
    assert html.index('<div class="card" id="upload">') < error < html.index("older")  # above the dataset list
    assert "this looks like a PNG image" in html
    assert "file: " not in html and "../shared" not in html and "DATA.md" not in html


def test_datasets_page_keeps_the_form_below_the_list_without_errors(web, user):
    Dataset.objects.create(owner=user, name="older")
    html = web.get("/datasets/").content.decode()
    assert html.index("older") < html.index('<div class="card" id="upload">')


def test_dataset_page_puts_a_version_upload_error_at_the_top(web, user):
    dataset = Dataset.objects.create(owner=user, name="hadoop")
    response = web.post(f"/datasets/{dataset.pk}/upload", {"file": SimpleUploadedFile("v2.csv", PNG)})
    html = response.content.decode()
    assert response.status_code == 400
    top = html.index("The upload was not imported; nothing changed.")
    assert top < html.index("Last import") and '<a href="#upload-version">To the upload form</a>' in html
    assert "file: " not in html


def test_staged_import_refused_says_why_without_the_field_prefix(web, user):
    Dataset.objects.create(owner=user, name="taken")
    job = import_jobs.stage(owner=user, upload=SimpleUploadedFile("faq.csv", b"question,answer\nQ?,A\n"), name="x")
    response = web.post("/datasets/", {"action": "import_staged", "staged": job.pk, "name": "taken"}, follow=True)
    html = response.content.decode()
    assert "You already have a dataset called &#x27;taken&#x27;; pick another name. The previewed file is still " \
           "kept" in html
    assert "name: you already" not in html


def test_dashboard_upload_names_every_format_and_offers_the_preview(web):
    html = web.get("/").content.decode()
    assert ("File: Jira REST JSON (.json, .json.gz, .zip), Jira CSV export, duplicate links CSV, Q&amp;A CSV/JSONL, "
            "StackFAQ JSON, pairs, triplets, text + label, or any CSV/JSONL/Parquet with a column mapping") in html
    assert '<button type="submit" name="action" value="preview">Preview</button>' in html
