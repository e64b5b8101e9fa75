"""REST API for datasets, training runs and model versions (owner-scoped)."""

from django.db.models import Count
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.response import Response

from training import datasets, serializers, services
from training.errors import ServiceError
from training.hyperparameters import HyperparameterError
from training.models import Dataset, ModelVersion, TrainingRun


def service_error_response(exc: Exception) -> Response:
    """400 with {"error": ..., "fields": {...}} for ServiceError/HyperparameterError."""
    if isinstance(exc, HyperparameterError):
        return Response({"error": str(exc), "fields": exc.errors}, status=status.HTTP_400_BAD_REQUEST)
    message = str(exc)
    field, _, _ = message.partition(":")
    body = {"error": message}
    if field.isidentifier():
        body["fields"] = {field: message.partition(":")[2].strip()}
    return Response(body, status=status.HTTP_400_BAD_REQUEST)


class DatasetViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet
):
    serializer_class = serializers.DatasetSerializer
    parser_classes = [MultiPartParser, FormParser, JSONParser]

    def get_queryset(self):
        return Dataset.objects.filter(owner=self.request.user).annotate(document_count=Count("documents"))

    @extend_schema(request=serializers.DatasetUploadSerializer, responses={201: serializers.DatasetSerializer})
    def create(self, request):
        upload = serializers.DatasetUploadSerializer(data=request.data)
        upload.is_valid(raise_exception=True)
        data = upload.validated_data
        try:
            dataset = datasets.import_upload(
                owner=request.user, name=data["name"], kind=data["kind"], upload=data["file"]
            )
        except ServiceError as exc:
            return service_error_response(exc)
        dataset = self.get_queryset().get(pk=dataset.pk)
        return Response(self.get_serializer(dataset).data, status=status.HTTP_201_CREATED)

    def destroy(self, request, pk=None):
        try:
            datasets.delete_dataset(dataset=self.get_object())
        except ServiceError as exc:
            return Response({"error": str(exc)}, status=status.HTTP_409_CONFLICT)
        return Response(status=status.HTTP_204_NO_CONTENT)


class TrainingRunViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = serializers.TrainingRunSerializer

    def get_queryset(self):
        return TrainingRun.objects.filter(owner=self.request.user).select_related("model_version")

    @extend_schema(request=serializers.TrainingRunCreateSerializer, responses={201: serializers.TrainingRunSerializer})
    def create(self, request):
        payload = serializers.TrainingRunCreateSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        data = payload.validated_data
        dataset = Dataset.objects.filter(owner=request.user, pk=data["dataset"]).first()
        if dataset is None:
            raise ValidationError({"dataset": [f"No dataset {data['dataset']} of yours."]})
        try:
            run = services.start_run(
                owner=request.user,
                dataset=dataset,
                base_model=data["base_model"],
                hyperparameters=data["hyperparameters"],
            )
        except (ServiceError, HyperparameterError) as exc:
            return service_error_response(exc)
        return Response(self.get_serializer(run).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        run = services.cancel_run(run=self.get_object())
        return Response(self.get_serializer(run).data)


class ModelVersionViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = serializers.ModelVersionSerializer

    def get_queryset(self):
        return ModelVersion.objects.filter(owner=self.request.user)

    @extend_schema(request=None)
    @action(detail=True, methods=["post"])
    def promote(self, request, pk=None):
        version = services.promote(version=self.get_object())
        return Response(self.get_serializer(version).data)
