"""Datasets, their documents, training runs and the model registry.

Every row belongs to an owner (a user); querysets in views and the API are
always filtered by owner, so nobody sees another owner's rows.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVectorField
from django.db import models

from embedportal.jobs import Job, JobStatus
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
    # Q&A: one question answered in several rows becomes several documents ("keep") or one ("merge");
    # chosen at the first upload, remembered for the next ones (importers.REPEATED_QUESTIONS).
    repeated_questions = models.CharField(max_length=8, default="keep", blank=True)
    # Where tickets open in Jira ({base}/browse/{key}), set by hand; a Jira connection's address wins
    # (training.datasets.jira_base_url). Validated as an http(s) address.
    jira_base_url = models.URLField(max_length=500, blank=True)
    # BM25 statistics of the keyword side of similar tickets (training.bm25), refreshed by every import with
    # the documents' lexeme frequencies (LexemeFrequency): documents, and their mean title-weighted length.
    bm25_documents = models.IntegerField(default=0, editable=False)
    bm25_average_length = models.FloatField(default=0.0, editable=False)
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
    # BM25 length (training.bm25): the search_vector's positions, a title's counted TITLE_WEIGHT times.
    bm25_length = models.IntegerField(default=0, db_default=0, editable=False)

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



class LexemeFrequency(models.Model):
    """How many of a dataset's documents hold a lexeme: BM25's document frequency (training.bm25).

    Rewritten by every import (training.bm25.refresh_statistics) from the
    documents' tsvectors; read by the keyword side of similar tickets.
    """

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="lexeme_frequencies")
    lexeme = models.TextField()
    documents = models.IntegerField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["dataset", "lexeme"], name="lexeme_frequency_unique")]

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
    repeated_questions = models.CharField(max_length=8, default="keep", blank=True)
    strict = models.BooleanField(default=False)
    mapping = models.JSONField(null=True, blank=True)
    filename = models.CharField(max_length=255)
    # The staged upload under UPLOADS_DIR; removed when the job ends.
    file_path = models.CharField(max_length=1024)
    size_bytes = models.BigIntegerField(default=0)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    # phase (Job): reading (validating + staging rows), merging (into the dataset), done.
    rows_read = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"import #{self.pk} {self.filename}"


class TrainingRun(Job):
    """A fine-tuning run and its job state (a Job of the one job system, embedportal.jobs).

    `phase` says what the worker is doing (pairs, evaluation, training,
    registration; "waiting for the queue" while the broker is unreachable),
    `attempt` counts the claims (a resumed run has attempt > 1) and each
    attempt works in its own folder, MODELS_DIR/run-<id>/attempt-<n>/.
    """


    task_name = "training.run_training"
    kind_label = "training run"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="training_runs")
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="training_runs")
    base_model = models.CharField(max_length=500)
    hyperparameters = models.JSONField(default=dict, blank=True)
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


# --- Daily retraining fed from Jira (training/connectors/jira.py, training/retraining.py) --------------------


class JiraConnection(models.Model):
    """A dataset's link to a Jira site: where, which issues (JQL), and the credentials, sealed.

    The token is stored encrypted (training.connectors.credentials: Fernet with
    EMBEDPORTAL_CREDENTIALS_KEY) and is never shown again, logged, serialized
    or exported; `token_set_at` tells that one is set. Cloud signs in with
    e-mail + API token (basic auth), Data Center with a personal access token
    (bearer).
    """

    class Flavor(models.TextChoices):
        CLOUD = "cloud", "Jira Cloud (e-mail + API token)"
        DATA_CENTER = "data_center", "Jira Data Center / Server (personal access token)"

    dataset = models.OneToOneField(Dataset, on_delete=models.CASCADE, related_name="jira_connection")
    base_url = models.URLField(max_length=500)
    flavor = models.CharField(max_length=16, choices=Flavor.choices, default=Flavor.CLOUD)
    jql = models.TextField()
    email = models.CharField(max_length=254, blank=True)
    token_sealed = models.TextField(editable=False)
    token_set_at = models.DateTimeField(null=True, blank=True, editable=False)
    # The Jira user's time zone (GET /myself): Jira reads the dates of a JQL query in it.
    time_zone = models.CharField(max_length=64, default="UTC")
    # The latest `updated` among the issues synced so far (Jira's clock); the next sync asks from a little before.
    synced_until = models.DateTimeField(null=True, blank=True)
    last_synced_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.base_url} ({self.jql[:60]})"


class JiraSync(Job):
    """One pull of a dataset's Jira issues into a new dataset version (a Job of embedportal.jobs).

    Pages are appended to a file of the attempt; after every page the cursor
    (Cloud's nextPageToken or Data Center's startAt) and the file's length are
    written to this row, so a new attempt after a crash copies what was kept
    and asks for the next page, not the first. The pages go through the same
    write path as an upload (datasets.add_version): same validation, same row report.
    """


    task_name = "training.run_jira_sync"
    kind_label = "Jira sync"
    heartbeat_every_s = 5.0

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jira_syncs")
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="jira_syncs")
    # The query sent, with the `updated >= "..."` of an incremental sync; `since` is that watermark.
    jql = models.TextField(blank=True)
    since = models.DateTimeField(null=True, blank=True)
    # Where to go on: Cloud's nextPageToken, or Data Center's startAt; pages and issues kept so far.
    next_page_token = models.TextField(blank=True)
    start_at = models.PositiveIntegerField(default=0)
    pages = models.PositiveIntegerField(default=0)
    issues_fetched = models.PositiveIntegerField(default=0)
    pages_file = models.CharField(max_length=1024, blank=True)
    pages_bytes = models.BigIntegerField(default=0)
    # The latest `updated` among the fetched issues: the connection's next watermark.
    max_updated = models.DateTimeField(null=True, blank=True)
    # Fetched issues already stored with the same `updated` (the overlap of two syncs): not imported again.
    up_to_date = models.PositiveIntegerField(default=0)
    version = models.ForeignKey(DatasetVersion, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"Jira sync #{self.pk} of {self.dataset_id} ({self.status})"


def _default_start_from() -> str:
    return settings.RETRAIN_START_FROM


def _default_margin() -> float:
    return settings.RETRAIN_MARGIN


def _default_tolerance() -> float:
    return settings.RETRAIN_TOLERANCE


def _default_time_zone() -> str:
    return settings.TIME_ZONE


class RetrainSchedule(models.Model):
    """When and how a dataset is retrained; its beat entry is a django-celery-beat PeriodicTask.

    minute/hour/day_of_week (crontab syntax) and time_zone are the truth; the
    service (retraining.save_schedule) writes them to a CrontabSchedule with
    that explicit time zone and a PeriodicTask, so admin, page and API edit one
    row. The guard: the challenger is promoted when the 95% lower bound of its
    nDCG@10 gain is above `margin` and no metric drops by more than `tolerance`.
    """

    class StartFrom(models.TextChoices):
        PRODUCTION = "production", "The production model (continue its fine-tuning)"
        BASE = "base", "The base model (fine-tune afresh on all tickets)"

    dataset = models.OneToOneField(Dataset, on_delete=models.CASCADE, related_name="retrain_schedule")
    enabled = models.BooleanField(default=True)
    minute = models.CharField(max_length=64, default="0")
    hour = models.CharField(max_length=64, default="2")
    day_of_week = models.CharField(max_length=64, default="*")
    time_zone = models.CharField(max_length=64, default=_default_time_zone)
    periodic_task = models.OneToOneField("django_celery_beat.PeriodicTask", on_delete=models.SET_NULL, null=True,
                                         blank=True, related_name="+", editable=False)
    start_from = models.CharField(max_length=16, choices=StartFrom.choices, default=_default_start_from)
    # With start_from=base: the model to start from ("" = settings.DEFAULT_BASE_MODEL).
    base_model = models.CharField(max_length=500, blank=True)
    hyperparameters = models.JSONField(default=dict, blank=True)
    margin = models.FloatField(default=_default_margin)
    tolerance = models.FloatField(default=_default_tolerance)
    # Sealed like the Jira token (a Slack webhook URL is a secret); only its host is ever shown.
    webhook_sealed = models.TextField(blank=True, editable=False)
    webhook_host = models.CharField(max_length=255, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"retrain {self.dataset_id}: {self.minute} {self.hour} * * {self.day_of_week} ({self.time_zone})"


class RetrainOccurrence(Job):
    """One retrain of a dataset, scheduled or run now (a Job of embedportal.jobs).

    sync from Jira if linked -> skip when no document changed since the data
    the last model was trained on -> a training run from the production (or
    base) model -> the champion/challenger decision, recorded with its numbers.
    `scheduled_for` is the crontab slot that fired it: unique per dataset, so
    two beat processes cannot start the same retrain twice.
    """


    class Outcome(models.TextChoices):
        PENDING = "", "Pending"
        SKIPPED = "skipped", "Skipped: no new tickets"
        BUSY = "busy", "Skipped: the previous retrain was still running"
        PROMOTED = "promoted", "Promoted"
        KEPT = "kept", "Kept the champion"
        FAILED = "failed", "Failed"

    class Trigger(models.TextChoices):
        SCHEDULE = "schedule", "Schedule"
        MANUAL = "manual", "Run now"

    ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
    task_name = "training.run_retrain"
    kind_label = "retrain"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="retrain_occurrences")
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="retrain_occurrences")
    trigger = models.CharField(max_length=16, choices=Trigger.choices, default=Trigger.SCHEDULE)
    scheduled_for = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices, default=Outcome.PENDING, blank=True)
    sync = models.ForeignKey(JiraSync, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    issues_synced = models.PositiveIntegerField(default=0)
    # The newest dataset version that changed a document when this occurrence looked, and a digest of the data.
    data_version = models.PositiveIntegerField(null=True, blank=True)
    fingerprint = models.CharField(max_length=64, blank=True)
    run = models.ForeignKey(TrainingRun, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    champion = models.ForeignKey(ModelVersion, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    challenger = models.ForeignKey(ModelVersion, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    # The comparison's numbers: gain, ci_low, ci_high, queries, resamples, seed, margin, tolerance, drops, metrics.
    decision = models.JSONField(default=dict, blank=True)
    summary = models.TextField(blank=True)
    # Held-out nDCG@10 of the model serving after this occurrence, on this occurrence's TEST queries.
    production_ndcg = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["dataset", "scheduled_for"], name="retrain_one_per_slot"),
            models.UniqueConstraint(fields=["dataset"], condition=models.Q(status__in=["queued", "running"]),
                                    name="retrain_one_active_per_dataset"),
        ]

    def __str__(self) -> str:
        return f"retrain #{self.pk} of {self.dataset_id} ({self.outcome or self.status})"


class WebhookDelivery(models.Model):
    """One notification of an occurrence (promotion or failure) to the dataset's webhook, with its retries."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Not delivered"

    occurrence = models.ForeignKey(RetrainOccurrence, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=16)
    host = models.CharField(max_length=255, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    payload = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["occurrence", "event"], name="webhook_one_per_event")]

    def __str__(self) -> str:
        return f"{self.event} of retrain #{self.occurrence_id} to {self.host}: {self.status}"
