from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from training import datasets, services
from training.forms import RunForm, UploadForm
from training.errors import ServiceError
from training.hyperparameters import HyperparameterError
from training.models import Dataset, ModelVersion, TrainingRun


@login_required
def dataset_list(request: HttpRequest) -> HttpResponse:
    form = UploadForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        try:
            dataset = datasets.import_upload(
                owner=request.user,
                name=form.cleaned_data["name"],
                kind=form.cleaned_data["kind"],
                upload=form.cleaned_data["file"],
            )
        except ServiceError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Imported {dataset.documents.count()} documents into {dataset.name}.")
            return redirect("dataset_detail", pk=dataset.pk)
    rows = Dataset.objects.filter(owner=request.user).annotate(document_count=Count("documents"))
    status = 400 if form.errors else 200
    return render(request, "training/dataset_list.html", {"datasets": rows, "form": form}, status=status)


@login_required
def dataset_detail(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_object_or_404(
        Dataset.objects.annotate(document_count=Count("documents")), pk=pk, owner=request.user
    )
    form = RunForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            run = services.start_run(
                owner=request.user,
                dataset=dataset,
                base_model=form.cleaned_data["base_model"],
                hyperparameters=form.hyperparameters(),
            )
        except HyperparameterError as exc:
            for name, message in exc.errors.items():
                form.add_error(name if name in form.fields else None, message)
        except ServiceError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Training run #{run.pk} queued.")
            return redirect("run_detail", pk=run.pk)
    context = {
        "dataset": dataset,
        "form": form,
        "documents": dataset.documents.all()[:20],
        "runs": dataset.training_runs.all()[:20],
        "versions": dataset.model_versions.all(),
        "indexes": dataset.search_indexes.select_related("model_version"),
    }
    return render(request, "training/dataset_detail.html", context, status=400 if form.errors else 200)


@login_required
@require_POST
def dataset_delete(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_object_or_404(Dataset, pk=pk, owner=request.user)
    try:
        datasets.delete_dataset(dataset=dataset)
    except ServiceError as exc:
        messages.error(request, str(exc))
        return redirect("dataset_detail", pk=pk)
    messages.success(request, f"Deleted {dataset.name}.")
    return redirect("dataset_list")


@login_required
def run_detail(request: HttpRequest, pk: int) -> HttpResponse:
    run = get_object_or_404(TrainingRun.objects.select_related("dataset"), pk=pk, owner=request.user)
    template = "partials/run_status.html" if request.headers.get("HX-Request") else "training/run_detail.html"
    return render(request, template, {"run": run, "version": getattr(run, "model_version", None)})


@login_required
@require_POST
def run_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    run = get_object_or_404(TrainingRun, pk=pk, owner=request.user)
    services.cancel_run(run=run)
    messages.info(request, f"Cancellation of run #{run.pk} requested.")
    return redirect("run_detail", pk=pk)


@login_required
def model_list(request: HttpRequest) -> HttpResponse:
    versions = ModelVersion.objects.filter(owner=request.user).select_related("dataset", "source_run")
    return render(request, "training/model_list.html", {"versions": versions})


@login_required
@require_POST
def model_promote(request: HttpRequest, pk: int) -> HttpResponse:
    version = get_object_or_404(ModelVersion, pk=pk, owner=request.user)
    services.promote(version=version)
    messages.success(request, f"{version} is now in production; its search index is being built.")
    return redirect("model_list")
