"""REST API for search indexes, hybrid search, similar tickets and the duplicate finder (owner-scoped)."""

from django.db.models import Q
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response

from search import serializers, services
from search.models import DuplicatePair, SearchIndex
from training.models import Dataset, Document, ModelVersion


def search_error(exc: services.SearchError) -> Response:
    """400 in the API's error shape; "field: reason" messages also fill `fields`."""
    message = str(exc)
    field, sep, reason = message.partition(":")
    body = {"error": message, "fields": {field: reason.strip()} if sep and field.isidentifier() else {}}
    return Response(body, status=status.HTTP_400_BAD_REQUEST)


_FILTER_PARAMETERS = [
    OpenApiParameter(name, str, many=True, description=f"Only documents whose {name} is one of these (repeatable)")
    for name in serializers.LIST_FILTERS
] + [
    OpenApiParameter("created_from", str, description="Created on or after this date (YYYY-MM-DD)"),
    OpenApiParameter("created_to", str, description="Created on or before this date (YYYY-MM-DD)"),
]


class SearchIndexViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = serializers.SearchIndexSerializer

    def get_queryset(self):
        return SearchIndex.objects.filter(owner=self.request.user).select_related("model_version", "dataset")

    @extend_schema(request=serializers.SearchIndexCreateSerializer, responses={201: serializers.SearchIndexSerializer})
    def create(self, request):
        payload = serializers.SearchIndexCreateSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        dataset = Dataset.objects.filter(owner=request.user, pk=payload.validated_data["dataset"]).first()
        version = ModelVersion.objects.filter(owner=request.user, pk=payload.validated_data["model_version"]).first()
        if dataset is None:
            raise ValidationError({"dataset": ["No such dataset of yours."]})
        if version is None:
            raise ValidationError({"model_version": ["No such model version of yours."]})
        index = services.create_index(owner=request.user, dataset=dataset, model_version=version)
        return Response(self.get_serializer(index).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Hybrid, keyword or vector search over the index's dataset",
        parameters=[
            OpenApiParameter("q", str, description="Query text (websearch syntax on the keyword side: \"phrase\", -word, or)"),
            OpenApiParameter("mode", str, enum=list(services.MODES), default="hybrid"),
            OpenApiParameter("k", int, default=10, description=f"Results per page (1-{services.MAX_K})"),
            OpenApiParameter("page", int, default=1),
            OpenApiParameter("fusion", str, enum=list(services.FUSION_METHODS), description="Default: the index's tuned fusion"),
            OpenApiParameter("alpha", float, description="Weighted fusion: weight of the vector side, 0-1"),
            OpenApiParameter("rrf_k", int, description="RRF constant (default 60)"),
            *_FILTER_PARAMETERS,
        ],
        responses={200: serializers.SearchResponseSerializer},
    )
    @action(detail=True, methods=["get"])
    def search(self, request, pk=None):
        index = self.get_object()
        params = serializers.SearchParamsSerializer(data=serializers.query_data(request.query_params))
        params.is_valid(raise_exception=True)
        data = params.validated_data
        try:
            result = services.hybrid_search(
                index=index, query=data["q"], k=data["k"], mode=data["mode"], page=data["page"],
                filters=serializers.FiltersSerializer.to_filters(data),
                fusion=data["fusion"], alpha=data["alpha"], rrf_k=data["rrf_k"],
            )
        except services.SearchError as exc:
            return search_error(exc)
        return Response(
            {
                "query": result.query, "mode": result.mode, "page": result.page, "k": data["k"],
                "has_more": result.has_more, "message": result.message, "notice": result.notice,
                "fusion": result.fusion, "filters": result.filters, "timings_ms": result.timings_ms,
                "results": [services.serialize_hit(hit) for hit in result.hits],
            }
        )

    @extend_schema(
        summary="Tickets most similar to one ticket (vector neighbours under this index's model)",
        parameters=[
            OpenApiParameter("key", str, description="Ticket key, e.g. HDFS-1234"),
            OpenApiParameter("document", int, description="Document id (instead of key)"),
            OpenApiParameter("k", int, default=10),
            *_FILTER_PARAMETERS,
        ],
        responses={200: serializers.SimilarResponseSerializer},
    )
    @action(detail=True, methods=["get"])
    def similar(self, request, pk=None):
        index = self.get_object()
        params = serializers.SimilarParamsSerializer(data=serializers.query_data(request.query_params))
        params.is_valid(raise_exception=True)
        data = params.validated_data
        lookup = Q(external_key=data["key"]) if data.get("key") else Q(pk=data["document"])
        document = Document.objects.filter(lookup, dataset_id=index.dataset_id).first()
        if document is None:
            raise ValidationError({"key": ["No such document in this index's dataset."]})
        try:
            hits = services.similar_documents(
                index=index, document=document, k=data["k"], filters=serializers.FiltersSerializer.to_filters(data)
            )
        except services.SearchError as exc:
            return search_error(exc)
        return Response(
            {
                "document": {"id": document.pk, "key": document.external_key, "title": document.title},
                "results": [services.serialize_hit(hit) for hit in hits],
            }
        )

    @extend_schema(summary="Tune the default fusion on the validation split (synchronous)", request=None,
                   responses={200: serializers.SearchIndexSerializer})
    @action(detail=True, methods=["post"], url_path="tune-fusion")
    def tune_fusion(self, request, pk=None):
        index = self.get_object()
        try:
            services.tune_fusion(index=index)
        except services.SearchError as exc:
            return search_error(exc)
        return Response(self.get_serializer(index).data)

    @extend_schema(summary="Start the duplicate finder: pairs above a cosine threshold (background job)",
                   request=serializers.DuplicateScanSerializer, responses={202: serializers.SearchIndexSerializer})
    @action(detail=True, methods=["post"], url_path="duplicates/scan")
    def duplicate_scan(self, request, pk=None):
        index = self.get_object()
        payload = serializers.DuplicateScanSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        try:
            index = services.start_duplicate_scan(index=index, threshold=payload.validated_data["threshold"])
        except services.SearchError as exc:
            return search_error(exc)
        return Response(self.get_serializer(index).data, status=status.HTTP_202_ACCEPTED)


class DuplicatePairViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Candidate duplicate pairs of your datasets, most similar first; filter with ?dataset=&decision=."""

    serializer_class = serializers.DuplicatePairSerializer

    def get_queryset(self):
        pairs = DuplicatePair.objects.filter(dataset__owner=self.request.user).select_related(
            "document_a", "document_b", "decided_by"
        )
        dataset = self.request.query_params.get("dataset")
        decision = self.request.query_params.get("decision")
        if dataset:
            if not dataset.isdigit():
                raise ValidationError({"dataset": ["must be a dataset id."]})
            pairs = pairs.filter(dataset_id=int(dataset))
        if decision:
            if decision not in DuplicatePair.Decision.values:
                raise ValidationError({"decision": [f"must be one of {', '.join(DuplicatePair.Decision.values)}."]})
            pairs = pairs.filter(decision=decision)
        return pairs.order_by("-similarity", "id")

    @extend_schema(
        parameters=[
            OpenApiParameter("dataset", int),
            OpenApiParameter("decision", str, enum=list(DuplicatePair.Decision.values)),
        ]
    )
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)

    @extend_schema(summary="Mark a pair as duplicate / not duplicate (pending undoes)",
                   request=serializers.DuplicateDecisionSerializer, responses={200: serializers.DuplicatePairSerializer})
    @action(detail=True, methods=["post"])
    def decide(self, request, pk=None):
        pair = self.get_object()
        payload = serializers.DuplicateDecisionSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        services.decide_duplicate(pair=pair, decision=payload.validated_data["decision"], user=request.user)
        return Response(self.get_serializer(pair).data)
