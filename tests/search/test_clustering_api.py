"""Clustering (issue 12) as users meet it: the API, the pages, owner isolation, bad parameters, query counts."""

from __future__ import annotations

import csv
import io

import pytest
from django.contrib.auth import get_user_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from search import serializers
from search.clustering import assignment, runs
from search.models import Cluster, ClusterAssignment, ClusterAssignmentJob, ClusteringRun
from tests.search.test_clustering import _fit, _groups_of, grouped  # noqa: F401 (grouped is a fixture)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def outsider(other_user) -> APIClient:
    client = APIClient()
    client.force_authenticate(other_user)
    return client


@pytest.fixture
def fitted(grouped, user):
    """An HDBSCAN run of the grouped tickets: 3 clusters and 3 outliers."""
    return _fit(grouped, user, "hdbscan", min_cluster_size=5, min_samples=3, dims=5)


def test_api_starts_a_run_reports_its_status_and_lists_its_clusters(api, grouped):
    response = api.post("/api/clusterings/", {"index": grouped.pk, "method": "kmeans", "k": 3, "seed": 1},
                        format="json")
    assert response.status_code == 202
    body = response.json()
    assert (body["status"], body["method"], body["params"], body["version"]) == (
        "queued", "kmeans", {"k": 3, "seed": 1}, 1)
    runs.run(job_id=body["id"])
    body = api.get(f"/api/clusterings/{body['id']}/").json()
    assert (body["status"], body["phase"], body["progress"], body["result"]["clusters"]) == ("succeeded", "done", 1.0, 3)
    clusters = api.get(f"/api/clusterings/{body['id']}/clusters/").json()
    assert clusters["count"] == 3 and sum(c["size"] for c in clusters["results"]) == 63
    first = clusters["results"][0]
    assert first["label"] == first["auto_label"] == " · ".join(t for t, _ in first["terms"][:4])


def test_api_k_auto_and_hdbscan_defaults_are_filled_in(api, grouped):
    body = api.post("/api/clusterings/", {"index": grouped.pk, "method": "kmeans", "k": "auto"}, format="json").json()
    assert body["params"] == {"seed": 42, "k": "auto", "k_min": 10, "k_max": 40, "sample_size": 3000}
    api.post(f"/api/clusterings/{body['id']}/cancel/")
    body = api.post("/api/clusterings/", {"index": grouped.pk, "method": "hdbscan"}, format="json").json()
    assert body["params"] == {"seed": 42, "min_cluster_size": None, "min_samples": 2, "reduction": "pca", "dims": 10,
                              "assign_outliers": False}


@pytest.mark.parametrize("payload, field", [
    ({"method": "spectral"}, "method"),
    ({"method": "kmeans", "k": 1}, "k"),
    ({"method": "kmeans", "k": "many"}, "k"),
    ({"method": "kmeans", "k_min": 9, "k_max": 3}, "k_max"),
    ({"method": "kmeans", "k": 4, "sample_size": 500}, "sample_size"),
    ({"method": "kmeans", "min_samples": 3}, "min_samples"),
    ({"method": "hdbscan", "min_cluster_size": 0}, "min_cluster_size"),
    ({"method": "hdbscan", "reduction": "umap"}, "reduction"),
    ({"method": "hdbscan", "dims": 1}, "dims"),
    ({"method": "hdbscan", "assign_outliers": "perhaps"}, "assign_outliers"),
    ({"method": "hdbscan", "seed": -5}, "seed"),
    ({"method": "hdbscan", "index": "abc"}, "index"),
])
def test_api_bad_parameters_are_400_naming_the_field(api, grouped, payload, field):
    response = api.post("/api/clusterings/", {"index": grouped.pk, **payload}, format="json")
    assert response.status_code == 400
    assert list(response.json()["fields"]) == [field]
    assert not ClusteringRun.objects.exists()


def test_api_start_on_someone_elses_index_is_refused_as_not_yours(outsider, grouped):
    response = outsider.post("/api/clusterings/", {"index": grouped.pk, "method": "kmeans"}, format="json")
    assert (response.status_code, response.json()["fields"]) == (400, {"index": "No such index of yours."})


def test_api_second_start_while_one_is_queued_is_409(api, grouped):
    assert api.post("/api/clusterings/", {"index": grouped.pk, "method": "kmeans"}, format="json").status_code == 202
    response = api.post("/api/clusterings/", {"index": grouped.pk, "method": "hdbscan"}, format="json")
    assert (response.status_code, response.json()["error"]) == (
        409, "A clustering run of this index is already queued or running.")


def test_api_cancel_of_a_queued_run(api, grouped):
    run_id = api.post("/api/clusterings/", {"index": grouped.pk, "method": "kmeans"}, format="json").json()["id"]
    body = api.post(f"/api/clusterings/{run_id}/cancel/").json()
    assert (body["status"], body["phase"]) == ("cancelled", "cancelled")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.dictionaries(
    st.sampled_from(["method", "k", "k_min", "k_max", "sample_size", "min_cluster_size", "min_samples", "reduction",
                     "dims", "assign_outliers", "seed", "index", "extra"]),
    st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True), st.text(max_size=12),
              st.sampled_from(["auto", "kmeans", "hdbscan", "pca", "none", "7", "200", "2"])),
    max_size=6,
))
def test_fuzzed_start_parameters_are_valid_or_name_a_known_field(payload):
    # The API's serializer: every input is either a valid run or a 400 whose fields are real parameter names.
    start = serializers.ClusteringStartSerializer(data={"index": 1, "method": "kmeans", **payload})
    known = {"index", "method", *runs.PARAM_NAMES, "non_field_errors"}
    if start.is_valid():
        data = start.validated_data
        assert runs.clean_params(data["method"], data["params"]) == data["params"]
        assert set(data["params"]) <= set(runs.METHOD_PARAMS[data["method"]])
    else:
        assert set(start.errors) <= known and start.errors


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.one_of(st.text(max_size=25), st.integers(-5, 10**20).map(str)))
def test_fuzzed_cluster_filter_is_accepted_only_as_ids(grouped, api, value):
    # Any text: either a search filtered by one id in the bigint range, or a 400 naming the parameter.
    response = api.get(f"/api/indexes/{grouped.pk}/search/", {"q": "node", "mode": "keyword", "cluster": value})
    assert response.status_code in (200, 400), value
    if response.status_code == 400:
        assert list(response.json()["fields"]) == ["cluster"]
    elif value == "":
        assert "cluster" not in response.json()["filters"]  # a blank parameter is dropped, as for every filter
    else:
        (chosen,) = response.json()["filters"]["cluster"]
        assert 1 <= chosen <= 2**63 - 1 and chosen == int(value.strip().split(".")[0])
    digits = value.strip()
    if digits.isascii() and digits.isdigit() and 1 <= int(digits) <= 2**63 - 1:
        assert response.status_code == 200, value


def test_api_members_document_and_outliers(api, fitted):
    groups = _groups_of(fitted)
    yarn = fitted.clusters.get(number=groups["YARN"].pop())
    body = api.get(f"/api/clusters/{yarn.pk}/members/", {"limit": 5}).json()
    assert body["count"] == 20 and len(body["results"]) == 5
    strengths = [m["strength"] for m in body["results"]]
    assert strengths == sorted(strengths, reverse=True) and all(m["source"] == "fit" for m in body["results"])
    member_key = body["results"][0]["document"]["key"]
    doc = api.get(f"/api/clusterings/{fitted.pk}/document/", {"key": member_key}).json()
    assert (doc["assigned"], doc["cluster"]["id"], doc["source"]) == (True, yarn.pk, "fit")
    outliers = api.get(f"/api/clusterings/{fitted.pk}/outliers/").json()
    assert outliers["count"] == 3 and {o["cluster"] for o in outliers["results"]} == {None}
    assert {o["document"]["key"][:7] for o in outliers["results"]} == {"HADOOP-"}
    outlier = api.get(f"/api/clusterings/{fitted.pk}/document/", {"key": outliers["results"][0]["document"]["key"]})
    assert (outlier.json()["assigned"], outlier.json()["cluster"]) == (True, None)
    assert api.get(f"/api/clusterings/{fitted.pk}/document/", {"key": "NOPE-1"}).json()["fields"] == {
        "key": "No such document in this run's dataset."}
    assert api.get(f"/api/clusterings/{fitted.pk}/outliers/", {"moved": "maybe"}).json()["fields"] == {
        "moved": "must be true or false."}
    assert api.get("/api/clusters/", {"run": "x1"}).json()["fields"] == {"run": "must be an id (a whole number), got 'x1'."}


def test_api_assign_outliers_job_then_moved_list(api, fitted):
    response = api.post(f"/api/clusterings/{fitted.pk}/assign-outliers/")
    assert response.status_code == 202 and response.json()["kind"] == "outliers"
    assignment.run(job_id=response.json()["id"])
    job = api.get(f"/api/cluster-jobs/{response.json()['id']}/").json()
    assert (job["status"], job["result"]) == ("succeeded", {"moved": 3})
    moved = api.get(f"/api/clusterings/{fitted.pk}/outliers/", {"moved": "true"}).json()
    assert moved["count"] == 3 and all(m["moved_from_noise"] and m["cluster"] for m in moved["results"])
    assert api.get(f"/api/clusterings/{fitted.pk}/outliers/").json()["count"] == 0


def test_api_assign_new_with_nothing_new_assigns_nothing(api, fitted):
    response = api.post(f"/api/clusterings/{fitted.pk}/assign-new/")
    assignment.run(job_id=response.json()["id"])
    job = ClusterAssignmentJob.objects.get(pk=response.json()["id"])
    assert (job.status, job.result) == ("succeeded", {"assigned": 0, "outliers": 0, "to_assign": 0,
                                                      "waiting_for_vectors": 0})


def test_api_assign_texts_returns_cluster_ids(api, fitted):
    response = api.post(f"/api/clusterings/{fitted.pk}/assign/", {"texts": ["NameNode out of memory", "x"]},
                        format="json")
    body = response.json()
    assert response.status_code == 200 and body["run"] == fitted.pk and len(body["results"]) == 2
    ids = set(fitted.clusters.values_list("pk", flat=True))
    for item in body["results"]:
        assert (item["cluster"] in ids) or (item["cluster"] is None and item["outlier"] is True)
    bad = api.post(f"/api/clusterings/{fitted.pk}/assign/", {"texts": "just one"}, format="json")
    assert (bad.status_code, list(bad.json()["fields"])) == (400, ["texts"])


def test_api_rename_is_kept_by_recluster(api, fitted):
    cluster = fitted.clusters.get(number=_groups_of(fitted)["YARN"].pop())
    response = api.patch(f"/api/clusters/{cluster.pk}/", {"name": "Scheduler & YARN"}, format="json")
    assert (response.status_code, response.json()["label"]) == (200, "Scheduler & YARN")
    too_long = api.patch(f"/api/clusters/{cluster.pk}/", {"name": "x" * 201}, format="json")
    assert (too_long.status_code, list(too_long.json()["fields"])) == (400, ["name"])
    again = api.post(f"/api/clusterings/{fitted.pk}/recluster/").json()
    runs.run(job_id=again["id"])
    names = api.get("/api/clusters/", {"run": again["id"]}).json()["results"]
    assert [c["name"] for c in names if c["name"]] == ["Scheduler & YARN"]
    assert api.put(f"/api/clusters/{cluster.pk}/", {"name": "x"}, format="json").status_code == 405


def test_api_export_csv_and_map(api, fitted):
    response = api.get(f"/api/clusterings/{fitted.pk}/export/", {"as": "csv"})
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert response.status_code == 200 and len(rows) == 63
    assert "grouped-clusters-v1.csv" in response["Content-Disposition"]
    assert api.get(f"/api/clusterings/{fitted.pk}/export/", {"as": "xml"}).json()["fields"] == {
        "as": "must be one of csv, parquet, got 'xml'."}
    data = api.get(f"/api/clusterings/{fitted.pk}/map/").json()
    assert len(data["points"]) == 63 and [c["number"] for c in data["clusters"]] == [0, 1, 2]


def test_api_endpoints_of_a_run_are_404_for_another_user(outsider, fitted, user):
    cluster = fitted.clusters.first()
    job = assignment.start_assignment(run=fitted, owner=user)
    run_url = f"/api/clusterings/{fitted.pk}/"
    for method, url in [
        ("get", run_url), ("post", run_url + "cancel/"), ("post", run_url + "recluster/"), ("get", run_url + "clusters/"),
        ("get", run_url + "outliers/"), ("get", run_url + "document/?key=HDFS-1"), ("post", run_url + "assign/"),
        ("post", run_url + "assign-new/"), ("post", run_url + "assign-outliers/"), ("get", run_url + "map/"),
        ("get", run_url + "export/"), ("get", f"/api/clusters/{cluster.pk}/"), ("patch", f"/api/clusters/{cluster.pk}/"),
        ("get", f"/api/clusters/{cluster.pk}/members/"), ("get", f"/api/cluster-jobs/{job.pk}/"),
        ("post", f"/api/cluster-jobs/{job.pk}/cancel/"), ("get", "/api/clusterings/999999/"),
    ]:
        response = getattr(outsider, method)(url, {"texts": ["x"], "name": "mine"}, format="json") if method != "get" \
            else outsider.get(url)
        assert response.status_code == 404, (method, url)
    for url in ("/api/clusterings/", "/api/clusters/", "/api/cluster-jobs/"):
        assert outsider.get(url).json()["count"] == 0
    fitted.refresh_from_db()
    assert (fitted.status, Cluster.objects.get(pk=cluster.pk).name) == ("succeeded", "")


def test_pages_of_a_run_are_404_for_another_user(client, other_user, fitted, user):
    cluster = fitted.clusters.first()
    job = assignment.start_assignment(run=fitted, owner=user)
    client.force_login(other_user)
    base = f"/search/clusters/runs/{fitted.pk}/"
    for method, url in [
        ("get", base), ("get", base + "map.json"), ("post", base + "cancel"), ("post", base + "recluster"),
        ("post", base + "assign"), ("get", base + "export"), ("get", base + "outliers"),
        ("get", f"/search/clusters/{cluster.pk}/"), ("post", f"/search/clusters/{cluster.pk}/rename"),
        ("get", f"/search/clusters/jobs/{job.pk}/"), ("post", f"/search/clusters/jobs/{job.pk}/cancel"),
    ]:
        assert getattr(client, method)(url).status_code == 404, (method, url)
    html = client.get("/search/clusters/").content.decode()
    assert "No clustering yet." in html and "grouped" not in html
    response = client.post("/search/clusters/start", {"index": fitted.index_id, "method": "kmeans"})
    assert response.status_code == 400 and "index: No such index of yours." in response.content.decode()


def test_page_start_shows_status_polling_then_the_clusters(web, grouped):
    response = web.post("/search/clusters/start", {"index": grouped.pk, "method": "hdbscan", "min_cluster_size": "5",
                                                   "min_samples": "3", "dims": "5", "reduction": "pca", "k": "auto"})
    run = ClusteringRun.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/search/clusters/runs/{run.pk}/"
    assert run.params == {"seed": 42, "min_cluster_size": 5, "min_samples": 3, "reduction": "pca", "dims": 5,
                          "assign_outliers": False}
    html = web.get(f"/search/clusters/runs/{run.pk}/").content.decode()
    assert 'hx-trigger="every 2s"' in html and "Queued" in html
    runs.run(job_id=run.pk)
    partial = web.get(f"/search/clusters/runs/{run.pk}/", HTTP_HX_REQUEST="true")
    assert partial["HX-Refresh"] == "true"
    html = web.get(f"/search/clusters/runs/{run.pk}/").content.decode()
    run.refresh_from_db()
    for cluster in run.clusters.all():
        assert f'href="/search/clusters/{cluster.pk}/"' in html
    assert 'id="cluster-map"' in html and "js/cluster-map.js" in html and "<script>" not in html
    assert "3 clusters of 63 tickets" in html and "outliers 5%" in html


def test_page_start_with_bad_parameters_is_400_naming_the_field(web, grouped):
    response = web.post("/search/clusters/start", {"index": grouped.pk, "method": "kmeans", "k": "1"})
    assert response.status_code == 400
    assert 'k: must be &quot;auto&quot; or a whole number from 2 to 200.' in response.content.decode()
    assert not ClusteringRun.objects.exists()


def test_cluster_page_rename_and_search_within(web, fitted):
    yarn = fitted.clusters.get(number=_groups_of(fitted)["YARN"].pop())
    html = web.get(f"/search/clusters/{yarn.pk}/").content.decode()
    for term, _ in yarn.terms:
        assert f">{term}</span>" in html
    assert f'name="cluster" value="{yarn.pk}"' in html and f'name="index" value="{fitted.index_id}"' in html
    web.post(f"/search/clusters/{yarn.pk}/rename", {"name": "YARN scheduler"})
    assert Cluster.objects.get(pk=yarn.pk).name == "YARN scheduler"
    search = web.get("/search/", {"index": fitted.index_id, "cluster": yarn.pk, "q": "node or memory or container",
                                  "mode": "keyword", "k": 50}).content.decode()
    assert f'<option value="{yarn.pk}" selected>YARN scheduler (20)</option>' in search
    members = set(ClusterAssignment.objects.filter(cluster=yarn).values_list("document__external_key", flat=True))
    shown = {k for k in members if f">{k}<" in search}
    others = ClusterAssignment.objects.exclude(cluster=yarn).filter(run=fitted).values_list("document__external_key",
                                                                                               flat=True)
    assert shown and not any(f">{k}<" in search for k in others)


def test_outliers_page_lists_them(web, fitted):
    html = web.get(f"/search/clusters/runs/{fitted.pk}/outliers").content.decode()
    for key in ClusterAssignment.objects.filter(run=fitted, cluster__isnull=True).values_list(
            "document__external_key", flat=True):
        assert f">{key}<" in html
    assert "3 tickets" in html


def test_map_json_and_export_pages(web, fitted):
    data = web.get(f"/search/clusters/runs/{fitted.pk}/map.json").json()
    assert len(data["points"]) == 63
    response = web.get(f"/search/clusters/runs/{fitted.pk}/export", {"as": "parquet"})
    assert response.status_code == 200 and b"".join(response.streaming_content)[:4] == b"PAR1"


def test_openapi_schema_lists_the_clustering_endpoints(api):
    schema = api.get("/api/schema/").content.decode()
    for path in ("/api/clusterings/", "/api/clusterings/{id}/assign/", "/api/clusterings/{id}/document/",
                 "/api/clusterings/{id}/export/", "/api/clusters/{id}/members/", "/api/cluster-jobs/{id}/cancel/"):
        assert path in schema


def test_admin_lists_the_clustering_models(admin_client, fitted):
    for name in ("clusteringrun", "cluster", "clusterassignment", "clusterassignmentjob"):
        assert admin_client.get(f"/admin/search/{name}/").status_code == 200


# --- Query counts: flat whatever the number of rows --------------------------------------------


def _runs(index, user, count: int) -> list[ClusteringRun]:
    out = []
    for n in range(count):
        run = ClusteringRun.objects.create(owner=user, index=index, dataset=index.dataset, version=n + 1,
                                           method="kmeans", params={"k": 3}, status="succeeded",
                                           result={"clusters": 2, "noise_share": 0.0})
        for number in range(count):
            Cluster.objects.create(run=run, number=number, size=1, terms=[["term", 0.5]])
        out.append(run)
    return out


@pytest.mark.parametrize("count", [1, 3])
def test_clustering_list_endpoint_query_count_is_flat(api, grouped, user, count, django_assert_num_queries):
    _runs(grouped, user, count)
    with django_assert_num_queries(3):  # token, count, page
        assert api.get("/api/clusterings/").json()["count"] == count


@pytest.mark.parametrize("count", [1, 3])
def test_cluster_list_endpoints_query_count_is_flat(api, grouped, user, count, django_assert_num_queries):
    run = _runs(grouped, user, count)[0]
    with django_assert_num_queries(3):
        assert api.get("/api/clusters/", {"run": run.pk}).json()["count"] == count
    with django_assert_num_queries(4):  # token, run, count, page
        assert api.get(f"/api/clusterings/{run.pk}/clusters/").json()["count"] == count


@pytest.mark.parametrize("count", [1, 3])
def test_members_and_jobs_endpoints_query_count_is_flat(api, fitted, user, count, django_assert_num_queries):
    cluster = fitted.clusters.first()
    ClusterAssignment.objects.filter(cluster=cluster).exclude(
        pk__in=list(ClusterAssignment.objects.filter(cluster=cluster).values_list("pk", flat=True)[:count])
    ).update(cluster=None)
    for kind in list(ClusterAssignmentJob.Kind)[:min(count, 2)]:
        ClusterAssignmentJob.objects.create(run=fitted, owner=user, kind=kind, status="succeeded")
    with django_assert_num_queries(4):  # token, cluster, count, page with documents
        assert api.get(f"/api/clusters/{cluster.pk}/members/").json()["count"] == count
    with django_assert_num_queries(3):
        assert api.get("/api/cluster-jobs/").json()["count"] == min(count, 2)


@pytest.mark.parametrize("count", [1, 3])
def test_cluster_pages_query_count_is_flat(web, grouped, user, count, django_assert_max_num_queries):
    run = _runs(grouped, user, count)[-1]
    with django_assert_max_num_queries(9):
        assert web.get("/search/clusters/").status_code == 200
    with django_assert_max_num_queries(9):
        assert web.get(f"/search/clusters/runs/{run.pk}/").status_code == 200
    with django_assert_max_num_queries(9):
        assert web.get(f"/search/clusters/{run.clusters.first().pk}/").status_code == 200


def test_another_users_cluster_id_in_the_search_filter_finds_nothing_and_leaks_no_label(grouped, fitted, client,
                                                                                         other_user, tmp_path):
    # bob searches his own index with alice's cluster id: nothing of hers, not even its name
    from search.models import SearchIndex
    from training.models import Dataset, ModelVersion

    ds = Dataset.objects.create(owner=other_user, name="bobs")
    version = ModelVersion.objects.create(owner=other_user, name="b", version=1, base_model="tiny",
                                          artifact_path=grouped.model_version.artifact_path, dimensions=32, dataset=ds)
    index = SearchIndex.objects.create(owner=other_user, dataset=ds, model_version=version, status="ready")
    alice_cluster = fitted.clusters.first()
    Cluster.objects.filter(pk=alice_cluster.pk).update(name="Alice's secret group")
    client.force_login(other_user)
    html = client.get("/search/", {"index": index.pk, "cluster": alice_cluster.pk, "q": "node"}).content.decode()
    assert "secret" not in html
    assert get_user_model().objects.count() == 2


def test_dashboard_shows_the_latest_clustering_of_each_dataset(web, fitted, user, django_assert_max_num_queries):
    again = _fit(fitted.index, user, "kmeans", k=3, seed=1)
    with django_assert_max_num_queries(12):
        html = web.get("/").content.decode()
    assert f'<a href="/search/clusters/runs/{again.pk}/">v2 · KMeans · 3 clusters</a>' in html
    assert f"/search/clusters/runs/{fitted.pk}/" not in html
