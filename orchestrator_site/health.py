"""Probes and the scrape endpoint: ``/health`` (liveness), ``/ready`` (readiness), ``/metrics``.

- ``GET /health``: 200 ``{"status": "ok"}`` while the process serves requests; touches nothing else,
  so a database outage does not make an orchestrator restart the web processes.
- ``GET /ready``: 200 when the database answers ``SELECT 1`` and the Celery broker accepts a
  connection, each within ``ORCHESTRATOR_READY_TIMEOUT`` seconds; else 503. The body says which
  check failed: ``{"status": "ok" | "unavailable", "checks": {"database": {"ok": bool, "ms": float,
  "error"?: str}, "broker": {...}}}``.
- ``GET /metrics``: the Prometheus text exposition of :mod:`runs.metrics` (all processes plus the
  gauges counted from the database). When ``ORCHESTRATOR_METRICS_TOKEN`` is set, the scraper must
  send ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET

from orchestrator_site.conf import conf

log = logging.getLogger("orchestrator.health")


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    """Liveness: the process is up and serving."""
    return JsonResponse({"status": "ok"})


def check_database() -> None:
    """Raise when the default database does not answer ``SELECT 1``."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def check_broker() -> None:
    """Raise when the Celery broker (``CELERY_BROKER_URL``) does not accept a connection."""
    from kombu import Connection

    url = settings.CELERY_BROKER_URL
    if url.startswith("memory://"):
        return  # the embedded broker lives in the process that uses it
    timeout = settings.ORCHESTRATOR_READY_TIMEOUT
    options = {**getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}), "socket_timeout": timeout}
    with Connection(url, connect_timeout=timeout, transport_options=options) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, interval_max=0, timeout=timeout)
        conn.default_channel  # noqa: B018 - opening a channel is what talks to the server (redis: PING)


def _run_check(check: Callable[[], None]) -> dict[str, Any]:
    started = time.monotonic()
    try:
        check()
    except Exception as exc:  # any failure means not ready; the reason goes into the body, one line
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        log.warning("readiness check %s failed: %s", check.__name__, message)
        return {"ok": False, "ms": round((time.monotonic() - started) * 1000, 1), "error": message}
    return {"ok": True, "ms": round((time.monotonic() - started) * 1000, 1)}


@require_GET
def ready(request: HttpRequest) -> JsonResponse:
    """Readiness: database and broker reachable (200), else 503 naming the failed check."""
    checks = {"database": _run_check(check_database), "broker": _run_check(check_broker)}
    ok = all(c["ok"] for c in checks.values())
    return JsonResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503)


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """The Prometheus exposition (text format 0.0.4)."""
    from runs.metrics import exposition

    token = conf.metrics_token
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return HttpResponse("authentication required\n", status=401, content_type="text/plain")
    body, content_type = exposition()
    return HttpResponse(body, content_type=content_type)
