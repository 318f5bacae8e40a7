"""Settings for the test suite: real PostgreSQL and Redis on 127.0.0.1 unless overridden."""

import os
import tempfile

# ORCHESTRATOR_TEST_SQLITE=1 runs the suite on SQLite (the embedded default's database) instead.
if os.environ.get("ORCHESTRATOR_TEST_SQLITE"):
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{tempfile.gettempdir()}/orchestrator-main.sqlite3")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/orchestrator")
# Names of this project's test suite only, so that a run next to anything else on the machine
# (the shared `test_orchestrator` database, Redis DB 0) disturbs nothing: the Redis database
# number 9 and the test database `test_orchestrator_suite` below. Both can be overridden
# (CELERY_BROKER_URL, ORCHESTRATOR_TEST_DB), e.g. amqp://guest:guest@127.0.0.1:5672// for RabbitMQ.
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/9")
# A queue of this test session only: messages left by other sessions never reach its worker.
os.environ.setdefault("ORCHESTRATOR_QUEUE", f"orchestrator-test-{os.getpid()}")
# Metric files of this session only (the worker subprocess inherits the variable).
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="orchestrator-metrics-"))
# The tests' own HTTP servers listen on loopback, which the SSRF guard refuses by default.
os.environ.setdefault("ORCHESTRATOR_HTTP_ALLOW_HOSTS", "127.0.0.1,localhost")
# Credential keys are never derived from SECRET_KEY: the tests (and their workers) share this
# test-only key (tests/flow_support.FERNET_KEY).
os.environ.setdefault("ORCHESTRATOR_FERNET_KEYS", "peUzMMa49ouYSTHc-2pSNjsRwsGBomITwILqQw_4jec=")

# POST /chat/orchestrate answers at once (tests that want the strategy in the answer wait longer).
os.environ.setdefault("ORCHESTRATOR_TASK_PLAN_WAIT", "0")
# Event streams of runs no worker runs (the schema fuzzers find such runs) end after 5 s, not an hour.
os.environ.setdefault("ORCHESTRATOR_SSE_MAX_SECONDS", "5")

from .settings import *  # noqa: E402,F403

# Sessions running side by side (e.g. two checkouts) can each take their own test database.
DATABASES["default"]["TEST"] = {"NAME": os.environ.get("ORCHESTRATOR_TEST_DB", "test_orchestrator_suite")}  # noqa: F405
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    # The engine suite on the embedded default's database (tests/README: ORCHESTRATOR_TEST_SQLITE):
    # a file, so that the worker process shares it with the tests.
    DATABASES["default"]["TEST"]["NAME"] = os.environ.get(  # noqa: F405
        "ORCHESTRATOR_TEST_DB", os.path.join(tempfile.gettempdir(), "test_orchestrator.sqlite3")
    )

# Test helpers for python steps (agents/testing.py): they write files where a workflow says, so
# they are allowed in tests only, never in the default allow-list (issue 10).
TEST_CALLABLES = ["agents.testing.echo", "agents.testing.fail", "agents.testing.flaky"]
ORCHESTRATOR_PYTHON_CALLABLES = [*ORCHESTRATOR_PYTHON_CALLABLES, *TEST_CALLABLES]  # noqa: F405
