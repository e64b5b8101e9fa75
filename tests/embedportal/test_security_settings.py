"""Issue #10, items 4-6: login lockout and throttling, production defaults, vendored API docs."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import drf_spectacular_sidecar
import pytest
import yaml
from axes.models import AccessAttempt
from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.cache import cache
from django.core.exceptions import ValidationError

from embedportal.launcher import local_http_env

ROOT = Path(__file__).resolve().parents[2]
LOCKOUT_MESSAGE = "Too many failed logins; try again in 15 minutes."
# A database no test reaches: settings skip the embedded PostgreSQL when DATABASE_URL is set,
# and neither `check --deploy` nor reading settings opens a connection.
UNREACHABLE_DB = "postgres://nobody@127.0.0.1:1/none"
STRONG_KEY = "k3y-" + "x7Qp9" * 12


@pytest.fixture(autouse=True)
def fresh_throttle_counts():
    """DRF throttles count in the default (per-process) cache: start and leave it empty."""
    cache.clear()
    yield
    cache.clear()


# --- 4. Login lockout and throttling ------------------------------------------------


def test_login_page_locks_out_after_ten_failures_with_429_page(client, user):
    # Given alice, when 30 wrong passwords are posted from one address
    statuses = [client.post("/login/", {"username": "alice", "password": f"wrong-{i}"}).status_code for i in range(30)]
    response = client.post("/login/", {"username": "alice", "password": "wrong-again"})

    # then the 10th failure locks the pair out, and the page says for how long
    assert statuses == [200] * 9 + [429] * 21
    assert response.status_code == 429
    assert LOCKOUT_MESSAGE in response.content.decode()


def test_login_page_refuses_correct_password_until_cooloff_passes(client, user):
    for i in range(10):
        client.post("/login/", {"username": "alice", "password": f"wrong-{i}"})

    locked = client.post("/login/", {"username": "alice", "password": "pw-alice-123"})
    assert locked.status_code == 429
    assert "_auth_user_id" not in client.session

    # When the cool-off period has passed since the last attempt
    AccessAttempt.objects.update(attempt_time=AccessAttempt.objects.get().attempt_time - timedelta(minutes=16))
    after = client.post("/login/", {"username": "alice", "password": "pw-alice-123"})

    assert after.status_code == 302
    assert after["Location"] == "/"
    assert client.session["_auth_user_id"] == str(user.pk)


def test_lockout_is_per_username_and_address(client, user):
    for i in range(10):
        client.post("/login/", {"username": "alice", "password": f"wrong-{i}"}, REMOTE_ADDR="203.0.113.9")

    # alice from another address is not locked out by a stranger's guesses
    response = client.post("/login/", {"username": "alice", "password": "pw-alice-123"}, REMOTE_ADDR="198.51.100.7")

    assert response.status_code == 302
    assert response["Location"] == "/"


def test_admin_login_locks_out_after_ten_failures(client, db):
    get_user_model().objects.create_superuser(username="root", email="", password="pw-root-123")
    statuses = [
        client.post("/admin/login/", {"username": "root", "password": f"wrong-{i}", "next": "/admin/"}).status_code
        for i in range(10)
    ]
    response = client.post("/admin/login/", {"username": "root", "password": "pw-root-123", "next": "/admin/"})

    assert statuses == [200] * 9 + [429]
    assert response.status_code == 429
    assert LOCKOUT_MESSAGE in response.content.decode()


def test_token_endpoint_locks_out_with_json_429(client, user):
    responses = [client.post("/api/auth/token/", {"username": "alice", "password": f"wrong-{i}"}) for i in range(10)]
    correct = client.post("/api/auth/token/", {"username": "alice", "password": "pw-alice-123"})

    assert [r.status_code for r in responses] == [400] * 9 + [429]
    assert responses[-1].json() == {"error": LOCKOUT_MESSAGE}
    assert correct.status_code == 429
    assert correct.json() == {"error": LOCKOUT_MESSAGE}


def test_token_endpoint_is_throttled_per_client_with_json_429(client, user):
    # 20 requests a minute (EMBEDPORTAL_TOKEN_RATE), even with the right password
    statuses = [
        client.post("/api/auth/token/", {"username": "alice", "password": "pw-alice-123"}).status_code for _ in range(21)
    ]
    response = client.post("/api/auth/token/", {"username": "alice", "password": "pw-alice-123"})

    assert statuses == [200] * 20 + [429]
    assert response.status_code == 429
    assert re.fullmatch(r"Request was throttled\. Expected available in \d+ seconds?\.", response.json()["error"])
    assert 1 <= int(response["Retry-After"]) <= 60


def test_password_validators_are_djangos_standard_four(db):
    user = get_user_model()(username="12345")
    with pytest.raises(ValidationError) as excinfo:
        validate_password("12345", user=user)

    assert sorted(e.code for e in excinfo.value.error_list) == [
        "password_entirely_numeric", "password_too_common", "password_too_short", "password_too_similar",
    ]
    assert validate_password("heron-quartz-lantern-42", user=user) is None


# --- 5. Production defaults ------------------------------------------------------------


def _clean_env(**overrides: str) -> dict[str, str]:
    """This environment without the variables settings read, plus `overrides`."""
    settings_vars = ("DEBUG", "SECRET_KEY", "ALLOWED_HOSTS", "EMBEDPORTAL_LOCAL_HTTP", "EMBEDPORTAL_BEHIND_TLS_PROXY",
                     "EMBEDPORTAL_HSTS_SECONDS", "DJANGO_SETTINGS_MODULE")
    env = {k: v for k, v in os.environ.items() if k not in settings_vars}
    return {**env, "DATABASE_URL": UNREACHABLE_DB, "DJANGO_SETTINGS_MODULE": "embedportal.settings", **overrides}


def _settings_in_subprocess(env: dict[str, str]) -> dict:
    names = ["DEBUG", "ALLOWED_HOSTS", "SECURE_SSL_REDIRECT", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE",
             "SECURE_HSTS_SECONDS", "SECURE_HSTS_INCLUDE_SUBDOMAINS", "SECURE_PROXY_SSL_HEADER"]
    code = (
        "import json, django; django.setup(); from django.conf import settings; "
        f"print(json.dumps({{n: getattr(settings, n) for n in {names!r}}}))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_settings_default_to_debug_off_https_only_and_local_hosts():
    loaded = _settings_in_subprocess(_clean_env(SECRET_KEY=STRONG_KEY))

    assert loaded == {
        "DEBUG": False, "ALLOWED_HOSTS": ["localhost", "127.0.0.1"], "SECURE_SSL_REDIRECT": True,
        "SESSION_COOKIE_SECURE": True, "CSRF_COOKIE_SECURE": True, "SECURE_HSTS_SECONDS": 31_536_000,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": True, "SECURE_PROXY_SSL_HEADER": None,
    }


def test_settings_behind_tls_proxy_trust_x_forwarded_proto():
    loaded = _settings_in_subprocess(_clean_env(SECRET_KEY=STRONG_KEY, EMBEDPORTAL_BEHIND_TLS_PROXY="1"))

    assert loaded["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert loaded["SECURE_SSL_REDIRECT"] is True


def test_settings_refuse_to_start_without_secret_key_when_debug_off():
    done = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env=_clean_env(DEBUG="0"), cwd=ROOT, capture_output=True, text=True, timeout=120,
    )

    assert done.returncode == 1
    assert "django.core.exceptions.ImproperlyConfigured: SECRET_KEY is not set." in done.stderr


def test_check_deploy_reports_no_issues_in_production_configuration():
    done = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        env=_clean_env(DEBUG="0", SECRET_KEY=STRONG_KEY, ALLOWED_HOSTS="example.com"),
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout == "System check identified no issues (0 silenced).\n"


def test_launcher_env_persists_a_private_secret_key_and_serves_local_http(tmp_path):
    env = local_http_env(env={"PATH": "/usr/bin"}, var_dir=tmp_path, host="127.0.0.1")
    again = local_http_env(env={}, var_dir=tmp_path, host="127.0.0.1")

    key_file = tmp_path / "secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert env["SECRET_KEY"] == key_file.read_text().strip() == again["SECRET_KEY"]
    assert len(env["SECRET_KEY"]) >= 50
    assert env["ALLOWED_HOSTS"] == "localhost,127.0.0.1"
    assert env["EMBEDPORTAL_LOCAL_HTTP"] == "1"
    assert "DEBUG" not in env
    # and the settings load from exactly that environment, over plain http
    loaded = _settings_in_subprocess({**_clean_env(), **env})
    assert (loaded["DEBUG"], loaded["SECURE_SSL_REDIRECT"], loaded["SESSION_COOKIE_SECURE"]) == (False, False, False)
    assert loaded["SECURE_HSTS_SECONDS"] == 0


def test_launcher_env_keeps_what_the_caller_set(tmp_path):
    given = {"SECRET_KEY": STRONG_KEY, "ALLOWED_HOSTS": "portal.example.com", "EMBEDPORTAL_LOCAL_HTTP": "0",
             "EMBEDPORTAL_CREDENTIALS_KEY": "b" * 43 + "="}
    env = local_http_env(env=dict(given), var_dir=tmp_path, host="10.0.0.5")
    lan = local_http_env(env={}, var_dir=tmp_path, host="10.0.0.5")

    assert env == given
    assert lan["ALLOWED_HOSTS"] == "localhost,127.0.0.1,10.0.0.5"


def _env_map(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    return env if isinstance(env, dict) else dict(item.split("=", 1) for item in env)


def test_docker_compose_has_no_default_secrets_and_waits_for_healthy_services():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]

    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
        for key, value in _env_map(service).items():
            if any(word in key for word in ("SECRET", "PASSWORD")):
                # required from .env: compose refuses to start without it
                assert re.fullmatch(r"\$\{" + key + r":\?[^}]+\}", str(value)), (name, key, value)
    assert _env_map(services["web"])["DATABASE_URL"].startswith("postgres://embedportal:${POSTGRES_PASSWORD:?")
    assert services["db"]["healthcheck"]["test"][1].startswith("pg_isready")
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "/login/" in services["web"]["healthcheck"]["test"][-1]
    for name in ("web", "gpu-worker", "cpu-worker", "beat"):
        assert services[name]["depends_on"]["db"] == {"condition": "service_healthy"}, name
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}, name
    for name in ("gpu-worker", "cpu-worker", "beat"):
        # web runs the migrations: workers start on a migrated database
        assert services[name]["depends_on"]["web"] == {"condition": "service_healthy"}, name


def test_env_example_sets_no_secret_values():
    lines = (ROOT / ".env.example").read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))

    assert values["SECRET_KEY"] == ""
    assert values["POSTGRES_PASSWORD"] == ""
    assert values["ALLOWED_HOSTS"] == "portal.example.com"


def test_dockerfile_runs_the_app_as_a_non_root_user():
    directives = [line.split() for line in (ROOT / "Dockerfile").read_text().splitlines() if line.strip()]
    users = [words[1] for words in directives if words[0] == "USER"]

    assert users[-1] == "app"


# --- 6. API docs without a CDN -------------------------------------------------------------


def test_api_docs_load_swagger_ui_from_our_own_static_files(web):
    html = web.get("/api/docs/").content.decode()
    scripts = re.findall(r'<script[^>]*\ssrc="([^"]+)"', html)
    links = re.findall(r'<link[^>]*\shref="([^"]+)"', html)

    dist = "/static/drf_spectacular_sidecar/swagger-ui-dist/"
    assert scripts == [f"{dist}swagger-ui-bundle.js", f"{dist}swagger-ui-standalone-preset.js", "/api/docs/?script="]
    assert links == [f"{dist}favicon-32x32.png", f"{dist}swagger-ui.css"]
    assert "cdn.jsdelivr" not in html and "unpkg" not in html and "http" not in " ".join(scripts + links)
    package_static = Path(drf_spectacular_sidecar.__file__).parent / "static"
    for url in [u for u in scripts + links if u.startswith("/static/")]:
        response = web.get(url)
        assert response.status_code == 200, url
        assert b"".join(response.streaming_content) == (package_static / url.removeprefix("/static/")).read_bytes()
    script = web.get("/api/docs/?script=")
    assert script["Content-Type"] == "application/javascript"
    assert 'url: "/api/schema/"' in script.content.decode()


def test_api_docs_send_an_anonymous_browser_to_login(client, db):
    response = client.get("/api/docs/")

    assert response.status_code == 302
    assert response["Location"] == "/login/?next=/api/docs/"


def test_api_schema_refuses_anonymous_requests(client, db):
    response = client.get("/api/schema/")

    assert response.status_code == 401
    # rendered as OpenAPI YAML, the schema's own format: the error, not the schema
    assert yaml.safe_load(response.content) == {"error": "Authentication credentials were not provided."}
