from rest_framework import serializers

from search.models import SearchIndex
from search.services import MAX_K, MAX_QUERY_CHARS, MODES


class SearchIndexSerializer(serializers.ModelSerializer):
    class Meta:
        model = SearchIndex
        fields = [
            "id", "dataset", "model_version", "status", "embedded_count", "total_count", "created_at",
            "started_at", "finished_at", "error",
        ]
        read_only_fields = fields


class SearchIndexCreateSerializer(serializers.Serializer):
    dataset = serializers.IntegerField()
    model_version = serializers.IntegerField()


class SearchParamsSerializer(serializers.Serializer):
    q = serializers.CharField(allow_blank=True, trim_whitespace=True, max_length=MAX_QUERY_CHARS * 4)
    mode = serializers.ChoiceField(choices=MODES, default="hybrid")
    k = serializers.IntegerField(min_value=1, max_value=MAX_K, default=10)
