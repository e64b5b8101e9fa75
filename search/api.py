"""REST API for search indexes, hybrid search, similar tickets and the duplicate finder (owner-scoped)."""

from django.db.models import BooleanField, F, Q
from django.db.models.expressions import RawSQL
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action, api_view, parser_classes
from rest_framework.exceptions import ValidationError
from rest_framework.exceptions import NotFound
from rest_framework.generics import get_object_or_404
from rest_framework.response import Response
from rest_framework.views import APIView

from embedportal import jobs
from embedportal.pagination import BoundedLimitOffsetPagination
from embedportal.parsers import API_PARSERS
from search import duplicates, encoders, hybrid, indexing, serializers, serving, tickets, tuning
from search.clustering import assignment as cluster_assignment
from search.clustering import runs as clustering_runs
from search.filters import FILTER_PARAMS
from search.models import (
    Cluster, ClusterAssignment, ClusterAssignmentJob, ClusteringRun, DuplicatePair, IndexJob, SearchIndex,
)
from training import api as training_api
from training.downloads import csv_attachment, temporary_file_response
from training.models import Dataset, Document, ModelVersion


_FILTER_PARAMETERS = [
    OpenApiParameter(name, str, many=True, description=f"Only documents whose {name} is one of these (repeatable)")
    for name in FILTER_PARAMS
] + [
    OpenApiParameter("created_from", str, description="Created on or after this date (YYYY-MM-DD)"),
    OpenApiParameter("created_to", str, description="Created on or before this date (YYYY-MM-DD)"),
]


_SEARCH_PARAMETERS = [
    OpenApiParameter("q", str, description="Query text (websearch syntax on the keyword side: \"phrase\", -word, or)"),
    OpenApiParameter("mode", str, enum=list(hybrid.MODES), default="hybrid"),
    OpenApiParameter("k", int, default=10, description=f"Results per page (1-{hybrid.MAX_K})"),
    OpenApiParameter("page", int, default=1),
    OpenApiParameter("fusion", str, enum=list(hybrid.FUSION_METHODS), description="Default: the index's tuned fusion"),
    OpenApiParameter("alpha", float, description="Weighted fusion: weight of the vector side, 0-1"),
    OpenApiParameter("rrf_k", int, description="RRF constant (default 60)"),
    *_FILTER_PARAMETERS,
]


def _search(index: SearchIndex, request) -> dict:
    """One search of `index` with the request's parameters, as the API answers it (both search endpoints)."""
    params = serializers.SearchParamsSerializer(data=serializers.query_data(request.query_params))
    params.is_valid(raise_exception=True)
    data = params.validated_data
    result = hybrid.hybrid_search(
        index=index, query=data["q"], k=data["k"], mode=data["mode"], page=data["page"],
        filters=serializers.FiltersSerializer.to_filters(data),
        fusion=data["fusion"], alpha=data["alpha"], rrf_k=data["rrf_k"],
    )
    return {
        "index": index.pk, "model_version": index.model_version_id,
        "query": result.query, "mode": result.mode, "page": result.page, "k": data["k"],
        "has_more": result.has_more, "total": result.total, "total_capped": result.total_capped,
        "key_document": result.key_document_id,
        "message": result.message, "notice": result.notice,
        "fusion": result.fusion, "filters": result.filters, "timings_ms": result.timings_ms,
        "query_encoder": result.query_encoder,
        "results": [hybrid.serialize_hit(hit) for hit in result.hits],
    }


class SearchIndexViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = serializers.SearchIndexSerializer
    parser_classes = API_PARSERS
    pagination_class = BoundedLimitOffsetPagination

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
        index = indexing.create_index(owner=request.user, dataset=dataset, model_version=version)
        return Response(self.get_serializer(index).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Hybrid, keyword or vector search over the index's dataset",
        parameters=_SEARCH_PARAMETERS,
        responses={200: serializers.SearchResponseSerializer},
    )
    @action(detail=True, methods=["get"])
    def search(self, request, pk=None):
        return Response(_search(self.get_object(), request))

    @extend_schema(
        summary="Tickets most similar to one ticket (its words and vector neighbours, fused as this index serves)",
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
        hits = hybrid.similar_documents(
            index=index, document=document, k=data["k"], filters=serializers.FiltersSerializer.to_filters(data)
        )
        return Response(
            {
                "document": {"id": document.pk, "key": document.external_key, "title": document.title},
                "results": [hybrid.serialize_hit(hit) for hit in hits],
            }
        )

    @extend_schema(summary="Tune the default fusion on the validation split (a background job)", request=None,
                   responses={202: serializers.IndexJobSerializer})
    @action(detail=True, methods=["post"], url_path="tune-fusion")
    def tune_fusion(self, request, pk=None):
        job = tuning.start_tuning(index=self.get_object(), owner=request.user)
        return Response(serializers.IndexJobSerializer(job).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(summary="Evaluate search on held-out tickets (a background job)",
                   request=serializers.EvaluationStartSerializer, responses={202: serializers.IndexJobSerializer})
    @action(detail=True, methods=["post"])
    def evaluate(self, request, pk=None):
        payload = serializers.EvaluationStartSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        job = tuning.start_evaluation(index=self.get_object(), owner=request.user,
                                      max_queries=payload.validated_data["queries"])
        return Response(serializers.IndexJobSerializer(job).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(summary="Start the duplicate finder: pairs above a cosine threshold (a background job)",
                   request=serializers.DuplicateScanSerializer, responses={202: serializers.IndexJobSerializer})
    @action(detail=True, methods=["post"], url_path="duplicates/scan")
    def duplicate_scan(self, request, pk=None):
        payload = serializers.DuplicateScanSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        job = duplicates.start_duplicate_scan(index=self.get_object(), owner=request.user,
                                              threshold=payload.validated_data["threshold"])
        return Response(serializers.IndexJobSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class IndexJobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Jobs over your indexes (duplicate scans, fusion tuning, evaluations): status, phase, progress, result."""

    serializer_class = serializers.IndexJobSerializer
    parser_classes = API_PARSERS
    pagination_class = BoundedLimitOffsetPagination

    def get_queryset(self):
        return IndexJob.objects.filter(owner=self.request.user).order_by("-created_at", "-id")

    @extend_schema(summary="Cancel a queued or running job", request=None, responses={200: serializers.IndexJobSerializer})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        job = self.get_object()
        jobs.request_cancel(job)
        job.refresh_from_db()
        return Response(self.get_serializer(job).data)


class DuplicatePairViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Candidate duplicate pairs of your datasets, most similar first; filter with ?dataset=&decision=."""

    serializer_class = serializers.DuplicatePairSerializer
    parser_classes = API_PARSERS
    pagination_class = BoundedLimitOffsetPagination

    def get_queryset(self):
        pairs = DuplicatePair.objects.filter(dataset__owner=self.request.user).select_related(
            "document_a", "document_b", "decided_by"
        ).annotate(jira_linked=RawSQL(duplicates._JIRA_LINKED_SQL, [], output_field=BooleanField()))
        dataset = self.request.query_params.get("dataset")
        index = self.request.query_params.get("index")
        decision = self.request.query_params.get("decision")
        jira = self.request.query_params.get("jira")
        if dataset:
            if not dataset.isdigit():
                raise ValidationError({"dataset": ["must be a dataset id."]})
            pairs = pairs.filter(dataset_id=int(dataset))
        if index:
            # Pairs belong to the index's dataset (a rescan with another version keeps the decisions).
            found = SearchIndex.objects.filter(owner=self.request.user, pk=int(index)).values_list(
                "dataset_id", flat=True).first() if index.isdigit() else None
            if found is None:
                raise ValidationError({"index": ["No such index of yours."]})
            pairs = pairs.filter(dataset_id=found)
        if jira:
            if jira not in duplicates.JIRA_FILTERS:
                raise ValidationError({"jira": [f"must be one of {', '.join(duplicates.JIRA_FILTERS)}."]})
            pairs = pairs.filter(jira_linked=jira == "linked")
        if decision:
            if decision not in DuplicatePair.Decision.values:
                raise ValidationError({"decision": [f"must be one of {', '.join(DuplicatePair.Decision.values)}."]})
            pairs = pairs.filter(decision=decision)
        return pairs.order_by("-similarity", "id")

    @extend_schema(
        parameters=[
            OpenApiParameter("dataset", int),
            OpenApiParameter("index", int, description="Pairs of this index's dataset"),
            OpenApiParameter("decision", str, enum=list(DuplicatePair.Decision.values)),
            OpenApiParameter("jira", str, enum=list(duplicates.JIRA_FILTERS),
                             description="Pairs Jira (or a links CSV) already links as duplicates, or the others"),
        ]
    )
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)

    @extend_schema(summary="Reviewed pairs of a dataset as CSV (?dataset= or ?index=; ?decision= for one verdict)",
                   parameters=[OpenApiParameter("dataset", int), OpenApiParameter("index", int),
                               OpenApiParameter("decision", str, enum=[*DuplicatePair.Decision.values])],
                   responses={(200, "text/csv"): str})
    @action(detail=False, methods=["get"])
    def export(self, request):
        params = request.query_params
        index = SearchIndex.objects.filter(owner=request.user, pk=params["index"]).first() if params.get(
            "index", "").isdigit() else None
        dataset_id = index.dataset_id if index else params.get("dataset", "")
        dataset = Dataset.objects.filter(owner=request.user, pk=dataset_id).first() if str(dataset_id).isdigit() else None
        if dataset is None:
            raise ValidationError({"dataset": ["Give ?dataset= or ?index= of yours."]})
        decision = params.get("decision") or None
        if decision is not None and decision not in DuplicatePair.Decision.values:
            raise ValidationError({"decision": [f"must be one of {', '.join(DuplicatePair.Decision.values)}."]})
        return csv_attachment(duplicates.export_csv(dataset=dataset, decision=decision),
                              f"{dataset.name}-duplicate-decisions.csv")

    @extend_schema(summary="Mark a pair as duplicate / not duplicate (pending undoes)",
                   request=serializers.DuplicateDecisionSerializer, responses={200: serializers.DuplicatePairSerializer})
    @action(detail=True, methods=["post"])
    def decide(self, request, pk=None):
        pair = self.get_object()
        payload = serializers.DuplicateDecisionSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        duplicates.decide_duplicate(pair=pair, decision=payload.validated_data["decision"], user=request.user)
        return Response(self.get_serializer(pair).data)


# --- Serving model versions ---------------------------------------------------------

class ModelVersionViewSet(training_api.ModelVersionViewSet, mixins.DestroyModelMixin):
    """Model versions (training.api) plus what switches or reads their vectors (search.serving)."""

    @extend_schema(request=serializers.PromoteSerializer)
    @action(detail=True, methods=["post"])
    def promote(self, request, pk=None):
        """Request promotion; it switches at once if the index is ready, else when it is (stage stays candidate)."""
        params = serializers.PromoteSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        version = serving.request_promotion(
            version=self.get_object(), user=request.user, require_not_worse=params.validated_data["require_not_worse"]
        )
        return Response(self.get_serializer(version).data)

    @extend_schema(request=serializers.RollbackSerializer)
    @action(detail=False, methods=["post"])
    def rollback(self, request):
        """Serve the dataset's previous production version again (instant: its vectors are kept)."""
        params = serializers.RollbackSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        dataset = Dataset.objects.filter(owner=request.user, pk=params.validated_data["dataset"]).first()
        if dataset is None:
            raise ValidationError({"dataset": ["No such dataset of yours."]})
        version = serving.rollback(dataset=dataset, user=request.user)
        return Response(self.get_serializer(version).data)

    def destroy(self, request, pk=None):
        serving.delete_version(version=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        # Not "format": DRF reserves that query parameter for choosing a renderer.
        parameters=[OpenApiParameter("as", str, enum=list(serving.EXPORT_FORMATS), default="jsonl")],
        responses={(200, "application/octet-stream"): OpenApiTypes.BINARY},
    )
    @action(detail=True, methods=["get"])
    def embeddings(self, request, pk=None):
        """The version's stored vectors as Parquet, JSONL or CSV (key, title, embedding)."""
        export = serving.export_embeddings(version=self.get_object(), fmt=request.query_params.get("as", "jsonl"))
        return temporary_file_response(export, "application/octet-stream")




# --- Embedding texts with a served model ------------------------------------------

def _serving_version(user, version_id):
    qs = ModelVersion.objects.filter(owner=user)
    if version_id is not None:
        version = qs.filter(pk=version_id).first()
        if version is None:
            raise ValidationError({"version": [f"No model version {version_id} of yours."]})
        return version
    version = qs.filter(stage=ModelVersion.Stage.PRODUCTION).order_by("-promoted_at").first()
    if version is None:
        raise ValidationError({"version": ["You have no production model yet; pass a version id."]})
    return version


@extend_schema(request=serializers.EmbedSerializer, responses={200: dict})
@api_view(["POST"])
@parser_classes(API_PARSERS)
def embed(request):
    """Texts -> normalized vectors with a model version (default: your latest production model)."""
    params = serializers.EmbedSerializer(data=request.data)
    params.is_valid(raise_exception=True)
    version = _serving_version(request.user, params.validated_data.get("version"))
    vectors = encoders.embed_texts(artifact_path=version.artifact_path, texts=params.validated_data["texts"])
    return Response({"version": version.pk, "model": str(version), "dimensions": int(vectors.shape[1]),
                     "embeddings": [[round(float(x), 7) for x in row] for row in vectors]})


@extend_schema(request=serializers.SimilaritySerializer, responses={200: dict})
@api_view(["POST"])
@parser_classes(API_PARSERS)
def similarity(request):
    """[text_a, text_b] pairs -> cosine similarity with a model version."""
    params = serializers.SimilaritySerializer(data=request.data)
    params.is_valid(raise_exception=True)
    version = _serving_version(request.user, params.validated_data.get("version"))
    scores = encoders.similarity(artifact_path=version.artifact_path, pairs=params.validated_data["pairs"])
    return Response({"version": version.pk, "model": str(version), "scores": scores})


# --- Clustering ----------------------------------------------------------------------


def _id_param(request, name: str) -> int | None:
    """An optional ?name= id filter: absent -> None; not a whole number -> 400 naming it."""
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise ValidationError({name: [f"must be an id (a whole number), got {raw[:40]!r}."]})
    return int(raw)


class ClusteringRunViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Clustering runs of your indexes: start, status, cancel, clusters, outliers, a document's cluster,
    texts to clusters, batch assignment of new tickets and of outliers, and the export. Filter with ?dataset=&index=."""

    serializer_class = serializers.ClusteringRunSerializer
    parser_classes = API_PARSERS
    pagination_class = BoundedLimitOffsetPagination

    def get_queryset(self):
        qs = ClusteringRun.objects.filter(owner=self.request.user).order_by("-created_at", "-id")
        if self.action == "list":
            for name in ("dataset", "index"):
                value = _id_param(self.request, name)
                if value is not None:
                    qs = qs.filter(**{f"{name}_id": value})
        return qs

    @extend_schema(parameters=[OpenApiParameter("dataset", int), OpenApiParameter("index", int)])
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)

    @extend_schema(summary="Start a clustering run (a background job)", request=serializers.ClusteringStartSerializer,
                   responses={202: serializers.ClusteringRunSerializer})
    def create(self, request):
        payload = serializers.ClusteringStartSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        data = payload.validated_data
        index = SearchIndex.objects.filter(owner=request.user, pk=data["index"]).first()
        if index is None:
            raise ValidationError({"index": ["No such index of yours."]})
        run = clustering_runs.start_clustering(index=index, owner=request.user, method=data["method"],
                                               params=data["params"])
        return Response(self.get_serializer(run).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(summary="Cancel a queued or running clustering run", request=None,
                   responses={200: serializers.ClusteringRunSerializer})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        run = self.get_object()
        jobs.request_cancel(run)
        run.refresh_from_db()
        return Response(self.get_serializer(run).data)

    @extend_schema(summary="Fit anew with the same method and parameters (names carried by member overlap)",
                   request=None, responses={202: serializers.ClusteringRunSerializer})
    @action(detail=True, methods=["post"])
    def recluster(self, request, pk=None):
        run = clustering_runs.recluster(run=self.get_object(), owner=request.user)
        return Response(self.get_serializer(run).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(summary="The run's clusters, largest first", responses={200: serializers.ClusterSerializer(many=True)})
    @action(detail=True, methods=["get"])
    def clusters(self, request, pk=None):
        clusters = self.get_object().clusters.order_by("-size", "number")
        page = self.paginate_queryset(clusters)
        return self.get_paginated_response(serializers.ClusterSerializer(page, many=True).data)

    @extend_schema(summary="The run's outliers (no cluster); ?moved=true: those moved to their nearest cluster",
                   parameters=[OpenApiParameter("moved", bool)],
                   responses={200: serializers.ClusterMemberSerializer(many=True)})
    @action(detail=True, methods=["get"])
    def outliers(self, request, pk=None):
        run = self.get_object()
        moved = request.query_params.get("moved", "false")
        if moved not in ("true", "false"):
            raise ValidationError({"moved": ["must be true or false."]})
        rows = ClusterAssignment.objects.filter(run=run).select_related("document").order_by("document_id")
        rows = rows.filter(moved_from_noise=True) if moved == "true" else rows.filter(cluster__isnull=True)
        page = self.paginate_queryset(rows)
        return self.get_paginated_response(serializers.ClusterMemberSerializer(page, many=True).data)

    @extend_schema(summary="A document's cluster in this run",
                   parameters=[OpenApiParameter("key", str, description="Ticket key, e.g. HDFS-1234"),
                               OpenApiParameter("document", int, description="Document id (instead of key)")],
                   responses={200: dict})
    @action(detail=True, methods=["get"])
    def document(self, request, pk=None):
        run = self.get_object()
        key, doc_id = request.query_params.get("key"), _id_param(request, "document")
        if not key and doc_id is None:
            raise ValidationError({"key": ["Give a ticket key (or a document id)."]})
        lookup = Q(external_key=key) if key else Q(pk=doc_id)
        document = Document.objects.filter(lookup, dataset_id=run.dataset_id).first()
        if document is None:
            raise ValidationError({"key": ["No such document in this run's dataset."]})
        row = ClusterAssignment.objects.filter(run=run, document=document).select_related("cluster").first()
        return Response({
            "document": {"id": document.pk, "key": document.external_key, "title": document.title},
            "assigned": row is not None,
            "cluster": serializers.ClusterSerializer(row.cluster).data if row and row.cluster else None,
            "strength": row.strength if row else None, "source": row.source if row else None,
            "moved_from_noise": row.moved_from_noise if row else False,
        })

    @extend_schema(summary="Texts -> clusters with this run's model (embedded by the run's model version)",
                   request=serializers.AssignTextsSerializer, responses={200: dict})
    @action(detail=True, methods=["post"])
    def assign(self, request, pk=None):
        run = self.get_object()
        payload = serializers.AssignTextsSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        return Response({"run": run.pk, "results": cluster_assignment.assign_texts(
            run=run, texts=payload.validated_data["texts"])})

    @extend_schema(summary="Assign the dataset's tickets that have no cluster yet, without refitting (a job)",
                   request=None, responses={202: serializers.ClusterAssignmentJobSerializer})
    @action(detail=True, methods=["post"], url_path="assign-new")
    def assign_new(self, request, pk=None):
        job = cluster_assignment.start_assignment(run=self.get_object(), owner=request.user,
                                                  kind=ClusterAssignmentJob.Kind.NEW_DOCUMENTS)
        return Response(serializers.ClusterAssignmentJobSerializer(job).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(summary="Move the outliers to their nearest cluster, recording which moved (a job)",
                   request=None, responses={202: serializers.ClusterAssignmentJobSerializer})
    @action(detail=True, methods=["post"], url_path="assign-outliers")
    def assign_outliers(self, request, pk=None):
        job = cluster_assignment.start_assignment(run=self.get_object(), owner=request.user,
                                                  kind=ClusterAssignmentJob.Kind.OUTLIERS)
        return Response(serializers.ClusterAssignmentJobSerializer(job).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(summary="The 2-D map: points [x, y, cluster number (-1 outlier), key, title] and the clusters",
                   responses={200: dict})
    @action(detail=True, methods=["get"], url_path="map")
    def map_points(self, request, pk=None):
        return Response(cluster_assignment.map_points(run=self.get_object()))

    @extend_schema(
        # Not "format": DRF reserves that query parameter for choosing a renderer.
        parameters=[OpenApiParameter("as", str, enum=[*cluster_assignment.EXPORT_FORMATS], default="csv")],
        responses={(200, "application/octet-stream"): OpenApiTypes.BINARY},
    )
    @action(detail=True, methods=["get"])
    def export(self, request, pk=None):
        """Every ticket's cluster (key, title, cluster, label, strength, source, moved) as CSV or Parquet."""
        export = cluster_assignment.export_assignments(run=self.get_object(), fmt=request.query_params.get("as", "csv"))
        return temporary_file_response(export, "application/octet-stream")


class ClusterViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Clusters of your runs (?run= to pick one), their members, and a name of your own (PATCH name)."""

    serializer_class = serializers.ClusterSerializer
    parser_classes = API_PARSERS
    pagination_class = BoundedLimitOffsetPagination
    http_method_names = ["get", "patch", "head", "options"]

    def get_queryset(self):
        qs = Cluster.objects.filter(run__owner=self.request.user).order_by("run_id", "-size", "number")
        if self.action == "list":
            run_id = _id_param(self.request, "run")
            if run_id is not None:
                qs = qs.filter(run_id=run_id)
        return qs

    @extend_schema(parameters=[OpenApiParameter("run", int)])
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)

    @extend_schema(summary="Rename a cluster (kept by its match in the next run)",
                   request=serializers.ClusterRenameSerializer, responses={200: serializers.ClusterSerializer})
    def partial_update(self, request, pk=None):
        cluster = self.get_object()
        payload = serializers.ClusterRenameSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        clustering_runs.rename_cluster(cluster=cluster, name=payload.validated_data["name"])
        return Response(self.get_serializer(cluster).data)

    @extend_schema(summary="The cluster's members, strongest first",
                   responses={200: serializers.ClusterMemberSerializer(many=True)})
    @action(detail=True, methods=["get"])
    def members(self, request, pk=None):
        rows = (ClusterAssignment.objects.filter(cluster=self.get_object()).select_related("document")
                .order_by(F("strength").desc(nulls_last=True), "document_id"))
        page = self.paginate_queryset(rows)
        return self.get_paginated_response(serializers.ClusterMemberSerializer(page, many=True).data)


class ClusterAssignmentJobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Batch assignments with a run's model (new tickets, outliers): status, phase, progress, result."""

    serializer_class = serializers.ClusterAssignmentJobSerializer
    pagination_class = BoundedLimitOffsetPagination

    def get_queryset(self):
        return ClusterAssignmentJob.objects.filter(owner=self.request.user).order_by("-created_at", "-id")

    @extend_schema(summary="Cancel a queued or running assignment", request=None,
                   responses={200: serializers.ClusterAssignmentJobSerializer})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        job = self.get_object()
        jobs.request_cancel(job)
        job.refresh_from_db()
        return Response(self.get_serializer(job).data)


class DatasetSearchView(APIView):
    """`GET /api/datasets/{id}/search/`: search a dataset with whatever serves it now.

    A stable address for integrations: after a promotion it answers from the
    new production model's index, where /api/indexes/{id}/search/ stays on one
    (possibly archived) version. Before any trained model it answers from the
    base-model index (search.serving.serving_index says which).
    """

    @extend_schema(summary="Search a dataset with its production model (or its base-model index before one)",
                   parameters=_SEARCH_PARAMETERS, responses={200: serializers.SearchResponseSerializer})
    def get(self, request, pk: int):
        dataset = get_object_or_404(Dataset, pk=pk, owner=request.user)
        index = serving.serving_index(dataset=dataset)
        if index is None:
            raise NotFound("This dataset has no search index yet; its base-model index is created at import.")
        return Response(_search(index, request))


class DatasetDocumentView(APIView):
    """`GET /api/datasets/{id}/documents/{key}/`: one ticket by its key (or numeric id), with links and Jira URL."""

    @extend_schema(summary="A ticket of the dataset by key: fields, links (with their document ids), Jira URL",
                   responses={200: OpenApiTypes.OBJECT})
    def get(self, request, pk: int, key: str):
        dataset = get_object_or_404(Dataset, pk=pk, owner=request.user)
        document = tickets.find(dataset=dataset, key=key)
        if document is None:
            raise NotFound(f"No ticket {key} in this dataset.")
        return Response(tickets.serialize(tickets.ticket(document=document)))
