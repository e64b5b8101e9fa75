"""Search indexes: the vectors of a dataset's documents under one model version.

Vectors are stored once per (document, model version) in one table whose
column has no fixed dimension, so models of any size share it. Each model
version gets its own partial HNSW index over `embedding::vector(dims)`
(pgvector's documented pattern for mixed dimensions); queries repeat the same
cast and the `model_version_id = ...` predicate so the planner uses it.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from pgvector.django import VectorField

from embedportal.jobs import Job

from training.models import Dataset, Document, ModelVersion


class SearchIndex(Job):
    """A dataset embedded with a model version; also the embedding job's state (a Job of the one job system)."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        READY = "ready", "Ready"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    SUCCEEDED = Status.READY
    TERMINAL = frozenset({Status.READY, Status.FAILED, Status.CANCELLED})
    task_name = "search.build_index"
    kind_label = "index build"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="search_indexes")
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="search_indexes")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="search_indexes")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    embedded_count = models.PositiveIntegerField(default=0)
    total_count = models.PositiveIntegerField(default=0)
    # Throughput of the last embedding job, end to end into pgvector.
    docs_per_s = models.FloatField(null=True, blank=True)
    # Encoder of the last embedding job: torch, onnx or onnx-int8 (search.onnx_encoder).
    backend = models.CharField(max_length=16, blank=True)
    # Default fusion of hybrid search, tuned on the validation split by
    # search.tuning.tune_fusion: {"method": "rrf"|"weighted", "rrf_k": 60,
    # "alpha": 0.5, "systems": {...figures per candidate}}. Empty means RRF k=60.
    fusion = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["dataset", "model_version"], name="search_index_unique_dataset_version")
        ]
        verbose_name_plural = "search indexes"

    def __str__(self) -> str:
        return f"{self.dataset} / {self.model_version}"

    @classmethod
    def held_by_children(cls, pks: list[int]) -> set[int]:
        """Builds whose attempt handed the embedding to chunks that are still queued or running."""
        return set(EmbedChunk.objects.filter(
            index_id__in=pks, build_attempt=models.F("index__attempt"),
            status__in=[EmbedChunk.QUEUED, EmbedChunk.RUNNING],
        ).values_list("index_id", flat=True))

    @property
    def is_searchable(self) -> bool:
        """Ready, or being refreshed after a complete build (old vectors keep serving meanwhile)."""
        return self.status == self.Status.READY or (
            self.status in (self.Status.QUEUED, self.Status.RUNNING) and self.finished_at is not None
        )


class EmbedChunk(Job):
    """One slice of a large index build: the pending documents with ids in [first, last], a job of its own.

    search.indexing splits a build into chunks that every idle embed worker
    takes in parallel; each is claimed, fenced, beaten and reaped like any
    job, and re-doing one writes no second vector (search.vectors.store_embeddings
    replaces nothing unchanged). The chunk that completes the set finishes the
    build: HNSW once, READY once.
    """

    task_name = "search.embed_chunk"
    kind_label = "index chunk"

    index = models.ForeignKey(SearchIndex, on_delete=models.CASCADE, related_name="chunks")
    # The index's attempt that planned this chunk; a later attempt plans its own set.
    build_attempt = models.PositiveSmallIntegerField()
    number = models.PositiveIntegerField()
    first_document_id = models.BigIntegerField()
    last_document_id = models.BigIntegerField()
    # Pending documents in the range when the chunk was planned, and vectors written by its last attempt.
    documents = models.PositiveIntegerField(default=0)
    embedded_count = models.PositiveIntegerField(default=0)
    # The Celery worker (name@host) of the last attempt: which hosts took which chunks.
    worker = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["index", "build_attempt", "number"]
        constraints = [
            models.UniqueConstraint(fields=["index", "build_attempt", "number"], name="embed_chunk_unique_number"),
        ]

    def __str__(self) -> str:
        return f"chunk {self.number} of {self.index_id} (attempt {self.build_attempt}, {self.status})"


class IndexJob(Job):
    """A job over a ready index: a duplicate scan, fusion tuning or a held-out evaluation.

    Its result is stored here, so a page reload shows the last result instead
    of computing it again inside a web request.
    """

    class Kind(models.TextChoices):
        DUPLICATES = "duplicates", "Duplicate scan"
        TUNING = "tuning", "Fusion tuning"
        EVALUATION = "evaluation", "Search evaluation"


    task_name = "search.run_index_job"
    kind_label = "index job"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="index_jobs")
    index = models.ForeignKey(SearchIndex, on_delete=models.CASCADE, related_name="jobs")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    # What was asked: {"threshold": 0.9} for a scan, {"max_queries": 200} for tuning/evaluation.
    params = models.JSONField(default=dict, blank=True)
    # What came out: {"found": 123} for a scan, the metric table for tuning/evaluation.
    result = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["index", "kind", "-created_at"], name="index_job_latest")]
        constraints = [
            # One unfinished job of a kind per index: a second scan is refused while one is under way.
            models.UniqueConstraint(
                fields=["index", "kind"], condition=models.Q(status__in=["queued", "running"]),
                name="index_job_one_active_per_kind",
            )
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} of {self.index} ({self.status})"


class Embedding(models.Model):
    """One document's vector under one model version.

    The table is LIST-partitioned by model_version (migration 0009; one table
    and one HNSW index per version, search.vectors): its primary key in the
    database is (id, model_version_id), and `id` alone stays unique.
    """

    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="embeddings")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="embeddings")
    embedding = VectorField()
    # Document.content_hash when this vector was made: a document whose hash
    # changed since is embedded again by the next (incremental) job.
    content_hash = models.CharField(max_length=40, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["document", "model_version"], name="embedding_unique_document_version")
        ]
        indexes = [models.Index(fields=["model_version", "document"], name="embedding_version_document")]


class DuplicatePair(models.Model):
    """Two documents of a dataset whose vectors are closer than a threshold, and a person's verdict.

    Pairs are stored with document_a.id < document_b.id, so a pair has one row
    whichever side was found first. A rescan refreshes similarity of pending
    pairs and never touches a decision.
    """

    class Decision(models.TextChoices):
        PENDING = "pending", "Not reviewed"
        DUPLICATE = "duplicate", "Duplicate"
        NOT_DUPLICATE = "not_duplicate", "Not a duplicate"

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="duplicate_pairs")
    document_a = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="+")
    document_b = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="+")
    similarity = models.FloatField()
    # The version whose vectors found the pair (kept when the version is archived).
    found_with = models.ForeignKey(ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    decision = models.CharField(max_length=16, choices=Decision.choices, default=Decision.PENDING)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-similarity", "id"]
        constraints = [
            models.UniqueConstraint(fields=["document_a", "document_b"], name="duplicate_pair_unique"),
            models.CheckConstraint(condition=models.Q(document_a__lt=models.F("document_b")), name="duplicate_pair_ordered"),
        ]
        indexes = [models.Index(fields=["dataset", "decision", "-similarity"], name="duplicate_pair_review")]

    def __str__(self) -> str:
        return f"{self.document_a_id} ~ {self.document_b_id} ({self.similarity:.3f}, {self.decision})"


# --- Clustering (search.clustering) ---------------------------------------------------


class ClusteringRun(Job):
    """A clustering of an index's vectors: a job, and once it succeeds a versioned clustering model.

    The fitted model (KMeans centroids, or the PCA reducer plus HDBSCAN's
    prediction data) is an artifact on disk (`artifact_path`, an .npz
    without pickles); `version` counts the runs of a dataset. New tickets of
    the dataset are assigned to this run's clusters without refitting
    (ClusterAssignmentJob); "recluster" is a new run.
    """

    class Method(models.TextChoices):
        KMEANS = "kmeans", "KMeans"
        HDBSCAN = "hdbscan", "HDBSCAN"


    task_name = "search.run_clustering"
    kind_label = "clustering run"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="clustering_runs")
    index = models.ForeignKey(SearchIndex, on_delete=models.CASCADE, related_name="clustering_runs")
    # The index's dataset, kept here so "the latest clustering of a dataset" is one indexed lookup.
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="clustering_runs")
    version = models.PositiveIntegerField()
    method = models.CharField(max_length=16, choices=Method.choices)
    # What was asked (validated by search.clustering.runs.clean_params): k or "auto", ranges, sizes, seed...
    params = models.JSONField(default=dict, blank=True)
    # What came out: chosen k and silhouette scores, reduction, noise share, timings, counts.
    result = models.JSONField(default=dict, blank=True)
    # The dataset's version number the fit saw; later versions' tickets are assigned, not fitted.
    dataset_version = models.PositiveIntegerField(null=True, blank=True)
    artifact_path = models.CharField(max_length=1000, blank=True)
    # The run whose clusters this one was matched against (names carried over by member overlap).
    previous = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # Dirty flag: the dataset got tickets since; the next ready index build queues their assignment.
    needs_assignment = models.BooleanField(default=False)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["dataset", "status", "-created_at"], name="clustering_run_latest")]
        constraints = [
            models.UniqueConstraint(fields=["dataset", "version"], name="clustering_run_unique_version"),
            # One unfinished run per index: a second is refused while one is under way.
            models.UniqueConstraint(fields=["index"], condition=models.Q(status__in=["queued", "running"]),
                                    name="clustering_run_one_active_per_index"),
        ]

    def __str__(self) -> str:
        return f"Clustering v{self.version} of {self.dataset_id} ({self.get_method_display()}, {self.status})"


class Cluster(models.Model):
    """One cluster of a run: its readable label (c-TF-IDF terms), representatives and dominant Jira fields."""

    run = models.ForeignKey(ClusteringRun, on_delete=models.CASCADE, related_name="clusters")
    # The fitted model's label (0..k-1): the row of its centroid in the artifact.
    number = models.PositiveIntegerField()
    # A person's name for it; carried to the matching cluster of the next run.
    name = models.CharField(max_length=200, blank=True)
    # [[term, score], ...], best first (class-based TF-IDF over the members' text).
    terms = models.JSONField(default=list, blank=True)
    # Document ids, most representative first (nearest the centroid / highest membership).
    representatives = models.JSONField(default=list, blank=True)
    # {"component": [[value, share], ...], "issue_type": [...], "priority": [...]}
    fields = models.JSONField(default=dict, blank=True)
    size = models.PositiveIntegerField(default=0)
    # The cluster of the previous run it was matched to, and their Jaccard overlap.
    matched = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    match_overlap = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["run", "-size", "number"]
        constraints = [models.UniqueConstraint(fields=["run", "number"], name="cluster_unique_number_per_run")]

    def __str__(self) -> str:
        return self.label

    @property
    def auto_label(self) -> str:
        return " · ".join(term for term, _ in self.terms[:4]) or f"cluster {self.number}"

    @property
    def label(self) -> str:
        return self.name or self.auto_label


class ClusterAssignment(models.Model):
    """A document's cluster in a run (null: an outlier), how strongly, and how it got there."""

    class Source(models.TextChoices):
        FIT = "fit", "Fitted"
        ASSIGNED = "assigned", "Assigned later (not refitted)"

    run = models.ForeignKey(ClusteringRun, on_delete=models.CASCADE, related_name="assignments")
    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="cluster_assignments")
    cluster = models.ForeignKey(Cluster, null=True, blank=True, on_delete=models.CASCADE, related_name="members")
    # HDBSCAN's membership probability, or cosine similarity to the KMeans centroid; null where none.
    strength = models.FloatField(null=True, blank=True)
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.FIT)
    # An HDBSCAN outlier moved to its nearest cluster by "assign outliers" (BERTopic's reduce_outliers).
    moved_from_noise = models.BooleanField(default=False)
    # Position on the run's 2-D map (null for rows outside the drawn sample).
    x = models.FloatField(null=True, blank=True)
    y = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run", "document"]
        constraints = [models.UniqueConstraint(fields=["run", "document"], name="cluster_assignment_unique")]
        indexes = [
            models.Index(fields=["cluster", "-strength"], name="cluster_assignment_members"),
            models.Index(fields=["document"], name="cluster_assignment_document"),
        ]


class ClusterAssignmentJob(Job):
    """Batch inference with a finished run's model: new tickets to clusters, or outliers to the nearest cluster."""

    class Kind(models.TextChoices):
        NEW_DOCUMENTS = "new", "Assign new tickets"
        OUTLIERS = "outliers", "Assign outliers to the nearest cluster"


    task_name = "search.assign_to_clusters"
    kind_label = "cluster assignment"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="cluster_jobs")
    run = models.ForeignKey(ClusteringRun, on_delete=models.CASCADE, related_name="assignment_jobs")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.NEW_DOCUMENTS)
    result = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["run", "kind"], condition=models.Q(status__in=["queued", "running"]),
                                    name="cluster_job_one_active_per_kind"),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} for run {self.run_id} ({self.status})"
