from django import forms
from django.contrib import admin

from training import retraining
from training.errors import ServiceError
from training.models import (
    Dataset,
    DatasetVersion,
    Document,
    ImportJob,
    JiraConnection,
    JiraSync,
    ModelVersion,
    RetrainOccurrence,
    RetrainSchedule,
    TrainingRun,
    WebhookDelivery,
)


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "owner", "source_filename", "created_at"]
    list_filter = ["kind"]
    search_fields = ["name"]


@admin.register(DatasetVersion)
class DatasetVersionAdmin(admin.ModelAdmin):
    list_display = ["dataset", "number", "source_filename", "detected_format", "added", "changed", "unchanged",
                    "created_at"]
    list_select_related = ["dataset"]
    readonly_fields = ["report", "rejected_rows"]


@admin.register(ImportJob)
class ImportJobAdmin(admin.ModelAdmin):
    list_display = ["id", "filename", "name", "action", "owner", "status", "phase", "rows_read", "attempt",
                    "created_at", "finished_at"]
    list_filter = ["status", "action"]
    search_fields = ["filename", "name"]
    readonly_fields = [f.name for f in ImportJob._meta.fields]

    def has_add_permission(self, request):  # jobs come from uploads (page or API), not from admin
        return False


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    list_display = ["external_key", "title", "dataset"]
    list_select_related = ["dataset"]
    search_fields = ["external_key", "title"]
    raw_id_fields = ["dataset"]


@admin.register(TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    list_display = ["id", "dataset", "base_model", "status", "created_at", "finished_at"]
    list_filter = ["status"]
    list_select_related = ["dataset"]
    readonly_fields = ["started_at", "finished_at", "heartbeat_at"]


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ["name", "version", "stage", "dimensions", "dataset", "created_at"]
    list_filter = ["stage"]
    list_select_related = ["dataset"]


# --- Jira link and daily retraining -------------------------------------------------------------------


@admin.register(JiraConnection)
class JiraConnectionAdmin(admin.ModelAdmin):
    """Read-only here: the token is sealed by the service, and a new address must come with its token again."""

    list_display = ["dataset", "base_url", "flavor", "jql", "token_set_at", "last_synced_at"]
    list_select_related = ["dataset"]
    readonly_fields = ["dataset", "base_url", "flavor", "jql", "email", "token_set_at", "time_zone", "synced_until",
                       "last_synced_at"]
    exclude = ["token_sealed"]

    def has_add_permission(self, request):  # linked on the dataset's retraining page or PUT /api/datasets/<id>/jira/
        return False


class RetrainScheduleAdminForm(forms.ModelForm):
    class Meta:
        model = RetrainSchedule
        fields = ["dataset", "enabled", "minute", "hour", "day_of_week", "time_zone", "start_from", "base_model",
                  "hyperparameters", "margin", "tolerance"]

    def clean(self):
        data = super().clean()
        try:
            data["minute"], data["hour"], data["day_of_week"], data["time_zone"] = retraining.check_timing(
                minute=data.get("minute", ""), hour=data.get("hour", ""), day_of_week=data.get("day_of_week", ""),
                time_zone=data.get("time_zone", ""))
        except ServiceError as exc:
            mine = {field: reason for field, reason in exc.by_field().items() if field in self.fields}
            for field, reason in mine.items():
                self.add_error(field, reason)
            if not mine:
                self.add_error(None, str(exc))
        return data


@admin.register(RetrainSchedule)
class RetrainScheduleAdmin(admin.ModelAdmin):
    """Editing a schedule here rewrites its beat entry (CrontabSchedule in its time zone + PeriodicTask)."""

    form = RetrainScheduleAdminForm
    list_display = ["dataset", "enabled", "minute", "hour", "day_of_week", "time_zone", "start_from", "margin",
                    "tolerance", "webhook_host"]
    list_select_related = ["dataset"]
    raw_id_fields = ["dataset"]

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        retraining.sync_periodic_task(schedule=obj)


@admin.register(RetrainOccurrence)
class RetrainOccurrenceAdmin(admin.ModelAdmin):
    list_display = ["id", "dataset", "trigger", "scheduled_for", "status", "outcome", "summary", "production_ndcg",
                    "created_at", "finished_at"]
    list_filter = ["status", "outcome", "trigger"]
    list_select_related = ["dataset"]
    readonly_fields = [f.name for f in RetrainOccurrence._meta.fields]

    def has_add_permission(self, request):  # started by the schedule or "run now"
        return False


@admin.register(JiraSync)
class JiraSyncAdmin(admin.ModelAdmin):
    list_display = ["id", "dataset", "status", "phase", "pages", "issues_fetched", "up_to_date", "created_at",
                    "finished_at"]
    list_filter = ["status"]
    list_select_related = ["dataset"]
    readonly_fields = [f.name for f in JiraSync._meta.fields]

    def has_add_permission(self, request):
        return False


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = ["occurrence", "event", "host", "status", "attempts", "response_status", "created_at"]
    list_filter = ["status", "event"]
    readonly_fields = [f.name for f in WebhookDelivery._meta.fields]

    def has_add_permission(self, request):
        return False
