from django.contrib import admin

from embedportal.errors import ServiceError
from search import serving
from search.models import (
    Cluster, ClusterAssignment, ClusterAssignmentJob, ClusteringRun, DuplicatePair, Embedding, IndexJob, SearchIndex,
)
from training.admin import ModelVersionAdmin
from training.models import Dataset, ModelVersion


@admin.register(SearchIndex)
class SearchIndexAdmin(admin.ModelAdmin):
    list_display = ["id", "dataset", "model_version", "status", "embedded_count", "total_count", "finished_at"]
    list_filter = ["status"]
    list_select_related = ["dataset", "model_version"]


@admin.register(Embedding)
class EmbeddingAdmin(admin.ModelAdmin):
    list_display = ["id", "document", "model_version"]
    list_select_related = ["document", "model_version"]
    raw_id_fields = ["document"]
    exclude = ["embedding"]


@admin.register(DuplicatePair)
class DuplicatePairAdmin(admin.ModelAdmin):
    list_display = ["id", "dataset", "document_a", "document_b", "similarity", "decision"]
    list_filter = ["decision"]
    list_select_related = ["dataset", "document_a", "document_b"]
    raw_id_fields = ["document_a", "document_b"]


@admin.register(IndexJob)
class IndexJobAdmin(admin.ModelAdmin):
    """Duplicate scans, tuning and evaluations: read-only (the job system owns their state)."""

    list_display = ["id", "kind", "index", "status", "phase", "attempt", "created_at", "finished_at"]
    list_filter = ["kind", "status"]
    list_select_related = ["index__dataset", "index__model_version"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


admin.site.unregister(ModelVersion)


@admin.register(ModelVersion)
class ServingModelVersionAdmin(ModelVersionAdmin):
    """training's ModelVersion admin plus the serving actions (search.serving switches the vectors)."""

    actions = ["promote_selected", "rollback_selected"]

    @admin.action(description="Promote to production (switches when its index is ready)")
    def promote_selected(self, request, queryset):
        for version in queryset:
            try:
                serving.request_promotion(version=version, user=request.user)
            except ServiceError as exc:
                self.message_user(request, str(exc), level="error")

    @admin.action(description="Roll back the selected versions' datasets to their previous production version")
    def rollback_selected(self, request, queryset):
        for dataset_id in sorted({v.dataset_id for v in queryset if v.dataset_id}):
            try:
                serving.rollback(dataset=Dataset.objects.get(pk=dataset_id), user=request.user)
            except ServiceError as exc:
                self.message_user(request, str(exc), level="error")


@admin.register(ClusteringRun)
class ClusteringRunAdmin(admin.ModelAdmin):
    """Clustering runs: read-only (the job system owns their state; start and cancel from the pages or the API)."""

    list_display = ["id", "dataset", "version", "method", "status", "phase", "needs_assignment", "created_at",
                    "finished_at"]
    list_filter = ["method", "status"]
    list_select_related = ["dataset"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Cluster)
class ClusterAdmin(admin.ModelAdmin):
    """Clusters: the name may be edited here (it is kept by the matching cluster of the next run)."""

    list_display = ["id", "run", "number", "name", "size", "match_overlap"]
    list_select_related = ["run"]
    search_fields = ["name"]
    raw_id_fields = ["run", "matched"]
    readonly_fields = ["run", "number", "terms", "representatives", "fields", "size", "matched", "match_overlap"]

    def has_add_permission(self, request):
        return False


@admin.register(ClusterAssignment)
class ClusterAssignmentAdmin(admin.ModelAdmin):
    list_display = ["id", "run", "document", "cluster", "strength", "source", "moved_from_noise"]
    list_filter = ["source", "moved_from_noise"]
    list_select_related = ["run", "document", "cluster"]
    raw_id_fields = ["run", "document", "cluster"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(ClusterAssignmentJob)
class ClusterAssignmentJobAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "run", "status", "phase", "attempt", "created_at", "finished_at"]
    list_filter = ["kind", "status"]
    list_select_related = ["run"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
