import json
from pathlib import Path

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Count
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_http_methods, require_POST

from embedportal.confirmation import confirm_page, confirmed
from training import comparison, datasets, evaluation, forms, import_jobs, pairs, registry, retraining, runs
from training.connectors import jira
from training.downloads import csv_attachment, temporary_file_response
from training.errors import ServiceError
from training.forms import (
    JiraBaseUrlForm,
    JiraConnectionForm,
    JiraDatasetForm,
    PairsForm,
    RetrainScheduleForm,
    RunForm,
    UploadForm,
    VersionUploadForm,
)
from training.hyperparameters import HyperparameterError
from training.models import (
    Dataset,
    DatasetVersion,
    ImportJob,
    JiraConnection,
    ModelVersion,
    RetrainOccurrence,
    TrainingRun,
    WebhookDelivery,
)


@csrf_exempt  # the upload size limit must be in place before the CSRF check reads the body;
@login_required  # _dataset_list checks CSRF right after (Django's documented pattern)
def dataset_list(request: HttpRequest) -> HttpResponse:
    """List datasets; POST uploads a new one, or with action=preview only reads and validates it."""
    limiter = forms.limit_upload_size(request) if request.method == "POST" else None
    return _dataset_list(request, limiter)


@csrf_protect
def _dataset_list(request: HttpRequest, limiter) -> HttpResponse:
    if request.method == "POST" and request.POST.get("action") == "import_staged":
        return _import_staged(request)
    if request.method == "POST" and request.POST.get("action") == "remap_staged":
        return _remap_staged(request)
    form = UploadForm(request.POST or None, request.FILES or None)
    preview = None
    if limiter is not None and limiter.exceeded:
        form.add_error("file", limiter.message)
    elif request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        options = {"name": data["name"], "kind": data["kind"], "strict": data["strict"], "mapping": form.mapping(),
                   "language": data.get("language") or "english",
                   "repeated_questions": data.get("repeated_questions") or "keep"}
        try:
            if request.POST.get("action") == "preview":
                # Kept on disk (a staged import), so "Import" after the preview needs no second upload;
                # kept too when the file needs a column mapping, which is chosen on this page next.
                job, preview = import_jobs.stage_and_preview(owner=request.user, upload=data["file"], **options)
                preview["staged"] = job
            elif import_jobs.wants_background(data["file"]):
                return _follow_job(request, import_jobs.submit(owner=request.user, upload=data["file"], **options))
            else:
                dataset = datasets.import_upload(owner=request.user, upload=data["file"], **options)
        except ServiceError as exc:
            form.add_error(None, _readable(exc))
        else:
            if preview is None:
                report = dataset.import_report
                messages.success(
                    request,
                    f"Imported {report['rows_accepted']} of {report['rows_read']} rows into {dataset.name} "
                    f"({report['rows_rejected']} rejected).",
                )
                return redirect("dataset_detail", pk=dataset.pk)
    return _render_list(request, form, preview, status=400 if form.errors else 200)


def _render_list(request: HttpRequest, form: UploadForm, preview: dict | None, *, status: int) -> HttpResponse:
    """The datasets page: datasets, recent background imports, the upload form and a preview, if any."""
    rows = Dataset.objects.filter(owner=request.user).annotate(document_count=Count("documents"))
    jobs = ImportJob.objects.filter(owner=request.user).exclude(status=ImportJob.Status.STAGED)[:10]
    _mapping_choices(preview)
    context = {"datasets": rows, "form": form, "preview": preview, "import_jobs": jobs}
    return render(request, "training/dataset_list.html", context, status=status)


def _follow_job(request: HttpRequest, job: ImportJob) -> HttpResponse:
    messages.info(request, f"{job.filename} is being imported in the background; this page follows it.")
    return redirect("import_detail", pk=job.pk)


def _mapping_choices(preview: dict) -> None:
    """Role -> column selects for a kept file that needs a mapping, preselected with the guess or last choice."""
    if not (preview and preview.get("needs_mapping") and preview.get("staged")):
        return
    mapping = preview.get("mapping") or {}
    roles = [(name[4:], field.label) for name, field in forms.MappingFields.base_fields.items()
             if name != "map_attributes"]
    preview["role_choices"] = [{"role": role, "label": label, "selected": mapping.get(role) or ""}
                               for role, label in roles]
    chosen = mapping.get("attributes") or []
    preview["attribute_choices"] = [{"column": c, "checked": c in chosen} for c in preview.get("columns") or []]


def _remap_staged(request: HttpRequest) -> HttpResponse:
    """Preview a kept file again with the column mapping chosen from its own columns (no second upload)."""
    job = get_object_or_404(ImportJob, pk=request.POST.get("staged") or 0, owner=request.user,
                            status=ImportJob.Status.STAGED)
    data = request.POST.copy()
    data.setlist("map_attributes", [", ".join(request.POST.getlist("map_attributes"))])
    chosen = forms.MappingFields(data)
    chosen.is_valid()  # every field is optional text
    mapping = chosen.mapping()
    kind = request.POST.get("kind", "")
    job.kind = kind if kind in Dataset.Kind.values else ""
    job.mapping = mapping
    job.save(update_fields=["kind", "mapping"])
    path = import_jobs.staged_file(job)
    try:
        preview = datasets.preview_file(path=path, filename=job.filename, kind=job.kind, mapping=mapping,
                                        repeated_questions=job.repeated_questions)
    except ServiceError as exc:  # e.g. the mapping makes no usable row: show the columns again with the reason
        preview = datasets.preview_file(path=path, filename=job.filename, kind=job.kind, mapping=None,
                                        repeated_questions=job.repeated_questions)
        preview.update(needs_mapping=True, error=str(exc), mapping=mapping or preview.get("mapping") or {})
        preview.setdefault("columns", [])
    preview["staged"] = job
    form = UploadForm(initial={"name": job.name, "kind": job.kind, "language": job.language, "strict": job.strict,
                               "repeated_questions": job.repeated_questions or "keep"})
    return _render_list(request, form, preview, status=400 if preview["needs_mapping"] else 200)


def _import_staged(request: HttpRequest) -> HttpResponse:
    """Import the file kept by a preview: now when small, by a background job when big."""
    job = get_object_or_404(ImportJob, pk=request.POST.get("staged") or 0, owner=request.user,
                            status=ImportJob.Status.STAGED)
    try:
        job = import_jobs.start(job=job, name=request.POST.get("name") or "")
    except ServiceError as exc:
        messages.error(request, f"{_readable(exc)} The previewed file is still kept: preview it again or upload it "
                                "anew.")
        return redirect("dataset_list")
    if job.status == ImportJob.Status.SUCCEEDED:
        report = job.version.report if job.version else {}
        messages.success(request, f"Imported {report.get('rows_accepted')} of {report.get('rows_read')} rows into "
                                  f"{job.dataset.name} ({report.get('rows_rejected')} rejected).")
        return redirect("dataset_detail", pk=job.dataset_id)
    if job.status == ImportJob.Status.FAILED:
        messages.error(request, _readable(ServiceError(job.error)))  # without the API's "field:" prefix
        return redirect("dataset_list")
    return _follow_job(request, job)


@login_required
def dataset_detail(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_object_or_404(
        Dataset.objects.annotate(document_count=Count("documents")), pk=pk, owner=request.user
    )
    form = RunForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            run = runs.start_run(
                owner=request.user,
                dataset=dataset,
                base_model=form.cleaned_data["base_model"],
                hyperparameters=form.hyperparameters(),
            )
        except HyperparameterError as exc:
            for name, message in exc.errors.items():
                form.add_error(name if name in form.fields else None, message)
        except ServiceError as exc:
            form.add_error(None, _readable(exc))
        else:
            messages.success(request, f"Training run #{run.pk} queued.")
            return redirect("run_detail", pk=run.pk)
    return render(request, "training/dataset_detail.html", _detail_context(dataset, form=form),
                  status=400 if form.errors else 200)


def _detail_context(dataset: Dataset, **extra) -> dict:
    jira_base = datasets.jira_base_url(dataset)
    return {
        "dataset": dataset,
        "jira_base": jira_base,
        "jira_from_connection": bool(jira_base) and jira_base != dataset.jira_base_url.rstrip("/"),
        "jira_form": extra.pop("jira_form", None) or JiraBaseUrlForm(initial={"jira_base_url": dataset.jira_base_url}),
        "documents": dataset.documents.all()[:20],
        "runs": dataset.training_runs.all()[:20],
        "versions": dataset.versions.defer("rejected_rows")[:20],
        "model_versions": dataset.model_versions.all(),
        "indexes": dataset.search_indexes.select_related("model_version"),
        "upload_form": extra.pop("upload_form", None) or VersionUploadForm(initial=_mapping_initial(dataset)),
        "form": extra.pop("form", None) or RunForm(),
        **extra,
    }


def _mapping_initial(dataset: Dataset) -> dict:
    mapping = dataset.column_mapping or {}
    initial = {f"map_{role}": column for role, column in mapping.items() if role != "attributes"}
    initial["repeated_questions"] = dataset.repeated_questions or "keep"
    if mapping.get("attributes"):
        initial["map_attributes"] = ", ".join(mapping["attributes"])
    return initial


@csrf_exempt  # as dataset_list: size limit first, then the CSRF check
@login_required
@require_POST
def dataset_upload(request: HttpRequest, pk: int) -> HttpResponse:
    """A newer export (upserted by key, a new version) or a duplicate links file into this dataset."""
    limiter = forms.limit_upload_size(request)
    return _dataset_upload(request, pk, limiter)


@csrf_protect
def _dataset_upload(request: HttpRequest, pk: int, limiter) -> HttpResponse:
    dataset = get_object_or_404(
        Dataset.objects.annotate(document_count=Count("documents")), pk=pk, owner=request.user
    )
    upload_form = VersionUploadForm(request.POST, request.FILES)
    if limiter is not None and limiter.exceeded:
        upload_form.add_error("file", limiter.message)
    elif upload_form.is_valid():
        upload = upload_form.cleaned_data["file"]
        if import_jobs.wants_background(upload):
            return _follow_job(request, import_jobs.submit(
                owner=request.user, upload=upload, dataset=dataset, strict=upload_form.cleaned_data["strict"],
                mapping=upload_form.mapping(), repeated_questions=upload_form.cleaned_data["repeated_questions"]))
        try:
            with datasets.upload_on_disk(upload) as path:
                version = datasets.add_version(dataset=dataset, path=path, filename=upload.name,
                                               strict=upload_form.cleaned_data["strict"],
                                               mapping=upload_form.mapping(),
                                               repeated_questions=upload_form.cleaned_data["repeated_questions"])
        except ServiceError as exc:
            upload_form.add_error(None, _readable(exc))
        else:
            messages.success(
                request,
                f"Version {version.number}: {version.added} added, {version.changed} changed, "
                f"{version.unchanged} unchanged, {version.report.get('rows_rejected', 0)} rejected.",
            )
            return redirect("dataset_detail", pk=pk)
    return render(request, "training/dataset_detail.html", _detail_context(dataset, upload_form=upload_form),
                  status=400)


@login_required
def import_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """A background import: phase, rows read, heartbeat, outcome; polls itself while it runs."""
    job = get_object_or_404(ImportJob.objects.select_related("dataset", "version"), pk=pk, owner=request.user)
    template = "partials/import_status.html" if request.headers.get("HX-Request") else "training/import_detail.html"
    return render(request, template, {"job": job})


@login_required
def dataset_report_csv(request: HttpRequest, pk: int, number: int) -> StreamingHttpResponse:
    """Every rejected row of one version, as a CSV download (formula prefixes neutralised)."""
    version = get_object_or_404(DatasetVersion, dataset__pk=pk, dataset__owner=request.user, number=number)
    return csv_attachment(datasets.report_csv(version=version), f"dataset-{pk}-v{number}-rejected.csv")


@login_required
def dataset_pairs(request: HttpRequest, pk: int) -> HttpResponse:
    """Counts and a sample of the training examples of a strategy (GET form)."""
    dataset = get_object_or_404(Dataset, pk=pk, owner=request.user)
    form = PairsForm(request.GET or PairsForm.DEFAULTS)
    result = None
    if form.is_valid():
        try:
            result = pairs.preview_pairs(dataset=dataset, **form.options())
        except ValueError as exc:
            form.add_error(None, _readable(exc))
    return render(request, "training/dataset_pairs.html", {"dataset": dataset, "form": form, "result": result},
                  status=400 if form.errors else 200)


@login_required
@require_POST
def dataset_jira_url(request: HttpRequest, pk: int) -> HttpResponse:
    """Set the dataset's Jira address by hand (ticket keys then link to Jira); a 400 naming the field if invalid."""
    dataset = get_object_or_404(
        Dataset.objects.annotate(document_count=Count("documents")), pk=pk, owner=request.user
    )
    form = JiraBaseUrlForm(request.POST)
    if form.is_valid():
        try:
            datasets.set_jira_base_url(dataset=dataset, url=form.cleaned_data["jira_base_url"])
        except ServiceError as exc:
            form.add_error("jira_base_url", _readable(exc))
        else:
            messages.success(request, f"Jira address of {dataset.name}: {dataset.jira_base_url or 'removed'}.")
            return redirect("dataset_detail", pk=pk)
    return render(request, "training/dataset_detail.html", _detail_context(dataset, jira_form=form), status=400)


@login_required
@require_http_methods(["GET", "POST"])
def dataset_delete(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_object_or_404(Dataset, pk=pk, owner=request.user)
    if not confirmed(request):
        return confirm_page(
            request, title=f"Delete {dataset.name}?", question=f"Delete the dataset {dataset.name}?",
            consequence="Its documents, versions, training runs, model versions, search indexes and duplicate "
                        "reviews are deleted for good, with their files. This cannot be undone.",
            action=reverse("dataset_delete", args=[pk]), button="Delete dataset",
            back=reverse("dataset_detail", args=[pk]))
    datasets.delete_dataset(dataset=dataset)
    messages.success(request, f"Deleted {dataset.name}.")
    return redirect("dataset_list")


METRIC_NAMES = ("ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10", "map@100")
SYSTEM_LABELS = {
    "keyword": "keyword (BM25 over the full-text index, summary weighted)",
    "base": "base model",
    "fine_tuned": "fine-tuned model",
    "hybrid_base": "plain hybrid (RRF k=60) with base model",
    "hybrid_fine_tuned": "plain hybrid (RRF k=60) with fine-tuned model",
    "served": "served: fine-tuned model with its index's tuned fusion (what similar tickets show)",
}
DRILLDOWN_ROWS = 30
# The run page's log box shows the last lines (a long run logs thousands; the page stays small).
LOG_LINES = 500


@login_required
def run_detail(request: HttpRequest, pk: int) -> HttpResponse:
    run = get_object_or_404(TrainingRun.objects.select_related("dataset"), pk=pk, owner=request.user)
    progress_data = {
        "loss": run.metrics.get("loss_history", []),
        "validation": run.metrics.get("validation_history", []),
    }
    context = {
        "run": run,
        "version": getattr(run, "model_version", None),
        "progress_data": progress_data,
    }
    if request.headers.get("HX-Request"):
        return render(request, "partials/run_status.html", context)
    systems = (run.evaluation or {}).get("systems", {})
    per_query = (run.evaluation or {}).get("per_query", [])
    context.update(
        metric_names=METRIC_NAMES,
        evaluation_rows=[
            (SYSTEM_LABELS.get(name, name), [values.get(m) for m in METRIC_NAMES]) for name, values in systems.items()
        ],
        drilldown=evaluation.labelled_drilldown(run.dataset, per_query[:DRILLDOWN_ROWS]),
        improved=sum(1 for row in per_query if row["delta"] > 0),
        worsened=sum(1 for row in per_query if row["delta"] < 0),
        unchanged=sum(1 for row in per_query if row["delta"] == 0),
    )
    context.update(_log_context(run))
    return render(request, "training/run_detail.html", context)


def _log_context(run: TrainingRun) -> dict:
    lines = run.log.splitlines()
    return {"run": run, "log": "\n".join(lines[-LOG_LINES:]), "log_lines": len(lines), "log_shown": LOG_LINES}


@login_required
def run_log(request: HttpRequest, pk: int) -> HttpResponse:
    """The run page's log box (HTMX polls it while the run is not finished; the finished box polls no more)."""
    run = get_object_or_404(TrainingRun.objects.only("pk", "status", "log", "owner_id"), pk=pk, owner=request.user)
    return render(request, "partials/run_log.html", _log_context(run))


# Runs listed on the Runs page (newest first), each with a checkbox to compare.
RUNS_LISTED = 100
# Runs compared at once: columns side by side still fit a screen.
MAX_COMPARED = 8


@login_required
def run_compare(request: HttpRequest) -> HttpResponse:
    """The runs list with checkboxes; the checked runs side by side (comparison.compare_runs)."""
    # Only plain ASCII digits ("²" is a digit to isdigit() and a ValueError to int()).
    ids = list(dict.fromkeys(int(i) for i in request.GET.getlist("ids") if i.isascii() and i.isdigit() and len(i) < 12))
    owned = TrainingRun.objects.filter(owner=request.user).select_related("dataset").defer("log")
    chosen = list(owned.filter(pk__in=ids[:MAX_COMPARED])) if ids else []
    chosen.sort(key=lambda run: ids.index(run.pk))
    context = {
        "choices": [(run, comparison.held_out_ndcg(run)) for run in owned[:RUNS_LISTED]],
        "selected_ids": ids, "runs": chosen, "max_compared": MAX_COMPARED, "too_many": len(ids) > MAX_COMPARED,
        "comparison": comparison.compare_runs(runs=chosen) if chosen else None,
    }
    return render(request, "training/run_compare.html", context)


@login_required
@require_http_methods(["GET", "POST"])
def run_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    run = get_object_or_404(TrainingRun.objects.select_related("dataset"), pk=pk, owner=request.user)
    if not confirmed(request):
        return confirm_page(
            request, title=f"Cancel run #{run.pk}?", question=f"Cancel training run #{run.pk} on {run.dataset.name}?",
            consequence="The run stops at its next step and registers no model; its log and metrics so far are "
                        "kept. Training again starts from the beginning.",
            action=reverse("run_cancel", args=[pk]), button="Cancel run", back=reverse("run_detail", args=[pk]))
    runs.cancel_run(run=run)
    messages.info(request, f"Cancellation of run #{run.pk} requested.")
    return redirect("run_detail", pk=pk)


@login_required
def model_list(request: HttpRequest) -> HttpResponse:
    versions = ModelVersion.objects.filter(owner=request.user).select_related("dataset", "source_run")
    return render(request, "training/model_list.html", {"versions": versions})


@login_required
def model_download(request: HttpRequest, pk: int) -> HttpResponse:
    version = get_object_or_404(ModelVersion, pk=pk, owner=request.user)
    try:
        export = registry.export_zip(version=version)
    except ServiceError as exc:
        messages.error(request, str(exc))
        return redirect("model_detail", pk=pk)
    return temporary_file_response(export, "application/zip")




# --- Jira link and daily retraining (training/retraining.py) ----------------------------------------

HISTORY_ROWS = 60


@login_required
def retraining_page(request: HttpRequest, pk: int) -> HttpResponse:
    """The dataset's Jira link, retrain schedule and guard, "run now", and the history with its chart.

    The history part polls itself (HTMX) while a retrain is queued or running.
    """
    dataset = get_object_or_404(Dataset, pk=pk, owner=request.user)
    context = _retraining_context(dataset)
    if request.headers.get("HX-Request"):
        return render(request, "training/retrain_history.html", context)
    return render(request, "training/retrain.html", context)


def _retraining_context(dataset: Dataset, *, jira_form: JiraConnectionForm | None = None,
                        schedule_form: RetrainScheduleForm | None = None) -> dict:
    connection = JiraConnection.objects.filter(dataset=dataset).first()
    schedule = retraining.schedule_of(dataset)
    occurrences = list(
        dataset.retrain_occurrences.select_related("champion", "challenger").prefetch_related("deliveries")[:HISTORY_ROWS]
    )
    chart = [{"label": timezone.localtime(o.finished_at).strftime("%m-%d %H:%M"), "ndcg": o.production_ndcg,
              "outcome": o.outcome}
             for o in reversed(occurrences) if o.production_ndcg is not None and o.finished_at is not None]
    if jira_form is None:
        jira_form = JiraConnectionForm(initial={
            "base_url": connection.base_url, "flavor": connection.flavor, "jql": connection.jql,
            "email": connection.email} if connection else {"flavor": JiraConnection.Flavor.CLOUD})
    if schedule_form is None:
        schedule_form = RetrainScheduleForm(initial={
            # An unsaved schedule shows the default: daily at 02:00 in the server's zone, on.
            "enabled": schedule.enabled or schedule.pk is None, "hour": schedule.hour, "minute": schedule.minute,
            "day_of_week": schedule.day_of_week, "time_zone": schedule.time_zone, "start_from": schedule.start_from,
            "base_model": schedule.base_model, "margin": schedule.margin, "tolerance": schedule.tolerance,
            "hyperparameters": json.dumps(schedule.hyperparameters) if schedule.hyperparameters else "",
        })
    return {
        "dataset": dataset,
        "connection": connection,
        "schedule": schedule,
        "schedule_text": retraining.describe_schedule(schedule),
        "next_run": retraining.next_run_at(schedule) if schedule.pk else None,
        "occurrences": occurrences,
        "active": any(not o.is_terminal for o in occurrences),
        "undelivered": [d for o in occurrences for d in o.deliveries.all() if d.status == WebhookDelivery.Status.FAILED],
        "chart": chart,
        "jira_form": jira_form,
        "schedule_form": schedule_form,
    }


def _readable(exc: ServiceError) -> str:
    """The message for a page: without the API's "field:" prefix ("mapping: no row ..." -> "No row ...").

    The API keeps the prefix (it fills `fields` from it); a page shows the sentence above its form.
    """
    reasons = [reason for reason in exc.by_field().values() if reason]
    if len(reasons) == 1:
        return reasons[0][0].upper() + reasons[0][1:]
    return str(exc)


def _field_error(form, exc: ServiceError) -> None:
    """A ServiceError about fields of the form under those fields, anything else above the form."""
    mine = {field: reason for field, reason in exc.by_field().items() if field in form.fields}
    for field, reason in mine.items():
        form.add_error(field, reason)
    if not mine:
        form.add_error(None, _readable(exc))


@login_required
def retraining_new(request: HttpRequest) -> HttpResponse:
    """A new tickets dataset straight from Jira: created empty and linked; its retraining page fills it."""
    form = JiraDatasetForm(request.POST or None, initial={"flavor": JiraConnection.Flavor.CLOUD})
    if request.method == "POST" and form.is_valid():
        try:
            dataset = jira.create_linked_dataset(owner=request.user, **form.cleaned_data)
        except ServiceError as exc:
            _field_error(form, exc)
        else:
            messages.success(request, f"Created {dataset.name}, linked to {form.cleaned_data['base_url']}. Test the "
                                      "connection, set the schedule, and press Run now for the first sync and model.")
            return redirect("dataset_retraining", pk=dataset.pk)
    return render(request, "training/retrain_new.html", {"form": form}, status=400 if form.errors else 200)


@login_required
@require_POST
def retraining_jira(request: HttpRequest, pk: int) -> HttpResponse:
    """Link the dataset to Jira, change the link, or unlink it (action=unlink)."""
    dataset = get_object_or_404(Dataset, pk=pk, owner=request.user)
    if request.POST.get("action") == "unlink":
        try:
            jira.delete_connection(dataset=dataset)
        except ServiceError as exc:
            messages.error(request, str(exc))
        else:
            messages.success(request, f"{dataset.name} is no longer linked to Jira; its token was deleted.")
        return redirect("dataset_retraining", pk=pk)
    form = JiraConnectionForm(request.POST)
    if form.is_valid():
        try:
            connection = jira.save_connection(dataset=dataset, **form.cleaned_data)
        except ServiceError as exc:
            _field_error(form, exc)
        else:
            messages.success(request, f"Linked to {connection.base_url} ({connection.jql}). Test the connection next.")
            return redirect("dataset_retraining", pk=pk)
    return render(request, "training/retrain.html", _retraining_context(dataset, jira_form=form), status=400)


@login_required
@require_POST
def retraining_jira_test(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_object_or_404(Dataset, pk=pk, owner=request.user)
    connection = JiraConnection.objects.filter(dataset=dataset).first()
    if connection is None:
        messages.error(request, "Link the dataset to Jira first.")
        return redirect("dataset_retraining", pk=pk)
    try:
        result = jira.test_connection(connection=connection)
    except ServiceError as exc:
        result = {"ok": False, "error": str(exc)}
    if result["ok"]:
        messages.success(request, result["message"])
    else:
        messages.error(request, result["error"])
    return redirect("dataset_retraining", pk=pk)


@login_required
@require_POST
def retraining_schedule(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_object_or_404(Dataset, pk=pk, owner=request.user)
    form = RetrainScheduleForm(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        try:
            schedule = retraining.save_schedule(
                dataset=dataset, owner=request.user, enabled=data["enabled"], minute=data["minute"],
                hour=data["hour"], day_of_week=data["day_of_week"], time_zone=data["time_zone"],
                start_from=data["start_from"], base_model=data["base_model"], hyperparameters=data["hyperparameters"],
                margin=data["margin"], tolerance=data["tolerance"], webhook_url=form.webhook(),
            )
        except ServiceError as exc:
            _field_error(form, exc)
        else:
            following = retraining.next_run_at(schedule)
            messages.success(request, f"Retraining {retraining.describe_schedule(schedule)}"
                             + (f"; next at {timezone.localtime(following):%Y-%m-%d %H:%M %Z}." if following
                                else " is off."))
            return redirect("dataset_retraining", pk=pk)
    return render(request, "training/retrain.html", _retraining_context(dataset, schedule_form=form), status=400)


@login_required
@require_POST
def retraining_run(request: HttpRequest, pk: int) -> HttpResponse:
    """"Run now": a retrain outside the schedule."""
    dataset = get_object_or_404(Dataset, pk=pk, owner=request.user)
    try:
        occurrence = retraining.run_now(dataset=dataset, owner=request.user)
    except ServiceError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Retrain #{occurrence.pk} queued; this page follows it.")
    return redirect("dataset_retraining", pk=pk)


@login_required
@require_POST
def retraining_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    occurrence = get_object_or_404(RetrainOccurrence, pk=pk, owner=request.user)
    retraining.cancel_occurrence(occurrence=occurrence)
    messages.info(request, f"Cancellation of retrain #{occurrence.pk} requested.")
    return redirect("dataset_retraining", pk=occurrence.dataset_id)
