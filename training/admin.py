from django.contrib import admin

from training.models import Dataset, Document, ModelVersion, TrainingRun


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "owner", "source_filename", "created_at"]
    list_filter = ["kind"]
    search_fields = ["name"]


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
    actions = ["promote_selected"]

    @admin.action(description="Promote to production (one per dataset)")
    def promote_selected(self, request, queryset):
        from training import services

        for version in queryset:
            services.promote(version=version)
