"""Clustering (issue 12), the services: both methods, outliers, labels, fencing, determinism, new tickets, renames."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from embedportal import jobs
from embedportal.errors import ConflictError, ServiceError
from search import hybrid, indexing
from search.clustering import assignment, fitting, labels, runs
from search.filters import SearchFilters
from search.models import Cluster, ClusterAssignment, ClusterAssignmentJob, ClusteringRun, SearchIndex
from search.vectors import store_embeddings
from training import datasets
from training.models import Document, ModelVersion

# Index builds create HNSW indexes (DDL) and jobs are sent on commit: real transactions.
pytestmark = pytest.mark.django_db(transaction=True)

GROUPS = ("HDFS", "YARN", "MAPREDUCE")
PER_GROUP = 20
OUTLIER_AXES = (10, 20, 30)


def _issues(hadoop_issues, project: str, n: int, skip: int = 0) -> list[dict]:
    chosen = [i for i in hadoop_issues if i["key"].startswith(project + "-") and i["fields"].get("description")]
    return chosen[skip:skip + n]


def _write(tmp_path: Path, name: str, issues: list[dict]) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"issues": issues}))
    return path


@pytest.fixture
def grouped(user, tiny_model_dir, hadoop_issues, tmp_path):
    """60 real tickets in three projects whose vectors form three tight groups, plus 3 far-off outliers.

    The vectors are made here (each project around its own axis of a
    32-dimensional space, cosine ~0.99 inside a group, ~0 across), so what
    each method must find is known exactly; the texts and Jira fields are the
    real tickets', so labels and shares are computed on real data.
    """
    issues = [i for p in GROUPS for i in _issues(hadoop_issues, p, PER_GROUP)]
    issues += _issues(hadoop_issues, "HADOOP", len(OUTLIER_AXES))
    ds = datasets.import_dataset(owner=user, name="grouped", kind="tickets", path=_write(tmp_path, "g.json", issues),
                                 filename="g.json")
    version = ModelVersion.objects.create(owner=user, name="tiny", version=1, base_model="tiny",
                                          artifact_path=str(tiny_model_dir), dimensions=32, dataset=ds)
    rng = np.random.default_rng(0)
    docs = list(Document.objects.filter(dataset=ds).order_by("id"))
    vectors = []
    for doc in docs:
        project = doc.external_key.split("-")[0]
        v = np.zeros(32, dtype=np.float32)
        if project in GROUPS:
            v[GROUPS.index(project)] = 1.0
            v += rng.normal(0, 0.03, 32).astype(np.float32)
        else:
            v[OUTLIER_AXES[[d.external_key for d in docs if d.external_key.startswith("HADOOP-")].index(doc.external_key)]] = 1.0
        vectors.append(v / np.linalg.norm(v))
    store_embeddings(model_version=version, doc_ids=[d.pk for d in docs], vectors=np.vstack(vectors),
                     content_hashes=[d.content_hash for d in docs])
    return SearchIndex.objects.create(owner=user, dataset=ds, model_version=version, status=SearchIndex.Status.READY,
                                      embedded_count=len(docs), total_count=len(docs))


def _fit(index, user, method, **params) -> ClusteringRun:
    run = runs.start_clustering(index=index, owner=user, method=method, params=params)
    runs.run(job_id=run.pk)
    run.refresh_from_db()
    assert (run.status, run.error) == ("succeeded", "")
    return run


def _groups_of(run: ClusteringRun) -> dict[str, set]:
    """project -> the cluster numbers its tickets landed in (None: outlier)."""
    out: dict[str, set] = {}
    for key, number in ClusterAssignment.objects.filter(run=run).values_list("document__external_key", "cluster__number"):
        out.setdefault(key.split("-")[0], set()).add(number)
    return out


def test_kmeans_with_a_given_k_finds_the_three_groups(grouped, user):
    run = _fit(grouped, user, "kmeans", k=3, seed=1)
    groups = _groups_of(run)
    # Each project is one cluster of its own; KMeans has no outliers (the far-off tickets join some cluster).
    assert [len(groups[p]) for p in GROUPS] == [1, 1, 1]
    assert len(set().union(*(groups[p] for p in GROUPS))) == 3
    assert None not in groups["HADOOP"]
    assert (run.version, run.result["clusters"], run.result["noise_share"], run.dataset_version) == (1, 3, 0.0, 1)
    assert sum(Cluster.objects.filter(run=run).values_list("size", flat=True)) == 63
    # Strength is the cosine to the centroid: ~1 inside a tight group.
    strengths = list(ClusterAssignment.objects.filter(run=run, document__external_key__startswith="HDFS")
                     .values_list("strength", flat=True))
    assert min(strengths) > 0.9


def test_kmeans_auto_picks_k_by_silhouette_and_shows_every_score(grouped, user):
    run = _fit(grouped, user, "kmeans", k="auto", k_min=2, k_max=6, sample_size=500, seed=3)
    scores = run.result["silhouette_by_k"]
    assert sorted(scores, key=int) == ["2", "3", "4", "5", "6"]
    assert run.result["k"] == int(max(scores, key=lambda k: (scores[k], -int(k))))
    assert run.result["k"] in (3, 4, 5, 6)  # the three groups, maybe with outliers split off
    assert run.result["k_range"] == [2, 6] and run.result["silhouette_sample"] == 63


def test_hdbscan_finds_the_groups_and_marks_the_outliers(grouped, user):
    run = _fit(grouped, user, "hdbscan", min_cluster_size=5, min_samples=3, reduction="pca", dims=5)
    groups = _groups_of(run)
    assert [len(groups[p]) for p in GROUPS] == [1, 1, 1] and None not in groups["HDFS"] | groups["YARN"]
    assert groups["HADOOP"] == {None}
    assert (run.result["clusters"], run.result["noise_share"], run.result["noise_share_after_assignment"]) == (
        3, round(3 / 63, 4), round(3 / 63, 4))
    assert (run.result["reduction"], run.result["reduced_dims"], run.result["fitted_points"]) == ("pca", 5, 63)
    outliers = ClusterAssignment.objects.filter(run=run, cluster__isnull=True)
    assert sorted(outliers.values_list("document__external_key", flat=True)) == sorted(
        i.external_key for i in Document.objects.filter(dataset=grouped.dataset, external_key__startswith="HADOOP-"))
    assert set(outliers.values_list("strength", flat=True)) == {None}
    probabilities = ClusterAssignment.objects.filter(run=run, cluster__isnull=False).values_list("strength", flat=True)
    assert all(0 < p <= 1 for p in probabilities)


def test_hdbscan_assign_outliers_moves_them_to_the_nearest_cluster_and_records_it(grouped, user):
    run = _fit(grouped, user, "hdbscan", min_cluster_size=5, min_samples=3, dims=5, assign_outliers=True)
    moved = ClusterAssignment.objects.filter(run=run, moved_from_noise=True)
    assert moved.count() == 3 and not ClusterAssignment.objects.filter(run=run, cluster__isnull=True).exists()
    assert set(moved.values_list("document__external_key", flat=True)) == set(
        Document.objects.filter(dataset=grouped.dataset, external_key__startswith="HADOOP-").values_list(
            "external_key", flat=True))
    assert (run.result["noise_share"], run.result["noise_share_after_assignment"], run.result["outliers_moved"]) == (
        round(3 / 63, 4), 0.0, 3)


def test_outliers_of_a_finished_run_are_moved_by_a_job(grouped, user):
    run = _fit(grouped, user, "hdbscan", min_cluster_size=5, min_samples=3, dims=5)
    job = assignment.start_assignment(run=run, owner=user, kind=ClusterAssignmentJob.Kind.OUTLIERS)
    assignment.run(job_id=job.pk)
    job.refresh_from_db()
    run.refresh_from_db()
    assert (job.status, job.result) == ("succeeded", {"moved": 3})
    assert ClusterAssignment.objects.filter(run=run, moved_from_noise=True, cluster__isnull=False).count() == 3
    assert run.result["noise_share_after_assignment"] == 0.0
    assert sum(run.clusters.values_list("size", flat=True)) == 63


def test_kmeans_runs_refuse_an_outlier_job(grouped, user):
    run = _fit(grouped, user, "kmeans", k=3)
    with pytest.raises(ServiceError, match="^kind: KMeans puts every ticket in a cluster"):
        assignment.start_assignment(run=run, owner=user, kind=ClusterAssignmentJob.Kind.OUTLIERS)


def test_same_parameters_and_seed_give_the_same_clusters(grouped, user):
    first = _fit(grouped, user, "kmeans", k="auto", k_min=2, k_max=5, seed=7)
    second = _fit(grouped, user, "kmeans", k="auto", k_min=2, k_max=5, seed=7)

    def table(run):
        return list(ClusterAssignment.objects.filter(run=run).order_by("document_id")
                    .values_list("document_id", "cluster__number", "strength", "x", "y"))

    assert table(first) == table(second)
    assert first.result["silhouette_by_k"] == second.result["silhouette_by_k"]
    assert (first.version, second.version) == (1, 2)


def test_labels_are_real_terms_representatives_and_field_shares(grouped, user):
    run = _fit(grouped, user, "kmeans", k=3, seed=1)
    yarn = _groups_of(run)["YARN"].pop()
    cluster = run.clusters.get(number=yarn)
    members = set(ClusterAssignment.objects.filter(cluster=cluster).values_list("document_id", flat=True))
    assert len(cluster.terms) == labels.TOP_TERMS and cluster.terms[0][1] >= cluster.terms[-1][1] > 0
    assert len(cluster.representatives) == labels.REPRESENTATIVES and set(cluster.representatives) <= members
    # Shares are fractions of the cluster's tickets, top values first.
    assert set(cluster.fields) == {"component", "issue_type", "priority"}
    priorities = cluster.fields["priority"]
    assert priorities == sorted(priorities, key=lambda vs: -vs[1]) and 0 < priorities[0][1] <= 1
    assert cluster.label == cluster.auto_label == " · ".join(t for t, _ in cluster.terms[:4])


def test_class_tfidf_ranks_what_one_cluster_says_over_what_all_say():
    texts = ["namenode crashes on startup", "namenode heap exhausted on startup", "namenode safemode stuck",
             "scheduler queue starves on startup", "scheduler preemption wrong", "scheduler queue capacity"]
    terms = labels.class_tfidf(texts, np.array([0, 0, 0, 1, 1, 1]), 2, top=2)
    assert [t for t, _ in terms[0]] == ["namenode", "startup"]
    assert [t for t, _ in terms[1]] == ["scheduler", "queue"]


def test_field_shares_count_each_component_of_a_ticket():
    metadata = [{"components": ["hdfs", "namenode"], "priority": "Major", "issue_type": "Bug"},
                {"components": ["hdfs"], "priority": "Minor", "issue_type": "Bug"},
                {"components": [], "priority": "Major"}]
    assert labels.field_shares(metadata, np.array([0, 0, -1]), 1) == [
        {"component": [["hdfs", 1.0], ["namenode", 0.5]], "issue_type": [["Bug", 1.0]],
         "priority": [["Major", 0.5], ["Minor", 0.5]]}]


def test_a_stale_attempt_writes_no_row(grouped, user):
    # Given a run whose worker is reaped while it fits, and another attempt owns it by the time it saves
    run = runs.start_clustering(index=grouped, owner=user, method="kmeans", params={"k": 3})
    attempt = jobs.claim(ClusteringRun, run.pk)

    class ReapedBeforeSaving(jobs.Attempt):
        def set_phase(self, phase, progress=None):
            if phase == "saving":  # the reaper re-queued it and a second worker claimed it meanwhile
                ClusteringRun.objects.filter(pk=self.pk).update(attempt=self.number + 1)
            super().set_phase(phase, progress)

    stale = ReapedBeforeSaving(model=ClusteringRun, pk=run.pk, number=attempt.number)
    # When the stale attempt reaches its fenced write, then it stops and nothing of it is stored
    with pytest.raises(jobs.LostClaim):
        runs._fit(stale)
    assert (Cluster.objects.filter(run=run).count(), ClusterAssignment.objects.filter(run=run).count()) == (0, 0)
    run.refresh_from_db()
    assert (run.status, run.result, run.artifact_path) == ("running", {}, "")


def test_cancel_of_a_queued_run_is_immediate_and_the_worker_does_nothing(grouped, user):
    run = runs.start_clustering(index=grouped, owner=user, method="kmeans", params={"k": 3})
    assert jobs.request_cancel(run) is True
    runs.run(job_id=run.pk)
    run.refresh_from_db()
    assert (run.status, run.phase, Cluster.objects.filter(run=run).count()) == ("cancelled", "cancelled", 0)


def test_cancel_while_running_stops_at_the_next_safe_point(grouped, user):
    run = runs.start_clustering(index=grouped, owner=user, method="kmeans", params={"k": "auto", "k_min": 2, "k_max": 6})

    def body(attempt):
        attempt.cancel_seen = True  # what the heartbeat sets when it reads cancel_requested
        runs._fit(attempt)

    jobs.run_job(ClusteringRun, run.pk, body)
    run.refresh_from_db()
    assert (run.status, run.phase, Cluster.objects.filter(run=run).count()) == ("cancelled", "cancelled", 0)


def test_a_second_run_of_an_index_is_refused_while_one_is_queued(grouped, user):
    runs.start_clustering(index=grouped, owner=user, method="kmeans", params={"k": 3})
    with pytest.raises(ConflictError, match="already queued or running"):
        runs.start_clustering(index=grouped, owner=user, method="hdbscan", params={})


def test_a_run_needs_a_ready_index(grouped, user):
    SearchIndex.objects.filter(pk=grouped.pk).update(status=SearchIndex.Status.RUNNING)
    grouped.refresh_from_db()
    with pytest.raises(ServiceError, match="^index: this index is running"):
        runs.start_clustering(index=grouped, owner=user, method="kmeans", params={"k": 3})


def test_rename_survives_reclustering_through_member_overlap(grouped, user):
    first = _fit(grouped, user, "kmeans", k=3, seed=1)
    hdfs = first.clusters.get(number=_groups_of(first)["HDFS"].pop())
    runs.rename_cluster(cluster=hdfs, name="  NameNode   and HDFS ")
    # A refit with another method and seed numbers its clusters differently; the name follows the members
    again = runs.recluster(run=first, owner=user)
    runs.run(job_id=again.pk)
    second = _fit(grouped, user, "hdbscan", min_cluster_size=5, min_samples=3, dims=5)
    for run in (ClusteringRun.objects.get(pk=again.pk), second):
        match = run.clusters.get(number=_groups_of(run)["HDFS"].difference({None}).pop())
        assert (match.name, match.label) == ("NameNode and HDFS", "NameNode and HDFS")
        assert match.match_overlap >= 0.9
    assert second.previous_id == again.pk and ClusteringRun.objects.get(pk=again.pk).previous_id == first.pk
    assert list(second.clusters.exclude(name="").values_list("name", flat=True)) == ["NameNode and HDFS"]


def test_cluster_filter_keeps_search_inside_a_cluster(grouped, user):
    run = _fit(grouped, user, "kmeans", k=3, seed=1)
    yarn = run.clusters.get(number=_groups_of(run)["YARN"].pop())
    members = set(ClusterAssignment.objects.filter(cluster=yarn).values_list("document__external_key", flat=True))
    chosen = SearchFilters.of(cluster=(str(yarn.pk),))
    result = hybrid.hybrid_search(index=grouped, query="node or container or memory or fails", mode="keyword", k=50,
                                  filters=chosen)
    assert result.hits and {h.document.external_key for h in result.hits} <= members
    assert result.filters == {"cluster": [yarn.pk]}
    vector = hybrid.hybrid_search(index=grouped, query="x", mode="vector", k=50, filters=chosen,
                                  query_vector=[1.0] + [0.0] * 31)
    assert {h.document.external_key for h in vector.hits} == members


@pytest.mark.parametrize("bad", ["abc", "0", "-3", "1.5", "9" * 30, "١٢"])
def test_cluster_filter_refuses_what_is_not_an_id(bad):
    with pytest.raises(ServiceError, match="^cluster: must be ids"):
        SearchFilters.of(cluster=(bad,))


def test_new_tickets_are_assigned_to_existing_clusters_without_refitting(user, tiny_model_dir, hadoop_issues, tmp_path):
    # Given a dataset indexed with a real (tiny) model and clustered
    first = _issues(hadoop_issues, "HDFS", 30)
    ds = datasets.import_dataset(owner=user, name="flow", kind="tickets", path=_write(tmp_path, "v1.json", first),
                                 filename="v1.json")
    version = ModelVersion.objects.create(owner=user, name="tiny", version=1, base_model="tiny",
                                          artifact_path=str(tiny_model_dir), dimensions=32, dataset=ds)
    index = indexing.build_index(index=SearchIndex.objects.create(owner=user, dataset=ds, model_version=version))
    run = _fit(index, user, "kmeans", k=4, seed=2)
    artifact = hashlib.sha1(Path(run.artifact_path).read_bytes()).hexdigest()
    sizes_before = sum(run.clusters.values_list("size", flat=True))
    # When a newer export adds 6 tickets (dataset version 2)
    newer = first + _issues(hadoop_issues, "HDFS", 6, skip=30)
    datasets.add_version(dataset=ds, path=_write(tmp_path, "v2.json", newer), filename="v2.json")
    run.refresh_from_db()
    assert run.needs_assignment is True  # flagged by the receiver; the refresh is queued, vectors not there yet
    assert not ClusterAssignmentJob.objects.filter(run=run).exists()
    # ... and the index refresh finishes, then an assignment job is queued after it
    indexing.build_index(index=index)
    job = ClusterAssignmentJob.objects.get(run=run)
    assignment.run(job_id=job.pk)
    job.refresh_from_db()
    run.refresh_from_db()
    # Then the 6 new tickets are in the clusters the fitted model predicts, and the model was not refitted
    new_keys = [i["key"] for i in newer[30:]]
    rows = ClusterAssignment.objects.filter(run=run, document__external_key__in=new_keys)
    assert rows.count() == 6 and set(rows.values_list("source", flat=True)) == {"assigned"}
    model = fitting.load_model(run.artifact_path)
    from search.models import Embedding

    for row in rows.select_related("cluster"):
        vector = np.asarray(Embedding.objects.get(document_id=row.document_id, model_version=version).embedding)
        expected, strength = fitting.predict(model, vector[None, :])
        assert (row.cluster.number, round(row.strength, 5)) == (int(expected[0]), round(float(strength[0]), 5))
        assert row.x is not None
    assert (job.status, job.result) == ("succeeded", {"assigned": 6, "outliers": 0, "to_assign": 6,
                                                      "waiting_for_vectors": 0})
    assert hashlib.sha1(Path(run.artifact_path).read_bytes()).hexdigest() == artifact
    assert sum(run.clusters.values_list("size", flat=True)) == sizes_before + 6
    assert (run.needs_assignment, run.version, ClusteringRun.objects.filter(dataset=ds).count()) == (False, 1, 1)


def test_texts_are_assigned_with_the_runs_own_model(grouped, user):
    run = _fit(grouped, user, "kmeans", k=3, seed=1)
    out = assignment.assign_texts(run=run, texts=["NameNode fails to start", "ResourceManager leaks memory"])
    assert len(out) == 2
    for item in out:
        cluster = Cluster.objects.get(pk=item["cluster"])
        assert (cluster.run_id, item["number"], item["label"], item["outlier"]) == (run.pk, cluster.number,
                                                                                   cluster.label, False)
        assert -1 <= item["strength"] <= 1
    with pytest.raises(ServiceError, match="^texts: give a non-empty list"):
        assignment.assign_texts(run=run, texts=[])


def test_export_has_one_row_per_ticket_in_csv_and_parquet(grouped, user):
    import csv

    import pyarrow.parquet as pq

    from training import temporary_files

    run = _fit(grouped, user, "hdbscan", min_cluster_size=5, min_samples=3, dims=5)
    export = assignment.export_assignments(run=run, fmt="csv")
    with open(export.path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    temporary_files.remove(export.folder)
    assert len(rows) == 63 and export.download_name == "grouped-clusters-v1.csv"
    assert sum(1 for r in rows if r["cluster"] == "") == 3
    assert {r["source"] for r in rows} == {"fit"}
    export = assignment.export_assignments(run=run, fmt="parquet")
    table = pq.read_table(export.path)
    temporary_files.remove(export.folder)
    assert table.num_rows == 63 and table.column_names[:3] == ["key", "title", "cluster"]
    assert table.column("cluster").null_count == 3
    with pytest.raises(ServiceError, match="^as: must be one of csv, parquet"):
        assignment.export_assignments(run=run, fmt="xlsx")


def test_map_points_carry_key_title_and_cluster(grouped, user):
    run = _fit(grouped, user, "hdbscan", min_cluster_size=5, min_samples=3, dims=5)
    data = assignment.map_points(run=run)
    assert len(data["points"]) == 63 and len(data["clusters"]) == 3
    assert sum(1 for p in data["points"] if p[2] == -1) == 3
    key_titles = dict(Document.objects.filter(dataset=grouped.dataset).values_list("external_key", "title"))
    assert all(key_titles[p[3]][:140] == p[4] for p in data["points"])


def test_hdbscan_above_the_fit_limit_predicts_the_rest_like_new_tickets():
    rng = np.random.default_rng(0)
    centers = np.eye(8, dtype=np.float32)[:2]
    vectors = np.vstack([centers[i % 2] + rng.normal(0, 0.02, 8) for i in range(400)]).astype(np.float32)
    fitted = fitting.fit_hdbscan(fitting.normalise(vectors), min_cluster_size=10, min_samples=5, reduction="none",
                                 dims=0, seed=0, fit_max=100)
    assert (fitted.info["fitted_points"], fitted.info["predicted_points"], fitted.n_clusters) == (100, 300, 2)
    truth = np.arange(400) % 2
    # Every point lands with its own group (cluster numbers may be swapped)
    assert len(set(zip(truth.tolist(), fitted.labels.tolist()))) == 2 and (fitted.labels >= 0).all()


@pytest.mark.parametrize("method, params, message", [
    ("spectral", {}, "method: must be one of kmeans, hdbscan"),
    ("kmeans", {"k": 1}, "k: must be between 2 and 200, got 1"),
    ("kmeans", {"k": "7"}, "k: must be a whole number, got '7'"),
    ("kmeans", {"k": True}, "k: must be a whole number, got True"),
    ("kmeans", {"k_min": 10, "k_max": 10}, "k_max: must be above k_min (10), got 10"),
    ("kmeans", {"sample_size": 10}, "sample_size: must be between 200 and 20000, got 10"),
    ("hdbscan", {"min_cluster_size": 1}, "min_cluster_size: must be between 2 and 10000, got 1"),
    ("hdbscan", {"reduction": "umap"}, "reduction: must be one of pca, none, got 'umap'"),
    ("hdbscan", {"dims": 500}, "dims: must be between 2 and 100, got 500"),
    ("hdbscan", {"assign_outliers": "yes"}, "assign_outliers: must be true or false, got 'yes'"),
    ("hdbscan", {"seed": -1}, "seed: must be between 0 and 2147483647, got -1"),
    ("kmeans", {"colour": "red"}, "colour: not a clustering parameter"),
    ("hdbscan", {"k": 5}, "k: not a parameter of hdbscan"),
    ("kmeans", {"min_samples": 5}, "min_samples: not a parameter of kmeans"),
    ("kmeans", {"k": 5, "k_max": 9}, 'k_max: only used when k is "auto"'),
    ("hdbscan", {"reduction": "none", "dims": 5}, 'dims: only used with reduction "pca"'),
])
def test_bad_parameters_are_refused_naming_the_field(method, params, message):
    with pytest.raises(ServiceError) as caught:
        runs.clean_params(method, params)
    assert str(caught.value).startswith(message)


def test_defaults_are_filled_in():
    assert runs.clean_params("kmeans", {}) == {"seed": 42, "k": "auto", "k_min": 10, "k_max": 40, "sample_size": 3000}
    assert runs.clean_params("hdbscan", {}) == {"seed": 42, "min_cluster_size": None, "min_samples": 2,
                                                "reduction": "pca", "dims": 10, "assign_outliers": False}
    assert runs.clean_params("hdbscan", {"reduction": "none"})["dims"] is None
    assert [runs.auto_min_cluster_size(n) for n in (100, 20_859, 25_000, 1_000_000)] == [10, 31, 38, 500]


def test_new_outliers_follow_a_run_that_moved_its_own(grouped, user, tiny_model_dir):
    # Given an HDBSCAN run that moved its outliers, and a new far-off ticket with a vector
    run = _fit(grouped, user, "hdbscan", min_cluster_size=5, min_samples=3, dims=5, assign_outliers=True)
    doc = Document.objects.create(dataset=grouped.dataset, external_key="NEW-1", title="Far away", body="",
                                  changed_in_version=2)
    far = np.zeros(32, dtype=np.float32)
    far[15] = 1.0
    store_embeddings(model_version=grouped.model_version, doc_ids=[doc.pk], vectors=far[None, :])
    # When new tickets are assigned, then the predicted outlier is moved too, and marked so
    job = assignment.start_assignment(run=run, owner=user)
    assignment.run(job_id=job.pk)
    job.refresh_from_db()
    row = ClusterAssignment.objects.get(run=run, document=doc)
    assert (job.result, row.moved_from_noise, row.cluster is not None, row.source) == (
        {"assigned": 1, "outliers": 0, "to_assign": 1, "waiting_for_vectors": 0, "moved": 1}, True, True, "assigned")
