"""Production mode from ``pip install -r requirements.txt`` alone: a fresh virtualenv (no test
extras), a migrated PostgreSQL database of its own, then ``celery worker`` and ``celery beat`` on
the session's broker; the worker answers a ping and executes the sweeper beat sends it.

Measured: about 20 s for the virtualenv (pip takes the wheels from its cache), 30-40 s in all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
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
