"""A second "host" on this machine: a Linux network namespace with its own veth address and var folder.

Used by tests/test_hosts.py and `python -m bench hosts` to show that a worker
needs only DATABASE_URL, REDIS_URL and the artifact store (docs/scaling.md).
`SecondHost` creates the namespace `ep14-<n>` and a veth pair, 10.231.<n>.1
on this side and 10.231.<n>.2 inside, and serves on 10.231.<n>.1 only:

- PostgreSQL: a TCP port forwarded (socat) to the embedded server's Unix
  socket, so the namespace speaks the PostgreSQL protocol over TCP to the
  same database the test uses;
- Redis: a TCP port forwarded (socat) to the Redis on 127.0.0.1:6379, which
  listens on loopback only;
- S3: moto's standalone server (`moto_server`), the stand-in for MinIO/S3.

`worker()` starts a real `celery worker`: on this side (host A) or inside the
namespace (host B). Host B's worker also runs in a mount namespace of its own
in which the folders it must not read (host A's var, the web's var) are
covered by empty tmpfs mounts: it cannot see a file of theirs, whatever path
the database records. Only loopback and the addresses inside the namespace
are used. Everything is removed on exit, also after a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PG_PORT = 15432
REDIS_PORT = 16379
S3_PORT = 15000


class Unavailable(Exception):
    """Namespaces cannot be made here (not root, no `ip`, no socat or moto_server): the reason."""


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def _wait_port(host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class SecondHost:
    """Context manager: the namespace, its veth pair and the services on the host-side address."""

    def __init__(self, *, pg_socket_dir: str, logs: Path, redis_port: int = 6379, slot: int | None = None):
        n = slot if slot is not None else 20 + os.getpid() % 200
        self.ns = f"ep14-{n}"
        self.veth_host, self.veth_ns = f"ep14h{n}", f"ep14n{n}"
        self.host_ip, self.ns_ip = f"10.231.{n}.1", f"10.231.{n}.2"
        self.pg_socket_dir = pg_socket_dir
        self.redis_port = redis_port
        self.logs = Path(logs)
        self.procs: list[subprocess.Popen] = []

    # --- setting up ------------------------------------------------------------------------
    def __enter__(self) -> SecondHost:
        missing = [tool for tool in ("ip", "socat", "unshare") if shutil.which(tool) is None]
        moto = Path(sys.executable).parent / "moto_server"
        if missing or not moto.exists():
            raise Unavailable(f"needs {', '.join(missing + ([] if moto.exists() else ['moto_server (moto[server])']))}")
        if os.geteuid() != 0:
            raise Unavailable("creating a network namespace needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)")
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            _run("ip", "netns", "add", self.ns)
        except (subprocess.CalledProcessError, OSError) as exc:
            raise Unavailable(f"`ip netns add` failed: {getattr(exc, 'stderr', b'') or exc}") from exc
        try:
            _run("ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
            _run("ip", "link", "set", self.veth_ns, "netns", self.ns)
            _run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.veth_host)
            _run("ip", "link", "set", self.veth_host, "up")
            _run("ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{self.ns_ip}/24", "dev", self.veth_ns)
            _run("ip", "netns", "exec", self.ns, "ip", "link", "set", self.veth_ns, "up")
            _run("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up")
            sockets = sorted(Path(self.pg_socket_dir).glob(".s.PGSQL.*"))
            if not sockets:
                raise RuntimeError(f"no PostgreSQL socket in {self.pg_socket_dir}")
            self._serve("pg", ["socat", f"TCP-LISTEN:{PG_PORT},bind={self.host_ip},fork,reuseaddr",
                               f"UNIX-CONNECT:{sockets[0]}"], PG_PORT)
            self._serve("redis", ["socat", f"TCP-LISTEN:{REDIS_PORT},bind={self.host_ip},fork,reuseaddr",
                                  f"TCP:127.0.0.1:{self.redis_port}"], REDIS_PORT)
            self._serve("s3", [str(moto), "-H", self.host_ip, "-p", str(S3_PORT)], S3_PORT)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _serve(self, name: str, argv: list[str], port: int) -> None:
        log = open(self.logs / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        _wait_port(self.host_ip, port)

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host_ip}:{S3_PORT}"

    def database_url(self, name: str, user: str = "postgres") -> str:
        return f"postgres://{user}@{self.host_ip}:{PG_PORT}/{name}"

    def redis_url(self, db: int) -> str:
        return f"redis://{self.host_ip}:{REDIS_PORT}/{db}"

    # --- workers ---------------------------------------------------------------------------
    def worker_env(self, *, var: Path, database_url: str, redis_url: str, bucket: str) -> dict[str, str]:
        """What a worker host is given: the database, the broker and the artifact store; no shared disk."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("EMBEDPORTAL_", "DATABASE_URL", "REDIS_URL", "CELERY_", "AWS_"))}
        env.update({
            "EMBEDPORTAL_VAR_DIR": str(var),
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "EMBEDPORTAL_ARTIFACT_STORE": f"s3://{bucket}/store",
            "EMBEDPORTAL_S3_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
            "SECRET_KEY": os.environ.get("SECRET_KEY") or "second-host-" + "x" * 40,
            "EMBEDPORTAL_LOCAL_HTTP": "1",
            "EMBEDPORTAL_DEVICE": "cpu",
            "EMBEDPORTAL_BASE_INDEX": "0",
            "EMBEDPORTAL_BASE_MODEL_DIRS": os.environ.get("EMBEDPORTAL_BASE_MODEL_DIRS", ""),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "LOG_LEVEL": "INFO",
        })
        return env

    def worker(self, *, name: str, queues: str, env: dict[str, str], inside: bool = False,
               hidden: tuple[Path, ...] = ()) -> subprocess.Popen:
        """A `celery worker` (solo pool) named name@<hostname>: here, or inside the namespace with `hidden`
        folders covered by empty tmpfs mounts (a mount namespace of its own)."""
        argv = [sys.executable, "-m", "celery", "-A", "embedportal", "worker", "-Q", queues, "--pool", "solo",
                "-n", f"{name}@%h", "--loglevel", "INFO"]
        if inside:
            mounts = " && ".join(f"mount -t tmpfs -o size=1m,mode=000 none '{path}'" for path in hidden)
            argv = ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation", "private",
                    "sh", "-c", f"{mounts + ' && ' if mounts else ''}exec \"$@\"", "sh", *argv]
        log = open(self.logs / f"worker-{name}.log", "wb")
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass

    def log(self, name: str) -> str:
        path = self.logs / f"worker-{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- tearing down ----------------------------------------------------------------------
    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        # Deleting the host end deletes its peer; deleting the namespace ends whatever still runs in it.
        subprocess.run(["ip", "link", "del", self.veth_host], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)
