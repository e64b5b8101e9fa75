"""Search pages: search, side-by-side versions, similar tickets, evaluation, duplicate review.

Thin views: owner-scoped lookups, the API's serializers for validating
parameters (one set of rules for both), and the services do the work.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from search import serializers, services
from search.models import DuplicatePair, SearchIndex
from training.models import Dataset, Document, ModelVersion

DUPLICATES_PER_PAGE = 25


def _indexes(request: HttpRequest):
    return SearchIndex.objects.filter(owner=request.user).select_related("dataset", "model_version")


def _pick(indexes, wanted: str | None) -> SearchIndex | None:
    """The index asked for, else the production one, else the newest."""
    indexes = list(indexes)
    chosen = next((i for i in indexes if str(i.pk) == (wanted or "")), None)
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
    fallback = serializers.SearchParamsSerializer(data={"q": request.GET.get("q", "")[: services.MAX_QUERY_CHARS]})
    fallback.is_valid()
    return fallback.validated_data, errors


def _run(index: SearchIndex | None, data: dict) -> tuple[services.SearchResponse | None, str]:
    if index is None:
        return None, ""
    try:
        result = services.hybrid_search(
            index=index, query=data["q"], k=data["k"], mode=data["mode"], page=data["page"],
            filters=serializers.FiltersSerializer.to_filters(data),
            fusion=data["fusion"], alpha=data["alpha"], rrf_k=data["rrf_k"],
        )
    except services.SearchError as exc:
        return None, str(exc)
    return result, ""


def _page_links(request: HttpRequest, result: services.SearchResponse | None) -> dict[str, str]:
    links: dict[str, str] = {}
    if result is None:
        return links
    for name, page in (("previous", result.page - 1), ("next", result.page + 1)):
        if (name == "previous" and page >= 1) or (name == "next" and result.has_more):
            query = request.GET.copy()
            query["page"] = str(page)
            links[name] = f"?{query.urlencode()}"
    return links


FILTER_LABELS = {
    "issue_type": ("issue_types", "Issue type"), "priority": ("priorities", "Priority"),
    "status": ("statuses", "Status"), "resolution": ("resolutions", "Resolution"),
    "component": ("components", "Component"), "label": ("labels", "Label"), "category": ("categories", "Category"),
}


def _filter_context(index: SearchIndex | None, data: dict) -> dict:
    """The filter form: each attribute the dataset has values for, with counts and what is selected."""
    options = services.filter_options(dataset=index.dataset) if index else {}
    fields = []
    for param, (option_name, label) in FILTER_LABELS.items():
        chosen = set(data.get(param, []))
        values = options.get(option_name, [])
        if values:
            fields.append({"name": param, "label": label,
                           "options": [(value, count, value in chosen) for value, count in values]})
    active = any(data.get(p) for p in FILTER_LABELS) or data.get("created_from") or data.get("created_to")
    return {"filter_fields": fields, "filters_active": bool(active)}


@login_required
def search_page(request: HttpRequest) -> HttpResponse:
    indexes = _indexes(request)
    selected = _pick(indexes, request.GET.get("index"))
    data, errors = _params(request)
    result, error = (None, "")
    if "q" in request.GET and not errors:
        result, error = _run(selected, data)
    context = {
        "indexes": indexes,
        "selected": selected,
        "data": data,
        "errors": errors,
        "modes": services.MODES,
        "fusion_methods": services.FUSION_METHODS,
        **_filter_context(selected, data),
        "result": result,
        "error": error or "; ".join(f"{k}: {v}" for k, v in errors.items()),
        "links": _page_links(request, result),
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
        "indexes": indexes, "left": left, "right": right, "data": data, "modes": services.MODES,
        "columns": columns, "errors": errors, "overlap": overlap,
    }
    return render(request, "search/compare.html", context, status=400 if errors else 200)


@login_required
def similar_page(request: HttpRequest, index_pk: int, document_pk: int) -> HttpResponse:
    index = get_object_or_404(_indexes(request), pk=index_pk)
    document = get_object_or_404(Document, pk=document_pk, dataset_id=index.dataset_id)
    hits, error = [], ""
    try:
        hits = services.similar_documents(index=index, document=document, k=10)
    except services.SearchError as exc:
        error = str(exc)
    return render(request, "search/similar.html", {"index": index, "document": document, "hits": hits, "error": error})


@login_required
def evaluate_page(request: HttpRequest, index_pk: int) -> HttpResponse:
    """Held-out queries through keyword, vector and hybrid; runs when asked (?run=1), stores nothing."""
    indexes = _indexes(request)
    index = get_object_or_404(indexes, pk=index_pk)
    report, error = None, ""
    max_queries = request.GET.get("queries", str(services.EVALUATION_MAX_QUERIES))
    if request.GET.get("run"):
        try:
            limit = int(max_queries)
            if not 1 <= limit <= 5000:
                raise ValueError
        except ValueError:
            error = "queries: give a number of held-out queries between 1 and 5000."
        else:
            try:
                report = services.evaluate_search(index=index, max_queries=limit)
            except services.SearchError as exc:
                error = str(exc)
    rows = []
    if report and report["systems"]:
        best = {m: max(s[m] for s in report["systems"].values()) for m in report["metrics"]}
        rows = [
            {"name": name, "cells": [(m, metrics[m], metrics[m] == best[m]) for m in report["metrics"]]}
            for name, metrics in report["systems"].items()
        ]
    context = {
        "index": index, "indexes": indexes, "report": report, "rows": rows, "error": error,
        "max_queries": max_queries, "fusion": index.fusion,
        "tuning_rows": sorted(
            ((name, m.get("ndcg@10"), m.get("mrr@10"), m.get("recall@10"))
             for name, m in (index.fusion or {}).get("systems", {}).items()),
            key=lambda row: -(row[1] or 0),
        ),
    }
    return render(request, "search/evaluate.html", context, status=400 if error else 200)


@login_required
@require_POST
def tune_fusion(request: HttpRequest, index_pk: int) -> HttpResponse:
    index = get_object_or_404(_indexes(request), pk=index_pk)
    try:
        fusion = services.tune_fusion(index=index)
    except services.SearchError as exc:
        messages.error(request, str(exc))
    else:
        described = f"RRF k={fusion['rrf_k']}" if fusion["method"] == "rrf" else f"weighted, alpha={fusion['alpha']}"
        messages.success(request, f"Default fusion of this index: {described}.")
    return redirect("search_evaluate", index_pk=index.pk)


@login_required
def duplicates_page(request: HttpRequest, index_pk: int) -> HttpResponse:
    index = get_object_or_404(_indexes(request), pk=index_pk)
    decision = request.GET.get("decision", DuplicatePair.Decision.PENDING)
    if decision not in DuplicatePair.Decision.values and decision != "all":
        decision = DuplicatePair.Decision.PENDING
    pairs = services.duplicate_pairs(dataset=index.dataset, decision=None if decision == "all" else decision)
    page = Paginator(pairs, DUPLICATES_PER_PAGE).get_page(request.GET.get("page"))
    context = {
        "index": index, "page": page, "decision": decision, "decisions": DuplicatePair.Decision.choices,
        "default_threshold": index.duplicates_threshold or services.DEFAULT_DUPLICATE_THRESHOLD,
    }
    return render(request, "search/duplicates.html", context)


@login_required
@require_POST
def duplicate_scan(request: HttpRequest, index_pk: int) -> HttpResponse:
    index = get_object_or_404(_indexes(request), pk=index_pk)
    payload = serializers.DuplicateScanSerializer(data=request.POST)
    if not payload.is_valid():
        messages.error(request, "threshold: " + str(next(iter(payload.errors.values()))[0]))
    else:
        try:
            services.start_duplicate_scan(index=index, threshold=payload.validated_data["threshold"])
        except services.SearchError as exc:
            messages.error(request, str(exc))
        else:
            messages.success(request, "Duplicate scan queued; pairs appear here when it is done.")
    return redirect("search_duplicates", index_pk=index.pk)


@login_required
@require_POST
def duplicate_decide(request: HttpRequest, pk: int) -> HttpResponse:
    pair = get_object_or_404(DuplicatePair.objects.select_related("document_a", "document_b"), pk=pk,
                             dataset__owner=request.user)
    payload = serializers.DuplicateDecisionSerializer(data=request.POST)
    if payload.is_valid():
        services.decide_duplicate(pair=pair, decision=payload.validated_data["decision"], user=request.user)
    else:
        messages.error(request, "Choose duplicate or not a duplicate.")
    if request.headers.get("HX-Request"):
        return render(request, "search/partials/duplicate_row.html", {"pair": pair})
    back = request.POST.get("next", "")
    return redirect(back if back.startswith("/search/duplicates/") else reverse("search"))


@login_required
@require_POST
def index_create(request: HttpRequest) -> HttpResponse:
    dataset = get_object_or_404(Dataset, pk=request.POST.get("dataset"), owner=request.user)
    version = get_object_or_404(ModelVersion, pk=request.POST.get("model_version"), owner=request.user)
    services.create_index(owner=request.user, dataset=dataset, model_version=version)
    return redirect("dataset_detail", pk=dataset.pk)
