from rest_framework import serializers

from search.duplicates import DEFAULT_DUPLICATE_THRESHOLD
from search.filters import FILTER_PARAMS, FILTERS, MAX_ID, SearchFilters
from training.fusion import RRF_K
from search.hybrid import FUSION_METHODS, MAX_K, MAX_QUERY_CHARS, MODES, RRF_K_RANGE
from search.models import DuplicatePair, IndexJob, SearchIndex
from search.tuning import EVALUATION_MAX_QUERIES, MAX_EVALUATION_QUERIES

FILTERS_BY_PARAM = {f.param: f for f in FILTERS}


class SearchIndexSerializer(serializers.ModelSerializer):
    class Meta:
        model = SearchIndex
        fields = [
            "id", "dataset", "model_version", "status", "embedded_count", "total_count", "docs_per_s", "backend", "created_at",
            "started_at", "finished_at", "error", "fusion", "phase", "progress", "attempt", "max_attempts",
        ]
        read_only_fields = fields


class IndexJobSerializer(serializers.ModelSerializer):
    waiting_for_queue = serializers.BooleanField(read_only=True)

    class Meta:
        model = IndexJob
        fields = [
            "id", "index", "kind", "status", "phase", "progress", "params", "result", "error", "attempt",
            "max_attempts", "waiting_for_queue", "created_at", "started_at", "finished_at",
        ]
        read_only_fields = fields


class EvaluationStartSerializer(serializers.Serializer):
    queries = serializers.IntegerField(
        required=False, allow_null=True, default=EVALUATION_MAX_QUERIES, min_value=1, max_value=MAX_EVALUATION_QUERIES,
        help_text="Held-out queries to replay (null: all of them).",
    )


class SearchIndexCreateSerializer(serializers.Serializer):
    dataset = serializers.IntegerField()
    model_version = serializers.IntegerField()


def _values(field_name: str) -> serializers.ListField:
    integer = FILTERS_BY_PARAM[field_name].integer
    child = serializers.IntegerField(min_value=1, max_value=MAX_ID) if integer else serializers.CharField(max_length=200)
    return serializers.ListField(
        child=child, required=False, default=list, max_length=50,
        help_text=f"Repeat the parameter to match any of several values ({field_name}=A&{field_name}=B).",
    )


class FiltersSerializer(serializers.Serializer):
    """Attribute filters from query parameters (the same names in the web form and the API; see search.filters)."""

    created_from = serializers.DateField(required=False, allow_null=True, default=None)
    created_to = serializers.DateField(required=False, allow_null=True, default=None)

    def get_fields(self):
        fields = super().get_fields()
        for param in FILTER_PARAMS:
            fields[param] = _values(param)
        return fields

    def validate(self, attrs):
        start, end = attrs.get("created_from"), attrs.get("created_to")
        if start and end and start > end:
            raise serializers.ValidationError({"created_to": ["must not be before created_from."]})
        return attrs

    @staticmethod
    def to_filters(data: dict) -> SearchFilters:
        return SearchFilters.of(
            created_from=data.get("created_from"), created_to=data.get("created_to"),
            **{param: tuple(data.get(param, ())) for param in FILTER_PARAMS},
        )



def query_data(query_params) -> dict:
    """QueryDict -> plain dict with the repeatable filter parameters as lists; blank values dropped."""
    data = {}
    for key in query_params:
        values = [v for v in query_params.getlist(key) if v != ""]
        if key in FILTER_PARAMS:
            data[key] = values
        elif values:
            data[key] = values[-1]
    return data


class SearchParamsSerializer(FiltersSerializer):
    # Longer queries are cut (and the response says so), not refused; this
    # bound only stops absurd URLs from being parsed.
    q = serializers.CharField(allow_blank=True, trim_whitespace=True, max_length=MAX_QUERY_CHARS * 4, default="")
    mode = serializers.ChoiceField(choices=MODES, default="hybrid")
    k = serializers.IntegerField(min_value=1, max_value=MAX_K, default=10)
    page = serializers.IntegerField(min_value=1, default=1)
    fusion = serializers.ChoiceField(choices=FUSION_METHODS, required=False, allow_null=True, default=None,
                                     help_text="Default: the index's tuned fusion.")
    alpha = serializers.FloatField(min_value=0.0, max_value=1.0, required=False, allow_null=True, default=None,
                                   help_text="Weighted fusion: weight of the vector side.")
    rrf_k = serializers.IntegerField(min_value=RRF_K_RANGE[0], max_value=RRF_K_RANGE[1], required=False,
                                     allow_null=True, default=None, help_text=f"RRF constant (default {RRF_K}).")


class SimilarParamsSerializer(FiltersSerializer):
    key = serializers.CharField(required=False, max_length=255, help_text="Ticket key, e.g. HDFS-1234")
    document = serializers.IntegerField(required=False, help_text="Document id (instead of key)")
    k = serializers.IntegerField(min_value=1, max_value=MAX_K, default=10)

    def validate(self, attrs):
        attrs = super().validate(attrs)
        if not attrs.get("key") and not attrs.get("document"):
            raise serializers.ValidationError({"key": ["Give a ticket key (or a document id)."]})
        return attrs


class HitSerializer(serializers.Serializer):
    """One result (the shape of services.serialize_hit), for the schema."""

    id = serializers.IntegerField()
    key = serializers.CharField()
    title = serializers.CharField()
    snippet = serializers.CharField()
    snippet_html = serializers.CharField(help_text="ts_headline fragments, HTML-escaped, matches in <mark>")
    metadata = serializers.DictField()
    score = serializers.FloatField()
    keyword_rank = serializers.IntegerField(allow_null=True)
    vector_rank = serializers.IntegerField(allow_null=True)
    keyword_score = serializers.FloatField(allow_null=True)
    vector_similarity = serializers.FloatField(allow_null=True)
    identifier_match = serializers.BooleanField()


class SearchResponseSerializer(serializers.Serializer):
    query = serializers.CharField()
    mode = serializers.CharField()
    page = serializers.IntegerField()
    k = serializers.IntegerField()
    has_more = serializers.BooleanField()
    message = serializers.CharField()
    notice = serializers.CharField()
    fusion = serializers.DictField()
    filters = serializers.DictField()
    timings_ms = serializers.DictField(child=serializers.FloatField())
    results = HitSerializer(many=True)


class SimilarResponseSerializer(serializers.Serializer):
    document = serializers.DictField()
    results = HitSerializer(many=True)


class DuplicateScanSerializer(serializers.Serializer):
    threshold = serializers.FloatField(min_value=0.5, max_value=0.999, default=DEFAULT_DUPLICATE_THRESHOLD)


class DocumentBriefSerializer(serializers.Serializer):
    id = serializers.IntegerField(source="pk")
    key = serializers.CharField(source="external_key")
    title = serializers.CharField()


class DuplicatePairSerializer(serializers.ModelSerializer):
    document_a = DocumentBriefSerializer(read_only=True)
    document_b = DocumentBriefSerializer(read_only=True)
    decided_by = serializers.CharField(source="decided_by.username", read_only=True, default=None)

    class Meta:
        model = DuplicatePair
        fields = ["id", "document_a", "document_b", "similarity", "decision", "decided_by", "decided_at"]
        read_only_fields = fields


class DuplicateDecisionSerializer(serializers.Serializer):
    decision = serializers.ChoiceField(choices=DuplicatePair.Decision.values)


class PromoteSerializer(serializers.Serializer):
    require_not_worse = serializers.BooleanField(
        default=False, help_text="Refuse when the candidate's held-out nDCG@10 is below production's."
    )


class RollbackSerializer(serializers.Serializer):
    dataset = serializers.IntegerField()


class EmbedSerializer(serializers.Serializer):
    # Batch size and text length are limited by search.encoders (MAX_EMBED_TEXTS, MAX_TEXT_CHARS).
    texts = serializers.ListField(child=serializers.CharField(allow_blank=True, trim_whitespace=False))
    version = serializers.IntegerField(required=False, help_text="model version id (default: your production model)")


class SimilaritySerializer(serializers.Serializer):
    pairs = serializers.ListField(child=serializers.ListField(child=serializers.CharField(allow_blank=True)))
    version = serializers.IntegerField(required=False)
