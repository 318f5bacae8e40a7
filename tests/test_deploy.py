"""Deployment, as far as a machine without docker allows:

- production mode from ``pip install -r requirements.txt`` alone: a fresh virtualenv (no test
  extras), a migrated PostgreSQL database of its own, then ``celery worker`` and ``celery beat``
  on the session's broker; the worker answers a ping (the compose healthcheck's command), runs
  the sweeper beat sends it, and beat's healthcheck passes;
- the Dockerfile's RUN steps executed in that virtualenv on a copy of the checkout (apt-get and
  useradd, which need a container's root, are reported as skipped);
- docker-compose.yml: every service restarts, has a healthcheck, and the app services wait for
  the one-shot ``migrate``; ``docker compose config`` (or Debian's ``docker-compose config``,
  installed by .ci/run) validates it, skipped with the reason where neither is installed.

Measured: about 20 s for the virtualenv (pip takes the wheels from its cache), 45 s in all.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import sql

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _wait_for(path: Path, needle: str, proc: subprocess.Popen, timeout: float) -> str:
    """Wait until ``needle`` appears in the log at ``path``; fail with the log's tail otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{needle!r} not in {path.name} (exit {proc.poll()}):\n{text[-3000:]}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A virtualenv with requirements.txt and nothing else (pip may use its local cache)."""
    path = tmp_path_factory.mktemp("prod") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    result = subprocess.run(
        [str(path / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "-r", "requirements.txt"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return path


@pytest.fixture
def prod_database(settings) -> str:
    """A PostgreSQL database of this test's own (created, then dropped): the URL."""
    db = settings.DATABASES["default"]
    name = f"{db['TEST']['NAME']}_prod"
    admin = f"postgresql://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield admin.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_worker_and_beat_start_from_requirements_txt_alone(venv, prod_database, settings, tmp_path):
    # Given: an environment like the README's production section, with nothing of the test run
    queue = f"prod-check-{uuid.uuid4().hex[:8]}"
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "DATABASE_URL": prod_database,
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "DJANGO_SECRET_KEY": "prod-check-" + uuid.uuid4().hex,
        "ORCHESTRATOR_DATA_DIR": str(tmp_path / "data"),
        "ORCHESTRATOR_QUEUE": queue,
        "ORCHESTRATOR_SWEEP_INTERVAL": "1",
        "ORCHESTRATOR_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    python = str(venv / "bin" / "python")
    celery = str(venv / "bin" / "celery")
    migrate = subprocess.run(
        [python, "manage.py", "migrate", "--no-input"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    assert migrate.stderr == ""  # no warnings a user cannot act on

    # When: a worker and beat start, as separate processes
    node = f"{queue}@localhost"
    procs = []
    try:
        worker_log, beat_log = tmp_path / "worker.log", tmp_path / "beat.log"
        app = [celery, "-A", "orchestrator_site"]
        for argv, log in (
            ([*app, "worker", "-Q", queue, "-c", "1", "-n", node, "-l", "INFO"], worker_log),
            ([*app, "beat", "-l", "INFO", "-s", str(tmp_path / "beat-schedule")], beat_log),
        ):
            with open(log, "wb") as handle:
                procs.append(
                    subprocess.Popen(
                        argv, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        _wait_for(worker_log, "ready.", procs[0], 120)

        # Then: the worker answers a ping (the compose healthcheck's command)...
        ping = subprocess.run(
            [celery, "-A", "orchestrator_site", "inspect", "ping", "-d", node, "-t", "10"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr[-2000:]
        # ...beat ticks (it sends the sweeper every second here) and the worker runs what it sent
        _wait_for(beat_log, "orchestrator-sweep", procs[1], 60)
        _wait_for(worker_log, "runs.sweep", procs[0], 60)
        assert "Traceback" not in worker_log.read_text() + beat_log.read_text()
    finally:
        for proc in procs:
            _stop(proc)
    assert all(proc.returncode is not None for proc in procs)
    # beat saved when it last sent the sweeper: its compose healthcheck passes
    health = subprocess.run(
        [python, "-m", "orchestrator_site.healthcheck", "beat", "--max-age", "600"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert health.returncode == 0, health.stderr


# --- the Dockerfile ----------------------------------------------------------------------------

DOCKERFILE = ROOT / "Dockerfile"
#: Commands that need the container's root (Debian packages, a system user): not run here.
NEEDS_CONTAINER_ROOT = ("apt-get", "rm -rf /var/lib/apt", "useradd", "mkdir -p /var/lib/orchestrator", "chown")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in (raw.strip() for raw in text.splitlines())
        if line and not line.startswith("#")
    ]


def test_dockerfile_shape():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = " && ".join(args for name, args in instructions if name == "RUN")
    assert "apt-get install -y --no-install-recommends bubblewrap" in runs
    assert "pip install --no-cache-dir -r requirements.txt" in runs
    assert "collectstatic" in runs
    users = [args for name, args in instructions if name == "USER"]
    assert users and users[-1] not in ("root", "0")  # the processes do not run as root
    assert ("CMD", '["gunicorn", "orchestrator_site.wsgi"]') in instructions


def test_dockerfile_run_steps_in_a_fresh_virtualenv(venv, tmp_path):
    # Given: the build context as COPY sees it (tracked files, minus .dockerignore's)
    app = tmp_path / "app"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()  # fmt: skip
    for name in files:
        if (ROOT / name).is_file() and not name.startswith("var/"):
            (app / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, app / name)
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    skipped, ran = [], []
    for name, args in dockerfile_instructions():
        if name == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                env[key] = value.replace("/app/", f"{app}/").replace("/var/lib/orchestrator", str(tmp_path / "data"))
        elif name == "RUN":
            for command in (part.strip() for part in args.split("&&")):
                if command.startswith(NEEDS_CONTAINER_ROOT):
                    skipped.append(command)
                    continue
                # When: each build step runs as the image build would (in /app)
                result = subprocess.run(["bash", "-c", command], cwd=app, env=env, capture_output=True, text=True,
                                        timeout=900)  # fmt: skip
                assert result.returncode == 0, f"{command}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
                ran.append(command)
    # Then: the dependencies installed and the static files collected where the image serves them
    assert any(c.startswith("pip install") for c in ran) and any("collectstatic" in c for c in ran), ran
    static = app / "static"
    assert (static / "admin" / "css" / "base.css").is_file()
    assert (static / "drf_spectacular_sidecar" / "swagger-ui-dist" / "swagger-ui-bundle.js").is_file()
    assert any(c.startswith("apt-get install") for c in skipped), skipped  # needs the container's root


# --- docker-compose.yml ------------------------------------------------------------------------

COMPOSE = ROOT / "docker-compose.yml"
APP_SERVICES = ("web", "worker", "worker-system", "beat")


def test_compose_services_restart_have_healthchecks_and_wait_for_migrate():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert set(APP_SERVICES) | {"migrate", "postgres", "redis"} <= set(services)
    for name, service in services.items():
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name
        if name != "migrate":  # a one-shot job has nothing to check once it exited
            assert service.get("healthcheck", {}).get("test"), name
    for name in APP_SERVICES:
        service = services[name]
        assert service["build"] == "." and service["image"] == "orchestrator:latest", name  # one image
        assert service["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name
        assert "pip install" not in json.dumps(service["command"]), name  # installed in the image
    assert "migrate" in " ".join(services["migrate"]["command"])
    assert services["worker"]["healthcheck"]["test"][1].startswith("celery -A orchestrator_site inspect ping")
    assert "ORCHESTRATOR_SYSTEM_QUEUE" in " ".join(services["worker-system"]["command"])
    assert services["web"]["environment"]["ORCHESTRATOR_WEB_WORKERS"] == "${ORCHESTRATOR_WEB_WORKERS:-4}"


def test_gunicorn_conf_reads_the_workers_from_the_environment():
    code = "import runpy; c = runpy.run_path('gunicorn.conf.py'); print(c['workers'], c['bind'])"
    env = {**os.environ, "ORCHESTRATOR_WEB_WORKERS": "7", "ORCHESTRATOR_WEB_BIND": "127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.stdout.split() == ["7", "127.0.0.1:9"], result.stderr


def _docker_compose() -> list[str] | None:
    for argv in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(argv[0]) and subprocess.run([*argv, "version"], capture_output=True).returncode == 0:
            return argv
    return None


@pytest.mark.skipif(_docker_compose() is None, reason="docker compose is not installed on this machine")
def test_docker_compose_config_accepts_the_file():
    argv = _docker_compose()
    env = {**os.environ, "DJANGO_SECRET_KEY": "compose-config-check"}
    result = subprocess.run([*argv, "-f", str(COMPOSE), "config", "-q"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, shlex.join(argv) + ": " + result.stderr
