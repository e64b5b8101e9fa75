"""Search pages: search, side-by-side versions, similar tickets, evaluation, duplicate review.

Thin views: owner-scoped lookups, the API's serializers for validating
parameters (one set of rules for both), and the services do the work.
"""

from __future__ import annotations


from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import F
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from embedportal import jobs
from embedportal.confirmation import confirm_page, confirmed
from embedportal.errors import ServiceError
from search import duplicates, hybrid, indexing, serializers, serving, tickets, tuning
from search.clustering import assignment as cluster_assignment
from search.clustering import runs as clustering_runs
from search.filters import FILTERS, filter_options
from search.models import (
    Cluster, ClusterAssignment, ClusterAssignmentJob, ClusteringRun, DuplicatePair, IndexJob, SearchIndex,
)
from training import artifacts
from training.downloads import csv_attachment, temporary_file_response
from training.fusion import fusion_name
from training.models import Dataset, Document, ModelVersion
from training.registry import production_version

DUPLICATES_PER_PAGE = 25


def _indexes(request: HttpRequest):
    return SearchIndex.objects.filter(owner=request.user).select_related("dataset", "model_version")


LAST_INDEX_SESSION_KEY = "search_last_index"


def _pick(indexes, wanted: str | None, last: str | None = None) -> SearchIndex | None:
    """The index asked for, else the one last used (`last`), else the production one, else the newest."""
    indexes = list(indexes)
    chosen = next((i for i in indexes if str(i.pk) == (wanted or "")), None)
    if chosen is None:
        chosen = next((i for i in indexes if str(i.pk) == str(last or "")), None)
    if chosen is None:
        production = [i for i in indexes if i.model_version.stage == ModelVersion.Stage.PRODUCTION]
        chosen = (production or indexes or [None])[0]
    return chosen


def _params(request: HttpRequest) -> tuple[dict, dict[str, str]]:
    """Validated search parameters (defaults on error) and the field errors."""
    params = serializers.SearchParamsSerializer(data=serializers.query_data(request.GET))
    if params.is_valid():
        return params.validated_data, {}
    errors = {name: str(msgs[0]) for name, msgs in params.errors.items()}
    fallback = serializers.SearchParamsSerializer(data={"q": request.GET.get("q", "")[: hybrid.MAX_QUERY_CHARS]})
    fallback.is_valid()
    return fallback.validated_data, errors


def _run(index: SearchIndex | None, data: dict) -> tuple[hybrid.SearchResponse | None, str]:
    """Search the index; while its first build runs, by keywords (they need no model), saying so."""
    if index is None:
        return None, ""
    mode = data["mode"]
    building = mode != "keyword" and not index.is_searchable and index.status != SearchIndex.Status.FAILED
    try:
        result = hybrid.hybrid_search(
            index=index, query=data["q"], k=data["k"], mode="keyword" if building else mode, page=data["page"],
            filters=serializers.FiltersSerializer.to_filters(data),
            fusion=data["fusion"], alpha=data["alpha"], rrf_k=data["rrf_k"],
        )
    except ServiceError as exc:
        return None, str(exc)
    if building:
        done = f" ({index.embedded_count:,}/{index.total_count:,} tickets embedded)" if index.total_count else ""
        result.notice = " ".join(filter(None, [
            f"Keyword results: this index is {index.get_status_display().lower()}{done}; "
            f"{mode} search follows once it is ready.",
            result.notice,
        ]))
    return result, ""


def _without_filters(data: dict) -> dict:
    """The parameters with every filter cleared: another index's dataset has other values."""
    cleared = dict(data)
    for f in FILTERS:
        if f.param in cleared:
            cleared[f.param] = []
    for name in ("created_from", "created_to"):
        if name in cleared:
            cleared[name] = None
    return cleared


def _page_links(request: HttpRequest, result: hybrid.SearchResponse | None) -> dict[str, str]:
    links: dict[str, str] = {}
    if result is None:
        return links
    for name, page in (("previous", result.page - 1), ("next", result.page + 1)):
        if (name == "previous" and page >= 1) or (name == "next" and result.has_more):
            query = request.GET.copy()
            query["page"] = str(page)
            links[name] = f"?{query.urlencode()}"
    return links


def _filter_context(index: SearchIndex | None, data: dict) -> dict:
    """The filter form: each attribute the dataset has values for, with counts and what is selected."""
    options = filter_options(dataset=index.dataset) if index else {}
    fields = []
    for f in FILTERS:
        chosen = {str(v) for v in data.get(f.param, [])}
        values = options.get(f.param, [])
        if f.param == "cluster" and index is not None:
            values = values + _other_clusters(index, chosen - {v for v, _, _ in values})
        if values:
            fields.append({"name": f.param, "label": f.label,
                           "options": [(value, count, value in chosen, label) for value, count, label in values]})
    active = any(data.get(f.param) for f in FILTERS) or data.get("created_from") or data.get("created_to")
    return {"filter_fields": fields, "filters_active": bool(active)}


def _other_clusters(index: SearchIndex, ids: set[str]) -> list[tuple[str, int, str]]:
    """Chosen clusters of an earlier run of the same dataset ("search within this cluster" from its page)."""
    if not ids:
        return []
    rows = Cluster.objects.filter(pk__in=[int(i) for i in ids], run__dataset_id=index.dataset_id).select_related("run")
    return [(str(c.pk), c.size, f"{c.label} (clustering v{c.run.version})") for c in rows]


@login_required
def search_page(request: HttpRequest) -> HttpResponse:
    indexes = _indexes(request)
    last = request.session.get(LAST_INDEX_SESSION_KEY)
    selected = _pick(indexes, request.GET.get("index"), last)
    data, errors = _params(request)
    if selected is not None:
        shown = request.GET.get("shown_index")  # the index the form was showing when submitted
        if shown and shown != str(selected.pk):
            data = _without_filters(data)  # another index was chosen: the filters follow it
        if request.GET.get("index") and last != selected.pk:  # remembered when chosen: no session write per page
            request.session[LAST_INDEX_SESSION_KEY] = selected.pk
    result, error = (None, "")
    if "q" in request.GET and not errors:
        result, error = _run(selected, data)
    context = {
        "indexes": indexes,
        "selected": selected,
        "data": data,
        "errors": errors,
        "modes": hybrid.MODES,
        "fusion_methods": hybrid.FUSION_METHODS,
        **_filter_context(selected, data),
        "result": result,
        "error": error or "; ".join(f"{k}: {v}" for k, v in errors.items()),
        "links": _page_links(request, result),
        # Result keys also link to the ticket in Jira when the dataset has an address (set by hand or a connection).
        "jira_base": tickets.jira_base_url(selected.dataset) if selected is not None and result else "",
    }
    return render(request, "search/search.html", context, status=400 if (error or errors) else 200)


@login_required
def compare_page(request: HttpRequest) -> HttpResponse:
    """The same query against two indexes (e.g. base vs fine-tuned version of one dataset)."""
    indexes = list(_indexes(request))
    left = _pick(indexes, request.GET.get("a"))
    right = next((i for i in indexes if str(i.pk) == request.GET.get("b", "")), None)
    if right is None and left is not None:
        right = next((i for i in indexes if i.dataset_id == left.dataset_id and i.pk != left.pk), left)
    data, errors = _params(request)
    columns = []
    if "q" in request.GET and not errors:
        for index in (left, right):
            result, error = _run(index, data)
            columns.append({"index": index, "result": result, "error": error})
    ranks = [
        {h.document.pk: n for n, h in enumerate(c["result"].hits, start=1)} if c["result"] else None for c in columns
    ]
    overlap = None
    for column, other in zip(columns, reversed(ranks)):
        hits = column["result"].hits if column["result"] else []
        # other_rank: the hit's rank on the other side, 0 when only this side has it.
        column["rows"] = [(hit, other.get(hit.document.pk, 0) if other is not None else None) for hit in hits]
    if len(ranks) == 2 and None not in ranks:
        overlap = len(ranks[0].keys() & ranks[1].keys())
    context = {
        "indexes": indexes, "left": left, "right": right, "data": data, "modes": hybrid.MODES,
        "columns": columns, "errors": errors, "overlap": overlap,
    }
    return render(request, "search/compare.html", context, status=400 if errors else 200)


@login_required
def similar_page(request: HttpRequest, index_pk: int, document_pk: int) -> HttpResponse:
    """The ticket page: the whole ticket, its links, its Jira address, and its similar tickets under the index."""
    index = get_object_or_404(_indexes(request), pk=index_pk)
    document = get_object_or_404(Document.objects.select_related("dataset"), pk=document_pk,
                                 dataset_id=index.dataset_id)
    hits, error = [], ""
    try:
        hits = hybrid.similar_documents(index=index, document=document, k=10)
    except ServiceError as exc:
        error = str(exc)
    ticket = tickets.ticket(document=document)
    fusion = hybrid.resolve_fusion(index=index)
    context = {"index": index, "document": document, "ticket": ticket, "hits": hits, "error": error,
               "jira_base": ticket.jira_base, "fusion": fusion_name(fusion), "has_prior": "prior" in fusion}
    return render(request, "search/similar.html", context)


@login_required
def evaluate_page(request: HttpRequest, index_pk: int) -> HttpResponse:
    """The last held-out evaluation and fusion tuning of an index (stored job results), and buttons for new ones."""
    indexes = _indexes(request)
    index = get_object_or_404(indexes, pk=index_pk)
    return render(request, "search/evaluate.html", _evaluation_context(index, indexes))


def _evaluation_context(index: SearchIndex, indexes, error: str = "") -> dict:
    evaluation_job = tuning.latest(index=index, kind=IndexJob.Kind.EVALUATION)
    tuning_job = tuning.latest(index=index, kind=IndexJob.Kind.TUNING)
    report = evaluation_job.result if evaluation_job and evaluation_job.status == IndexJob.Status.SUCCEEDED else None
    rows = []
    if report and report.get("systems"):
        best = {m: max(s[m] for s in report["systems"].values()) for m in report["metrics"]}
        rows = [
            {"name": name, "cells": [(m, metrics[m], metrics[m] == best[m]) for m in report["metrics"]]}
            for name, metrics in report["systems"].items()
        ]
    return {
        "index": index, "indexes": indexes, "report": report, "rows": rows, "error": error,
        "evaluation_job": evaluation_job, "tuning_job": tuning_job,
        "max_queries": (evaluation_job.params.get("max_queries") if evaluation_job else None)
        or tuning.EVALUATION_MAX_QUERIES,
        "max_evaluation_queries": tuning.MAX_EVALUATION_QUERIES, "fusion": index.fusion,
        "tuning_rows": sorted(
            ((name, m.get("ndcg@10"), m.get("mrr@10"), m.get("recall@10"))
             for name, m in (index.fusion or {}).get("systems", {}).items()),
            key=lambda row: -(row[1] or 0),
        ),
    }


@login_required
@require_POST
def evaluate_start(request: HttpRequest, index_pk: int) -> HttpResponse:
    indexes = _indexes(request)
    index = get_object_or_404(indexes, pk=index_pk)
    payload = serializers.EvaluationStartSerializer(data=request.POST)
    error = ""
    if not payload.is_valid():
        error = f"queries: give a number of held-out queries between 1 and {tuning.MAX_EVALUATION_QUERIES}."
    else:
        try:
            job = tuning.start_evaluation(index=index, owner=request.user, max_queries=payload.validated_data["queries"])
        except ServiceError as exc:
            error = str(exc)
        else:
            return redirect("index_job_detail", pk=job.pk)
    return render(request, "search/evaluate.html", _evaluation_context(index, indexes, error), status=400)


@login_required
@require_POST
def tune_fusion(request: HttpRequest, index_pk: int) -> HttpResponse:
    index = get_object_or_404(_indexes(request), pk=index_pk)
    try:
        job = tuning.start_tuning(index=index, owner=request.user)
    except ServiceError as exc:
        messages.error(request, str(exc))
        return redirect("search_evaluate", index_pk=index.pk)
    return redirect("index_job_detail", pk=job.pk)


@login_required
def duplicates_page(request: HttpRequest, index_pk: int) -> HttpResponse:
    index = get_object_or_404(_indexes(request), pk=index_pk)
    decision = request.GET.get("decision", DuplicatePair.Decision.PENDING)
    if decision not in DuplicatePair.Decision.values and decision not in ("all", "jira"):
        decision = DuplicatePair.Decision.PENDING
    groups = []
    # Pairs Jira already links as duplicates have their own tab instead of waiting as "Not reviewed".
    if decision == "jira":
        pairs = duplicates.duplicate_pairs(dataset=index.dataset, jira="linked")
    elif decision == DuplicatePair.Decision.PENDING:
        # Near-identical tickets are one group with one decision, not every pair among them.
        groups = duplicates.near_identical_groups(dataset=index.dataset)
        pairs = duplicates.duplicate_pairs(dataset=index.dataset, decision=decision, jira="not_linked").exclude(
            pk__in=[pk for group in groups for pk in group.pair_ids])
    else:
        pairs = duplicates.duplicate_pairs(dataset=index.dataset, decision=None if decision == "all" else decision)
    page = Paginator(pairs, DUPLICATES_PER_PAGE).get_page(request.GET.get("page"))
    scan = duplicates.latest_scan(index=index)
    context = {
        "index": index, "page": page, "decision": decision, "decisions": DuplicatePair.Decision.choices, "scan": scan,
        "groups": groups, "near_identical": duplicates.NEAR_IDENTICAL,
        "default_threshold": (scan.params.get("threshold") if scan else None) or duplicates.DEFAULT_DUPLICATE_THRESHOLD,
    }
    return render(request, "search/duplicates.html", context)


@login_required
@require_POST
def duplicate_group_decide(request: HttpRequest, index_pk: int) -> HttpResponse:
    """One verdict on every pair of a near-identical group (the pair ids the page listed)."""
    index = get_object_or_404(_indexes(request), pk=index_pk)
    ids = [int(v) for v in request.POST.getlist("pair") if v.isdigit()]
    try:
        count = duplicates.decide_group(dataset=index.dataset, pair_ids=ids, decision=request.POST.get("decision", ""),
                                        user=request.user)
        messages.success(request, f"{count} pairs decided.")
    except ServiceError as exc:
        messages.error(request, str(exc))
    return redirect("search_duplicates", index_pk=index.pk)


@login_required
def duplicates_export(request: HttpRequest, index_pk: int) -> HttpResponse:
    """The reviewed pairs of the index's dataset as CSV (the API's /api/duplicates/export/ writes the same)."""
    index = get_object_or_404(_indexes(request), pk=index_pk)
    return csv_attachment(duplicates.export_csv(dataset=index.dataset), f"{index.dataset.name}-duplicate-decisions.csv")


@login_required
@require_POST
def duplicate_scan(request: HttpRequest, index_pk: int) -> HttpResponse:
    index = get_object_or_404(_indexes(request), pk=index_pk)
    payload = serializers.DuplicateScanSerializer(data=request.POST)
    if not payload.is_valid():
        messages.error(request, "threshold: " + str(next(iter(payload.errors.values()))[0]))
        return redirect("search_duplicates", index_pk=index.pk)
    try:
        job = duplicates.start_duplicate_scan(index=index, owner=request.user, threshold=payload.validated_data["threshold"])
    except ServiceError as exc:
        messages.error(request, str(exc))
        return redirect("search_duplicates", index_pk=index.pk)
    return redirect("index_job_detail", pk=job.pk)


@login_required
def index_job_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """A job over an index: status, phase, progress (HTMX polling while it runs) and where its result is."""
    job = get_object_or_404(IndexJob.objects.select_related("index__dataset", "index__model_version"),
                            pk=pk, owner=request.user)
    template = "search/partials/index_job_status.html" if request.headers.get("HX-Request") else "search/index_job.html"
    return render(request, template, {"job": job})


@login_required
@require_POST
def index_job_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_object_or_404(IndexJob, pk=pk, owner=request.user)
    if jobs.request_cancel(job):
        messages.success(request, "Cancel requested.")
    return redirect("index_job_detail", pk=job.pk)


@login_required
@require_POST
def duplicate_decide(request: HttpRequest, pk: int) -> HttpResponse:
    pair = get_object_or_404(DuplicatePair.objects.select_related("document_a", "document_b"), pk=pk,
                             dataset__owner=request.user)
    payload = serializers.DuplicateDecisionSerializer(data=request.POST)
    if payload.is_valid():
        duplicates.decide_duplicate(pair=pair, decision=payload.validated_data["decision"], user=request.user)
    else:
        messages.error(request, "Choose duplicate or not a duplicate.")
    if request.headers.get("HX-Request"):
        # Read again with its Jira-link mark, so the swapped row shows what the page showed.
        pair = duplicates.duplicate_pairs(dataset=pair.dataset).get(pk=pair.pk)
        return render(request, "search/partials/duplicate_row.html", {"pair": pair})
    back = request.POST.get("next", "")
    return redirect(back if back.startswith("/search/duplicates/") else reverse("search"))


@login_required
@require_POST
def index_create(request: HttpRequest) -> HttpResponse:
    dataset = get_object_or_404(Dataset, pk=request.POST.get("dataset"), owner=request.user)
    version = get_object_or_404(ModelVersion, pk=request.POST.get("model_version"), owner=request.user)
    indexing.create_index(owner=request.user, dataset=dataset, model_version=version)
    return redirect("dataset_detail", pk=dataset.pk)


# --- Serving a model version: promotion, rollback, deletion, vector export ------------


@login_required
def model_detail(request: HttpRequest, pk: int) -> HttpResponse:
    version = get_object_or_404(
        ModelVersion.objects.select_related("dataset", "source_run", "dataset_version", "created_by", "promoted_by"),
        pk=pk, owner=request.user,
    )
    context = {
        "version": version,
        "indexes": version.search_indexes.select_related("dataset"),
        "card": artifacts.read_text(version=version, name="README.md")[-20000:],
        "production": production_version(dataset=version.dataset) if version.dataset else None,
        "export_formats": serving.EXPORT_FORMATS,
    }
    return render(request, "training/model_detail.html", context)


@login_required
@require_POST
def model_promote(request: HttpRequest, pk: int) -> HttpResponse:
    version = get_object_or_404(ModelVersion, pk=pk, owner=request.user)
    try:
        version = serving.request_promotion(
            version=version, user=request.user, require_not_worse=request.POST.get("require_not_worse") == "on"
        )
    except ServiceError as exc:
        messages.error(request, str(exc))
    else:
        if version.stage == ModelVersion.Stage.PRODUCTION:
            messages.success(request, f"{version} is now in production.")
        else:
            messages.info(request, f"{version} will serve search as soon as its index is complete; "
                                   "the current production version answers until then.")
    return redirect("model_detail", pk=pk)


@login_required
@require_http_methods(["GET", "POST"])
def model_rollback(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_object_or_404(Dataset, pk=pk, owner=request.user)
    if not confirmed(request):
        current = production_version(dataset=dataset)
        return confirm_page(
            request, title=f"Roll back {dataset.name}?",
            question=f"Roll {dataset.name} back to its previous production version?",
            consequence=(f"{current} stops serving search" if current else "The current production version stops "
                         "serving search") + "; the version promoted before it serves again at once. Nothing is "
                         "deleted, and you can promote the newer version again later.",
            action=reverse("model_rollback", args=[pk]), button="Roll back",
            back=reverse("model_detail", args=[current.pk]) if current else reverse("model_list"), danger=False)
    try:
        version = serving.rollback(dataset=dataset, user=request.user)
    except ServiceError as exc:
        messages.error(request, str(exc))
        return redirect("model_list")
    messages.success(request, f"Rolled back: {version} serves {dataset.name} again.")
    return redirect("model_detail", pk=version.pk)


@login_required
@require_http_methods(["GET", "POST"])
def model_delete(request: HttpRequest, pk: int) -> HttpResponse:
    version = get_object_or_404(ModelVersion, pk=pk, owner=request.user)
    if not confirmed(request):
        return confirm_page(
            request, title=f"Delete {version}?", question=f"Delete the model version {version}?",
            consequence="Its files, its search indexes and their vectors are deleted for good. The production "
                        "version cannot be deleted; promote or roll back first.",
            action=reverse("model_delete", args=[pk]), button="Delete version",
            back=reverse("model_detail", args=[pk]))
    try:
        serving.delete_version(version=version)
    except ServiceError as exc:
        messages.error(request, str(exc))
        return redirect("model_detail", pk=pk)
    messages.success(request, f"Deleted {version}.")
    return redirect("model_list")


@login_required
def model_export(request: HttpRequest, pk: int) -> HttpResponse:
    version = get_object_or_404(ModelVersion, pk=pk, owner=request.user)
    try:
        export = serving.export_embeddings(version=version, fmt=request.GET.get("as", "jsonl"))
    except ServiceError as exc:
        messages.error(request, str(exc))
        return redirect("model_detail", pk=pk)
    return temporary_file_response(export, "application/octet-stream")


# --- Clustering ----------------------------------------------------------------------

CLUSTER_MEMBERS_PER_PAGE = 50
CLUSTER_RUNS_PER_PAGE = 25


def _clustering_runs(request: HttpRequest):
    return ClusteringRun.objects.filter(owner=request.user).select_related("dataset", "index__model_version")


@login_required
def cluster_runs(request: HttpRequest) -> HttpResponse:
    """Your clustering runs, and the form that starts one on a ready index."""
    return _render_cluster_runs(request)


def _render_cluster_runs(request: HttpRequest, errors: dict | None = None, status: int = 200) -> HttpResponse:
    indexes = _indexes(request).filter(status=SearchIndex.Status.READY)
    page = Paginator(_clustering_runs(request), CLUSTER_RUNS_PER_PAGE).get_page(request.GET.get("page"))
    context = {
        "page": page, "indexes": indexes, "errors": errors or {}, "form": request.POST if errors else {},
        "selected_index": request.GET.get("index", ""), "methods": ClusteringRun.Method.choices,
        "defaults": {"k_min": clustering_runs.DEFAULT_K_RANGE[0], "k_max": clustering_runs.DEFAULT_K_RANGE[1],
                     "sample_size": clustering_runs.DEFAULT_SAMPLE, "min_samples": clustering_runs.DEFAULT_MIN_SAMPLES,
                     "dims": clustering_runs.DEFAULT_DIMS, "seed": clustering_runs.DEFAULT_SEED},
    }
    return render(request, "search/cluster_runs.html", context, status=status)


@login_required
@require_POST
def cluster_run_start(request: HttpRequest) -> HttpResponse:
    # The form shows both methods' fields: only the chosen method's are read, and
    # blank ones mean "the default" (left out, as the API's optional fields are).
    wanted = {"index", "method", *clustering_runs.METHOD_PARAMS.get(request.POST.get("method", ""), ())}
    data = {k: v for k, v in request.POST.items() if v != "" and k in wanted}
    payload = serializers.ClusteringStartSerializer(data=data)
    if not payload.is_valid():
        return _render_cluster_runs(request, {k: str(v[0]) for k, v in payload.errors.items()}, status=400)
    index = _indexes(request).filter(pk=payload.validated_data["index"]).first()
    if index is None:
        return _render_cluster_runs(request, {"index": "No such index of yours."}, status=400)
    try:
        run = clustering_runs.start_clustering(index=index, owner=request.user, method=payload.validated_data["method"],
                                               params=payload.validated_data["params"])
    except ServiceError as exc:
        return _render_cluster_runs(request, {"index": str(exc)}, status=exc.status)
    return redirect("cluster_run", pk=run.pk)


@login_required
def cluster_run(request: HttpRequest, pk: int) -> HttpResponse:
    """A run: its status while it runs (HTMX polling), then the map, the cluster table and the actions."""
    run = get_object_or_404(_clustering_runs(request), pk=pk)
    if request.headers.get("HX-Request"):
        response = render(request, "search/partials/cluster_run_status.html", {"run": run})
        if run.is_terminal:
            response["HX-Refresh"] = "true"  # the finished page has the map and the table
        return response
    context = {"run": run, "rows": [], "jobs": run.assignment_jobs.order_by("-created_at", "-id")[:5]}
    if run.status == ClusteringRun.Status.SUCCEEDED:
        context.update(clustering_runs.cluster_table(run=run))
    return render(request, "search/cluster_run.html", context)


@login_required
def cluster_run_map(request: HttpRequest, pk: int) -> HttpResponse:
    run = get_object_or_404(ClusteringRun, pk=pk, owner=request.user, status=ClusteringRun.Status.SUCCEEDED)
    return JsonResponse(cluster_assignment.map_points(run=run))


@login_required
@require_POST
def cluster_run_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    run = get_object_or_404(ClusteringRun, pk=pk, owner=request.user)
    if jobs.request_cancel(run):
        messages.success(request, "Cancel requested.")
    return redirect("cluster_run", pk=run.pk)


@login_required
@require_POST
def cluster_run_recluster(request: HttpRequest, pk: int) -> HttpResponse:
    run = get_object_or_404(_clustering_runs(request), pk=pk)
    try:
        again = clustering_runs.recluster(run=run, owner=request.user)
    except ServiceError as exc:
        messages.error(request, str(exc))
        return redirect("cluster_run", pk=run.pk)
    return redirect("cluster_run", pk=again.pk)


@login_required
@require_POST
def cluster_run_assign(request: HttpRequest, pk: int) -> HttpResponse:
    """Queue a batch assignment: kind=new (tickets without a cluster) or kind=outliers."""
    run = get_object_or_404(_clustering_runs(request), pk=pk)
    try:
        job = cluster_assignment.start_assignment(run=run, owner=request.user, kind=request.POST.get("kind", ""))
    except ServiceError as exc:
        messages.error(request, str(exc))
        return redirect("cluster_run", pk=run.pk)
    return redirect("cluster_job", pk=job.pk)


@login_required
def cluster_run_export(request: HttpRequest, pk: int) -> HttpResponse:
    run = get_object_or_404(_clustering_runs(request), pk=pk)
    try:
        export = cluster_assignment.export_assignments(run=run, fmt=request.GET.get("as", "csv"))
    except ServiceError as exc:
        messages.error(request, str(exc))
        return redirect("cluster_run", pk=run.pk)
    return temporary_file_response(export, "application/octet-stream")


@login_required
def cluster_run_outliers(request: HttpRequest, pk: int) -> HttpResponse:
    """The run's outliers (no cluster), and the ones moved to their nearest cluster (?moved=1)."""
    run = get_object_or_404(_clustering_runs(request), pk=pk)
    moved = request.GET.get("moved") == "1"
    rows = ClusterAssignment.objects.filter(run=run).select_related("document", "cluster").order_by("document_id")
    rows = rows.filter(moved_from_noise=True) if moved else rows.filter(cluster__isnull=True)
    page = Paginator(rows, CLUSTER_MEMBERS_PER_PAGE).get_page(request.GET.get("page"))
    return render(request, "search/cluster_outliers.html", {"run": run, "page": page, "moved": moved})


@login_required
def cluster_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """One cluster: label and rename, terms, representative tickets, Jira fields, members, search within it."""
    cluster = get_object_or_404(Cluster.objects.select_related("run__dataset", "run__index__model_version",
                                                               "matched__run"), pk=pk, run__owner=request.user)
    members = (ClusterAssignment.objects.filter(cluster=cluster).select_related("document")
               .order_by(F("strength").desc(nulls_last=True), "document_id"))
    page = Paginator(members, CLUSTER_MEMBERS_PER_PAGE).get_page(request.GET.get("page"))
    representatives = Document.objects.in_bulk(cluster.representatives)
    context = {
        "cluster": cluster, "run": cluster.run, "page": page,
        "representatives": [representatives[d] for d in cluster.representatives if d in representatives],
        "fields": [(name.replace("_", " "), values) for name, values in cluster.fields.items()],
    }
    return render(request, "search/cluster.html", context)


@login_required
@require_POST
def cluster_rename(request: HttpRequest, pk: int) -> HttpResponse:
    cluster = get_object_or_404(Cluster, pk=pk, run__owner=request.user)
    payload = serializers.ClusterRenameSerializer(data=request.POST)
    if payload.is_valid():
        clustering_runs.rename_cluster(cluster=cluster, name=payload.validated_data["name"])
        messages.success(request, f"Renamed to {cluster.label}.")
    else:
        messages.error(request, "name: " + str(next(iter(payload.errors.values()))[0]))
    return redirect("cluster_detail", pk=cluster.pk)


@login_required
def cluster_job(request: HttpRequest, pk: int) -> HttpResponse:
    """A batch assignment: status, phase, progress (HTMX polling while it runs) and its result."""
    job = get_object_or_404(ClusterAssignmentJob.objects.select_related("run__dataset"), pk=pk, owner=request.user)
    template = "search/partials/cluster_job_status.html" if request.headers.get("HX-Request") else "search/cluster_job.html"
    return render(request, template, {"job": job})


@login_required
@require_POST
def cluster_job_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_object_or_404(ClusterAssignmentJob, pk=pk, owner=request.user)
    if jobs.request_cancel(job):
        messages.success(request, "Cancel requested.")
    return redirect("cluster_job", pk=job.pk)
