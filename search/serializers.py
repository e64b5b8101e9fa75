from rest_framework import serializers

from search.duplicates import DEFAULT_DUPLICATE_THRESHOLD
from search.filters import FILTER_PARAMS, FILTERS, MAX_ID, SearchFilters
from training.fusion import RRF_K
from search.hybrid import FUSION_METHODS, MAX_K, MAX_QUERY_CHARS, MODES, RRF_K_RANGE
from search.models import (
    Cluster, ClusterAssignment, ClusterAssignmentJob, ClusteringRun, DuplicatePair, IndexJob, SearchIndex,
)
from search.tuning import EVALUATION_MAX_QUERIES, MAX_EVALUATION_QUERIES
from embedportal.errors import ServiceError
from search.clustering.runs import (
    DEFAULT_K_RANGE, DEFAULT_MIN_SAMPLES, DEFAULT_SAMPLE, DIMS_BOUNDS, K_BOUNDS, MIN_CLUSTER_SIZE_BOUNDS,
    MIN_SAMPLES_BOUNDS, REDUCTIONS, SAMPLE_BOUNDS, SEED_BOUNDS,
)
from search.clustering.runs import METHODS as CLUSTERING_METHODS
from search.clustering.runs import PARAM_NAMES as CLUSTERING_PARAMS
from search.clustering.runs import clean_params as clean_clustering_params

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
    prior = serializers.DictField(
        allow_null=True, help_text="Similar tickets under an index with a ticket prior: {score, days_apart, "
                                   "shared_components, same_project}; null otherwise (docs/search.md)")


class SearchResponseSerializer(serializers.Serializer):
    index = serializers.IntegerField(help_text="The index that answered (GET /api/datasets/{id}/search/ picks it)")
    model_version = serializers.IntegerField()
    query = serializers.CharField()
    mode = serializers.CharField()
    page = serializers.IntegerField()
    k = serializers.IntegerField()
    has_more = serializers.BooleanField()
    total = serializers.IntegerField(help_text="Results over all pages, counted up to the paging depth (500)")
    total_capped = serializers.BooleanField(help_text="True when there are more than `total`")
    key_document = serializers.IntegerField(allow_null=True, help_text="Id of the ticket whose key the query is (first)")
    message = serializers.CharField()
    notice = serializers.CharField()
    fusion = serializers.DictField()
    filters = serializers.DictField()
    timings_ms = serializers.DictField(child=serializers.FloatField())
    query_encoder = serializers.DictField(
        help_text='How the query was embedded: {"backend": "onnx-int8"|"onnx"|"torch", "cached": bool}; '
                  "empty when it was not (keyword mode, a ticket key's own vector)")
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
    jira_linked = serializers.BooleanField(read_only=True, default=False,
                                           help_text="Jira (or a links CSV) already links the two as duplicates")

    class Meta:
        model = DuplicatePair
        fields = ["id", "document_a", "document_b", "similarity", "decision", "decided_by", "decided_at",
                  "jira_linked"]
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


# --- Clustering (search.clustering) ------------------------------------------------------


class ClusteringRunSerializer(serializers.ModelSerializer):
    waiting_for_queue = serializers.BooleanField(read_only=True)

    class Meta:
        model = ClusteringRun
        fields = [
            "id", "index", "dataset", "version", "method", "params", "result", "status", "phase", "progress", "error",
            "attempt", "max_attempts", "waiting_for_queue", "dataset_version", "previous", "needs_assignment",
            "created_at", "started_at", "finished_at",
        ]
        read_only_fields = fields


class KField(serializers.Field):
    """A number of clusters, or "auto" (k picked by silhouette)."""

    default_error_messages = {"invalid": f'must be "auto" or a whole number from {K_BOUNDS[0]} to {K_BOUNDS[1]}.'}

    def to_internal_value(self, data):
        if data == "auto":
            return "auto"
        text = str(data).strip()
        if isinstance(data, bool) or not text.isascii() or not text.isdigit() or len(text) > 4:
            self.fail("invalid")
        value = int(text)
        if not K_BOUNDS[0] <= value <= K_BOUNDS[1]:
            self.fail("invalid")
        return value

    def to_representation(self, value):
        return value


def _bounded(bounds: tuple[int, int], help_text: str, **kwargs) -> serializers.IntegerField:
    return serializers.IntegerField(min_value=bounds[0], max_value=bounds[1], required=False, help_text=help_text,
                                    **kwargs)


class ClusteringStartSerializer(serializers.Serializer):
    """Start a clustering run; the parameters of the other method are refused (search.clustering.runs.clean_params)."""

    index = serializers.IntegerField(min_value=1, max_value=MAX_ID, help_text="A ready search index of yours")
    method = serializers.ChoiceField(choices=CLUSTERING_METHODS)
    k = KField(required=False, help_text='KMeans: clusters, or "auto" (default) to pick k by silhouette')
    k_min = _bounded(K_BOUNDS, f"KMeans auto: smallest k tried (default {DEFAULT_K_RANGE[0]})")
    k_max = _bounded(K_BOUNDS, f"KMeans auto: largest k tried (default {DEFAULT_K_RANGE[1]})")
    sample_size = _bounded(SAMPLE_BOUNDS, f"KMeans auto: documents in the silhouette sample (default {DEFAULT_SAMPLE})")
    min_cluster_size = _bounded(MIN_CLUSTER_SIZE_BOUNDS, "HDBSCAN: smallest cluster (default 0.15% of the tickets fitted, 10-500)",
                                allow_null=True)
    min_samples = _bounded(MIN_SAMPLES_BOUNDS, f"HDBSCAN: neighbours that make a point dense (default {DEFAULT_MIN_SAMPLES})")
    reduction = serializers.ChoiceField(choices=REDUCTIONS, required=False, help_text="HDBSCAN: pca (default) or none")
    dims = _bounded(DIMS_BOUNDS, "HDBSCAN with PCA: components kept (default 10)")
    assign_outliers = serializers.BooleanField(required=False, help_text="HDBSCAN: move outliers to the nearest cluster")
    seed = _bounded(SEED_BOUNDS, "Random seed: the same seed gives the same clusters (default 42)")

    def validate(self, attrs):
        params = {name: attrs[name] for name in CLUSTERING_PARAMS if name in attrs}
        if attrs["method"] == "kmeans" and attrs.get("k") == "auto":
            params.pop("k")
        try:
            attrs["params"] = clean_clustering_params(attrs["method"], params)
        except ServiceError as exc:
            raise serializers.ValidationError(exc.by_field() or {"non_field_errors": [str(exc)]}) from None
        return attrs


class ClusterSerializer(serializers.ModelSerializer):
    label = serializers.CharField(read_only=True)
    auto_label = serializers.CharField(read_only=True)

    class Meta:
        model = Cluster
        fields = ["id", "run", "number", "name", "label", "auto_label", "size", "terms", "representatives", "fields",
                  "matched", "match_overlap"]
        read_only_fields = fields


class ClusterRenameSerializer(serializers.Serializer):
    name = serializers.CharField(allow_blank=True, max_length=200, trim_whitespace=True,
                                 help_text="Empty: back to the top terms")


class ClusterMemberSerializer(serializers.ModelSerializer):
    document = DocumentBriefSerializer(read_only=True)

    class Meta:
        model = ClusterAssignment
        fields = ["document", "cluster", "strength", "source", "moved_from_noise"]
        read_only_fields = fields


class AssignTextsSerializer(serializers.Serializer):
    # Batch size and text length are limited by search.encoders (MAX_TEXTS, MAX_TEXT_CHARS).
    texts = serializers.ListField(child=serializers.CharField(allow_blank=True, trim_whitespace=False))


class ClusterAssignmentJobSerializer(serializers.ModelSerializer):
    waiting_for_queue = serializers.BooleanField(read_only=True)

    class Meta:
        model = ClusterAssignmentJob
        fields = ["id", "run", "kind", "status", "phase", "progress", "result", "error", "attempt", "max_attempts",
                  "waiting_for_queue", "created_at", "started_at", "finished_at"]
        read_only_fields = fields
