"""Clustering on the Hadoop tickets and at 100,000 documents (issue 12).

What it builds, in its own throwaway PostgreSQL + pgvector:
- dataset "hadoop": the 20,859 real tickets of --data with their real
  vectors (all-MiniLM-L6-v2 by default, encoded once and cached under
  var/bench-cache/ exactly as `bench search` does, so both share the cache);
- dataset "hadoop-100k" (unless --docs 0): the same tickets plus perturbed
  copies up to --docs, as in `bench search`: a copy keeps the metadata, drops
  a title word, keeps a shuffled ~70% of the body's sentences, and its vector
  is the original's plus Gaussian noise (cosine ~0.9).

Then it runs the product's clustering job (search.clustering.runs, the code
the worker runs: vectors from pgvector, fit, c-TF-IDF labels, map, fenced
save) for KMeans(auto) and for PCA + HDBSCAN (with "assign outliers", so the
noise share before and after is known), twice each with different seeds.
Figures:
- seconds per run (target <= 90 s at 20,859 tickets, <= 360 s at 100k) and
  the process's peak RSS (target <= 4 GB);
- noise share of HDBSCAN before and after assigning outliers, the cosine
  silhouette of each result on a 5,000-ticket sample;
- stability: adjusted Rand index between the two seeds (target >= 0.8);
- meaning: the share of duplicate pairs (connected components of Duplicate
  links, ../shared/DATA.md) whose two tickets share a cluster, over the
  share expected by chance with the same cluster sizes (sum of squared
  cluster shares), as `<method>_dup_pairs_vs_chance` (target >= 5) with
  every ticket in a cluster (HDBSCAN after its outliers were moved; before
  that, with outliers never "together", as `..._before_assignment`), and
  the NMI between the clusters and the tickets' first Jira component.
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
from pathlib import Path

import numpy as np

from bench.harness import emit, peak_rss_mb
from bench.search import DEFAULT_DATA, _copy_vectors, _variant, cached_vectors, issue_text, load_issues


def _import(owner, name: str, path: Path):
    from training import datasets

    return datasets.import_dataset(owner=owner, name=name, kind="tickets", path=path, filename=path.name)


def _index(owner, dataset, model_path: str, vectors_by_key: dict, *, copies: int = 0):
    """A READY index of the dataset with the cached vectors; `copies` perturbed copies added first."""
    from django.db import connection, transaction

    from search.models import SearchIndex
    from training import finetune
    from training.models import Document, ModelVersion

    if copies:
        rng = np.random.default_rng(0)
        originals = list(Document.objects.filter(dataset=dataset).order_by("id")
                         .values_list("external_key", "title", "body", "metadata"))
        batch = []
        for n in range(copies):
            key, title, body, metadata = originals[n % len(originals)]
            title, body = _variant(rng, title, body)
            batch.append(Document(dataset=dataset, external_key=f"{key}~{n // len(originals) + 1}", title=title or key,
                                  body=body, metadata={k: v for k, v in metadata.items() if k != "links"}))
            if len(batch) == 5000:
                Document.objects.bulk_create(batch)
                batch = []
        if batch:
            Document.objects.bulk_create(batch)
    dims = int(next(iter(vectors_by_key.values())).shape[0])
    version = ModelVersion.objects.create(owner=dataset.owner, name=f"bench-{dataset.name}", version=1,
                                          base_model=model_path, artifact_path=finetune.resolve_base_model(model_path),
                                          dimensions=dims)
    rows = list(Document.objects.filter(dataset=dataset).order_by("id").values_list("id", "external_key"))
    noise = np.random.default_rng(1)
    out = []
    for doc_id, key in rows:
        vector = vectors_by_key[key.split("~")[0]]
        if "~" in key:
            noisy = vector + noise.normal(0.0, 0.025, size=dims).astype(np.float32)
            vector = noisy / np.linalg.norm(noisy)
        out.append((doc_id, version.pk, vector))
    with transaction.atomic():
        _copy_vectors(connection.connection, out)
    return SearchIndex.objects.create(owner=owner, dataset=dataset, model_version=version,
                                      status=SearchIndex.Status.READY, embedded_count=len(rows), total_count=len(rows))


def _cluster(index, owner, method: str, params: dict) -> tuple:
    """Run the product's clustering job: (run, document ids ascending, labels, labels before outliers were moved, seconds)."""
    from search.clustering import runs
    from search.models import ClusterAssignment

    started = time.perf_counter()
    run = runs.start_clustering(index=index, owner=owner, method=method, params=params)
    runs.run(job_id=run.pk)
    wall = time.perf_counter() - started
    run.refresh_from_db()
    if run.status != "succeeded":
        raise RuntimeError(f"{method} run failed: {run.error}")
    rows = ClusterAssignment.objects.filter(run=run).order_by("document_id").values_list(
        "document_id", "cluster__number", "moved_from_noise")
    ids, labels, before = [], [], []
    for doc_id, number, moved in rows.iterator(chunk_size=20000):
        ids.append(doc_id)
        labels.append(-1 if number is None else number)
        before.append(-1 if number is None or moved else number)
    return run, np.asarray(ids), np.asarray(labels), np.asarray(before), wall


def _dup_pairs_vs_chance(keys_by_id: dict, ids: np.ndarray, labels: np.ndarray, dup_clusters: list) -> dict:
    label_of = {keys_by_id[d]: int(lab) for d, lab in zip(ids.tolist(), labels.tolist())}
    pairs = [(a, b) for cluster in dup_clusters for a, b in itertools.combinations(cluster, 2)
             if a in label_of and b in label_of]
    together = sum(1 for a, b in pairs if label_of[a] >= 0 and label_of[a] == label_of[b])
    sizes = np.bincount(labels[labels >= 0])
    chance = float(((sizes / len(labels)) ** 2).sum())
    share = together / len(pairs) if pairs else 0.0
    return {"dup_pairs": len(pairs), "dup_pairs_together": round(share, 4), "chance_together": round(chance, 4),
            "dup_pairs_vs_chance": round(share / chance, 2) if chance else 0.0}


def _nmi_component(ids: np.ndarray, labels: np.ndarray, component_by_id: dict) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    keep = [i for i, d in enumerate(ids.tolist()) if d in component_by_id]
    return round(float(normalized_mutual_info_score([component_by_id[int(ids[i])] for i in keep], labels[keep])), 4)


def _measure(name: str, index, owner, method: str, params: dict, seeds: tuple[int, int], *, quality: dict | None):
    from sklearn.metrics import adjusted_rand_score

    first, ids, labels, before, wall = _cluster(index, owner, method, {**params, "seed": seeds[0]})
    second, ids2, labels2, _, wall2 = _cluster(index, owner, method, {**params, "seed": seeds[1]})
    assert (ids == ids2).all()
    result = first.result
    figures = {
        f"{name}_seconds": round(wall, 1), f"{name}_seconds_second_seed": round(wall2, 1),
        f"{name}_clusters": result["clusters"], f"{name}_silhouette": result["silhouette"],
        f"{name}_ari_between_seeds": round(float(adjusted_rand_score(labels, labels2)), 4),
        f"{name}_phase_seconds": result["timings"],
    }
    if method == "kmeans":
        figures[f"{name}_k"] = result["k"]
        figures[f"{name}_silhouette_by_k"] = result["silhouette_by_k"]
    else:
        figures.update({f"{name}_noise_share": result["noise_share"],
                        f"{name}_noise_share_after_assignment": result["noise_share_after_assignment"],
                        f"{name}_min_cluster_size": result["min_cluster_size"],
                        f"{name}_pca_explained_variance": result.get("pca_explained_variance"),
                        f"{name}_reduce_and_hdbscan_seconds": round(result["reduce_seconds"] + result["hdbscan_seconds"], 2),
                        f"{name}_fitted_points": result["fitted_points"]})
    if quality is not None:
        # Every ticket in a cluster (HDBSCAN: after its outliers were moved), so both methods compare.
        dup = _dup_pairs_vs_chance(quality["keys"], ids, labels, quality["dup_clusters"])
        figures.update({f"{name}_{k}": v for k, v in dup.items()})
        figures[f"{name}_nmi_component"] = _nmi_component(ids, labels, quality["components"])
        if method == "hdbscan":  # outliers are never "together": the tight groups alone
            dup = _dup_pairs_vs_chance(quality["keys"], ids, before, quality["dup_clusters"])
            figures.update({f"{name}_{k}_before_assignment": v for k, v in dup.items()})
            figures[f"{name}_nmi_component_before_assignment"] = _nmi_component(ids, before, quality["components"])
        figures[f"{name}_top_labels"] = [c.auto_label for c in first.clusters.order_by("-size")[:8]]
    figures[f"{name}_peak_rss_mb"] = round(peak_rss_mb(), 1)
    emit({"step": name, **figures})
    return figures


def run(argv: list[str]) -> dict:
    import argparse

    from bench.harness import setup_django, summary

    parser = argparse.ArgumentParser(prog="python -m bench cluster")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2",
                        help="base model name or a fine-tuned model folder (its vectors are cached)")
    parser.add_argument("--docs", type=int, default=100_000, help="size of the perturbed set (0: skip it)")
    parser.add_argument("--seeds", type=int, nargs=2, default=(1, 2))
    args = parser.parse_args(argv)
    # A throwaway database that serves no request: any key will do (settings refuse to start without one).
    os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
    setup_django()
    from django.contrib.auth import get_user_model

    from training.datasets import dataset_tickets
    from training.models import Document
    from training.pairs import duplicate_clusters

    issues = load_issues(args.data)
    texts = {}
    for issue in issues:
        if (issue["fields"].get("summary") or "").strip() and issue["key"] not in texts:
            texts[issue["key"]] = issue_text(issue)
    vectors_by_key = cached_vectors(model_path=args.model, data=args.data, texts_by_key=texts)
    owner, _ = get_user_model().objects.get_or_create(username="bench")

    t0 = time.perf_counter()
    real = _import(owner, "hadoop", args.data)
    index = _index(owner, real, args.model, vectors_by_key)
    emit({"step": "build", "documents": index.total_count, "seconds": round(time.perf_counter() - t0, 1)})
    docs = Document.objects.filter(dataset=real).values_list("id", "external_key", "metadata")
    keys = {d: k for d, k, _ in docs}
    components = {d: sorted(m["components"])[0] for d, _, m in docs if m.get("components")}
    quality = {"keys": keys, "components": components, "dup_clusters": duplicate_clusters(dataset_tickets(real))}

    figures: dict = {"documents": index.total_count, "model": args.model}
    figures.update(_measure("kmeans", index, owner, "kmeans", {"k": "auto"}, tuple(args.seeds), quality=quality))
    figures.update(_measure("hdbscan", index, owner, "hdbscan", {"assign_outliers": True}, tuple(args.seeds),
                            quality=quality))
    figures["load_avg_1m_after_20k"] = round(os.getloadavg()[0], 2)
    targets = {
        "kmeans_seconds": "<= 90", "hdbscan_seconds": "<= 90",
        "kmeans_ari_between_seeds": ">= 0.8", "hdbscan_ari_between_seeds": ">= 0.8",
        "kmeans_dup_pairs_vs_chance": ">= 5", "hdbscan_dup_pairs_vs_chance": ">= 5",
    }
    if args.docs > index.total_count:
        t0 = time.perf_counter()
        big = _import(owner, "hadoop-100k", args.data)
        big_index = _index(owner, big, args.model, vectors_by_key, copies=args.docs - index.total_count)
        emit({"step": "build-100k", "documents": big_index.total_count, "seconds": round(time.perf_counter() - t0, 1)})
        figures["documents_100k"] = big_index.total_count
        for name, method, params in (("kmeans_100k", "kmeans", {"k": "auto"}),
                                     ("hdbscan_100k", "hdbscan", {"assign_outliers": True})):
            started = time.perf_counter()
            run_, ids, labels, _, wall = _cluster(big_index, owner, method, {**params, "seed": args.seeds[0]})
            figures.update({f"{name}_seconds": round(wall, 1), f"{name}_clusters": run_.result["clusters"],
                            f"{name}_phase_seconds": run_.result["timings"],
                            f"{name}_peak_rss_mb": round(peak_rss_mb(), 1)})
            if method == "hdbscan":
                figures[f"{name}_noise_share"] = run_.result["noise_share"]
                figures[f"{name}_fitted_points"] = run_.result["fitted_points"]
            emit({"step": name, "seconds": round(time.perf_counter() - started, 1)})
        targets.update({"kmeans_100k_seconds": "<= 360", "hdbscan_100k_seconds": "<= 360"})
        figures["load_avg_1m_after_100k"] = round(os.getloadavg()[0], 2)
    figures["peak_rss_mb"] = round(peak_rss_mb(), 1)
    targets["peak_rss_mb"] = "<= 4096"
    return summary("cluster", figures, targets)
