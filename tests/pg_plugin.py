"""Point the test run at its own embedded PostgreSQL + pgvector and Redis DB.

Loaded with `-p tests.pg_plugin` (pytest.ini) so it runs before pytest-django
imports the settings. The server lives in a temporary folder and is stopped
and deleted when the run ends. Redis is the real one at TEST_REDIS_URL
(default database 15 of 127.0.0.1:6379), so a product running on database 0
is not disturbed.
"""

import os
import tempfile

from embedportal.embedded_pg import use_throwaway_var_dir

use_throwaway_var_dir("embedportal-test-")
os.environ["REDIS_URL"] = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.pop("CELERY_BROKER_URL", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("EMBEDPORTAL_DEVICE", "cpu")
# Tests run as production does (DEBUG off), over plain HTTP like bin/run.
os.environ.setdefault("SECRET_KEY", "test-only-" + "x" * 50)
os.environ.setdefault("EMBEDPORTAL_LOCAL_HTTP", "1")
# The tiny models tests build live in pytest's temporary folders.
os.environ.setdefault("EMBEDPORTAL_BASE_MODEL_DIRS", tempfile.gettempdir())
