"""``/health`` (liveness), ``/ready`` (database + broker, 503 otherwise), and the JSON logs of web
and worker: one object per line, carrying run, step, tenant and correlation id, secrets masked."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest

from orchestrator_site import health
from orchestrator_site import logging as logctx
from tests.conftest import SERVICE_TOKEN, run_to_end

pytestmark = pytest.mark.django_db


def test_health_is_always_ok_without_auth(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert client.get("/health/").status_code == 200


def test_ready_checks_database_and_broker(client):
    response = client.get("/ready")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["broker"]["ok"] is True


def test_ready_is_503_when_the_broker_is_unreachable(client, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    settings.ORCHESTRATOR_READY_TIMEOUT = 1.0
    started = time.monotonic()
    response = client.get("/ready")
    assert time.monotonic() - started < 10
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["broker"]["ok"] is False
    assert body["checks"]["broker"]["error"]


def test_ready_is_503_when_the_database_fails(client, monkeypatch):
    def broken() -> None:
        raise RuntimeError("connection refused")

    broken.__name__ = "check_database"
    monkeypatch.setattr(health, "check_database", broken)
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["database"] == {
        "ok": False,
        "ms": response.json()["checks"]["database"]["ms"],
        "error": "RuntimeError: connection refused",
    }


def test_requests_get_a_request_id(client):
    response = client.get("/health", HTTP_X_REQUEST_ID="abc-123")
    assert response["X-Request-ID"] == "abc-123"
    generated = client.get("/health", HTTP_X_REQUEST_ID="bad id with spaces")["X-Request-ID"]
    assert generated != "bad id with spaces" and len(generated) == 32


def _capture(logger_name: str = "orchestrator.test") -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logctx.JsonFormatter())
    handler.addFilter(logctx.ContextFilter())
    handler.addFilter(logctx.RedactFilter())
    logger = logging.getLogger(logger_name)
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


@pytest.fixture
def clean_log_context():
    """A log context with nothing bound (earlier code of this thread may have bound fields)."""
    token = logctx._context.set({})
    yield
    logctx._context.reset(token)


def test_json_lines_carry_the_context_and_mask_secrets(settings, monkeypatch, clean_log_context):
    settings.ORCHESTRATOR_SERVICE_TOKEN = SERVICE_TOKEN
    # only the configured token: secrets registered by earlier tests of this process stay out of the way
    monkeypatch.setattr(logctx, "_known_secrets", lambda: [SERVICE_TOKEN])
    logger, stream = _capture()
    with logctx.scope(run_id="r-1", step_id="s-1", tenant="acme", correlation_id="corr-9"):
        logger.info("calling with %s", f"Bearer {SERVICE_TOKEN}", extra={"attempt": 2})
        try:
            raise ValueError(f"token {SERVICE_TOKEN} refused")
        except ValueError:
            logger.exception("failed")
    logger.info("outside")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)
    assert first["message"] == "calling with Bearer ***"
    assert (first["run_id"], first["step_id"], first["tenant"], first["correlation_id"]) == (
        "r-1",
        "s-1",
        "acme",
        "corr-9",
    )
    assert first["level"] == "INFO" and first["logger"] == "orchestrator.test" and first["attempt"] == 2
    assert "timestamp" in first and "process" in first
    assert "ValueError" in second["exc_info"] and SERVICE_TOKEN not in second["exc_info"]
    assert "run_id" not in third  # the scope ended
    assert SERVICE_TOKEN not in stream.getvalue()


def test_api_requests_log_tenant_and_request_id(owner_api, chain_template, caplog):
    caplog.set_level(logging.INFO, logger="orchestrator.services")
    response = owner_api.post(
        "/api/v1/runs",
        {"template": "chain", "variables": {"n": 1}, "correlation_id": "c-log"},
        format="json",
        HTTP_X_REQUEST_ID="req-42",
    )
    assert response.status_code == 201
    record = next(r for r in caplog.records if r.getMessage() == "run created")
    logctx.ContextFilter().filter(record)  # caplog's handler does not run our filters
    assert record.request_id == "req-42"
    assert record.tenant == "acme"
    assert record.run_id == response.json()["id"]


def test_worker_logs_are_json_with_run_and_step(worker):
    run, _ = run_to_end(
        "key: logs\nsteps:\n  - {id: broken, type: python, retry: {max_attempts: 1}, "
        "params: {callable: agents.testing.fail, message: nope}}\n",
        correlation_id="corr-worker",
    )
    assert run.status == "failed"
    deadline = time.time() + 10
    found = None
    while found is None and time.time() < deadline:
        for line in worker.log_path.read_text().splitlines():
            if line.startswith("{") and str(run.pk) in line:
                record = json.loads(line)
                if record.get("logger") == "orchestrator.engine":
                    found = record
        time.sleep(0.2)
    assert found is not None, "no JSON line of the engine names the run"
    assert (found["run_id"], found["step_id"], found["tenant"], found["correlation_id"]) == (
        str(run.pk),
        "broken",
        "default",
        "corr-worker",
    )
    assert found["message"] == "step broken: dead"
    assert SERVICE_TOKEN not in worker.log_path.read_text()
