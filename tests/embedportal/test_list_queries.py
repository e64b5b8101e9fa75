"""Every list endpoint and list page costs the same number of queries for one item as for three (no N+1)."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from search.models import SearchIndex
from training.models import Dataset, ImportJob, ModelVersion, TrainingRun


def _make(user, n: int) -> None:
    """n more of everything a list shows, each with the relations its serializer or template follows."""
    start = Dataset.objects.filter(owner=user).count()
    for i in range(start, start + n):
        dataset = Dataset.objects.create(owner=user, name=f"tickets-{i}")
        run = TrainingRun.objects.create(owner=user, dataset=dataset, base_model="tiny", status="succeeded")
        version = ModelVersion.objects.create(owner=user, name=dataset.name, version=1, base_model="tiny",
                                              artifact_path=f"/nowhere/{i}", dimensions=32, dataset=dataset,
                                              source_run=run, created_by=user)
        SearchIndex.objects.create(owner=user, dataset=dataset, model_version=version, status="ready")
        ImportJob.objects.create(owner=user, dataset=dataset, filename=f"export-{i}.json", file_path="",
                                 status="succeeded", size_bytes=10)


def _queries(client, url: str) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200, (url, response.status_code)
    return len(captured)


API_LISTS = ["/api/datasets/", "/api/imports/", "/api/runs/", "/api/models/", "/api/indexes/",
             "/api/index-jobs/", "/api/duplicates/"]
PAGES = ["/datasets/", "/models/", "/search/", "/"]


@pytest.mark.parametrize("url", API_LISTS)
def test_list_endpoint_query_count_is_the_same_for_one_and_three(api, user, other_user, url):
    # Given one item of each kind, when the list is read, count its queries
    _make(user, 1)
    one = _queries(api, url)
    # Given three, the count is the same
    _make(user, 2)
    assert _queries(api, url) == one


@pytest.mark.parametrize("url", PAGES)
def test_list_page_query_count_is_the_same_for_one_and_three(web, user, url):
    _make(user, 1)
    one = _queries(web, url)
    _make(user, 2)
    assert _queries(web, url) == one
