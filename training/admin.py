from django.contrib import admin

from training.models import Dataset, DatasetVersion, Document, ImportJob, ModelVersion, TrainingRun


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
