from django.conf import settings
from rest_framework import serializers

from training.models import (
    Dataset,
    DatasetVersion,
    ImportJob,
    JiraConnection,
    JiraSync,
    ModelVersion,
    RetrainOccurrence,
    RetrainSchedule,
    TrainingRun,
    WebhookDelivery,
)
from training.pairs import STRATEGIES


class DatasetSerializer(serializers.ModelSerializer):
    document_count = serializers.IntegerField(read_only=True)
    latest_version = serializers.IntegerField(read_only=True)

    class Meta:
        model = Dataset
        fields = [
            "id", "name", "kind", "source_filename", "language", "document_count", "latest_version",
            "column_mapping", "repeated_questions", "jira_base_url", "import_report", "created_at",
        ]
        read_only_fields = fields


class DatasetVersionSerializer(serializers.ModelSerializer):
    class Meta:
        model = DatasetVersion
        fields = [
            "number", "source_filename", "detected_format", "strict", "added", "changed", "unchanged",
            "report", "created_at",
        ]
        read_only_fields = fields


def _check_upload_size(upload):
    limit = settings.MAX_UPLOAD_MB * 1024 * 1024
    if upload.size > limit:
        raise serializers.ValidationError(
            f"The file is {upload.size / 1048576:.0f} MB; the limit is {settings.MAX_UPLOAD_MB} MB."
        )
    return upload


class MappingField(serializers.JSONField):
    """A role -> column object; in a multipart upload it arrives as a JSON string."""

    def to_internal_value(self, data):
        if isinstance(data, (str, bytes)):
            if not data.strip():
                return None
            self.binary = True
        else:
            self.binary = False
        value = super().to_internal_value(data)
        if value is not None and not isinstance(value, dict):
            raise serializers.ValidationError("Give an object of role -> column name.")
        return value


def repeated_questions_field(*, default: str) -> serializers.ChoiceField:
    return serializers.ChoiceField(
        choices=[("keep", "keep each answer as its own document"), ("merge", "merge the answers into one document")]
        + ([("", "the dataset's remembered choice")] if default == "" else []),
        default=default, allow_blank=default == "",
        help_text="Q&A only: the same question answered in several rows becomes several documents (keep, the "
                  "default of a new dataset) or one (merge). Rows identical to an earlier one are always merged; "
                  "the report lists every merged row (`merged`, `rows_merged`) with its reason.")


class DatasetUploadSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200)
    kind = serializers.ChoiceField(choices=[("", "detect")] + list(Dataset.Kind.choices), default="",
                                   allow_blank=True)
    file = serializers.FileField()
    strict = serializers.BooleanField(default=False)
    mapping = MappingField(required=False, allow_null=True, default=None)
    language = serializers.CharField(max_length=32, default="english",
                                     help_text="PostgreSQL text-search configuration (english, german, simple, ...)")
    repeated_questions = repeated_questions_field(default="keep")
    background = serializers.BooleanField(
        required=False, allow_null=True, default=None,
        help_text="Import in a background job and answer 202 with it (default: only uploads above "
                  "EMBEDPORTAL_BACKGROUND_IMPORT_MB)")

    def validate_file(self, upload):
        return _check_upload_size(upload)


class DatasetVersionUploadSerializer(serializers.Serializer):
    file = serializers.FileField()
    strict = serializers.BooleanField(default=False)
    mapping = MappingField(required=False, allow_null=True, default=None)
    repeated_questions = repeated_questions_field(default="")
    background = serializers.BooleanField(
        required=False, allow_null=True, default=None,
        help_text="Import in a background job and answer 202 with it (default: only uploads above "
                  "EMBEDPORTAL_BACKGROUND_IMPORT_MB)")

    def validate_file(self, upload):
        return _check_upload_size(upload)


class DatasetPreviewSerializer(serializers.Serializer):
    file = serializers.FileField()
    kind = serializers.ChoiceField(choices=[("", "detect")] + list(Dataset.Kind.choices), default="",
                                   allow_blank=True)
    mapping = MappingField(required=False, allow_null=True, default=None)
    dataset = serializers.IntegerField(required=False, allow_null=True, default=None)
    keep = serializers.BooleanField(
        default=False, help_text="Keep the file for a day as a staged import (`staged_import` in the answer); "
                                 "POST /api/imports/{id}/start/ imports it without a second upload")
    name = serializers.CharField(max_length=200, required=False, default="", allow_blank=True,
                                 help_text="Name of the new dataset (with keep, when no dataset is given)")
    strict = serializers.BooleanField(default=False)
    language = serializers.CharField(max_length=32, default="english")
    repeated_questions = repeated_questions_field(default="")

    def validate_file(self, upload):
        return _check_upload_size(upload)


class ImportStartSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200, required=False, default="", allow_blank=True,
                                 help_text="Rename the new dataset before importing")
    background = serializers.BooleanField(required=False, allow_null=True, default=None,
                                          help_text="Default: only files above EMBEDPORTAL_BACKGROUND_IMPORT_MB")


class DatasetJiraUrlSerializer(serializers.Serializer):
    jira_base_url = serializers.CharField(max_length=500, allow_blank=True, trim_whitespace=True,
                                          help_text="http(s) address of the Jira site; \"\" removes it")
    effective = serializers.CharField(read_only=True, help_text="the address in use (a Jira connection's wins)")


class DatasetMappingSerializer(serializers.Serializer):
    mapping = serializers.DictField()


class PairsQuerySerializer(serializers.Serializer):
    strategy = serializers.ChoiceField(choices=[""] + sorted(STRATEGIES), default="", allow_blank=True)
    seed = serializers.IntegerField(default=42)
    sample = serializers.IntegerField(default=10, min_value=0, max_value=100)
    link_types = serializers.CharField(default="duplicate")
    weak_positives = serializers.ChoiceField(choices=["", "component", "issue_type"], default="", allow_blank=True)
    include_self_pairs = serializers.BooleanField(default=True)
    include_paraphrases = serializers.BooleanField(default=True)

    def options(self) -> dict:
        data = dict(self.validated_data)
        data["link_types"] = tuple(t.strip().lower() for t in data["link_types"].split(",") if t.strip()) or (
            "duplicate",
        )
        return data


class TrainingRunSerializer(serializers.ModelSerializer):
    model_version = serializers.PrimaryKeyRelatedField(read_only=True)

    class Meta:
        model = TrainingRun
        fields = [
            "id", "dataset", "base_model", "hyperparameters", "status", "created_at", "started_at",
            "finished_at", "heartbeat_at", "error", "metrics", "model_version", "evaluation", "log", "attempt",
            "max_attempts", "phase", "progress", "checkpoint_path", "cancel_requested",
        ]
        read_only_fields = fields


class TrainingRunCreateSerializer(serializers.Serializer):
    dataset = serializers.IntegerField()
    base_model = serializers.CharField(
        max_length=500, required=False, allow_blank=True, default="",
        help_text="A Hugging Face id, `version:<id>` of one of your model versions, or a folder under "
                  "EMBEDPORTAL_BASE_MODEL_DIRS (default: the server's base model)")
    base_version = serializers.IntegerField(
        required=False, allow_null=True, default=None, min_value=1,
        help_text="Continue training from one of your model versions (its id); the run records it as "
                  "base_model `version:<id>`")
    hyperparameters = serializers.DictField(required=False, default=dict)

    def validate(self, data):
        version = data.pop("base_version", None)
        if version is not None:
            if data.get("base_model"):
                raise serializers.ValidationError({"base_version": "Give base_model or base_version, not both."})
            data["base_model"] = f"version:{version}"
        return data


class ModelVersionSerializer(serializers.ModelSerializer):
    class Meta:
        model = ModelVersion
        fields = [
            "id", "name", "version", "base_model", "artifact_path", "dimensions", "source_run", "dataset",
            "stage", "metrics", "created_at", "dataset_version", "created_by", "promotion_requested_at",
            "promoted_at", "promoted_by", "storage_uri",
        ]
        read_only_fields = fields


class ImportJobSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()
    waiting_for_queue = serializers.BooleanField(read_only=True)

    class Meta:
        model = ImportJob
        fields = ["id", "url", "action", "dataset", "version", "name", "filename", "size_bytes", "strict", "status",
                  "phase", "rows_read", "error", "attempt", "max_attempts", "cancel_requested", "waiting_for_queue",
                  "created_at", "started_at", "heartbeat_at", "finished_at"]
        read_only_fields = fields

    def get_url(self, job) -> str:
        return f"/api/imports/{job.pk}/"


# --- Jira link and daily retraining (training.connectors.jira, training.retraining) ------------------


class JiraConnectionSerializer(serializers.Serializer):
    """A dataset's Jira link as the API shows it: never the token, only that one is set."""

    dataset = serializers.IntegerField(source="dataset_id", read_only=True)
    base_url = serializers.CharField(read_only=True)
    flavor = serializers.CharField(read_only=True)
    jql = serializers.CharField(read_only=True)
    email = serializers.CharField(read_only=True)
    token_set = serializers.SerializerMethodField()
    token_set_at = serializers.DateTimeField(read_only=True)
    time_zone = serializers.CharField(read_only=True)
    synced_until = serializers.DateTimeField(read_only=True)
    last_synced_at = serializers.DateTimeField(read_only=True)

    def get_token_set(self, connection) -> bool:
        return bool(connection.token_sealed)


class JiraConnectionInputSerializer(serializers.Serializer):
    base_url = serializers.CharField(max_length=500, help_text="The site's root, e.g. https://your-site.atlassian.net")
    flavor = serializers.ChoiceField(choices=JiraConnection.Flavor.choices, default=JiraConnection.Flavor.CLOUD)
    jql = serializers.CharField(max_length=4000, help_text="Which issues, e.g. project = HDFS")
    email = serializers.CharField(max_length=254, required=False, allow_blank=True, default="",
                                  help_text="Jira Cloud: the Atlassian account's e-mail")
    token = serializers.CharField(
        max_length=2000, required=False, allow_blank=True, default="", write_only=True,
        style={"input_type": "password"},
        help_text="Cloud: an API token; Data Center: a personal access token. Stored encrypted, never shown again; "
                  "leave empty to keep the stored one (a new base URL or type needs it again)")


class JiraDatasetCreateSerializer(JiraConnectionInputSerializer):
    name = serializers.CharField(max_length=200)
    language = serializers.CharField(max_length=32, default="english",
                                     help_text="PostgreSQL text-search configuration (english, german, simple, ...)")


class JiraSyncSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()
    version = serializers.SerializerMethodField()
    waiting_for_queue = serializers.BooleanField(read_only=True)

    class Meta:
        model = JiraSync
        fields = ["id", "url", "dataset", "status", "phase", "progress", "jql", "since", "pages", "issues_fetched",
                  "up_to_date", "version", "error", "attempt", "max_attempts", "cancel_requested",
                  "waiting_for_queue", "created_at", "started_at", "heartbeat_at", "finished_at"]
        read_only_fields = fields

    def get_url(self, sync) -> str:
        return f"/api/jira-syncs/{sync.pk}/"

    def get_version(self, sync) -> int | None:
        """The dataset version it added (its number); null when nothing new came."""
        return sync.version.number if sync.version_id else None


class RetrainScheduleSerializer(serializers.Serializer):
    dataset = serializers.IntegerField(source="dataset_id", read_only=True)
    enabled = serializers.BooleanField(read_only=True)
    minute = serializers.CharField(read_only=True)
    hour = serializers.CharField(read_only=True)
    day_of_week = serializers.CharField(read_only=True)
    time_zone = serializers.CharField(read_only=True)
    description = serializers.SerializerMethodField()
    next_run_at = serializers.SerializerMethodField()
    start_from = serializers.CharField(read_only=True)
    base_model = serializers.CharField(read_only=True)
    hyperparameters = serializers.JSONField(read_only=True)
    margin = serializers.FloatField(read_only=True)
    tolerance = serializers.FloatField(read_only=True)
    webhook_host = serializers.CharField(read_only=True, help_text="Only the host of the webhook is ever shown")
    saved = serializers.SerializerMethodField()

    def get_description(self, schedule) -> str:
        from training.retraining import describe_schedule

        return describe_schedule(schedule)

    def get_next_run_at(self, schedule) -> str | None:
        from training.retraining import next_run_at

        moment = next_run_at(schedule) if schedule.pk else None
        return moment.isoformat() if moment else None

    def get_saved(self, schedule) -> bool:
        return schedule.pk is not None


class RetrainScheduleInputSerializer(serializers.Serializer):
    enabled = serializers.BooleanField(default=True)
    minute = serializers.CharField(max_length=64, default="0", help_text="crontab minute, e.g. 0 or */30")
    hour = serializers.CharField(max_length=64, default="2", help_text="crontab hour, e.g. 2")
    day_of_week = serializers.CharField(max_length=64, default="*", help_text="crontab day of week: *, mon-fri, 0-6")
    time_zone = serializers.CharField(max_length=64, required=False, allow_blank=True, default="",
                                      help_text="IANA name (default: the server's zone)")
    start_from = serializers.ChoiceField(choices=RetrainSchedule.StartFrom.choices, required=False, allow_blank=True,
                                         default="")
    base_model = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")
    hyperparameters = serializers.DictField(required=False, default=dict)
    margin = serializers.FloatField(required=False, allow_null=True, default=None)
    tolerance = serializers.FloatField(required=False, allow_null=True, default=None)
    webhook_url = serializers.CharField(max_length=2000, required=False, allow_null=True, default=None,
                                        write_only=True,
                                        help_text="JSON POST on promotion and failure; \"\" removes it, absent keeps it")


class WebhookDeliverySerializer(serializers.ModelSerializer):
    class Meta:
        model = WebhookDelivery
        fields = ["event", "host", "status", "attempts", "response_status", "error", "created_at", "finished_at"]
        read_only_fields = fields


class RetrainOccurrenceSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()
    champion = serializers.StringRelatedField()
    challenger = serializers.StringRelatedField()
    deliveries = WebhookDeliverySerializer(many=True, read_only=True)
    waiting_for_queue = serializers.BooleanField(read_only=True)

    class Meta:
        model = RetrainOccurrence
        fields = ["id", "url", "dataset", "trigger", "scheduled_for", "status", "outcome", "summary", "decision",
                  "production_ndcg", "phase", "progress", "issues_synced", "data_version", "fingerprint", "sync",
                  "run", "champion", "challenger", "error", "deliveries", "attempt", "max_attempts",
                  "cancel_requested", "waiting_for_queue", "created_at", "started_at", "heartbeat_at", "finished_at"]
        read_only_fields = fields

    def get_url(self, occurrence) -> str:
        return f"/api/retrains/{occurrence.pk}/"
