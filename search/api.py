"""REST API for search indexes and hybrid search (owner-scoped)."""

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response

from search import serializers, services
from search.models import SearchIndex
from training.models import Dataset, ModelVersion


class SearchIndexViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = serializers.SearchIndexSerializer

    def get_queryset(self):
        return SearchIndex.objects.filter(owner=self.request.user)

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
        parameters=[
            OpenApiParameter("q", str, description="Query text (websearch syntax for the keyword side)"),
            OpenApiParameter("mode", str, enum=list(services.MODES), default="hybrid"),
            OpenApiParameter("k", int, default=10),
        ],
        responses={200: dict},
    )
    @action(detail=True, methods=["get"])
    def search(self, request, pk=None):
        index = self.get_queryset().select_related("model_version", "dataset").get(pk=self.get_object().pk)
        params = serializers.SearchParamsSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        try:
            data = params.validated_data
            result = services.hybrid_search(index=index, query=data["q"], k=data["k"], mode=data["mode"])
        except services.SearchError as exc:
            return Response({"error": str(exc)}, status=status.HTTP_400_BAD_REQUEST)
        return Response(
            {
                "query": result.query,
                "mode": result.mode,
                "message": result.message,
                "timings_ms": result.timings_ms,
                "results": [services.serialize_hit(hit) for hit in result.hits],
            }
        )
