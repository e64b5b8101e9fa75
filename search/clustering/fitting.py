"""Fitting and applying clustering models: numpy and scikit-learn only, no Django.

Vectors come in L2-normalised, so Euclidean distance orders pairs as cosine
similarity does and KMeans on them is spherical k-means in all but name.

- KMeans with a given k, or "auto": k picked by silhouette over a range of
  candidates on a seeded sample (every candidate's score is kept).
- HDBSCAN after PCA. PCA rather than UMAP: it is deterministic, linear (a
  new ticket is reduced with one matrix product, so the reducer is a few
  arrays in the artifact), needs no numba/pynndescent stack, and reduces
  100k x 384 in about a second on 2 cores where UMAP takes minutes. HDBSCAN
  is scikit-learn's (>= 1.3); above HDBSCAN_FIT_MAX points it is fitted on a
  seeded sample and the rest are predicted like new tickets, because its
  minimum spanning tree grows with n^2 (6 s at 20k, 38 s at 50k points on
  this machine).
- Prediction without refitting: the nearest centroid for KMeans; for
  HDBSCAN the rule of the hdbscan library's approximate_predict: a new point
  joins the cluster of its nearest fitted point in mutual-reachability
  distance (an outlier if that point is one), unless that distance is
  beyond where the cluster ends, then it is an outlier too; its strength is
  the cluster's smallest distance over that distance. scikit-learn keeps
  HDBSCAN's condensed tree private, so where a cluster ends and its
  smallest distance are estimated from the fitted points (_cluster_extent).
  A new point farther from the PCA subspace than any fitted member is an
  outlier too (what the reduction drops, HDBSCAN cannot see).

Everything the prediction needs is a dict of arrays saved with np.savez
(no pickle): `save_model` / `load_model`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Candidates tried by KMeans(auto), spread evenly over [k_min, k_max].
MAX_K_CANDIDATES = 8
# KMeans restarts: more restarts make the result depend less on the seed.
# Hadoop tickets, k=5: ARI between two seeds 0.56 with 3 restarts; k=10 with
# 10 restarts: 0.985. The restarts run on a seeded sample of
# KMEANS_RESTART_SAMPLE tickets and the best one seeds a single run on all
# of them: 10 full restarts took 61 s of a 101 s run at 20k tickets on 2
# busy cores (bench cluster).
KMEANS_N_INIT = 10
KMEANS_RESTART_SAMPLE = 5_000
KMEANS_MAX_ITER = 100
# HDBSCAN is fitted on at most this many points, the rest predicted (see the module docstring).
HDBSCAN_FIT_MAX = 25_000
# Fitted neighbours looked at when predicting a new point's HDBSCAN cluster.
PREDICT_NEIGHBOURS = 16
# No HDBSCAN cluster may hold more than this share of the fitted tickets. On
# PCA-reduced ticket vectors the excess-of-mass selection sometimes keeps one
# blob of ~80% of the tickets plus a crumb (3 seeded 2,300-ticket samples of
# the Hadoop set: 2 clusters in two of them); capped, it selects that blob's
# sub-clusters instead (25-29 clusters), and it changes nothing where no blob
# forms (the whole Hadoop set: 33 clusters either way). The same 20,859
# tickets embedded by the product's index (ONNX, 256 tokens) instead of the
# bench's (128 tokens) gave one cluster of ~51% at a cap of 60%: a quarter it
# is. The price: a real group of more than a quarter of the tickets is split
# too; below CAP_FROM_POINTS fitted tickets (small sets, tests) there is no cap.
MAX_CLUSTER_SHARE = 0.25
CAP_FROM_POINTS = 500
NOISE = -1


@dataclass
class Fitted:
    """What a fit produced: a label per row (NOISE for outliers), a strength per row (nan: none) and the model."""

    labels: np.ndarray
    strengths: np.ndarray
    model: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_clusters(self) -> int:
        return int(self.model["centroids"].shape[0])


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted row numbers of a seeded sample of at most `size` rows (all rows when n <= size)."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def k_candidates(k_min: int, k_max: int) -> list[int]:
    return sorted({int(round(k)) for k in np.linspace(k_min, k_max, MAX_K_CANDIDATES)})


def choose_k(
    vectors: np.ndarray, *, k_min: int, k_max: int, sample_size: int, seed: int,
    check: Callable[[], None] = lambda: None,
) -> tuple[int, dict[int, float]]:
    """The k with the best silhouette (cosine) on a seeded sample, and every candidate's score.

    Ties go to the smaller k. `check` runs between candidates (cancel, lost claim).
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    sample = vectors[sample_rows(len(vectors), sample_size, seed)]
    scores: dict[int, float] = {}
    for k in k_candidates(k_min, min(k_max, len(sample) - 1)):
        check()
        labels = KMeans(n_clusters=k, n_init=1, max_iter=KMEANS_MAX_ITER, random_state=seed).fit_predict(sample)
        scores[k] = round(float(silhouette_score(sample, labels, metric="cosine")), 4)
    if not scores:
        raise ValueError("too few documents to choose k")
    best = max(scores, key=lambda k: (scores[k], -k))
    return best, scores


def fit_kmeans(vectors: np.ndarray, *, k: int, seed: int) -> Fitted:
    """KMeans on normalised vectors (restarts on a sample, then one run on all); strength = cosine to the centroid."""
    from sklearn.cluster import KMeans

    if not 2 <= k <= len(vectors):
        raise ValueError(f"k: must be between 2 and the number of documents ({len(vectors)}), got {k}")
    # The sample does not depend on the seed (only the restarts do): two seeds then differ less.
    sample = vectors[sample_rows(len(vectors), KMEANS_RESTART_SAMPLE, 0)]
    best = KMeans(n_clusters=k, n_init=KMEANS_N_INIT, max_iter=KMEANS_MAX_ITER, random_state=seed).fit(sample)
    km = best if len(sample) == len(vectors) else KMeans(
        n_clusters=k, init=best.cluster_centers_, n_init=1, max_iter=KMEANS_MAX_ITER, random_state=seed).fit(vectors)
    centroids = normalise(km.cluster_centers_)
    labels = km.labels_.astype(np.int64)
    strengths = np.einsum("ij,ij->i", vectors, centroids[labels])
    return Fitted(labels=labels, strengths=strengths.astype(np.float32),
                  model={"method": np.array("kmeans"), "centroids": centroids.astype(np.float32)},
                  info={"k": k, "inertia": round(float(km.inertia_), 3), "iterations": int(km.n_iter_)})


def fit_pca(vectors: np.ndarray, *, dims: int, seed: int) -> dict[str, np.ndarray]:
    """A PCA reducer as arrays (mean, components, explained variance ratio); deterministic for a seed."""
    from sklearn.decomposition import PCA

    dims = min(dims, vectors.shape[1], len(vectors))
    # covariance_eigh: one d x d eigendecomposition, exact and fast for n >> d (384 dims here).
    pca = PCA(n_components=dims, svd_solver="covariance_eigh", random_state=seed).fit(vectors)
    return {"pca_mean": pca.mean_.astype(np.float32), "pca_components": pca.components_.astype(np.float32),
            "pca_explained": pca.explained_variance_ratio_.astype(np.float32)}


def reduce(model: dict[str, np.ndarray], vectors: np.ndarray) -> np.ndarray:
    if "pca_components" not in model:
        return vectors
    return (vectors - model["pca_mean"]) @ model["pca_components"].T


def fit_hdbscan(
    vectors: np.ndarray, *, min_cluster_size: int, min_samples: int, reduction: str, dims: int, seed: int,
    fit_max: int = HDBSCAN_FIT_MAX, check: Callable[[], None] = lambda: None,
) -> Fitted:
    """Optional PCA, then HDBSCAN (on a seeded sample above fit_max), with what prediction needs.

    Strength = HDBSCAN's membership probability for fitted points, the
    approximate_predict-style strength for predicted ones; outliers get NOISE and nan.
    """
    from sklearn.cluster import HDBSCAN
    from sklearn.neighbors import NearestNeighbors

    started = time.perf_counter()
    model: dict[str, np.ndarray] = {"method": np.array("hdbscan")}
    if reduction == "pca":
        model.update(fit_pca(vectors, dims=dims, seed=seed))
    reduced = reduce(model, vectors).astype(np.float32)
    reduce_s = time.perf_counter() - started
    check()
    fit_rows = sample_rows(len(reduced), fit_max, seed)
    points = np.ascontiguousarray(reduced[fit_rows])
    min_samples = min(min_samples, len(points) - 1)
    started = time.perf_counter()
    largest = int(MAX_CLUSTER_SHARE * len(points))
    capped = len(points) >= CAP_FROM_POINTS and largest > min_cluster_size
    hdb = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples, copy=True,
                  max_cluster_size=largest if capped else None).fit(points)
    fit_s = time.perf_counter() - started
    check()
    labels_fit = hdb.labels_.astype(np.int64)
    n_clusters = int(labels_fit.max()) + 1 if len(labels_fit) else 0
    # sklearn's core distance: distance to the min_samples-th neighbour, the point itself counted first.
    core = NearestNeighbors(n_neighbors=min_samples).fit(points).kneighbors(points)[0][:, -1].astype(np.float32)
    densest, reach = _cluster_extent(points, labels_fit, core, hdb.probabilities_, n_clusters)
    if "pca_components" in model:
        # What PCA drops is invisible to HDBSCAN: a new ticket on a topic none of the fitted
        # ones has lies off the kept subspace but may project near its centre. Its distance
        # from the subspace beyond every fitted member's makes it an outlier (prediction).
        residual = _pca_residual(model, vectors[fit_rows])
        model["pca_residual_limit"] = np.array(float(residual[labels_fit >= 0].max()) if n_clusters else np.inf,
                                               dtype=np.float32)
    model.update({
        "fit_points": points, "fit_labels": labels_fit, "fit_core": core, "cluster_densest_core": densest,
        "cluster_reach": reach, "min_samples": np.array(min_samples),
    })
    labels = np.full(len(vectors), NOISE, dtype=np.int64)
    strengths = np.full(len(vectors), np.nan, dtype=np.float32)
    labels[fit_rows] = labels_fit
    strengths[fit_rows] = np.where(labels_fit >= 0, hdb.probabilities_, np.nan)
    rest = np.setdiff1d(np.arange(len(vectors)), fit_rows, assume_unique=True)
    if len(rest):
        labels[rest], strengths[rest] = _predict_reduced_hdbscan(model, reduced[rest])
    model["centroids"] = _centroids(vectors, labels, n_clusters)
    info = {
        "min_cluster_size": min_cluster_size, "min_samples": min_samples, "max_cluster_share": MAX_CLUSTER_SHARE if capped else None,
        "reduction": reduction,
        "reduced_dims": int(reduced.shape[1]), "fitted_points": int(len(points)), "predicted_points": int(len(rest)),
        "reduce_seconds": round(reduce_s, 2), "hdbscan_seconds": round(fit_s, 2),
    }
    if "pca_explained" in model:
        info["pca_explained_variance"] = round(float(model["pca_explained"].sum()), 4)
    return Fitted(labels=labels, strengths=strengths, model=model, info=info)


def _cluster_extent(points: np.ndarray, labels_fit: np.ndarray, core: np.ndarray, probabilities: np.ndarray,
                    n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster: its smallest distance (densest core distance) and how far it reaches before it ends.

    It ends where it meets another cluster: the smallest mutual-reachability
    distance between one of its members and a member of another cluster
    (single linkage joins them there). With one cluster, the farthest its
    members fall out: a member's probability is lambda / max lambda, so it
    leaves at (smallest distance) / probability.
    """
    from sklearn.neighbors import NearestNeighbors

    densest = np.zeros(n_clusters, dtype=np.float32)
    reach = np.zeros(n_clusters, dtype=np.float32)
    for c in range(n_clusters):
        inside = labels_fit == c
        densest[c] = core[inside].min()
        reach[c] = max(core[inside].max(), densest[c] / max(float(probabilities[inside].min()), 1e-6))
        others = np.flatnonzero((labels_fit >= 0) & ~inside)
        if len(others):
            k = min(5, len(others))
            distances, nearest = NearestNeighbors(n_neighbors=k).fit(points[others]).kneighbors(points[inside])
            mr = np.maximum(np.maximum(distances, core[others][nearest]), core[inside][:, None])
            reach[c] = max(reach[c], float(mr.min()))
    return densest, reach


def _centroids(vectors: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """Normalised mean vector of each cluster's members (rows: cluster numbers)."""
    sums = np.zeros((n_clusters, vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, labels[labels >= 0], vectors[labels >= 0])
    return normalise(sums.astype(np.float32))


def _pca_residual(model: dict[str, np.ndarray], vectors: np.ndarray) -> np.ndarray:
    """Each vector's distance from the PCA subspace (what the reduction drops)."""
    centred = vectors - model["pca_mean"]
    kept = (centred @ model["pca_components"].T) @ model["pca_components"]
    return np.linalg.norm(centred - kept, axis=1)


def _predict_reduced_hdbscan(model: dict[str, np.ndarray], reduced: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.neighbors import NearestNeighbors

    points, fit_labels, fit_core = model["fit_points"], model["fit_labels"], model["fit_core"]
    min_samples = int(model["min_samples"])
    k = min(max(PREDICT_NEIGHBOURS, min_samples), len(points))
    distances, neighbours = NearestNeighbors(n_neighbors=k).fit(points).kneighbors(reduced)
    # A new point's core distance: its min_samples-th nearest fitted point (itself is not among them).
    own_core = distances[:, min(min_samples, k) - 1]
    reach = np.maximum(np.maximum(distances, fit_core[neighbours]), own_core[:, None])
    best = np.argmin(reach, axis=1)
    nearest = neighbours[np.arange(len(reduced)), best]
    mr = reach[np.arange(len(reduced)), best]
    labels = fit_labels[nearest].copy()
    inside = labels >= 0
    inside[inside] = mr[inside] <= model["cluster_reach"][labels[inside]]
    labels[~inside] = NOISE
    strengths = np.full(len(reduced), np.nan, dtype=np.float32)
    densest = model["cluster_densest_core"][labels[inside]]
    strengths[inside] = np.minimum(1.0, densest / np.maximum(mr[inside], 1e-12))
    return labels, strengths


def predict(model: dict[str, np.ndarray], vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels (NOISE for outliers) and strengths of new normalised vectors under a fitted model, no refit."""
    vectors = normalise(vectors)
    if str(model["method"]) == "kmeans":
        similarity = vectors @ model["centroids"].T
        labels = np.argmax(similarity, axis=1).astype(np.int64)
        return labels, similarity[np.arange(len(vectors)), labels].astype(np.float32)
    labels, strengths = _predict_reduced_hdbscan(model, reduce(model, vectors).astype(np.float32))
    if "pca_residual_limit" in model:
        off = _pca_residual(model, vectors) > float(model["pca_residual_limit"])
        labels[off], strengths[off] = NOISE, np.nan
    return labels, strengths


def nearest_clusters(model: dict[str, np.ndarray], vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each vector's nearest cluster by cosine to the centroids (BERTopic's reduce_outliers, "embeddings")."""
    similarity = normalise(vectors) @ model["centroids"].T
    labels = np.argmax(similarity, axis=1).astype(np.int64)
    return labels, similarity[np.arange(len(vectors)), labels].astype(np.float32)


# --- The 2-D map -------------------------------------------------------------------------


def fit_map(vectors: np.ndarray, labels: np.ndarray, *, seed: int) -> dict[str, np.ndarray]:
    """A 2-D projection for the map, as an affine map stored with the model (new tickets get a place too).

    Linear discriminant analysis (SVD solver) on the clustered rows: of all
    linear 2-D views, the one that best separates the clusters. PCA's first
    two components showed one round blob with the clusters mixed through it
    (3,000 Hadoop tickets in 20 KMeans clusters: between/within-cluster
    spread 2.5 with PCA, 4.1 with LDA; the eigen solver with shrinkage
    blew up to coordinates of 1e22 on gitbugs' 37 clusters).
    Distances on the map are not similarities; colours are the truth. Under
    three clusters (LDA has at most clusters - 1 axes) it falls back to PCA.
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    member = labels >= 0
    if len(set(labels[member].tolist())) >= 3:
        rows = np.flatnonzero(member)[sample_rows(int(member.sum()), 50_000, seed)]
        lda = LinearDiscriminantAnalysis(n_components=2, solver="svd").fit(
            vectors[rows], labels[rows])
        offset = lda.transform(np.zeros((1, vectors.shape[1]), dtype=np.float64))[0]
        matrix = lda.transform(np.eye(vectors.shape[1], dtype=np.float64)) - offset
    else:
        arrays = fit_pca(vectors, dims=2, seed=seed)
        matrix = arrays["pca_components"].T.astype(np.float64)
        offset = -(arrays["pca_mean"].astype(np.float64) @ matrix)
    return {"map_matrix": matrix.astype(np.float32), "map_offset": offset.astype(np.float32)}


def project(model: dict[str, np.ndarray], vectors: np.ndarray) -> np.ndarray:
    return normalise(vectors) @ model["map_matrix"] + model["map_offset"]


# --- The artifact -------------------------------------------------------------------------


def save_model(model: dict[str, np.ndarray], path: Path) -> Path:
    """Write the model's arrays to `path` (.npz, compressed, no pickled objects)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **model)
    return path


def load_model(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
