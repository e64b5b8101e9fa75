from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from search import services
from search.models import SearchIndex
from training.models import Dataset, ModelVersion


@login_required
def search_page(request: HttpRequest) -> HttpResponse:
    indexes = SearchIndex.objects.filter(owner=request.user).select_related("dataset", "model_version")
    selected = None
    if request.GET.get("index"):
        selected = next((i for i in indexes if str(i.pk) == request.GET["index"]), None)
    if selected is None:
        production = [i for i in indexes if i.model_version.stage == ModelVersion.Stage.PRODUCTION]
        selected = (production or list(indexes) or [None])[0]
    mode = request.GET.get("mode", "hybrid")
    query = request.GET.get("q", "")
    result, error = None, ""
    if selected is not None and "q" in request.GET:
        try:
            result = services.hybrid_search(index=selected, query=query, k=10, mode=mode)
        except services.SearchError as exc:
            error = str(exc)
    context = {
        "indexes": indexes,
        "selected": selected,
        "mode": mode,
        "modes": services.MODES,
        "query": query,
        "result": result,
        "error": error,
    }
    return render(request, "search/search.html", context, status=400 if error else 200)


@login_required
@require_POST
def index_create(request: HttpRequest) -> HttpResponse:
    dataset = get_object_or_404(Dataset, pk=request.POST.get("dataset"), owner=request.user)
    version = get_object_or_404(ModelVersion, pk=request.POST.get("model_version"), owner=request.user)
    services.create_index(owner=request.user, dataset=dataset, model_version=version)
    return redirect("dataset_detail", pk=dataset.pk)
