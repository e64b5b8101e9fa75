"""Point the test run at its own embedded PostgreSQL + pgvector and Redis DB.

Loaded with `-p tests.pg_plugin` (pytest.ini) so it runs before pytest-django
imports the settings. The server lives in a temporary folder and is stopped
and deleted when the run ends. Redis is the real one at TEST_REDIS_URL
(default database 15 of 127.0.0.1:6379), so a product running on database 0
is not disturbed.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

if not os.environ.get("DATABASE_URL"):
    _var = Path(tempfile.mkdtemp(prefix="embedportal-test-"))
    os.environ["EMBEDPORTAL_VAR_DIR"] = str(_var)

    def _cleanup() -> None:
        from embedportal import embedded_pg

        embedded_pg.stop(_var / "pgdata")
        shutil.rmtree(_var, ignore_errors=True)

    atexit.register(_cleanup)
else:
    os.environ.setdefault("EMBEDPORTAL_VAR_DIR", tempfile.mkdtemp(prefix="embedportal-test-"))

os.environ["REDIS_URL"] = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.pop("CELERY_BROKER_URL", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("EMBEDPORTAL_DEVICE", "cpu")
