"""Datasets, their documents, training runs and the model registry.

Every row belongs to an owner (a user); querysets in views and the API are
always filtered by owner, so nobody sees another owner's rows.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVectorField
from django.db import models

from embedportal.jobs import Job
from training.corpus import ticket_text


class Dataset(models.Model):
    class Kind(models.TextChoices):
        TICKETS = "tickets", "Tickets"
        QA = "qa", "Q&A"
        PAIRS = "pairs", "Pairs (anchor, positive)"
        TRIPLETS = "triplets", "Triplets (anchor, positive, negative)"
        LABELLED = "labelled", "Text + label"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="datasets")
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.TICKETS)
    source_filename = models.CharField(max_length=255, blank=True)
    # Text-search configuration for the keyword index (PostgreSQL regconfig name).
    language = models.CharField(max_length=32, default="english")
    # What the importer saw: rows read/accepted/rejected and the first errors.
    import_report = models.JSONField(default=dict, blank=True)
    # Which column plays which role ({"key": "Id", "title": "Subject", ...}) for
    # files that are not a known export; remembered for the next upload.
    column_mapping = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["owner", "name"], name="dataset_unique_name_per_owner")]

    def __str__(self) -> str:
        return self.name


class Document(models.Model):
    """One ticket or one Q&A item.

    title is the ticket summary or the question; body the description or the
    answer; metadata holds issue type, priority, status, components, labels,
    dates and links (`[{"type": "Duplicate", "direction": "outward", "key": ...}]`).
    """

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="documents")
    external_key = models.CharField(max_length=255)
    title = models.TextField()
    body = models.TextField(blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    # Weighted tsvector (title A, body B), filled by the import service.
    search_vector = SearchVectorField(null=True, editable=False)
    # sha1 of title, body and metadata: a re-upload compares it to tell a
    # changed row from an unchanged one.
    content_hash = models.CharField(max_length=40, blank=True)
    # Dataset version that added or last changed this row (daily retraining
    # picks what changed since the version it last trained on).
    changed_in_version = models.PositiveIntegerField(default=1)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["dataset", "external_key"], name="document_unique_key_per_dataset")
        ]
        indexes = [GinIndex(fields=["search_vector"], name="document_search_vector_gin")]

    def __str__(self) -> str:
        return f"{self.external_key}: {self.title[:60]}"

    @property
    def text(self) -> str:
        """The text that is embedded: title, newline, body (as in shared/DATA.md)."""
        return ticket_text(self.title, self.body)


class DatasetVersion(models.Model):
    """One successful upload into a dataset: what it added, changed and rejected."""

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    source_filename = models.CharField(max_length=255, blank=True)
    # What the importer recognised: jira_json, jira_csv, jira_links, qa, stackfaq, pairs, ...
    detected_format = models.CharField(max_length=32, blank=True)
    strict = models.BooleanField(default=False)
    added = models.PositiveIntegerField(default=0)
    changed = models.PositiveIntegerField(default=0)
    unchanged = models.PositiveIntegerField(default=0)
    # Validation report: counts, duplicates, empty bodies, length distribution, first errors.
    report = models.JSONField(default=dict, blank=True)
    # Every rejected row (up to importers.MAX_STORED_ERRORS) for the CSV download.
    rejected_rows = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-number"]
        constraints = [
            models.UniqueConstraint(fields=["dataset", "number"], name="dataset_version_unique_number")
        ]

    def __str__(self) -> str:
        return f"{self.dataset_id} v{self.number}"


class ImportJob(Job):
    """A big upload imported in the background: the staged file, the job's state and its result.

    Uploads above EMBEDPORTAL_BACKGROUND_IMPORT_MB (or sent with
    background=true) are streamed to disk, recorded here and imported by the
    `training.run_import` task through the same service as a small upload
    (training.import_jobs), so the request returns at once. A Job of the one job
    system (embedportal.jobs): claimed, fenced, beaten and reaped like every
    other kind; STAGED (a kept preview) is before all that and the reaper
    leaves it alone. The import itself is all-or-nothing: a failed,
    interrupted or stale attempt leaves the dataset as it was.
    """

    class Status(models.TextChoices):
        # Previewed and kept on disk so that "Import" needs no second upload; not queued yet.
        STAGED = "staged", "Previewed, not imported yet"
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    class Action(models.TextChoices):
        CREATE = "create", "New dataset"
        VERSION = "version", "New version of a dataset"

    TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})
    task_name = "training.run_import"
    kind_label = "import"
    # Rows read so far reach the page within seconds, not only every 15 s.
    heartbeat_every_s = 5.0

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="import_jobs")
    action = models.CharField(max_length=16, choices=Action.choices, default=Action.CREATE)
    # The target for a new version; the created dataset once a CREATE job succeeds.
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, null=True, blank=True, related_name="import_jobs")
    version = models.ForeignKey("DatasetVersion", on_delete=models.SET_NULL, null=True, blank=True,
                                related_name="+")
    name = models.CharField(max_length=200, blank=True)
    kind = models.CharField(max_length=16, blank=True)
    language = models.CharField(max_length=64, default="english")
    strict = models.BooleanField(default=False)
    mapping = models.JSONField(null=True, blank=True)
    filename = models.CharField(max_length=255)
    # The staged upload under UPLOADS_DIR; removed when the job ends.
    file_path = models.CharField(max_length=1024)
    size_bytes = models.BigIntegerField(default=0)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    # phase (Job): reading (validating + staging rows), merging (into the dataset), done.
    rows_read = models.BigIntegerField(default=0)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"import #{self.pk} {self.filename}"

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL


class TrainingRun(Job):
    """A fine-tuning run and its job state (a Job of the one job system, embedportal.jobs).

    `phase` says what the worker is doing (pairs, evaluation, training,
    registration; "waiting for the queue" while the broker is unreachable),
    `attempt` counts the claims (a resumed run has attempt > 1) and each
    attempt works in its own folder, MODELS_DIR/run-<id>/attempt-<n>/.
    """

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})
    task_name = "training.run_training"
    kind_label = "training run"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="training_runs")
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="training_runs")
    base_model = models.CharField(max_length=500)
    hyperparameters = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    # Live progress (step, total_steps, loss) and final figures (final_loss,
    # train_pairs, duration_s, device).
    metrics = models.JSONField(default=dict, blank=True)
    # Held-out evaluation before/after: {"systems": {name: {metric: value}}, "queries": [...]}.
    evaluation = models.JSONField(default=dict, blank=True)
    # The run's own log, shown on its page (appended in batches by the worker).
    log = models.TextField(blank=True)
    # Folder of the last complete checkpoint (inside some attempt's folder); the next attempt resumes from it.
    checkpoint_path = models.CharField(max_length=1000, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"Run #{self.pk} on {self.dataset_id} ({self.status})"

    @classmethod
    def timeout_s(cls) -> int:
        # Runs keep their own setting (EMBEDPORTAL_RUN_HEARTBEAT_TIMEOUT_S), which operators already tune.
        return int(settings.RUN_HEARTBEAT_TIMEOUT_S)

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL


class ModelVersion(models.Model):
    class Stage(models.TextChoices):
        CANDIDATE = "candidate", "Candidate"
        PRODUCTION = "production", "Production"
        ARCHIVED = "archived", "Archived"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="model_versions")
    name = models.CharField(max_length=200)
    version = models.PositiveIntegerField()
    base_model = models.CharField(max_length=500)
    artifact_path = models.CharField(max_length=1000)
    dimensions = models.PositiveIntegerField()
    source_run = models.OneToOneField(
        TrainingRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="model_version"
    )
    dataset = models.ForeignKey(
        Dataset, null=True, blank=True, on_delete=models.SET_NULL, related_name="model_versions"
    )
    stage = models.CharField(max_length=16, choices=Stage.choices, default=Stage.CANDIDATE, db_index=True)
    metrics = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Lineage: the dataset version the run trained on, and who made/promoted it.
    dataset_version = models.ForeignKey(
        "DatasetVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="model_versions"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Set when a promotion is requested; the switch happens once its index is ready.
    promotion_requested_at = models.DateTimeField(null=True, blank=True)
    promoted_at = models.DateTimeField(null=True, blank=True)
    promoted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Where the artifact is kept besides the local folder (s3://bucket/prefix/...), if configured.
    storage_uri = models.CharField(max_length=1000, blank=True)

    class Meta:
        ordering = ["name", "-version"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "name", "version"], name="model_version_unique_per_owner")
        ]

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"
