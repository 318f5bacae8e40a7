"""Shared fixtures: the real PostgreSQL test database, a real Celery worker process on Redis,
a local agent HTTP server, and helpers to run workflows and wait for them.

The worker is one ``celery worker`` process for the whole session, started against the test
database and a queue name unique to the session (ORCHESTRATOR_QUEUE, set in test_settings), so
stale messages of other runs never reach it. Tests that use it need committed rows: they take the
``transactional_db`` fixture (through ``worker``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.agent_server import AgentServer

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = Path(__file__).resolve().parent / "workflows"
EXAMPLES = ROOT / "examples"
#: A canary secret: it must never appear in traces, outputs, errors or logs.
SERVICE_TOKEN = "tok-CANARY-5f3a9e"


FAULTS_HELP = "restarts the shared PostgreSQL/Redis: run with ORCHESTRATOR_FAULTS=1 or -m faults"


def faults_requested(config) -> bool:
    """True when this session was asked for the fault suite (``ORCHESTRATOR_FAULTS=1`` or a
    ``-m`` expression naming ``faults`` without negating it)."""
    markexpr = (config.getoption("markexpr", "") or "").replace(" ", "")
    return os.environ.get("ORCHESTRATOR_FAULTS", "") == "1" or ("faults" in markexpr and "notfaults" not in markexpr)


def pytest_collection_modifyitems(config, items):
    """The fault suite (tests/faults: kills workers, restarts PostgreSQL and Redis) runs only on
    request, so the default run leaves the machine's servers alone."""
    if faults_requested(config):
        return
    skip = pytest.mark.skip(reason=f"fault test: {FAULTS_HELP}")
    for item in items:
        if item.get_closest_marker("faults"):
            item.add_marker(skip)


def pytest_itemcollected(item):
    if "tests/faults/" in item.nodeid.replace("\\", "/"):
        item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session", autouse=True)
def _clean_reused_database(django_db_setup, django_db_blocker):
    """--reuse-db keeps the schema between sessions; rows an interrupted session left behind are
    removed once at the start (then the data migration's default tenant is put back)."""
    from django.core.management import call_command
    from django.db import connection

    from runs.models import Tenant

    if connection.settings_dict["NAME"] != connection.settings_dict["TEST"]["NAME"]:
        return  # no test of this session uses the database: pytest-django set none up
    with django_db_blocker.unblock():
        call_command("flush", interactive=False, verbosity=0)
        Tenant.objects.get_or_create(slug="default", defaults={"name": "Default"})


@pytest.fixture(scope="session")
def agent_server():
    server = AgentServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def worker_env(django_db_setup, agent_server, tmp_path_factory):
    # django_db_setup first: DATABASE_URL below must name the test database, not the main one
    from django.db import connection

    db = connection.settings_dict
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(
        DJANGO_SETTINGS_MODULE="orchestrator_site.settings",
        DATABASE_URL=(
            f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
        ),
        ORCHESTRATOR_AGENTS_BASE_URL=agent_server.url,
        ORCHESTRATOR_SERVICE_TOKEN=SERVICE_TOKEN,
        ORCHESTRATOR_LLM_BASE_URL=f"{agent_server.url}/v1",
        ORCHESTRATOR_HTTP_ALLOW_HOSTS="127.0.0.1,localhost",  # the SSRF guard lets the local servers in
        ORCHESTRATOR_DATA_DIR=str(tmp_path_factory.mktemp("worker-data")),
        ORCHESTRATOR_LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="session")
def celery_worker_process(django_db_setup, django_db_blocker, worker_env, tmp_path_factory):
    """One real ``celery worker`` process (prefork, 4 children) on the session queue."""
    from django.conf import settings

    from tests.workers import purge_queue, start_workers

    queue = settings.CELERY_TASK_DEFAULT_QUEUE
    workers = start_workers(worker_env, tmp_path_factory.mktemp("worker"), concurrency=4, queue=queue)
    proc = workers.procs[0]
    proc.log_path = workers.logs[0]
    yield proc
    workers.stop()
    purge_queue(queue)


@pytest.fixture
def worker(celery_worker_process, transactional_db, agent_server, settings):
    """A test that needs the real worker: committed rows, a clean agent server log."""
    agent_server.reset()
    settings.ORCHESTRATOR_AGENTS_BASE_URL = agent_server.url
    settings.ORCHESTRATOR_SERVICE_TOKEN = SERVICE_TOKEN
    yield celery_worker_process


def wait_for_run(run_id, timeout: float = 60.0, sweep: bool = False):
    """Poll until the run is terminal; returns the Run. Fails the test on timeout."""
    from runs import engine
    from runs.choices import RUN_TERMINAL
    from runs.models import Run

    deadline = time.time() + timeout
    while time.time() < deadline:
        run = Run.objects.get(pk=run_id)
        if run.status in RUN_TERMINAL:
            return run
        if sweep:
            engine.sweep()
        time.sleep(0.1)
    steps = list(run.steps.values_list("step_id", "status", "error"))
    pytest.fail(f"run {run_id} still {run.status} after {timeout} s: {steps}")


def start(yaml_text: str, inputs: dict | None = None, **kwargs):
    """Load a workflow from YAML text and start a run of it."""
    from runs import engine
    from templates_app.spec import load_spec

    return engine.start_run(load_spec(yaml_text, source="test.yaml"), inputs or {}, **kwargs)


def run_to_end(yaml_text: str, inputs: dict | None = None, timeout: float = 60.0, **kwargs):
    """Start a run and wait for it; returns (run, {step_id: Step}) for top-level steps."""
    sweep = kwargs.pop("sweep", False)
    run = start(yaml_text, inputs, **kwargs)
    run = wait_for_run(run.pk, timeout=timeout, sweep=sweep)
    steps = {s.step_id: s for s in run.steps.filter(parent__isnull=True)}
    return run, steps


# --- tenants, users and API clients (the API, admin and metrics tests) ------------------------------

CHAIN_YAML = """\
key: chain
name: A chain
variables:
  greeting: {type: string, default: hello}
  n: {type: integer, required: true}
steps:
  - id: a
    type: noop
    params: {output: {n: "${n}"}}
  - id: b
    type: noop
    depends_on: [a]
    params: {output: {greeting: "${greeting}"}}
"""


@pytest.fixture
def tenants(db):
    """Two tenants: ``acme`` (the owner's) and ``globex`` (the outsider's)."""
    from runs.models import Tenant

    return {slug: Tenant.objects.create(slug=slug, name=slug.title()) for slug in ("acme", "globex")}


def _user(username: str, tenant, role: str, **extra):
    from django.contrib.auth import get_user_model

    from runs.models import Membership

    user = get_user_model().objects.create_user(username=username, password="pw-" + username, **extra)
    if tenant is not None:
        Membership.objects.create(user=user, tenant=tenant, role=role, is_default=True)
    return user


@pytest.fixture
def owner(tenants):
    """Owner of tenant ``acme``."""
    return _user("owner", tenants["acme"], "owner")


@pytest.fixture
def member(tenants):
    """Member of tenant ``acme`` (may start, cancel and retry runs)."""
    return _user("member", tenants["acme"], "member")


@pytest.fixture
def viewer(tenants):
    """Viewer of tenant ``acme`` (read only)."""
    return _user("viewer", tenants["acme"], "viewer")


@pytest.fixture
def outsider(tenants):
    """Owner of tenant ``globex``: must never see anything of ``acme``."""
    return _user("outsider", tenants["globex"], "owner")


def api_client_for(user=None):
    """A DRF APIClient sending a fresh API token of ``user`` (anonymous when None)."""
    from knox.models import AuthToken
    from rest_framework.test import APIClient

    client = APIClient()
    if user is not None:
        _instance, token = AuthToken.objects.create(user=user)
        client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        client.token = token
    return client


@pytest.fixture
def owner_api(owner):
    return api_client_for(owner)


@pytest.fixture
def outsider_api(outsider):
    return api_client_for(outsider)


@pytest.fixture
def chain_template(tenants):
    """Template ``chain`` (two noop steps, variables ``n`` required and ``greeting``) in ``acme``."""
    from templates_app.services import save_template
    from templates_app.spec import load_spec

    return save_template(load_spec(CHAIN_YAML, source="chain.yaml"), CHAIN_YAML, tenant_id="acme").template
