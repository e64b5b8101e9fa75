from axes.helpers import get_lockout_message
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView
from rest_framework import status
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.routers import DefaultRouter
from rest_framework.throttling import ScopedRateThrottle

from embedportal import views
from search import api as search_api
from search import views as search_views
from training import api as training_api
from training import views as training_views



class ObtainTokenView(ObtainAuthToken):
    """`POST /api/auth/token/`: DRF's token view, throttled, with django-axes' lockout as a JSON 429.

    axes sees these logins (DRF passes the request to authenticate()), but it
    flags the lockout on DRF's Request, which its middleware never sees, and
    authenticate() turns the refusal into "wrong credentials": say 429 here.
    """

    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "auth-token"

    def post(self, request, *args, **kwargs):
        try:
            return super().post(request, *args, **kwargs)
        except ValidationError:
            if getattr(request, "axes_locked_out", False):
                return Response({"error": str(get_lockout_message())}, status=status.HTTP_429_TOO_MANY_REQUESTS)
            raise


router = DefaultRouter()
router.register("datasets", training_api.DatasetViewSet, basename="api-dataset")
router.register("imports", training_api.ImportJobViewSet, basename="api-import")
router.register("runs", training_api.TrainingRunViewSet, basename="api-run")
router.register("models", search_api.ModelVersionViewSet, basename="api-model")
router.register("indexes", search_api.SearchIndexViewSet, basename="api-index")
router.register("duplicates", search_api.DuplicatePairViewSet, basename="api-duplicate")
router.register("index-jobs", search_api.IndexJobViewSet, basename="api-index-job")
router.register("jira-syncs", training_api.JiraSyncViewSet, basename="api-jira-sync")
router.register("retrains", training_api.RetrainOccurrenceViewSet, basename="api-retrain")
router.register("clusterings", search_api.ClusteringRunViewSet, basename="api-clustering")
router.register("clusters", search_api.ClusterViewSet, basename="api-cluster")
router.register("cluster-jobs", search_api.ClusterAssignmentJobViewSet, basename="api-cluster-job")

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("partials/runs", views.runs_partial, name="runs_partial"),
    path("partials/health", views.health_partial, name="health_partial"),
    path("setup/", views.setup_check, name="setup_check"),
    # Browsers ask for /favicon.ico on pages without a <link rel=icon> (JSON, downloads): no 404 in the log.
    path("favicon.ico", RedirectView.as_view(url=static("favicon.svg"), permanent=True)),
    path("datasets/", training_views.dataset_list, name="dataset_list"),
    path("datasets/<int:pk>/", training_views.dataset_detail, name="dataset_detail"),
    path("datasets/<int:pk>/delete", training_views.dataset_delete, name="dataset_delete"),
    path("datasets/<int:pk>/jira-url", training_views.dataset_jira_url, name="dataset_jira_url"),
    path("datasets/<int:pk>/upload", training_views.dataset_upload, name="dataset_upload"),
    path("datasets/<int:pk>/versions/<int:number>/rejected.csv", training_views.dataset_report_csv, name="dataset_report_csv"),
    path("datasets/<int:pk>/pairs", training_views.dataset_pairs, name="dataset_pairs"),
    path("datasets/from-jira/", training_views.retraining_new, name="dataset_from_jira"),
    path("datasets/<int:pk>/retraining/", training_views.retraining_page, name="dataset_retraining"),
    path("datasets/<int:pk>/retraining/jira", training_views.retraining_jira, name="dataset_retraining_jira"),
    path("datasets/<int:pk>/retraining/jira/test", training_views.retraining_jira_test, name="dataset_retraining_jira_test"),
    path("datasets/<int:pk>/retraining/schedule", training_views.retraining_schedule, name="dataset_retraining_schedule"),
    path("datasets/<int:pk>/retraining/run", training_views.retraining_run, name="dataset_retraining_run"),
    path("retrains/<int:pk>/cancel", training_views.retraining_cancel, name="retrain_cancel"),
    path("imports/<int:pk>/", training_views.import_detail, name="import_detail"),
    path("runs/compare/", training_views.run_compare, name="run_compare"),
    path("runs/<int:pk>/", training_views.run_detail, name="run_detail"),
    path("runs/<int:pk>/cancel", training_views.run_cancel, name="run_cancel"),
    path("runs/<int:pk>/log", training_views.run_log, name="run_log"),
    path("models/", training_views.model_list, name="model_list"),
    path("models/<int:pk>/", search_views.model_detail, name="model_detail"),
    path("models/<int:pk>/promote", search_views.model_promote, name="model_promote"),
    path("models/<int:pk>/delete", search_views.model_delete, name="model_delete"),
    path("models/<int:pk>/download", training_views.model_download, name="model_download"),
    path("models/<int:pk>/export", search_views.model_export, name="model_export"),
    path("datasets/<int:pk>/rollback", search_views.model_rollback, name="model_rollback"),
    path("search/", search_views.search_page, name="search"),
    path("indexes/create", search_views.index_create, name="index_create"),
    path("search/compare", search_views.compare_page, name="search_compare"),
    path("search/similar/<int:index_pk>/<int:document_pk>", search_views.similar_page, name="search_similar"),
    path("search/evaluate/<int:index_pk>", search_views.evaluate_page, name="search_evaluate"),
    path("search/evaluate/<int:index_pk>/run", search_views.evaluate_start, name="search_evaluate_start"),
    path("search/tune/<int:index_pk>", search_views.tune_fusion, name="search_tune"),
    path("search/jobs/<int:pk>/", search_views.index_job_detail, name="index_job_detail"),
    path("search/jobs/<int:pk>/cancel", search_views.index_job_cancel, name="index_job_cancel"),
    path("search/duplicates/<int:index_pk>", search_views.duplicates_page, name="search_duplicates"),
    path("search/duplicates/<int:index_pk>/scan", search_views.duplicate_scan, name="search_duplicate_scan"),
    path("search/duplicates/<int:index_pk>/export.csv", search_views.duplicates_export, name="search_duplicates_export"),
    path("search/duplicates/<int:index_pk>/group", search_views.duplicate_group_decide, name="search_duplicate_group"),
    path("search/duplicates/pair/<int:pk>/decide", search_views.duplicate_decide, name="search_duplicate_decide"),
    path("search/clusters/", search_views.cluster_runs, name="cluster_runs"),
    path("search/clusters/start", search_views.cluster_run_start, name="cluster_run_start"),
    path("search/clusters/runs/<int:pk>/", search_views.cluster_run, name="cluster_run"),
    path("search/clusters/runs/<int:pk>/map.json", search_views.cluster_run_map, name="cluster_run_map"),
    path("search/clusters/runs/<int:pk>/cancel", search_views.cluster_run_cancel, name="cluster_run_cancel"),
    path("search/clusters/runs/<int:pk>/recluster", search_views.cluster_run_recluster, name="cluster_run_recluster"),
    path("search/clusters/runs/<int:pk>/assign", search_views.cluster_run_assign, name="cluster_run_assign"),
    path("search/clusters/runs/<int:pk>/export", search_views.cluster_run_export, name="cluster_run_export"),
    path("search/clusters/runs/<int:pk>/outliers", search_views.cluster_run_outliers, name="cluster_run_outliers"),
    path("search/clusters/<int:pk>/", search_views.cluster_detail, name="cluster_detail"),
    path("search/clusters/<int:pk>/rename", search_views.cluster_rename, name="cluster_rename"),
    path("search/clusters/jobs/<int:pk>/", search_views.cluster_job, name="cluster_job"),
    path("search/clusters/jobs/<int:pk>/cancel", search_views.cluster_job_cancel, name="cluster_job_cancel"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/datasets/from-jira/", training_api.JiraDatasetCreateView.as_view(), name="api_dataset_from_jira"),
    path("api/datasets/<int:pk>/jira/", training_api.DatasetJiraView.as_view(), name="api_dataset_jira"),
    path("api/datasets/<int:pk>/jira/test/", training_api.DatasetJiraTestView.as_view(), name="api_dataset_jira_test"),
    path("api/datasets/<int:pk>/jira/sync/", training_api.DatasetJiraSyncView.as_view(), name="api_dataset_jira_sync"),
    path("api/datasets/<int:pk>/search/", search_api.DatasetSearchView.as_view(), name="api_dataset_search"),
    path("api/datasets/<int:pk>/documents/<str:key>/", search_api.DatasetDocumentView.as_view(),
         name="api_dataset_document"),
    path("api/datasets/<int:pk>/retraining/", training_api.DatasetRetrainingView.as_view(), name="api_dataset_retraining"),
    path("api/datasets/<int:pk>/retraining/run/", training_api.DatasetRetrainNowView.as_view(),
         name="api_dataset_retrain_now"),
    path("api/", include(router.urls)),
    path("api/health/", views.api_health, name="api_health"),
    path("api/embed", search_api.embed, name="api_embed"),
    path("api/similarity", search_api.similarity, name="api_similarity"),
    path("api/auth/token/", ObtainTokenView.as_view(), name="api_token"),
    # Both need a logged-in user (SPECTACULAR_SETTINGS["SERVE_PERMISSIONS"]); a
    # browser without a session is sent to the login page instead of a bare 403.
    path("api/schema/", SpectacularAPIView.as_view(), name="api_schema"),
    path("api/docs/", login_required(SpectacularSwaggerSplitView.as_view(url_name="api_schema")), name="api_docs"),
]
