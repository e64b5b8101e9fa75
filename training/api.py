"""REST API for datasets, training runs and model versions (owner-scoped)."""

from django.db.models import Count, OuterRef, Subquery
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from embedportal import jobs, json_limits
from embedportal.pagination import BoundedLimitOffsetPagination
from embedportal.parsers import API_PARSERS, BoundedFormParser, BoundedJSONParser

from training import datasets, forms, import_jobs, importers, pairs, registry, retraining, runs, serializers
from training.connectors import jira
from training.downloads import csv_attachment, temporary_file_response
from training.errors import ServiceError
from training.models import (
    Dataset,
    DatasetVersion,
    ImportJob,
    JiraConnection,
    JiraSync,
    ModelVersion,
    RetrainOccurrence,
    TrainingRun,
)


def _latest_version():
    return Subquery(
        DatasetVersion.objects.filter(dataset=OuterRef("pk")).order_by("-number").values("number")[:1]
    )


class DatasetViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet
):
    """Datasets: list, upload (multipart), preview, mapping, versions, validation report, pairs, delete."""

    serializer_class = serializers.DatasetSerializer
    parser_classes = [MultiPartParser, BoundedFormParser, BoundedJSONParser]
    pagination_class = BoundedLimitOffsetPagination

    def get_queryset(self):
        return Dataset.objects.filter(owner=self.request.user).annotate(
            document_count=Count("documents"), latest_version=_latest_version()
        )

    def initialize_request(self, request, *args, **kwargs):
        # Before DRF authenticates (a session-auth CSRF check reads the body):
        # uploads then pass the streaming size limit.
        self._upload_limit = forms.limit_upload_size(request) if request.method == "POST" else None
        return super().initialize_request(request, *args, **kwargs)

    def _limited(self, request):
        """A 400 if the upload passed the size limit while it streamed in, or its mapping is not readable JSON.

        A multipart mapping arrives as JSON text; it is read here with the
        nesting and number limits (json_limits) before the serializer's
        json.loads, which raised RecursionError (a 500) on deep input.
        """
        handler = self._upload_limit
        request.data  # parse now, through the handler
        if handler is not None and handler.exceeded:
            return Response({"error": handler.message, "fields": {"file": handler.message}},
                            status=status.HTTP_400_BAD_REQUEST)
        mapping = request.data.get("mapping") if hasattr(request.data, "get") else None
        if isinstance(mapping, str) and mapping.strip():
            try:
                json_limits.loads(mapping, what="mapping")
            except json_limits.JSONLimitError as exc:
                raise ServiceError(str(exc)) from exc
        return None

    @extend_schema(request=serializers.DatasetUploadSerializer,
                   responses={201: serializers.DatasetSerializer, 202: serializers.ImportJobSerializer})
    def create(self, request):
        """Upload a new dataset: 201 with it, or 202 with an import job for a big (or background=true) upload."""
        if (refused := self._limited(request)) is not None:
            return refused
        upload = serializers.DatasetUploadSerializer(data=request.data)
        upload.is_valid(raise_exception=True)
        data = upload.validated_data
        if import_jobs.wants_background(data["file"], data["background"]):
            job = import_jobs.submit(owner=request.user, upload=data["file"], name=data["name"], kind=data["kind"],
                                 strict=data["strict"], mapping=data["mapping"], language=data["language"],
                                 repeated_questions=data["repeated_questions"])
            return Response(serializers.ImportJobSerializer(job).data, status=status.HTTP_202_ACCEPTED)
        dataset = datasets.import_upload(
            owner=request.user, name=data["name"], kind=data["kind"], upload=data["file"],
            strict=data["strict"], mapping=data["mapping"], language=data["language"],
            repeated_questions=data["repeated_questions"],
        )
        dataset = self.get_queryset().get(pk=dataset.pk)
        return Response(self.get_serializer(dataset).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=serializers.DatasetPreviewSerializer, responses={200: dict})
    @action(detail=False, methods=["post"])
    def preview(self, request):
        """Read and validate a file without storing it. `?errors=csv` returns every rejected row as CSV."""
        if (refused := self._limited(request)) is not None:
            return refused
        payload = serializers.DatasetPreviewSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        data = payload.validated_data
        dataset = None
        if data["dataset"] is not None:
            dataset = Dataset.objects.filter(owner=request.user, pk=data["dataset"]).first()
            if dataset is None:
                raise ValidationError({"dataset": [f"No dataset {data['dataset']} of yours."]})
        if data["keep"]:
            job, result = import_jobs.stage_and_preview(
                owner=request.user, upload=data["file"], dataset=dataset, name=data["name"], kind=data["kind"],
                strict=data["strict"], mapping=data["mapping"], language=data["language"],
                repeated_questions=data["repeated_questions"])
            if result["needs_mapping"]:  # nothing to start: the API caller sends a mapping with the next file
                import_jobs.discard(job=job)
            else:
                result["staged_import"] = serializers.ImportJobSerializer(job).data
        else:
            with datasets.upload_on_disk(data["file"]) as path:
                result = datasets.preview_file(path=path, filename=data["file"].name, kind=data["kind"],
                                               mapping=data["mapping"], dataset=dataset,
                                               repeated_questions=data["repeated_questions"])
        all_errors = result.pop("all_errors", [])
        if request.query_params.get("errors") == "csv":
            return csv_attachment(importers.write_csv(importers.error_csv_rows(all_errors)), "preview-errors.csv")
        return Response(result)

    @extend_schema(request=serializers.DatasetVersionUploadSerializer,
                   responses={201: serializers.DatasetVersionSerializer, 202: serializers.ImportJobSerializer})
    @action(detail=True, methods=["post"])
    def upload(self, request, pk=None):
        """Upsert a newer export (or add a duplicate links CSV) as a new version; 202 + job when imported later."""
        dataset = self.get_object()
        if (refused := self._limited(request)) is not None:
            return refused
        payload = serializers.DatasetVersionUploadSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        data = payload.validated_data
        if import_jobs.wants_background(data["file"], data["background"]):
            job = import_jobs.submit(owner=request.user, upload=data["file"], dataset=dataset, strict=data["strict"],
                                 mapping=data["mapping"], repeated_questions=data["repeated_questions"])
            return Response(serializers.ImportJobSerializer(job).data, status=status.HTTP_202_ACCEPTED)
        with datasets.upload_on_disk(data["file"]) as path:
            version = datasets.add_version(dataset=dataset, path=path, filename=data["file"].name,
                                           strict=data["strict"], mapping=data["mapping"],
                                           repeated_questions=data["repeated_questions"])
        return Response(serializers.DatasetVersionSerializer(version).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=serializers.DatasetJiraUrlSerializer, responses={200: serializers.DatasetJiraUrlSerializer})
    @action(detail=True, methods=["get", "put"], url_path="jira-url")
    def jira_url(self, request, pk=None):
        """The dataset's Jira address set by hand (`jira_base_url`, "" to remove) and the one in use (`effective`:
        a Jira connection's address wins). 400 naming `jira_base_url` unless it is an http(s) site address."""
        dataset = self.get_object()
        if request.method == "PUT":
            payload = serializers.DatasetJiraUrlSerializer(data=request.data)
            payload.is_valid(raise_exception=True)
            dataset = datasets.set_jira_base_url(dataset=dataset, url=payload.validated_data["jira_base_url"])
        return Response({"jira_base_url": dataset.jira_base_url, "effective": datasets.jira_base_url(dataset)})

    @extend_schema(request=serializers.DatasetMappingSerializer, responses={200: serializers.DatasetMappingSerializer})
    @action(detail=True, methods=["get", "put"])
    def mapping(self, request, pk=None):
        """The remembered column mapping (role -> column) used for this dataset's next uploads."""
        dataset = self.get_object()
        if request.method == "PUT":
            payload = serializers.DatasetMappingSerializer(data=request.data)
            payload.is_valid(raise_exception=True)
            dataset = datasets.save_mapping(dataset=dataset, mapping=payload.validated_data["mapping"])
        return Response({"mapping": dataset.column_mapping})

    @extend_schema(responses={200: serializers.DatasetVersionSerializer(many=True)})
    @action(detail=True, methods=["get"])
    def versions(self, request, pk=None):
        dataset = self.get_object()
        rows = dataset.versions.defer("rejected_rows")
        return Response(serializers.DatasetVersionSerializer(rows, many=True).data)

    @extend_schema(responses={200: dict})
    @action(detail=True, methods=["get"])
    def report(self, request, pk=None):
        """The validation report of the latest version (`?version=N` for another)."""
        version = self._version(request, self.get_object())
        return Response(version.report)

    @extend_schema(responses={(200, "text/csv"): str})
    @action(detail=True, methods=["get"], url_path="rejected-rows")
    def report_csv(self, request, pk=None):
        """Every rejected row of the latest version (`?version=N`) as CSV."""
        dataset = self.get_object()
        version = self._version(request, dataset)
        return csv_attachment(datasets.report_csv(version=version), f"{dataset.name}-v{version.number}-rejected.csv")

    @extend_schema(parameters=[serializers.PairsQuerySerializer], responses={200: dict})
    @action(detail=True, methods=["get"])
    def pairs(self, request, pk=None):
        """Counts and a sample of the training examples a strategy builds (train split only)."""
        dataset = self.get_object()
        query = serializers.PairsQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        try:
            result = pairs.preview_pairs(dataset=dataset, **query.options())
        except ValueError as exc:  # strategy options checked by pairs (plain ValueError)
            raise ServiceError(str(exc)) from exc
        return Response(result)

    def destroy(self, request, pk=None):
        """Delete the dataset; its unfinished runs and imports are cancelled, its staged files and run folders go."""
        datasets.delete_dataset(dataset=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _version(self, request, dataset: Dataset) -> DatasetVersion:
        number = request.query_params.get("version")
        versions = dataset.versions.all()
        version = versions.filter(number=number).first() if number and number.isdigit() else versions.first()
        if version is None:
            raise NotFound(f"No version {number} of dataset {dataset.pk}." if number else "The dataset has no version.")
        return version


class ImportJobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Background import jobs of big uploads: status, phase, rows read, outcome (the dataset and version)."""

    serializer_class = serializers.ImportJobSerializer
    parser_classes = API_PARSERS
    pagination_class = BoundedLimitOffsetPagination

    def get_queryset(self):
        return ImportJob.objects.filter(owner=self.request.user)

    @extend_schema(request=serializers.ImportStartSerializer,
                   responses={200: serializers.ImportJobSerializer, 202: serializers.ImportJobSerializer})
    @action(detail=True, methods=["post"])
    def start(self, request, pk=None):
        """Import a file kept by a preview (keep=true): 200 when done now, 202 when a worker will."""
        job = self.get_object()
        payload = serializers.ImportStartSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        job = import_jobs.start(job=job, background=payload.validated_data["background"],
                            name=payload.validated_data["name"])
        done = job.is_terminal
        return Response(self.get_serializer(job).data, status=status.HTTP_200_OK if done else status.HTTP_202_ACCEPTED)


class TrainingRunViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = serializers.TrainingRunSerializer
    parser_classes = API_PARSERS
    pagination_class = BoundedLimitOffsetPagination

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
        run = runs.start_run(
            owner=request.user,
            dataset=dataset,
            base_model=data["base_model"],
            hyperparameters=data["hyperparameters"],
        )
        return Response(self.get_serializer(run).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        run = runs.cancel_run(run=self.get_object())
        return Response(self.get_serializer(run).data)


class ModelVersionViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Model versions and their lineage; search.api adds promotion, rollback, deletion and vector export."""

    serializer_class = serializers.ModelVersionSerializer
    parser_classes = API_PARSERS
    pagination_class = BoundedLimitOffsetPagination

    def get_queryset(self):
        return ModelVersion.objects.filter(owner=self.request.user)

    @extend_schema(responses={(200, "application/zip"): OpenApiTypes.BINARY})
    @action(detail=True, methods=["get"])
    def download(self, request, pk=None):
        """The model folder as a zip that SentenceTransformer(unzipped_folder) loads."""
        return temporary_file_response(registry.export_zip(version=self.get_object()), "application/zip")


# --- Jira link and daily retraining (owner-scoped: a dataset that is missing or not yours is a 404) -------


def _owned_dataset(request, pk: int) -> Dataset:
    dataset = Dataset.objects.filter(owner=request.user, pk=pk).first()
    if dataset is None:
        raise NotFound("Not found.")
    return dataset


def _dataset_filter(request, queryset):
    """?dataset=<id> narrows a list; anything but a whole number is a 400 naming the parameter."""
    raw = request.query_params.get("dataset")
    if raw in (None, ""):
        return queryset
    if not raw.isdigit() or len(raw) > 18:
        raise ValidationError({"dataset": [f"must be a dataset id (a whole number), got {raw[:40]!r}."]})
    return queryset.filter(dataset_id=int(raw))


class DatasetJiraView(APIView):
    """The dataset's Jira link: GET it (never the token), PUT to link or change it, DELETE to unlink."""

    parser_classes = API_PARSERS

    @extend_schema(responses={200: serializers.JiraConnectionSerializer})
    def get(self, request, pk: int):
        connection = JiraConnection.objects.filter(dataset=_owned_dataset(request, pk)).first()
        if connection is None:
            raise NotFound("This dataset is not linked to Jira.")
        return Response(serializers.JiraConnectionSerializer(connection).data)

    @extend_schema(request=serializers.JiraConnectionInputSerializer,
                   responses={200: serializers.JiraConnectionSerializer})
    def put(self, request, pk: int):
        dataset = _owned_dataset(request, pk)
        payload = serializers.JiraConnectionInputSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        connection = jira.save_connection(dataset=dataset, **payload.validated_data)
        return Response(serializers.JiraConnectionSerializer(connection).data)

    def delete(self, request, pk: int):
        jira.delete_connection(dataset=_owned_dataset(request, pk))
        return Response(status=status.HTTP_204_NO_CONTENT)


class JiraDatasetCreateView(APIView):
    """POST: a new, empty tickets dataset linked to Jira (201); its first sync or retrain fills it."""

    parser_classes = API_PARSERS

    @extend_schema(request=serializers.JiraDatasetCreateSerializer, responses={201: serializers.DatasetSerializer})
    def post(self, request):
        payload = serializers.JiraDatasetCreateSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        dataset = jira.create_linked_dataset(owner=request.user, **payload.validated_data)
        dataset = Dataset.objects.filter(pk=dataset.pk).annotate(
            document_count=Count("documents"), latest_version=_latest_version()).get()
        return Response(serializers.DatasetSerializer(dataset).data, status=status.HTTP_201_CREATED)


class DatasetJiraTestView(APIView):
    """POST: sign in to Jira and run the link's JQL for one issue; {"ok": true, ...} or {"ok": false, "error"}."""

    parser_classes = API_PARSERS

    @extend_schema(request=None, responses={200: dict})
    def post(self, request, pk: int):
        connection = JiraConnection.objects.filter(dataset=_owned_dataset(request, pk)).first()
        if connection is None:
            raise NotFound("This dataset is not linked to Jira.")
        return Response(jira.test_connection(connection=connection))


class DatasetJiraSyncView(APIView):
    """POST: pull the issues updated since the last sync into a new dataset version (202 with the sync job)."""

    parser_classes = API_PARSERS

    @extend_schema(request=None, responses={202: serializers.JiraSyncSerializer})
    def post(self, request, pk: int):
        sync = jira.start_sync(dataset=_owned_dataset(request, pk), owner=request.user)
        return Response(serializers.JiraSyncSerializer(sync).data, status=status.HTTP_202_ACCEPTED)


class JiraSyncViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Jira sync jobs (`?dataset=<id>` for one dataset's): status, pages, issues fetched, the version it added."""

    serializer_class = serializers.JiraSyncSerializer
    parser_classes = API_PARSERS
    pagination_class = BoundedLimitOffsetPagination

    def get_queryset(self):
        return _dataset_filter(self.request, JiraSync.objects.filter(owner=self.request.user).select_related("version"))

    @extend_schema(request=None)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        sync = self.get_object()
        jobs.request_cancel(sync)
        sync.refresh_from_db()
        return Response(self.get_serializer(sync).data)


class DatasetRetrainingView(APIView):
    """The dataset's retrain schedule and guard: GET (defaults until saved), PUT to set them."""

    parser_classes = API_PARSERS

    @extend_schema(responses={200: serializers.RetrainScheduleSerializer})
    def get(self, request, pk: int):
        return Response(serializers.RetrainScheduleSerializer(retraining.schedule_of(_owned_dataset(request, pk))).data)

    @extend_schema(request=serializers.RetrainScheduleInputSerializer,
                   responses={200: serializers.RetrainScheduleSerializer})
    def put(self, request, pk: int):
        dataset = _owned_dataset(request, pk)
        payload = serializers.RetrainScheduleInputSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        schedule = retraining.save_schedule(dataset=dataset, owner=request.user, **payload.validated_data)
        return Response(serializers.RetrainScheduleSerializer(schedule).data)


class DatasetRetrainNowView(APIView):
    """POST: retrain now, outside the schedule (202 with the occurrence; 409 while one is queued or running)."""

    parser_classes = API_PARSERS

    @extend_schema(request=None, responses={202: serializers.RetrainOccurrenceSerializer})
    def post(self, request, pk: int):
        occurrence = retraining.run_now(dataset=_owned_dataset(request, pk), owner=request.user)
        return Response(serializers.RetrainOccurrenceSerializer(occurrence).data, status=status.HTTP_202_ACCEPTED)


class RetrainOccurrenceViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Retrains (`?dataset=<id>` for one dataset's history): outcome, the decision with its numbers, deliveries."""

    serializer_class = serializers.RetrainOccurrenceSerializer
    parser_classes = API_PARSERS
    pagination_class = BoundedLimitOffsetPagination

    def get_queryset(self):
        rows = (RetrainOccurrence.objects.filter(owner=self.request.user)
                .select_related("champion", "challenger").prefetch_related("deliveries"))
        return _dataset_filter(self.request, rows)

    @extend_schema(request=None)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        occurrence = retraining.cancel_occurrence(occurrence=self.get_object())
        return Response(self.get_serializer(occurrence).data)
