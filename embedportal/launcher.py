"""`bin/run`: the whole product on one machine, with embedded defaults.

Starts (or reuses) the embedded PostgreSQL under var/pgdata unless
DATABASE_URL is set, uses Redis at REDIS_URL when it answers and otherwise
starts a local redis-server under var/redis, migrates, makes sure an admin
account exists, then runs the web server, a worker for the gpu (training)
queue, a worker for the default queue and Celery beat under honcho. Ctrl-C
stops them all, then the servers this launcher started.

Settings are production-safe (DEBUG off, SECRET_KEY required, HTTPS only), so
the launcher fills in what serving on this machine over plain http needs:
see local_http_env().
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import redis

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("EMBEDPORTAL_VAR_DIR", BASE_DIR / "var")).resolve()
LOCAL_REDIS_PORT = 6390


def main() -> int:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "embedportal.settings")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["EMBEDPORTAL_VAR_DIR"] = str(VAR_DIR)
    host = env.get("HOST", "127.0.0.1")
    port = env.get("PORT", "8000")
    env = local_http_env(env=env, var_dir=VAR_DIR, host=host)
    python = sys.executable

    started_pg = False
    if not env.get("DATABASE_URL"):
        from embedportal import embedded_pg

        socket_dir = embedded_pg.ensure_running(VAR_DIR / "pgdata")
        started_pg = True
        print(f"[embedportal] embedded PostgreSQL 18 + pgvector running (socket {socket_dir})", flush=True)

    redis_proc = None
    redis_url = env.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if not _redis_answers(redis_url):
        redis_proc, redis_url = _start_local_redis()
        env["REDIS_URL"] = redis_url
        print(f"[embedportal] started a local Redis at {redis_url}", flush=True)
    else:
        env["REDIS_URL"] = redis_url
        print(f"[embedportal] using Redis at {redis_url}", flush=True)

    try:
        manage = [python, str(BASE_DIR / "manage.py")]
        subprocess.run([*manage, "migrate", "--noinput"], env=env, check=True, cwd=BASE_DIR)
        subprocess.run([*manage, "ensure_admin"], env=env, check=True, cwd=BASE_DIR)
        subprocess.run([*manage, "collectstatic", "--noinput", "-v0"], env=env, check=True, cwd=BASE_DIR)
        print(f"\n[embedportal] EmbedPortal is starting at http://{host}:{port}/  (Ctrl-C stops everything)\n", flush=True)
        return _supervise(env, python, host, port)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
        if started_pg and os.environ.get("EMBEDPORTAL_KEEP_PG") != "1":
            from embedportal import embedded_pg

            embedded_pg.stop(VAR_DIR / "pgdata")
            print("[embedportal] embedded PostgreSQL stopped", flush=True)


def local_http_env(*, env: dict[str, str], var_dir: Path, host: str) -> dict[str, str]:
    """`env` plus what serving http://HOST:PORT/ on this machine needs; what `env` sets wins.

    SECRET_KEY: read from var/secret_key, which is created (mode 0600, random)
    on first use, so sessions and tokens survive restarts. ALLOWED_HOSTS:
    localhost, 127.0.0.1 and HOST. EMBEDPORTAL_LOCAL_HTTP=1: no redirect to
    https and no secure-only cookies, which plain http could never send back.
    """
    out = dict(env)
    if not out.get("SECRET_KEY"):
        out["SECRET_KEY"] = _persistent_secret_key(var_dir / "secret_key")
    if not out.get("ALLOWED_HOSTS"):
        hosts = ["localhost", "127.0.0.1"]
        # 0.0.0.0 / :: are bind addresses, not names a browser sends: set ALLOWED_HOSTS then.
        if host not in hosts and host not in ("0.0.0.0", "::", ""):
            hosts.append(host)
        out["ALLOWED_HOSTS"] = ",".join(hosts)
    out.setdefault("EMBEDPORTAL_LOCAL_HTTP", "1")
    return out


def _persistent_secret_key(path: Path) -> str:
    try:
        # O_EXCL: two launchers starting at once cannot both write a key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    key = secrets.token_urlsafe(50)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


def _supervise(env: dict, python: str, host: str, port: str) -> int:
    from honcho.manager import Manager

    celery = [python, "-m", "celery", "-A", "embedportal"]
    processes = {
        "web": [python, "-m", "gunicorn", "embedportal.wsgi", "--bind", f"{host}:{port}", "--workers", "2",
                "--threads", "4", "--timeout", "120", "--access-logfile", "-"],
        # One task at a time on the gpu queue: a solo pool frees CUDA memory with the task.
        "gpu-worker": [*celery, "worker", "-Q", "gpu", "--pool", "solo", "-n", "gpu@%h", "--loglevel", "INFO"],
        "worker": [*celery, "worker", "-Q", "default", "--concurrency", "2", "-n", "default@%h", "--loglevel", "INFO"],
        "beat": [*celery, "beat", "--loglevel", "INFO", "--schedule", str(VAR_DIR / "celerybeat-schedule")],
    }
    manager = Manager()
    for name, cmd in processes.items():
        manager.add_process(name, " ".join(_quote(part) for part in cmd), env=env, cwd=str(BASE_DIR))
    manager.loop()
    return manager.returncode or 0


def _quote(part: str) -> str:
    import shlex

    return shlex.quote(part)


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def _start_local_redis() -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(
            "No Redis answers at REDIS_URL and no redis-server binary is installed. "
            "Install Redis (apt-get install redis-server) or set REDIS_URL."
        )
    data = VAR_DIR / "redis"
    data.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [binary, "--port", str(LOCAL_REDIS_PORT), "--bind", "127.0.0.1", "--dir", str(data), "--save", "60 1"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{LOCAL_REDIS_PORT}/0"
    for _ in range(50):
        if _redis_answers(url):
            return proc, url
        time.sleep(0.1)
    proc.terminate()
    raise SystemExit(f"redis-server did not answer on {urlparse(url).netloc}; see var/redis.")


if __name__ == "__main__":
    raise SystemExit(main())
