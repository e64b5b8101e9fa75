from django.contrib import admin

from search.models import DuplicatePair, Embedding, SearchIndex


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
