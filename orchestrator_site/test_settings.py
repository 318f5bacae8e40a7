"""Settings for the test suite: real PostgreSQL and Redis on 127.0.0.1 unless overridden."""

import os

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/orchestrator")
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
# A queue of this test session only: messages left by other sessions never reach its worker.
os.environ.setdefault("ORCHESTRATOR_QUEUE", f"orchestrator-test-{os.getpid()}")

from .settings import *  # noqa: E402,F403

# Sessions running side by side (e.g. two checkouts) can each take their own test database.
DATABASES["default"]["TEST"] = {"NAME": os.environ.get("ORCHESTRATOR_TEST_DB", "test_orchestrator")}  # noqa: F405
