"""Every line the processes write is one JSON record, tracebacks included: a real gunicorn (with
gunicorn.conf.py) serving requests, celery beat crashing on an unmigrated database (the issue's
1,347 fragments), and a management command dying of an uncaught exception."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import httpx
import psycopg
import pytest
from psycopg import sql

from tests.conftest import ROOT


def _records(output: str) -> list[dict]:
    """Parse every non-empty line as a JSON object; fails naming the first line that is not."""
    records = []
    for number, line in enumerate(output.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"line {number} is not JSON: {line[:300]!r}\n---\n{output[-3000:]}")
        assert isinstance(record, dict), line
        records.append(record)
    return records


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def env(tmp_path, settings) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO_SETTINGS"))}
    environ.update(
        DJANGO_SETTINGS_MODULE="orchestrator_site.settings",
        ORCHESTRATOR_DATA_DIR=str(tmp_path / "data"),
        ORCHESTRATOR_LOG_LEVEL="INFO",
        ORCHESTRATOR_LOG_FORMAT="json",
        ORCHESTRATOR_QUEUE=f"log-check-{uuid.uuid4().hex[:8]}",
        CELERY_BROKER_URL=settings.CELERY_BROKER_URL,
        PYTHONUNBUFFERED="1",
    )
    return environ


@pytest.fixture
def empty_database(settings) -> str:
    """A PostgreSQL database with no tables (created, then dropped): its URL."""
    db = settings.DATABASES["default"]
    name = f"{db['TEST']['NAME']}_empty"
    server = f"postgresql://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield f"{server}/{name}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_gunicorn_logs_json_through_the_platform_formatter(env, empty_database, tmp_path):
    port = _free_port()
    env.update(DATABASE_URL=empty_database, ORCHESTRATOR_WEB_BIND=f"127.0.0.1:{port}", ORCHESTRATOR_WEB_WORKERS="2")
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "orchestrator_site.wsgi"],
            cwd=ROOT,  # gunicorn.conf.py is read from here
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
        missing = httpx.get(f"http://127.0.0.1:{port}/api/v1/no-such-thing", timeout=5)
        assert missing.status_code == 404 and missing.json() == {"detail": "not found: /api/v1/no-such-thing"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    records = _records(log.read_text())
    loggers = {r["logger"] for r in records}
    assert {"gunicorn.error", "gunicorn.access", "django.request"} <= loggers, loggers
    assert all({"timestamp", "level", "message", "process"} <= set(r) for r in records)
    assert any(r["logger"] == "gunicorn.access" and "/api/v1/no-such-thing" in r["message"] for r in records)
    assert any(r["message"].startswith("Booting worker") for r in records)
    assert sum(r["message"].startswith("Booting worker") for r in records) == 2  # workers from the env


def test_beat_crash_on_an_unmigrated_database_is_one_record_with_its_traceback(env, empty_database, tmp_path):
    env["DATABASE_URL"] = empty_database
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "orchestrator_site", "-q", "beat", "-l", "INFO"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    records = _records(result.stdout + result.stderr)
    assert len(records) <= 5, [r["message"][:80] for r in records]
    crashes = [r for r in records if r["level"] == "CRITICAL"]
    assert crashes and all("Traceback (most recent call last)" in r["exc_info"] for r in crashes)
    assert any("django_celery_beat" in r["exc_info"] for r in crashes)
    assert not any(r["message"].lstrip().startswith(("Traceback", "File ")) for r in records)


def test_an_uncaught_exception_in_a_command_is_one_record(env, tmp_path):
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", "raise RuntimeError('boom in a command')"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    records = _records(result.stderr)  # the log; stdout is the command's own output
    assert len(records) == 1, records
    (record,) = records
    assert record["level"] == "CRITICAL" and record["logger"] == "orchestrator.crash"
    assert record["message"] == "uncaught RuntimeError: boom in a command"
    assert "Traceback (most recent call last)" in record["exc_info"] and "boom in a command" in record["exc_info"]
