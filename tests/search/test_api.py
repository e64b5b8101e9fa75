"""Search API and pages (issue 6): parameters, errors, schema, similar tickets, duplicates, query counts."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from search import indexing
from search.models import DuplicatePair, SearchIndex
from training.datasets import refresh_search_vectors
from training.models import Dataset, Document, ModelVersion

pytestmark = pytest.mark.django_db(transaction=True)

TICKETS = [
    ("HDFS-1", "NameNode fails to start after upgrade", "The namenode crashes with an IOException on startup",
     "Blocker", ["namenode"]),
    ("HDFS-2", "DataNode disk full", "A datanode volume fills up and the node stops", "Major", ["datanode"]),
    ("HDFS-3", "DataNode disk full again", "A datanode volume fills up and the node stops", "Major", ["datanode"]),
    ("YARN-4", "ResourceManager web UI shows wrong memory", "Memory column is off by 1024", "Minor", ["yarn"]),
    ("HDFS-5", "Balancer too slow", "Balancer moves blocks at 1 MB/s between datanode hosts", "Major", ["balancer"]),
]


@pytest.fixture
def index(user, tiny_model_dir):
    ds = Dataset.objects.create(owner=user, name="mini")
    Document.objects.bulk_create([
        Document(dataset=ds, external_key=k, title=t, body=b,
                 metadata={"issue_type": "Bug", "priority": p, "status": "Open", "components": c, "labels": [],
                           "created": "2015-05-05T00:00:00.000+0000"})
        for k, t, b, p, c in TICKETS
    ])
    refresh_search_vectors(dataset=ds)
    version = ModelVersion.objects.create(owner=user, name="mini", version=1, base_model="tiny",
                                          artifact_path=str(tiny_model_dir), dimensions=32, dataset=ds,
                                          stage=ModelVersion.Stage.PRODUCTION)
    index = SearchIndex.objects.create(owner=user, dataset=ds, model_version=version)
    return indexing.build_index(index=index)


def test_search_api_returns_breakdown_filters_and_paging(api, index):
    response = api.get(f"/api/indexes/{index.pk}/search/",
                       {"q": "datanode", "mode": "keyword", "k": 1, "priority": "Major", "component": ["datanode"]})
    body = response.json()
    assert response.status_code == 200
    assert [r["key"] for r in body["results"]] == ["HDFS-2"]
    assert (body["page"], body["k"], body["has_more"], body["filters"]) == (
        1, 1, True, {"priority": ["Major"], "component": ["datanode"]}
    )
    assert body["results"][0]["keyword_rank"] == 1
    assert body["results"][0]["snippet_html"] == "<mark>datanode</mark> volume fills up and the node stops"
    page2 = api.get(f"/api/indexes/{index.pk}/search/", {"q": "datanode", "mode": "keyword", "k": 1, "page": 2,
                                                           "priority": "Major", "component": "datanode"}).json()
    assert ([r["key"] for r in page2["results"]], page2["has_more"]) == (["HDFS-3"], False)


def test_search_api_hybrid_reports_fusion_and_timings(api, index):
    body = api.get(f"/api/indexes/{index.pk}/search/", {"q": "namenode upgrade", "k": 3}).json()
    assert body["fusion"] == {"method": "rrf", "rrf_k": 60}
    assert body["results"][0]["key"] == "HDFS-1"
    assert body["results"][0]["keyword_rank"] == 1
    assert set(body["timings_ms"]) == {"keyword", "embed", "vector", "total"}


@pytest.mark.parametrize("params, fields", [
    ({"q": "disk", "mode": "magic", "k": 1000}, {"mode", "k"}),
    ({"q": "disk", "created_from": "2020-01-02", "created_to": "2020-01-01"}, {"created_to"}),
    ({"q": "disk", "fusion": "weighted", "alpha": 2}, {"alpha"}),
    ({"q": "disk", "created_from": "yesterday"}, {"created_from"}),
])
def test_search_api_rejects_bad_parameters_by_field(api, index, params, fields):
    response = api.get(f"/api/indexes/{index.pk}/search/", params)
    assert response.status_code == 400
    assert set(response.json()["fields"]) == fields


@pytest.mark.parametrize("q, message", [("", "Type some words to search for."),
                                        ("?!* -- ;;", "The query has no words to search for.")])
def test_search_api_empty_and_punctuation_queries_answer_200(api, index, q, message):
    body = api.get(f"/api/indexes/{index.pk}/search/", {"q": q}).json()
    assert (body["results"], body["message"]) == ([], message)


def test_search_api_page_too_deep_is_400_with_field(api, index):
    response = api.get(f"/api/indexes/{index.pk}/search/", {"q": "disk", "k": 100, "page": 6})
    assert response.status_code == 400
    assert response.json()["fields"] == {"page": "must be between 1 and 5 for k=100 (results are paged up to the 500th)."}


def test_similar_api_by_key_excludes_the_ticket(api, index):
    body = api.get(f"/api/indexes/{index.pk}/similar/", {"key": "HDFS-2", "k": 2}).json()
    assert body["document"]["key"] == "HDFS-2"
    keys = [r["key"] for r in body["results"]]
    assert len(keys) == 2 and "HDFS-2" not in keys
    assert api.get(f"/api/indexes/{index.pk}/similar/", {"key": "NOPE-1"}).json()["fields"] == {
        "key": "No such document in this index's dataset."
    }


def test_schema_documents_search_similar_and_duplicates(api):
    schema = api.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    paths = schema["paths"]
    search_params = {p["name"] for p in paths["/api/indexes/{id}/search/"]["get"]["parameters"]}
    assert {"q", "mode", "k", "page", "fusion", "alpha", "rrf_k", "issue_type", "priority", "status", "component",
            "label", "category", "created_from", "created_to"} <= search_params
    assert "/api/indexes/{id}/similar/" in paths
    assert "/api/indexes/{id}/duplicates/scan/" in paths
    assert "/api/duplicates/{id}/decide/" in paths


def _pairs(index, n: int) -> None:
    docs = list(Document.objects.filter(dataset=index.dataset).order_by("id"))
    DuplicatePair.objects.bulk_create([
        DuplicatePair(dataset=index.dataset, document_a=docs[0], document_b=docs[i + 1], similarity=0.9 + i / 100)
        for i in range(n)
    ])


@pytest.mark.parametrize("n", [1, 3])
def test_duplicates_list_api_query_count_is_flat(api, index, n):
    _pairs(index, n)
    with CaptureQueriesContext(connection) as queries:
        body = api.get("/api/duplicates/", {"dataset": index.dataset_id, "decision": "pending"}).json()
    assert body["count"] == n
    assert [r["similarity"] for r in body["results"]] == sorted((0.9 + i / 100 for i in range(n)), reverse=True)
    assert len(queries) == 3  # token auth, count, page with both documents joined


@pytest.mark.parametrize("n", [1, 3])
def test_search_api_query_count_is_flat(api, index, n):
    with CaptureQueriesContext(connection) as queries:
        body = api.get(f"/api/indexes/{index.pk}/search/", {"q": "datanode OR namenode OR memory", "mode": "keyword",
                                                           "k": n}).json()
    assert len(body["results"]) == n
    # token auth, index, keyword ranking, documents with their snippets
    assert len(queries) == 4


@pytest.mark.parametrize("n", [1, 3])
def test_hybrid_search_api_is_one_statement_per_side(api, index, n):
    api.get(f"/api/indexes/{index.pk}/search/", {"q": "disk full", "k": n})  # the query vector is now cached
    with CaptureQueriesContext(connection) as queries:
        body = api.get(f"/api/indexes/{index.pk}/search/", {"q": "disk full", "k": n}).json()
    assert (len(body["results"]), body["query_encoder"]) == (n, {"backend": "onnx-int8", "cached": True})
    # token auth, index, keyword ranking, kNN (no BEGIN / SET LOCAL / COMMIT), documents with their snippets
    assert [q["sql"].split()[0] for q in queries.captured_queries] == ["SELECT", "SELECT", "SELECT", "WITH", "SELECT"]


def test_sessions_search_with_the_default_ef_search_and_iterative_scans(api, index):
    connection.close()
    with connection.cursor() as cursor:
        cursor.execute("SHOW hnsw.ef_search")
        ef_search = cursor.fetchone()[0]
        cursor.execute("SHOW hnsw.iterative_scan")
        assert (ef_search, cursor.fetchone()[0]) == ("100", "relaxed_order")
    # A page deeper than ef_search raises it for its own transaction only.
    body = api.get(f"/api/indexes/{index.pk}/search/", {"q": "disk full", "k": 100, "mode": "vector"}).json()
    assert len(body["results"]) == len(TICKETS)
    with connection.cursor() as cursor:
        cursor.execute("SHOW hnsw.ef_search")
        assert cursor.fetchone()[0] == "100"


def test_duplicate_decide_api_and_owner_scope(api, index, other_user):
    _pairs(index, 1)
    pair = DuplicatePair.objects.get()
    body = api.post(f"/api/duplicates/{pair.pk}/decide/", {"decision": "not_duplicate"}, format="json").json()
    assert (body["decision"], body["decided_by"]) == ("not_duplicate", "alice")
    other = APIClient()
    other.force_authenticate(other_user)
    assert other.post(f"/api/duplicates/{pair.pk}/decide/", {"decision": "duplicate"}, format="json").status_code == 404
    assert other.get("/api/duplicates/").json()["count"] == 0


def test_duplicate_scan_api_queues_and_refuses_bad_threshold(api, index):
    assert api.post(f"/api/indexes/{index.pk}/duplicates/scan/", {"threshold": 0.2}, format="json").json()["fields"] == {
        "threshold": "Ensure this value is greater than or equal to 0.5."
    }
    response = api.post(f"/api/indexes/{index.pk}/duplicates/scan/", {"threshold": 0.95}, format="json")
    body = response.json()
    assert (response.status_code, body["kind"], body["status"], body["params"]) == (
        202, "duplicates", "queued", {"threshold": 0.95})
    assert api.get(f"/api/index-jobs/{body['id']}/").json()["status"] == "queued"
    again = api.post(f"/api/indexes/{index.pk}/duplicates/scan/", {"threshold": 0.95}, format="json")
    assert (again.status_code, again.json()["error"]) == (409, "A duplicate scan of this index is already queued or running.")


# --- pages -----------------------------------------------------------------------


def test_search_page_shows_filters_breakdown_and_latency(web, index):
    response = web.get("/search/", {"q": "datanode disk", "mode": "hybrid", "priority": "Major"})
    html = response.content.decode()
    assert response.status_code == 200
    # The 3 Major tickets: the two with both words found by both sides, the balancer one by vectors only.
    assert html.count('class="result"') == 3
    assert '<option value="Major" selected>Major (3)</option>' in html
    assert html.count("keyword rank 1 ") == 1 and html.count("keyword rank 2 ") == 1
    assert html.count("keyword rank –") == 1 and html.count("vector rank –") == 0
    assert "<strong>" in html and " ms</strong>" in html
    assert f'href="/search/similar/{index.pk}/' in html


def test_search_page_bad_parameter_is_400_with_message(web, index):
    response = web.get("/search/", {"q": "disk", "k": "0"})
    assert response.status_code == 400
    assert "k: Ensure this value is greater than or equal to 1." in response.content.decode()


def test_compare_page_runs_query_on_two_versions(web, index, user, tiny_model_dir):
    v2 = ModelVersion.objects.create(owner=user, name="mini", version=2, base_model="tiny",
                                     artifact_path=str(tiny_model_dir), dimensions=32, dataset=index.dataset)
    other = indexing.build_index(index=SearchIndex.objects.create(owner=user, dataset=index.dataset, model_version=v2))
    html = web.get("/search/compare", {"q": "datanode", "a": index.pk, "b": other.pk, "mode": "keyword"}).content.decode()
    assert "mini v1" in html and "mini v2" in html
    # Same keyword results on both sides: every hit is on the other side at the same rank.
    assert html.count('class="result"') == 6
    assert "3 of the top 10 are on both sides." in html
    assert [html.count(f"rank {n} on the other side") for n in (1, 2, 3)] == [2, 2, 2]


def test_similar_page_lists_neighbours(web, index):
    doc = Document.objects.get(dataset=index.dataset, external_key="HDFS-2")
    html = web.get(f"/search/similar/{index.pk}/{doc.pk}").content.decode()
    assert html.count('class="result"') == 4


def test_similar_tickets_are_owner_scoped_with_one_answer(api, web, index, other_user):
    doc = Document.objects.get(dataset=index.dataset, external_key="HDFS-2")
    assert api.get(f"/api/indexes/{index.pk}/similar/", {"key": "HDFS-2"}).status_code == 200
    other = APIClient()
    other.force_authenticate(other_user)
    missing = other.get("/api/indexes/999999/similar/", {"key": "HDFS-2"})
    not_yours = other.get(f"/api/indexes/{index.pk}/similar/", {"key": "HDFS-2"})
    assert (missing.status_code, not_yours.status_code) == (404, 404)
    assert missing.json() == not_yours.json()
    web.force_login(other_user)
    assert web.get(f"/search/similar/{index.pk}/{doc.pk}").status_code == 404


@pytest.mark.parametrize("n", [1, 3])
def test_duplicates_page_query_count_is_flat(web, index, n, django_assert_num_queries):
    _pairs(index, n)
    # session, user, index, near-identical groups, latest scan job, count, page of pairs (documents joined)
    with django_assert_num_queries(7):
        html = web.get(f"/search/duplicates/{index.pk}").content.decode()
    assert html.count('<tr id="pair-') == n


def test_duplicate_decide_page_with_htmx_returns_row(web, index):
    _pairs(index, 1)
    pair = DuplicatePair.objects.get()
    response = web.post(f"/search/duplicates/pair/{pair.pk}/decide", {"decision": "duplicate"}, HTTP_HX_REQUEST="true")
    html = response.content.decode()
    assert f'<tr id="pair-{pair.pk}">' in html and ">Duplicate</span>" in html
    pair.refresh_from_db()
    assert pair.decision == "duplicate"


def test_similar_tickets_say_why_the_ticket_prior_placed_them(api, web, index):
    # Given an index whose tuned fusion carries a ticket prior, and HDFS-3 filed 12 days after HDFS-2
    SearchIndex.objects.filter(pk=index.pk).update(fusion={
        "method": "weighted", "alpha": 0.5, "tuned": True, "prior": {"filed": 1.2, "component": 0.2, "project": 0.3},
        "learned_prior": {"filed": 1.2, "component": 0.2, "project": 0.3, "queries": 9, "keyword_ndcg": 0.5,
                          "with_prior_ndcg": 0.6}})
    doc = Document.objects.get(dataset=index.dataset, external_key="HDFS-3")
    doc.metadata = {**doc.metadata, "created": "2015-05-17T00:00:00.000+0000"}
    doc.save()
    # When a client asks for HDFS-2's similar tickets
    results = api.get(f"/api/indexes/{index.pk}/similar/", {"key": "HDFS-2", "k": 4}).json()["results"]
    # Then each hit carries its prior and its reasons
    by_key = {r["key"]: r["prior"] for r in results}
    assert by_key["HDFS-3"] == {"score": pytest.approx(1.2 * (1 - 2.564949 / 8.202756) + 0.2 + 0.3, abs=1e-3),
                                "days_apart": 12, "shared_components": ["datanode"], "same_project": True}
    assert by_key["YARN-4"]["same_project"] is False and by_key["YARN-4"]["days_apart"] == 0
    # And the ticket page says it in words, and the text search does not claim a prior it cannot use
    html = web.get(f"/search/similar/{index.pk}/{Document.objects.get(external_key='HDFS-2').pk}").content.decode()
    assert "ticket prior" in html and "filed 12 days apart, shares datanode, same project" in html
    assert "+ prior (filed 1.2, component 0.2, project 0.3)" in html
    body = api.get(f"/api/indexes/{index.pk}/search/", {"q": "datanode disk", "mode": "hybrid"}).json()
    assert "prior" not in body["fusion"] and all(r["prior"] is None for r in body["results"])
