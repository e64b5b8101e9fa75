"""`bin/run`: the whole product on one machine, with embedded defaults.

Starts (or reuses) the embedded PostgreSQL under var/pgdata unless
DATABASE_URL is set, uses Redis at REDIS_URL when it answers and otherwise
starts a local redis-server under var/redis, migrates, makes sure an admin
account exists, then runs the web server, a worker for the gpu (training)
queue, a worker for the embed (index build) queue, a worker for the default queue and Celery beat under `Supervisor`.
A process that dies is restarted with backoff; only Ctrl-C (SIGINT or SIGTERM
to the launcher) stops them all, then the servers this launcher started.

Why a supervisor of our own: honcho (used before) ends every process when one
exits and cannot restart; supervisord and circus can, but bring a daemon, a
config file format and an RPC layer (circus also ZeroMQ) for what is four
children of one foreground process. `Supervisor` is Popen + a poll loop.

Settings are production-safe (DEBUG off, SECRET_KEY required, HTTPS only), so
the launcher fills in what serving on this machine over plain http needs:
see local_http_env().
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
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
        supervisor = Supervisor(product_processes(python=python, host=host, port=port), status_path(VAR_DIR),
                                env=env, cwd=BASE_DIR)
        # Ctrl-C reaches the launcher only: the children run in their own
        # sessions, so the launcher decides the order in which they stop.
        signal.signal(signal.SIGINT, lambda *_: supervisor.stop())
        signal.signal(signal.SIGTERM, lambda *_: supervisor.stop())
        supervisor.run()
        return 0
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
    on first use, so sessions and tokens survive restarts.
    EMBEDPORTAL_CREDENTIALS_KEY: likewise from var/credentials_key, a Fernet
    key that seals Jira tokens and webhook URLs (training/connectors/credentials.py). ALLOWED_HOSTS:
    localhost, 127.0.0.1 and HOST. EMBEDPORTAL_LOCAL_HTTP=1: no redirect to
    https and no secure-only cookies, which plain http could never send back.
    """
    out = dict(env)
    if not out.get("SECRET_KEY"):
        out["SECRET_KEY"] = _persistent_secret_key(var_dir / "secret_key")
    if not out.get("EMBEDPORTAL_CREDENTIALS_KEY"):
        out["EMBEDPORTAL_CREDENTIALS_KEY"] = _persistent_secret_key(var_dir / "credentials_key", fernet=True)
    if not out.get("ALLOWED_HOSTS"):
        hosts = ["localhost", "127.0.0.1"]
        # 0.0.0.0 / :: are bind addresses, not names a browser sends: set ALLOWED_HOSTS then.
        if host not in hosts and host not in ("0.0.0.0", "::", ""):
            hosts.append(host)
        out["ALLOWED_HOSTS"] = ",".join(hosts)
    out.setdefault("EMBEDPORTAL_LOCAL_HTTP", "1")
    return out


def _persistent_secret_key(path: Path, *, fernet: bool = False) -> str:
    try:
        # O_EXCL: two launchers starting at once cannot both write a key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    # A Fernet key is 32 random bytes in url-safe base64 (what Fernet.generate_key() makes).
    key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode() if fernet else secrets.token_urlsafe(50)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


def product_processes(*, python: str, host: str, port: str) -> dict[str, list[str]]:
    """The product's long-running processes: name -> command line."""
    celery = [python, "-m", "celery", "-A", "embedportal"]
    workers, threads = web_size()
    return {
        "web": [python, "-m", "gunicorn", "embedportal.wsgi", "--bind", f"{host}:{port}", "--workers", str(workers),
                "--threads", str(threads), "--timeout", "120", "--access-logfile", "-"],
        # One task at a time on the gpu queue: a solo pool frees CUDA memory with the task.
        "gpu-worker": [*celery, "worker", "-Q", "gpu", "--pool", "solo", "-n", "gpu@%h", "--loglevel", "INFO"],
        # Index builds on their own queue and worker, so they never wait behind a training run
        # (settings.EMBED_QUEUE says why a queue and not a priority); solo for the same CUDA reason.
        "embed-worker": [*celery, "worker", "-Q", "embed", "--pool", "solo", "-n", "embed@%h", "--loglevel", "INFO"],
        "worker": [*celery, "worker", "-Q", "default", "--concurrency", "2", "-n", "default@%h", "--loglevel", "INFO"],
        "beat": [*celery, "beat", "--loglevel", "INFO", "--schedule", str(VAR_DIR / "celerybeat-schedule")],
    }


def web_size() -> tuple[int, int]:
    """(gunicorn workers, threads per worker): EMBEDPORTAL_WEB_WORKERS / EMBEDPORTAL_WEB_THREADS, else sized to the cores.

    A search request is CPU work (query encoding, JSON) plus waits on
    PostgreSQL: one worker per core keeps the cores busy without doubling
    the models in memory, and threads cover the waits. Measured in
    docs/benchmarks.md (search, HTTP load).
    """
    cores = os.cpu_count() or 1
    workers = int(os.environ.get("EMBEDPORTAL_WEB_WORKERS") or max(2, cores))
    threads = int(os.environ.get("EMBEDPORTAL_WEB_THREADS") or 4)
    return max(1, workers), max(1, threads)


def worker(argv: list[str]) -> int:
    """`bin/worker [QUEUES]`: one more Celery worker for the product (docs/scaling.md), default queue "embed".

    Next to a running `bin/run` on the same machine it needs nothing set: it
    uses var/'s keys (SECRET_KEY, the credentials key), the embedded
    PostgreSQL's socket and the Redis that bin/run uses (REDIS_URL, else
    127.0.0.1:6379, else the one bin/run started on LOCAL_REDIS_PORT). On
    another host, set DATABASE_URL, REDIS_URL, SECRET_KEY,
    EMBEDPORTAL_CREDENTIALS_KEY and the artifact store (docs/scaling.md).
    A solo pool, one task at a time (a GPU's memory is freed with the task);
    start one per core or per GPU. Replaces this process with the worker.
    """
    queues = argv[0] if argv else "embed"
    if not re.fullmatch(r"[a-z]+(,[a-z]+)*", queues):
        raise SystemExit(f"QUEUES must look like 'embed' or 'gpu,embed', got {queues!r}.")
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    env = local_http_env(env={**os.environ, "EMBEDPORTAL_VAR_DIR": str(VAR_DIR)}, var_dir=VAR_DIR, host="127.0.0.1")
    env.setdefault("DJANGO_SETTINGS_MODULE", "embedportal.settings")
    if not env.get("REDIS_URL"):
        local = f"redis://127.0.0.1:{LOCAL_REDIS_PORT}/0"
        env["REDIS_URL"] = "redis://127.0.0.1:6379/0" if _redis_answers("redis://127.0.0.1:6379/0") else local
    name = f"{queues.replace(',', '-')}-{os.getpid()}@%h"  # unique per process: two on one host stay apart
    python = sys.executable
    argv = [python, "-m", "celery", "-A", "embedportal", "worker", "-Q", queues, "--pool", "solo", "-n", name,
            "--loglevel", env.get("LOG_LEVEL", "INFO")]
    print(f"[embedportal] worker {name} on queue(s) {queues}, broker {env['REDIS_URL']}", flush=True)
    os.execve(python, argv, env)
    return 0  # not reached


def status_path(var_dir: Path) -> Path:
    """Where the launcher keeps its process table (read by the dashboard)."""
    return Path(var_dir) / "launcher" / "status.json"


def read_status(path: Path) -> dict[str, dict] | None:
    """The process table `Supervisor` last wrote, or None when no launcher runs (or it is unreadable).

    Timestamps come back as aware datetimes.
    """
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    for entry in table.values():
        for key in ("last_restart_at", "up_since"):
            entry[key] = datetime.fromisoformat(entry[key]) if entry.get(key) else None
    return table


# Restart backoff: the first restart waits 1 s, each further one twice as long
# up to 60 s; a process that stayed up STABLE_AFTER_S starts again at 1 s.
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
STABLE_AFTER_S = 60.0
# On Ctrl-C each process group gets SIGTERM, then SIGKILL after this long. A
# Celery worker's warm shutdown waits for its task; the job system requeues
# a task cut short (heartbeat reaper), so a long training step need not hold
# the shutdown.
STOP_GRACE_S = 15.0
POLL_S = 0.2


class Supervisor:
    """Runs `processes` (name -> argv), restarts any that exits, until `stop()`.

    Each child runs in its own session (so its own process group): Ctrl-C in
    the terminal reaches only the launcher, and a child's workers (gunicorn's,
    Celery's pool) are stopped with it. Every change of the process table is
    written atomically to `status_path` as JSON:
    {name: {pid, restarts, last_exit, last_restart_at, up_since}}; the file is
    removed on stop, so a stale table never outlives the launcher that wrote it.
    Children's output goes to our stdout, each line prefixed with its name.
    """

    def __init__(self, processes: dict[str, list[str]], status_path: Path, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.commands = dict(processes)
        self.status_path = Path(status_path)
        self.env = env
        self.cwd = cwd
        self._stopping = threading.Event()
        self._procs: dict[str, subprocess.Popen] = {}
        self._started_at: dict[str, float] = {}
        self._restart_due: dict[str, float] = {}
        self._backoff: dict[str, float] = {name: 0.0 for name in processes}
        self.table: dict[str, dict] = {
            name: {"pid": None, "restarts": 0, "last_exit": None, "last_restart_at": None, "up_since": None}
            for name in processes
        }

    def stop(self) -> None:
        """Ask `run()` to stop every child and return; safe from a signal handler or another thread."""
        self._stopping.set()

    def run(self) -> None:
        """Start every process, restart those that exit, until `stop()`; then stop them all.

        Side effects: starts and kills child processes, writes and finally
        removes `status_path`, prints a line per exit and restart.
        """
        try:
            for name in self.commands:
                self._start(name)
            self._write_status()
            while not self._stopping.wait(POLL_S):
                self._check_children()
        finally:
            self._stop_all()

    def _check_children(self) -> None:
        now = time.monotonic()
        for name, proc in list(self._procs.items()):
            if not self._exited(proc):
                continue
            self._kill_group(proc.pid, signal.SIGKILL)  # what the dead leader left behind (pool children)
            code = proc.wait()
            del self._procs[name]
            stayed_up = now - self._started_at[name]
            previous = self._backoff[name]
            delay = BACKOFF_FIRST_S if stayed_up >= STABLE_AFTER_S or not previous else min(previous * 2, BACKOFF_MAX_S)
            self._backoff[name] = delay
            self._restart_due[name] = now + delay
            entry = self.table[name]
            entry.update(pid=None, last_exit=code, up_since=None)
            print(f"[launcher] {name} exited with {code}; restarting in {delay:g} s (restart {entry['restarts'] + 1})",
                  flush=True)
            self._write_status()
        for name, due in list(self._restart_due.items()):
            if now >= due and not self._stopping.is_set():
                del self._restart_due[name]
                self._start(name)
                entry = self.table[name]
                entry["restarts"] += 1
                entry["last_restart_at"] = entry["up_since"]
                self._write_status()

    @staticmethod
    def _exited(proc: subprocess.Popen) -> bool:
        # WNOWAIT: see the exit without reaping it, so the dead leader's pid (our
        # process group id) cannot be reused before _kill_group has used it.
        try:
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def _start(self, name: str) -> None:
        proc = subprocess.Popen(
            self.commands[name], env=self.env, cwd=self.cwd, start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        threading.Thread(target=_copy_output, args=(name, proc.stdout), daemon=True).start()
        self._procs[name] = proc
        self._started_at[name] = time.monotonic()
        self.table[name].update(pid=proc.pid, up_since=_now_iso())

    def _stop_all(self) -> None:
        self._restart_due.clear()
        for proc in self._procs.values():
            self._kill_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for name, proc in self._procs.items():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"[launcher] {name} did not stop in {STOP_GRACE_S:g} s; killing it", flush=True)
            # The group may outlive its leader (a Celery pool child): kill what is left.
            self._kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"[launcher] {name} stopped", flush=True)
        self._procs.clear()
        self.status_path.unlink(missing_ok=True)

    @staticmethod
    def _kill_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # nothing left in the group

    def _write_status(self) -> None:
        self.status_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.status_path.with_name(f".{self.status_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.table, indent=1))
        os.replace(tmp, self.status_path)  # readers see the old table or the new one, never half of one


def _copy_output(name: str, stream) -> None:
    prefix = f"{name} | "
    for line in iter(stream.readline, b""):
        sys.stdout.write(prefix + line.decode(errors="replace"))
        sys.stdout.flush()
    stream.close()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

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
        start_new_session=True,  # Ctrl-C must not stop Redis before the workers that use it
    )
    url = f"redis://127.0.0.1:{LOCAL_REDIS_PORT}/0"
    for _ in range(50):
        if _redis_answers(url):
            return proc, url
        time.sleep(0.1)
    proc.terminate()
    raise SystemExit(f"redis-server did not answer on {urlparse(url).netloc}; see var/redis.")


if __name__ == "__main__":
    raise SystemExit(worker(sys.argv[2:]) if sys.argv[1:2] == ["worker"] else main())
