"""Clustering runs: start one on a ready index, fit it as a job, store clusters and assignments fenced.

A run is a ClusteringRun (a Job of embedportal.jobs, default queue, CPU):
loading vectors -> choosing k / reducing -> fitting -> (outliers to the
nearest cluster) -> labelling -> the map -> saving. Every row is written in
one transaction that starts with the attempt's fenced update, so a stale
attempt (reaped, then woken) can never leave a row: its update raises
LostClaim and the transaction rolls back. The same params and seed give the
same clusters (seeded samples, KMeans random_state, PCA by eigendecomposition,
HDBSCAN has no randomness).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, Max, Q
from django.db.models.functions import Left
from django.utils import timezone

from embedportal import jobs
from embedportal.errors import ConflictError, ServiceError
from search.clustering import fitting, labels
from search.models import Cluster, ClusterAssignment, ClusteringRun, SearchIndex
from training import artifacts
from training.corpus import ticket_text
from training.models import Dataset, Document

logger = logging.getLogger(__name__)

METHODS = tuple(ClusteringRun.Method.values)
REDUCTIONS = ("pca", "none")
# Bounds of the parameters a person may set (the API and the form show the same).
K_BOUNDS = (2, 200)
# Silhouette on sentence embeddings rises as k falls (Hadoop tickets, MiniLM:
# 0.060 at k=5, 0.059 at 9, 0.042 at 13, 0.040 at 40), so "auto" would mostly
# pick the smallest k tried; the range starts at 10 because fewer groups are
# too coarse to read through (and k=10 is stable: ARI 0.985 between seeds).
DEFAULT_K_RANGE = (10, 40)
SAMPLE_BOUNDS = (200, 20_000)
# Silhouette costs n^2 per candidate: 3,000 tickets keep choosing k at ~15 s for 8 candidates on 2 cores.
DEFAULT_SAMPLE = 3_000
MIN_CLUSTER_SIZE_BOUNDS = (2, 10_000)
MIN_SAMPLES_BOUNDS = (1, 1_000)
# Small min_samples keeps HDBSCAN from merging everything into 2-3 huge clusters on PCA-reduced
# ticket vectors (Hadoop, 10 dims: min_samples 5 -> 3 clusters, 2 -> 35).
DEFAULT_MIN_SAMPLES = 2
DIMS_BOUNDS = (2, 100)
DEFAULT_DIMS = 10
SEED_BOUNDS = (0, 2**31 - 1)
DEFAULT_SEED = 42
# Points drawn on the map: a seeded sample when the dataset is larger.
MAP_POINTS = 20_000
MIN_DOCUMENTS = 10
# Jaccard overlap of members above which a new cluster is "the same" as one of the previous run (name carried).
MATCH_MIN_JACCARD = 0.3
# Silhouette of the result, on a seeded sample (shown on the run page).
RESULT_SILHOUETTE_SAMPLE = 5_000
PARAM_NAMES = ("k", "k_min", "k_max", "sample_size", "min_cluster_size", "min_samples", "reduction", "dims",
               "assign_outliers", "seed")
METHOD_PARAMS = {
    "kmeans": ("k", "k_min", "k_max", "sample_size", "seed"),
    "hdbscan": ("min_cluster_size", "min_samples", "reduction", "dims", "assign_outliers", "seed"),
}


def _int(params: dict, name: str, bounds: tuple[int, int], default: int | None) -> int | None:
    value = params.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ServiceError(f"{name}: must be a whole number, got {value!r}.")
    if not bounds[0] <= value <= bounds[1]:
        raise ServiceError(f"{name}: must be between {bounds[0]} and {bounds[1]}, got {value}.")
    return value


def clean_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The run's parameters with defaults filled in; ServiceError("<field>: why") for anything off.

    kmeans: k (2-200 or "auto"), k_min/k_max (the auto range), sample_size (silhouette sample).
    hdbscan: min_cluster_size (None: 0.15% of the fitted documents, 10-500), min_samples,
    reduction ("pca" or "none"), dims (PCA components), assign_outliers.
    Both: seed.
    """
    if method not in METHODS:
        raise ServiceError(f"method: must be one of {', '.join(METHODS)}, got {method!r}.")
    unknown = sorted(set(params) - set(PARAM_NAMES))
    if unknown:
        raise ServiceError(f"{unknown[0]}: not a clustering parameter (known: {', '.join(PARAM_NAMES)}).")
    other = sorted(set(params) - set(METHOD_PARAMS[method]))
    if other:
        raise ServiceError(f"{other[0]}: not a parameter of {method} (it takes {', '.join(METHOD_PARAMS[method])}).")
    out: dict[str, Any] = {"seed": _int(params, "seed", SEED_BOUNDS, DEFAULT_SEED)}
    if method == ClusteringRun.Method.KMEANS:
        k = params.get("k", "auto")
        if k in ("auto", None, ""):
            k_min = _int(params, "k_min", K_BOUNDS, DEFAULT_K_RANGE[0])
            k_max = _int(params, "k_max", K_BOUNDS, DEFAULT_K_RANGE[1])
            if k_min >= k_max:
                raise ServiceError(f"k_max: must be above k_min ({k_min}), got {k_max}.")
            out.update(k="auto", k_min=k_min, k_max=k_max,
                       sample_size=_int(params, "sample_size", SAMPLE_BOUNDS, DEFAULT_SAMPLE))
        else:
            used = sorted(set(params) & {"k_min", "k_max", "sample_size"})
            if used:
                raise ServiceError(f"{used[0]}: only used when k is \"auto\".")
            out["k"] = _int(params, "k", K_BOUNDS, None)
        return out
    reduction = params.get("reduction", "pca")
    if reduction not in REDUCTIONS:
        raise ServiceError(f"reduction: must be one of {', '.join(REDUCTIONS)}, got {reduction!r}.")
    if reduction == "none" and params.get("dims") is not None:
        raise ServiceError("dims: only used with reduction \"pca\".")
    assign_outliers = params.get("assign_outliers", False)
    if not isinstance(assign_outliers, bool):
        raise ServiceError(f"assign_outliers: must be true or false, got {assign_outliers!r}.")
    out.update(
        min_cluster_size=_int(params, "min_cluster_size", MIN_CLUSTER_SIZE_BOUNDS, None),
        min_samples=_int(params, "min_samples", MIN_SAMPLES_BOUNDS, DEFAULT_MIN_SAMPLES),
        reduction=reduction, dims=_int(params, "dims", DIMS_BOUNDS, DEFAULT_DIMS) if reduction == "pca" else None,
        assign_outliers=assign_outliers,
    )
    return out


def auto_min_cluster_size(n: int) -> int:
    """0.15% of the fitted documents, 10 to 500 (Hadoop, 20,859 tickets: 31 -> 35 clusters; 0.5% gave 10)."""
    return int(min(500, max(10, round(n * 0.0015))))


def start_clustering(*, index: SearchIndex, owner, method: str, params: dict[str, Any] | None = None) -> ClusteringRun:
    """Validate, create the run (the dataset's next clustering version) and queue it after commit.

    Refused (409) while another run of this index is queued or running; the
    index must be ready (every document embedded).
    """
    cleaned = clean_params(method, dict(params or {}))
    if index.status != SearchIndex.Status.READY:
        raise ServiceError(f"index: this index is {index.status}; clustering needs a ready index.")
    try:
        with transaction.atomic():
            # The dataset's row lock serialises version numbers of concurrent starts.
            Dataset.objects.select_for_update().filter(pk=index.dataset_id).first()
            number = (ClusteringRun.objects.filter(dataset_id=index.dataset_id).aggregate(n=Max("version"))["n"] or 0) + 1
            run = ClusteringRun.objects.create(owner=owner, index=index, dataset_id=index.dataset_id, version=number,
                                               method=method, params=cleaned)
    except IntegrityError:
        raise ConflictError("A clustering run of this index is already queued or running.") from None
    jobs.enqueue(run)
    return run


def recluster(*, run: ClusteringRun, owner) -> ClusteringRun:
    """Fit anew with the same method and parameters on the index's current vectors (names carried by overlap)."""
    return start_clustering(index=run.index, owner=owner, method=run.method, params=run.params)


def run(*, job_id: int) -> None:
    """The worker's side (search.tasks calls this): claim, fit with a heartbeat, finish by what happened."""
    jobs.run_job(ClusteringRun, job_id, _fit)


def latest_run(*, dataset: Dataset) -> ClusteringRun | None:
    """The dataset's current clustering: its latest succeeded run."""
    return (ClusteringRun.objects.filter(dataset=dataset, status=ClusteringRun.Status.SUCCEEDED)
            .order_by("-created_at", "-id").first())


def rename_cluster(*, cluster: Cluster, name: str) -> Cluster:
    """Give a cluster a person's name ("" goes back to its terms); kept by the matching cluster of the next run."""
    if not isinstance(name, str):
        raise ServiceError("name: must be text.")
    name = " ".join(name.split())
    if len(name) > 200:
        raise ServiceError(f"name: at most 200 characters, got {len(name)}.")
    cluster.name = name
    cluster.save(update_fields=["name"])
    return cluster


# --- The job ------------------------------------------------------------------------


def load_vectors(index: SearchIndex) -> tuple[np.ndarray, np.ndarray]:
    """(document ids ascending, their normalised vectors) of the index's dataset under its model version.

    A binary COPY with pgvector's binary loader registered on this cursor only
    (Django's connection keeps its text loaders): ~2 s for 100k x 384, where
    the ORM's text form took ~30 s.
    """
    from pgvector.psycopg.vector import VectorBinaryLoader

    dims = int(index.model_version.dimensions)
    ids: list[int] = []
    vectors: list[np.ndarray] = []
    with transaction.atomic(), connection.cursor() as cursor:
        # Right after an index build the planner may not have statistics for the new
        # rows yet and pick a nested loop over the join: 8 minutes instead of 7 s for
        # 100k tickets in one bench run. A hash join is right for "all rows of a dataset".
        cursor.execute("SET LOCAL enable_nestloop = off")
        cursor.execute("SELECT 'vector'::regtype::oid")
        vector_oid = cursor.fetchone()[0]
        raw = cursor.cursor
        raw.adapters.register_loader(vector_oid, VectorBinaryLoader)
        sql = (
            "COPY (SELECT e.document_id, e.embedding FROM search_embedding e "
            "JOIN training_document d ON d.id = e.document_id "
            f"WHERE e.model_version_id = {int(index.model_version_id)} AND d.dataset_id = {int(index.dataset_id)} "
            "ORDER BY e.document_id) TO STDOUT (FORMAT BINARY)"
        )
        with raw.copy(sql) as copy:
            copy.set_types(["int8", vector_oid])
            for doc_id, vector in copy.rows():
                ids.append(doc_id)
                vectors.append(vector.to_numpy())
    if not ids:
        return np.zeros(0, dtype=np.int64), np.zeros((0, dims), dtype=np.float32)
    return np.asarray(ids, dtype=np.int64), fitting.normalise(np.vstack(vectors).astype(np.float32))


def load_texts(doc_ids: np.ndarray) -> tuple[list[str], list[dict]]:
    """Text (title + the start of the body) and metadata of the documents, in doc_ids order."""
    position = {int(d): i for i, d in enumerate(doc_ids)}
    texts: list[str] = [""] * len(doc_ids)
    metadata: list[dict] = [{}] * len(doc_ids)
    rows = (Document.objects.filter(pk__in=[int(d) for d in doc_ids])
            .values_list("pk", "title", Left("body", labels.MAX_LABEL_CHARS), "metadata"))
    for pk, title, body, meta in rows.iterator(chunk_size=5000):
        i = position[pk]
        texts[i] = ticket_text(title, body or "")
        metadata[i] = meta or {}
    return texts, metadata


def _fit(attempt: jobs.Attempt) -> None:
    run = ClusteringRun.objects.select_related("index__model_version", "dataset").get(pk=attempt.pk)
    params, seed = run.params, int(run.params.get("seed", DEFAULT_SEED))
    timings: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 2)
        clock = now

    attempt.set_phase("loading vectors", 0.0)
    doc_ids, vectors = load_vectors(run.index)
    if len(doc_ids) < MIN_DOCUMENTS:
        raise jobs.JobFailed(f"Clustering needs at least {MIN_DOCUMENTS} documents with vectors; "
                             f"this index has {len(doc_ids)}.")
    lap("load_vectors")
    result: dict[str, Any] = {"documents": int(len(doc_ids)), "method": run.method}
    if run.method == ClusteringRun.Method.KMEANS:
        k = params["k"]
        if k == "auto":
            attempt.set_phase("choosing k by silhouette", 0.05)
            k, scores = fitting.choose_k(vectors, k_min=params["k_min"], k_max=params["k_max"],
                                         sample_size=params["sample_size"], seed=seed, check=attempt.check)
            result.update(k_range=[params["k_min"], params["k_max"]], silhouette_by_k={str(n): s for n, s in scores.items()},
                          silhouette_sample=int(min(len(doc_ids), params["sample_size"])))
            lap("choose_k")
        attempt.set_phase("fitting KMeans", 0.3)
        fitted = fitting.fit_kmeans(vectors, k=min(int(k), len(doc_ids)), seed=seed)
        lap("fit")
    else:
        # HDBSCAN fits at most HDBSCAN_FIT_MAX tickets: the automatic size follows what it sees.
        min_cluster_size = params.get("min_cluster_size") or auto_min_cluster_size(
            min(len(doc_ids), fitting.HDBSCAN_FIT_MAX))
        attempt.set_phase("reducing (PCA) and fitting HDBSCAN" if params["reduction"] == "pca" else "fitting HDBSCAN", 0.1)
        fitted = fitting.fit_hdbscan(vectors, min_cluster_size=min_cluster_size, min_samples=params["min_samples"],
                                     reduction=params["reduction"], dims=params["dims"] or DEFAULT_DIMS, seed=seed,
                                     check=attempt.check)
        lap("fit")
    attempt.check()
    result.update(fitted.info, clusters=fitted.n_clusters)
    if fitted.n_clusters == 0:
        raise jobs.JobFailed("HDBSCAN found no cluster (every document is an outlier): lower min_cluster_size "
                             "or min_samples and run it again.")
    model = fitted.model
    labels_, strengths = fitted.labels, fitted.strengths
    moved = np.zeros(len(doc_ids), dtype=bool)
    noise = labels_ == fitting.NOISE
    result["noise_share"] = round(float(noise.mean()), 4)
    if run.method == ClusteringRun.Method.HDBSCAN and params.get("assign_outliers") and noise.any():
        attempt.set_phase("assigning outliers to the nearest cluster", 0.5)
        labels_, strengths = labels_.copy(), strengths.copy()
        labels_[noise], strengths[noise] = fitting.nearest_clusters(model, vectors[noise])
        moved = noise
        result["outliers_moved"] = int(noise.sum())
    result["noise_share_after_assignment"] = round(float((labels_ == fitting.NOISE).mean()), 4)
    result["silhouette"] = _silhouette(vectors, labels_, seed)
    lap("outliers_and_silhouette")

    attempt.set_phase("labelling clusters (c-TF-IDF)", 0.6)
    texts, metadata = load_texts(doc_ids)
    n_clusters = fitted.n_clusters
    terms = labels.class_tfidf(texts, labels_, n_clusters)
    attempt.check()
    member = labels_ >= 0
    similarity = np.full(len(doc_ids), -1.0, dtype=np.float32)
    similarity[member] = np.einsum("ij,ij->i", vectors[member], model["centroids"][labels_[member]])
    reps = labels.representatives(labels_, strengths, similarity, n_clusters)
    shares = labels.field_shares(metadata, labels_, n_clusters)
    sizes = np.bincount(labels_[member], minlength=n_clusters)
    lap("label")

    attempt.set_phase("drawing the map", 0.8)
    model.update(fitting.fit_map(vectors, labels_, seed=seed))
    drawn = fitting.sample_rows(len(doc_ids), MAP_POINTS, seed)
    xy = np.full((len(doc_ids), 2), np.nan, dtype=np.float32)
    xy[drawn] = fitting.project(model, vectors[drawn])
    folder = attempt.workdir(settings.MODELS_DIR / "clustering" / f"run-{int(run.pk)}")
    artifact = fitting.save_model(model, folder / "model.npz")
    # Assignments may run on another host (no shared disk): the store holds the model by ids.
    artifacts.publish_file(artifact, *artifact_key(run, attempt.number))
    lap("map_and_artifact")

    version_number = run.dataset.versions.aggregate(n=Max("number"))["n"]
    attempt.set_phase("saving", 0.9)
    with transaction.atomic():
        # Fenced first: a stale attempt stops here and writes nothing.
        attempt.update(phase="saving", progress=0.9)
        ClusterAssignment.objects.filter(run=run).delete()
        Cluster.objects.filter(run=run).delete()
        clusters = Cluster.objects.bulk_create([
            Cluster(run=run, number=c, terms=terms[c], size=int(sizes[c]), fields=shares[c],
                    representatives=[int(doc_ids[i]) for i in reps[c]])
            for c in range(n_clusters)
        ])
        cluster_ids = np.asarray([c.pk for c in clusters], dtype=np.int64)
        _copy_assignments(run.pk, doc_ids, labels_, strengths, moved, xy, cluster_ids, source="fit")
        previous = match_previous(run=run, clusters=clusters)
        lap("save")
        result.update(timings=timings, seconds=round(time.perf_counter() - started, 2),
                      matched_previous=previous.pk if previous else None)
        attempt.update(result=result, artifact_path=str(artifact), dataset_version=version_number,
                       previous=previous, needs_assignment=False)


def artifact_key(run: ClusteringRun, attempt_number: int) -> tuple[str, ...]:
    """The fitted model's key in the artifact store (training.artifacts): ids only."""
    return (str(int(run.owner_id)), f"clustering-{int(run.pk)}", f"attempt-{int(attempt_number)}", "model.npz")


def artifact_cache(run: ClusteringRun) -> Path:
    """Where a host that did not fit the run keeps the store's copy: the path it would have written itself."""
    return Path(settings.MODELS_DIR) / "clustering" / f"run-{int(run.pk)}" / f"attempt-{int(run.attempt)}" / "model.npz"


def _silhouette(vectors: np.ndarray, labels_: np.ndarray, seed: int) -> float | None:
    """Cosine silhouette of the clustered (non-outlier) rows on a seeded sample; None under 2 clusters."""
    from sklearn.metrics import silhouette_score

    rows = np.flatnonzero(labels_ >= 0)
    rows = rows[fitting.sample_rows(len(rows), RESULT_SILHOUETTE_SAMPLE, seed)]
    if len(set(labels_[rows].tolist())) < 2:
        return None
    return round(float(silhouette_score(vectors[rows], labels_[rows], metric="cosine")), 4)


def _copy_assignments(run_id: int, doc_ids: np.ndarray, labels_: np.ndarray, strengths: np.ndarray,
                      moved: np.ndarray, xy: np.ndarray, cluster_ids: np.ndarray, *, source: str) -> int:
    """COPY one assignment row per document (100k rows in ~2 s, bulk_create takes ~20 s); inside the caller's transaction."""
    now = timezone.now()

    def value(x: float) -> float | None:
        return None if np.isnan(x) else float(x)

    with connection.cursor() as cursor:
        with cursor.cursor.copy(
            "COPY search_clusterassignment (run_id, document_id, cluster_id, strength, source, moved_from_noise, "
            "x, y, created_at) FROM STDIN"
        ) as copy:
            for i in range(len(doc_ids)):
                label = int(labels_[i])
                copy.write_row((int(run_id), int(doc_ids[i]), int(cluster_ids[label]) if label >= 0 else None,
                                value(strengths[i]), source, bool(moved[i]), value(xy[i, 0]), value(xy[i, 1]), now))
    return len(doc_ids)


def match_previous(*, run: ClusteringRun, clusters: list[Cluster]) -> ClusteringRun | None:
    """Match this run's clusters to the dataset's previous run by member overlap; carry names over.

    Pairs are chosen by the Hungarian method on Jaccard overlap (one-to-one);
    a pair at or above MATCH_MIN_JACCARD is "the same cluster": its `matched`
    and `match_overlap` are set and a person's name is kept. Call inside the
    run's saving transaction, after its assignments are written.
    """
    from scipy.optimize import linear_sum_assignment

    previous = (ClusteringRun.objects.filter(dataset_id=run.dataset_id, status=ClusteringRun.Status.SUCCEEDED)
                .exclude(pk=run.pk).order_by("-created_at", "-id").first())
    if previous is None or not clusters:
        return previous
    old = list(previous.clusters.all())
    if not old:
        return previous
    # Counted in numpy from both runs' (document, cluster) rows: a SQL self-join of the
    # freshly copied, not yet analysed rows got a nested-loop plan (30 s at 20k tickets).
    new_at = {c.pk: i for i, c in enumerate(clusters)}
    old_at = {c.pk: j for j, c in enumerate(old)}

    def members(run_id: int, at: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(list(ClusterAssignment.objects.filter(run_id=run_id, cluster__isnull=False)
                               .values_list("document_id", "cluster_id")), dtype=np.int64).reshape(-1, 2)
        return rows[:, 0], np.asarray([at[c] for c in rows[:, 1].tolist()], dtype=np.int64)

    new_docs, new_rows = members(run.pk, new_at)
    old_docs, old_cols = members(previous.pk, old_at)
    _, in_new, in_old = np.intersect1d(new_docs, old_docs, assume_unique=True, return_indices=True)
    if not len(in_new):
        return previous
    shared = np.zeros((len(clusters), len(old)))
    np.add.at(shared, (new_rows[in_new], old_cols[in_old]), 1)
    new_sizes = np.asarray([c.size for c in clusters], dtype=float)[:, None]
    old_sizes = np.asarray([c.size for c in old], dtype=float)[None, :]
    jaccard = shared / np.maximum(new_sizes + old_sizes - shared, 1.0)
    rows, cols = linear_sum_assignment(-jaccard)
    changed = []
    for i, j in zip(rows, cols):
        if jaccard[i, j] >= MATCH_MIN_JACCARD:
            cluster = clusters[i]
            cluster.matched = old[j]
            cluster.match_overlap = round(float(jaccard[i, j]), 4)
            cluster.name = old[j].name or cluster.name
            changed.append(cluster)
    Cluster.objects.bulk_update(changed, ["matched", "match_overlap", "name"])
    return previous


def cluster_table(*, run: ClusteringRun) -> dict[str, Any]:
    """The run page's table: clusters largest first, each with its growth and the change since its match.

    Growth = members added or changed in the dataset's latest version (when
    there is more than one): "which groups grew with the last export". One
    query for the clusters with the count, one for the dataset's versions.
    """
    latest = run.dataset.versions.aggregate(n=Max("number"))["n"] or 1
    clusters = (run.clusters.select_related("matched")
                .annotate(grew=Count("members", filter=Q(members__document__changed_in_version=latest)))
                .order_by("-size", "number"))
    rows = [{
        "cluster": c, "growth": c.grew if latest > 1 else None,
        "delta": c.size - c.matched.size if c.matched else None,
        "components": c.fields.get("component", [])[:3],
    } for c in clusters]
    return {"rows": rows, "latest_version": latest}
