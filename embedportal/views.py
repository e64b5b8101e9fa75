from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db.models import Count, OuterRef, Prefetch, Subquery
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from rest_framework.decorators import api_view
from rest_framework.response import Response

from embedportal.health import system_health
from embedportal.launcher import read_status, status_path
from search.models import ClusteringRun
from training.forms import UploadForm
from training.models import Dataset, ModelVersion, RetrainOccurrence, RetrainSchedule, TrainingRun
from training.retraining import next_run_at

RECENT_RUNS = 10


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    production = ModelVersion.objects.filter(stage=ModelVersion.Stage.PRODUCTION)
    # Each dataset's clusterings that finished, newest first: the card shows the first (the current one).
    clusterings = ClusteringRun.objects.filter(status=ClusteringRun.Status.SUCCEEDED).order_by("-created_at", "-id")
    datasets = (
        Dataset.objects.filter(owner=request.user)
        .annotate(document_count=Count("documents"))
        .prefetch_related(Prefetch("model_versions", queryset=production, to_attr="production_versions"),
                          Prefetch("clustering_runs", queryset=clusterings, to_attr="clusterings"))
    )
    # The launcher's process table (bin/run); absent when the product runs under another supervisor.
    processes = read_status(status_path(settings.VAR_DIR))
    return render(
        request,
        "dashboard.html",
        {"datasets": datasets, "runs": _recent_runs(request), "upload_form": UploadForm(), "processes": processes,
         "retraining": _retraining(request)},
    )


def _retraining(request: HttpRequest) -> list[dict]:
    """The daily retraining card: each retrained dataset's next scheduled retrain and last decision."""
    decided = (RetrainOccurrence.objects.filter(dataset=OuterRef("dataset"), status=RetrainOccurrence.Status.SUCCEEDED)
               .exclude(outcome=RetrainOccurrence.Outcome.BUSY).order_by("-finished_at"))
    schedules = (RetrainSchedule.objects.filter(dataset__owner=request.user).select_related("dataset")
                 .annotate(last_summary=Subquery(decided.values("summary")[:1]),
                           last_at=Subquery(decided.values("finished_at")[:1])).order_by("dataset__name"))
    return [{"schedule": schedule, "next": next_run_at(schedule)} for schedule in schedules]


@login_required
def runs_partial(request: HttpRequest) -> HttpResponse:
    return render(request, "partials/runs_table.html", {"runs": _recent_runs(request)})


@login_required
def health_partial(request: HttpRequest) -> HttpResponse:
    return render(request, "partials/health.html", {"health": system_health(request.user)})


def _recent_runs(request: HttpRequest):
    return TrainingRun.objects.filter(owner=request.user).select_related("dataset")[:RECENT_RUNS]


@login_required
def setup_check(request: HttpRequest) -> HttpResponse:
    """Every check with its detail for staff; for other users only which checks pass.

    The details name paths, package versions, the interpreter, the broker host
    and the database server: an attacker's map, of no use to a user. Answers
    at once: the device and base-model checks come from a worker
    (setup_check.page_checks), never from a model loaded in this request.
    """
    from embedportal.setup_check import Check, page_checks

    checks, worker = page_checks()
    if not request.user.is_staff:
        checks = [Check(c.name, c.ok, "" if c.ok else "ask an administrator") for c in checks]
    return render(request, "setup_check.html", {"checks": checks, "worker": worker})


@api_view(["GET"])
def api_health(request) -> Response:
    """Workers, queue lengths, broker and database reachability."""
    health = system_health(request.user)
    for job in health["running_jobs"]:
        job["last_seen"] = job["last_seen"].isoformat() if job["last_seen"] else None
    return Response(health)
