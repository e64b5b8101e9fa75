"""A finished run's model applied without refitting: new tickets, outliers, texts; and the export of assignments.

New tickets reach a clustering like this: training announces a dataset
version (training.signals.dataset_version_added); search/receivers.py marks
the dataset's current run `needs_assignment` (a dirty flag) next to queueing
the index refresh; when that index build finishes READY (search.indexing.
run_build) the flagged runs of the index get a ClusterAssignmentJob, which
assigns every document that has a vector and no assignment yet. A document
still without a vector keeps the flag up, so the next build tries again.
"""

from __future__ import annotations

import csv
import json
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from django.db import IntegrityError, connection, transaction

from embedportal import jobs
from embedportal.errors import ConflictError, ServiceError
from search import encoders
from search.clustering import fitting
from search.clustering.runs import MAP_POINTS, _copy_assignments, artifact_cache, artifact_key
from search.models import Cluster, ClusterAssignment, ClusterAssignmentJob, ClusteringRun, Embedding, SearchIndex
from training import artifacts, temporary_files
from training.importers import csv_safe
from training.models import Dataset, Document
from training.temporary_files import TemporaryExport

# Documents predicted and written per fenced transaction (with progress saved in between).
ASSIGN_CHUNK = 5000
EXPORT_FORMATS = ("csv", "parquet")
EXPORT_BATCH = 5000
# Fitted models kept in memory per process for /assign (a model is a few MB).
MAX_CACHED_MODELS = 4
_models: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
_models_lock = threading.Lock()


def model_of(run: ClusteringRun) -> dict[str, np.ndarray]:
    """The run's fitted model, loaded once per process (the artifact never changes after the run)."""
    path = run.artifact_path
    if not Path(path).exists() and artifacts.configured():  # fitted on another host: this host's cached copy
        path = str(artifacts.fetch_file(artifact_cache(run), *artifact_key(run, run.attempt)))
    with _models_lock:
        if path in _models:
            _models.move_to_end(path)
            return _models[path]
    model = fitting.load_model(path)
    with _models_lock:
        _models[path] = model
        while len(_models) > MAX_CACHED_MODELS:
            _models.popitem(last=False)
    return model


def _require_finished(run: ClusteringRun) -> None:
    if run.status != ClusteringRun.Status.SUCCEEDED or not run.artifact_path:
        raise ConflictError(f"This clustering run is {run.status}; only a finished run has a model to apply.")


def start_assignment(*, run: ClusteringRun, owner, kind: str = ClusterAssignmentJob.Kind.NEW_DOCUMENTS
                     ) -> ClusterAssignmentJob:
    """Queue a batch assignment with the run's model (after commit); refused while one of that kind is under way."""
    if kind not in ClusterAssignmentJob.Kind.values:
        raise ServiceError(f"kind: must be one of {', '.join(ClusterAssignmentJob.Kind.values)}, got {kind!r}.")
    _require_finished(run)
    if kind == ClusterAssignmentJob.Kind.OUTLIERS and run.method != ClusteringRun.Method.HDBSCAN:
        raise ServiceError("kind: KMeans puts every ticket in a cluster; only HDBSCAN runs have outliers.")
    try:
        with transaction.atomic():
            job = ClusterAssignmentJob.objects.create(run=run, owner=owner, kind=kind)
    except IntegrityError:
        raise ConflictError(f"{ClusterAssignmentJob.Kind(kind).label} is already queued or running for this run.") from None
    jobs.enqueue(job)
    return job


def run(*, job_id: int) -> None:
    """The worker's side (search.tasks calls this)."""
    jobs.run_job(ClusterAssignmentJob, job_id, _body)


def mark_new_tickets(*, dataset: Dataset) -> ClusteringRun | None:
    """A dataset version added tickets: flag its current run; assign at once if its index has nothing to embed.

    Called by search/receivers.py. When the index is being refreshed (the
    usual case: the refresh receiver re-queued it) the index build's end
    queues the assignment (after_index_build); a ready index is assigned now.
    """
    from search.clustering.runs import latest_run

    current = latest_run(dataset=dataset)
    if current is None:
        return None
    ClusteringRun.objects.filter(pk=current.pk).update(needs_assignment=True)
    if SearchIndex.objects.filter(pk=current.index_id, status=SearchIndex.Status.READY).exists():
        _start_quietly(current)
    return current


def after_index_build(*, index: SearchIndex) -> int:
    """An index build finished READY: queue the assignment of every flagged run of the index. Returns how many."""
    queued = 0
    for flagged in ClusteringRun.objects.filter(index=index, needs_assignment=True, status=ClusteringRun.Status.SUCCEEDED):
        queued += _start_quietly(flagged)
    return queued


def _start_quietly(run: ClusteringRun) -> int:
    try:
        start_assignment(run=run, owner=run.owner)
    except ConflictError:  # one is already queued: it will pick these tickets up too
        return 0
    return 1


def _body(attempt: jobs.Attempt) -> None:
    job = ClusterAssignmentJob.objects.select_related("run__index").get(pk=attempt.pk)
    if job.kind == ClusterAssignmentJob.Kind.OUTLIERS:
        _assign_outliers(attempt, job)
    else:
        _assign_new(attempt, job)


def _assign_new(attempt: jobs.Attempt, job: ClusterAssignmentJob) -> None:
    """Predict the clusters of the run's dataset's documents that have a vector and no assignment, chunk by chunk.

    Side effects: inserts ClusterAssignment rows (source "assigned"; an
    outlier moved to its nearest cluster when the run moved its own), adds
    to the clusters' sizes, clears the run's needs_assignment once no
    document is left waiting for a vector. Each chunk is one fenced transaction.
    """
    run_ = job.run
    index = run_.index
    model = model_of(run_)
    clusters = dict(Cluster.objects.filter(run=run_).values_list("number", "pk"))
    cluster_ids = np.asarray([clusters[n] for n in range(len(clusters))], dtype=np.int64)
    attempt.set_phase("finding new tickets", 0.0)
    pending = (Embedding.objects.filter(model_version_id=index.model_version_id, document__dataset_id=index.dataset_id)
               .exclude(document_id__in=ClusterAssignment.objects.filter(run=run_).values("document_id")))
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_nestloop = off")  # as in runs.load_vectors: fresh rows, no statistics
        ids = list(pending.order_by("document_id").values_list("document_id", flat=True))
    assigned = outliers = moved_total = 0
    move_outliers = run_.method == ClusteringRun.Method.HDBSCAN and bool(run_.params.get("assign_outliers"))
    attempt.set_phase("assigning new tickets", 0.0)
    for start in range(0, len(ids), ASSIGN_CHUNK):
        attempt.check()
        chunk = ids[start:start + ASSIGN_CHUNK]
        rows = dict(Embedding.objects.filter(model_version_id=index.model_version_id, document_id__in=chunk)
                    .values_list("document_id", "embedding"))
        doc_ids = np.asarray(chunk, dtype=np.int64)
        vectors = fitting.normalise(np.vstack([np.asarray(rows[d], dtype=np.float32) for d in chunk]))
        found, strengths = fitting.predict(model, vectors)
        moved = np.zeros(len(chunk), dtype=bool)
        if move_outliers and (found < 0).any():  # the run moved its own outliers: new ones follow
            moved = found < 0
            found[moved], strengths[moved] = fitting.nearest_clusters(model, vectors[moved])
        xy = fitting.project(model, vectors) if "map_matrix" in model else np.full((len(chunk), 2), np.nan)
        with transaction.atomic():
            attempt.update(progress=round(start / len(ids), 4),
                           result={"assigned": assigned, "outliers": outliers, "to_assign": len(ids)})
            _copy_assignments(run_.pk, doc_ids, found, strengths, moved, xy, cluster_ids,
                              source=ClusterAssignment.Source.ASSIGNED)
            _refresh_sizes(run_.pk)
        assigned += int((found >= 0).sum())
        outliers += int((found < 0).sum())
        moved_total += int(moved.sum())
    waiting = (Document.objects.filter(dataset_id=index.dataset_id)
               .exclude(pk__in=ClusterAssignment.objects.filter(run=run_).values("document_id")).count())
    with transaction.atomic():
        attempt.update(result={"assigned": assigned, "outliers": outliers, "to_assign": len(ids),
                               "waiting_for_vectors": waiting, **({"moved": moved_total} if move_outliers else {})})
        if not waiting:
            ClusteringRun.objects.filter(pk=run_.pk).update(needs_assignment=False)


def _assign_outliers(attempt: jobs.Attempt, job: ClusterAssignmentJob) -> None:
    """Move the run's outliers to their nearest cluster (cosine to the centroids), marked moved_from_noise."""
    run_ = job.run
    model = model_of(run_)
    clusters = dict(Cluster.objects.filter(run=run_).values_list("number", "pk"))
    attempt.set_phase("assigning outliers to the nearest cluster", 0.0)
    noise = list(ClusterAssignment.objects.filter(run=run_, cluster__isnull=True).order_by("document_id")
                 .values_list("pk", "document_id"))
    vectors_by_doc = dict(Embedding.objects.filter(model_version_id=run_.index.model_version_id,
                                                   document_id__in=[d for _, d in noise])
                          .values_list("document_id", "embedding"))
    noise = [(pk, d) for pk, d in noise if d in vectors_by_doc]
    moved = 0
    if noise:
        vectors = np.vstack([np.asarray(vectors_by_doc[d], dtype=np.float32) for _, d in noise])
        found, similarity = fitting.nearest_clusters(model, vectors)
        attempt.check()
        with transaction.atomic(), connection.cursor() as cursor:
            attempt.update(phase="saving", progress=0.9)
            cursor.execute(
                "UPDATE search_clusterassignment a SET cluster_id = v.cluster_id, strength = v.strength, "
                "moved_from_noise = true FROM unnest(%s::bigint[], %s::bigint[], %s::float8[]) "
                "AS v(id, cluster_id, strength) WHERE a.id = v.id AND a.cluster_id IS NULL",
                [[pk for pk, _ in noise], [clusters[int(n)] for n in found], [float(s) for s in similarity]],
            )
            moved = cursor.rowcount
            _refresh_sizes(run_.pk)
            result = dict(run_.result, outliers_moved=int(run_.result.get("outliers_moved") or 0) + moved)
            total = ClusterAssignment.objects.filter(run=run_).count()
            left = ClusterAssignment.objects.filter(run=run_, cluster__isnull=True).count()
            result["noise_share_after_assignment"] = round(left / total, 4) if total else 0.0
            ClusteringRun.objects.filter(pk=run_.pk).update(result=result)
    attempt.update(result={"moved": moved})


def _refresh_sizes(run_id: int) -> None:
    """Cluster.size = its members now (one UPDATE)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE search_cluster c SET size = coalesce(m.n, 0) FROM search_cluster c2 LEFT JOIN "
            "(SELECT cluster_id, count(*) AS n FROM search_clusterassignment WHERE run_id = %s "
            " AND cluster_id IS NOT NULL GROUP BY cluster_id) m ON m.cluster_id = c2.id "
            "WHERE c.id = c2.id AND c.run_id = %s",
            [run_id, run_id],
        )


# --- Texts, a document, the map, the export ------------------------------------------------


def assign_texts(*, run: ClusteringRun, texts: list) -> list[dict]:
    """Texts -> their clusters under the run's model, embedded with the model version the run clustered.

    The vectors must come from the same model as the fitted clusters, so the
    run's index's version encodes them (search.encoders, cached per process).
    """
    _require_finished(run)
    vectors = encoders.embed_texts(artifact_path=run.index.model_version.artifact_path, texts=texts)
    found, strengths = fitting.predict(model_of(run), vectors)
    clusters = {c.number: c for c in run.clusters.all()}
    out = []
    for number, strength in zip(found.tolist(), strengths.tolist()):
        cluster = clusters.get(number)
        out.append({
            "cluster": cluster.pk if cluster else None, "number": number if cluster else None,
            "label": cluster.label if cluster else None, "outlier": cluster is None,
            "strength": None if np.isnan(strength) else round(float(strength), 4),
        })
    return out


def map_points(*, run: ClusteringRun) -> dict:
    """The run's map: at most MAP_POINTS documents [x, y, cluster number (-1: outlier), key, title] and a legend."""
    clusters = list(run.clusters.order_by("number"))
    number_of = {c.pk: c.number for c in clusters}
    rows = (ClusterAssignment.objects.filter(run=run, x__isnull=False).order_by("document_id")
            .values_list("x", "y", "cluster_id", "document__external_key", "document__title")[:MAP_POINTS])
    return {
        "run": run.pk,
        "clusters": [{"number": c.number, "id": c.pk, "label": c.label, "size": c.size} for c in clusters],
        "points": [[round(x, 4), round(y, 4), number_of.get(cid, -1), key, title[:140]]
                   for x, y, cid, key, title in rows],
    }


def export_assignments(*, run: ClusteringRun, fmt: str) -> TemporaryExport:
    """Every assignment of the run (key, title, cluster id/number/label, strength, source, moved) as CSV or Parquet.

    Written as clustering-<id>.<fmt> in a temporary folder of its own (the
    caller removes it); CSV cells pass through importers.csv_safe.
    """
    if fmt not in EXPORT_FORMATS:
        raise ServiceError(f"as: must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}.")
    _require_finished(run)
    labels_by_id = {c.pk: (c.number, c.label) for c in run.clusters.all()}
    columns = ["key", "title", "cluster", "cluster_number", "cluster_label", "strength", "source", "moved_from_noise"]
    rows = (ClusterAssignment.objects.filter(run=run).order_by("document_id")
            .values_list("document__external_key", "document__title", "cluster_id", "strength", "source",
                         "moved_from_noise"))

    def records():
        for key, title, cluster_id, strength, source, moved in rows.iterator(chunk_size=EXPORT_BATCH):
            number, label = labels_by_id.get(cluster_id, (None, None))
            yield [key, title, cluster_id, number, label, strength, source, moved]

    with temporary_files.new_folder("clusters") as tmp:
        path = tmp / f"clustering-{int(run.pk)}.{fmt}"
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([("key", pa.string()), ("title", pa.string()), ("cluster", pa.int64()),
                                ("cluster_number", pa.int64()), ("cluster_label", pa.string()),
                                ("strength", pa.float64()), ("source", pa.string()), ("moved_from_noise", pa.bool_())])
            with pq.ParquetWriter(path, schema) as writer:
                batch: list[list] = []
                for record in records():
                    batch.append(record)
                    if len(batch) >= EXPORT_BATCH:
                        writer.write_table(pa.Table.from_pylist([dict(zip(columns, r)) for r in batch], schema=schema))
                        batch = []
                if batch:
                    writer.write_table(pa.Table.from_pylist([dict(zip(columns, r)) for r in batch], schema=schema))
        else:
            with open(path, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(columns)
                for key, title, cluster_id, number, label, strength, source, moved in records():
                    writer.writerow([csv_safe(key), csv_safe(title), cluster_id if cluster_id is not None else "",
                                     "" if number is None else number, csv_safe(label or ""),
                                     "" if strength is None else round(strength, 6), source, json.dumps(moved)])
    name = f"{run.dataset.name[:100]}-clusters-v{run.version}.{fmt}"
    return TemporaryExport(folder=tmp, path=path, download_name=name)
