"""The hourly health report (seed 000's scheduled health check, for this platform).

Beat sends ``scheduler.health_report`` (``ORCHESTRATOR_HEALTH_CRON``, hourly by default), which
starts a run of the system template ``system-health``: one ``python`` step calling :func:`check`.
So the report is a run like any other (admin, API, retention), and:

- its trace (kind ``checkpoint``) holds the whole report::

    {"status": "ok" | "degraded",
     "checks": {"database": {"ok", "ms", "error"?}, "broker": {...},
                "workers": {"ok", "count", "names"?}, "stuck_runs": {"ok", "count", "run_ids"}}}

  The report a step gets is its tenant's: only that tenant's stuck runs, no worker names (a
  workflow of any tenant may call this callable; it must not learn about other tenants).

- the metrics ``orchestrator_health_check_ok{check}`` (1/0),
  ``orchestrator_health_stuck_runs`` and ``orchestrator_health_last_report_timestamp_seconds``
  are set (gauges, ``mostrecent`` across processes);
- the step fails (permanently, no retry) when a check fails, so the run shows up as failed.

Stuck: a step the sweeper should have moved long ago (queued longer than
``ORCHESTRATOR_REQUEUE_AFTER`` + ``ORCHESTRATOR_STUCK_AFTER``; lease expired, or retry due, more
than ``ORCHESTRATOR_STUCK_AFTER`` seconds ago) or a run active that long past its deadline.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone

from orchestrator_site.conf import conf

log = logging.getLogger("orchestrator.health")

SYSTEM_TEMPLATE_KEY = "system-health"
SYSTEM_TEMPLATE = """\
# Made by scheduler/health.py: the hourly health check, one python step.
key: system-health
name: Platform health check
description: >-
  Database, broker, workers and stuck runs; the report is the step's output and trace, and sets
  the orchestrator_health_* metrics. Started hourly by beat (scheduler.health_report).
category: system
steps:
  - id: check
    type: python
    params: {callable: scheduler.health.check}
    timeout: 60s
    retry: {max_attempts: 1}
"""
CHECKS = ("database", "broker", "workers", "stuck_runs")


def _gauge(name: str, documentation: str, labels: tuple[str, ...] = ()):
    """A gauge created once per process (an existing collector of that name is reused)."""
    from prometheus_client import REGISTRY, Gauge

    existing = getattr(REGISTRY, "_names_to_collectors", {}).get(name)
    if existing is not None:
        return existing
    return Gauge(name, documentation, list(labels), multiprocess_mode="mostrecent")


CHECK_OK = _gauge("orchestrator_health_check_ok", "1 when the health check passed at the last report.", ("check",))
STUCK_RUNS = _gauge("orchestrator_health_stuck_runs", "Runs with a stuck step at the last health report.")
LAST_REPORT = _gauge("orchestrator_health_last_report_timestamp_seconds", "Unix time of the last health report.")


def _timed(check) -> dict[str, Any]:
    started = time.monotonic()
    try:
        check()
    except Exception as exc:  # any failure is the finding, one line
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        return {"ok": False, "ms": round((time.monotonic() - started) * 1000, 1), "error": message}
    return {"ok": True, "ms": round((time.monotonic() - started) * 1000, 1)}


def check_workers(timeout: float | None = None) -> dict[str, Any]:
    """Celery workers answering a ping within ``timeout`` seconds (the embedded worker: itself)."""
    if conf.embedded:
        return {"ok": True, "count": 1, "names": ["embedded"]}
    from orchestrator_site.celery import app

    timeout = timeout if timeout is not None else max(1.0, float(conf.ping_timeout))
    try:
        replies = app.control.inspect(timeout=timeout).ping() or {}
    except Exception as exc:
        return {"ok": False, "count": 0, "names": [], "error": " ".join(str(exc).split())[:300]}
    names = sorted(replies)
    return {"ok": bool(names), "count": len(names), "names": names[:20]}


def find_stuck_runs(now=None, limit: int = 1000, tenant_id: str | None = None) -> list[str]:
    """Ids of runs with a step the sweeper should have moved long ago (see the module docstring).

    ``tenant_id``: only that tenant's runs; None: every tenant's (operators and metrics only,
    never a step's output). At most ``limit`` ids, sorted.
    """
    from runs.choices import RunStatus, StepStatus
    from runs.models import Run, Step

    now = now or timezone.now()
    runs = Run.objects.all() if tenant_id is None else Run.objects.filter(tenant_id=tenant_id)
    steps = Step.objects.all() if tenant_id is None else Step.objects.filter(run__tenant_id=tenant_id)
    after = timedelta(seconds=float(settings.ORCHESTRATOR_STUCK_AFTER))
    requeue = timedelta(seconds=float(settings.ORCHESTRATOR_REQUEUE_AFTER))
    ids: set[str] = set()
    for qs in (
        steps.filter(status=StepStatus.QUEUED, queued_at__lt=now - requeue - after),
        steps.filter(status=StepStatus.RUNNING, lease_expires_at__lt=now - after),
        steps.filter(status=StepStatus.RETRY_WAIT, next_attempt_at__lt=now - after),
    ):
        ids.update(str(pk) for pk in qs.values_list("run_id", flat=True)[:limit])
    late = runs.filter(status__in=[RunStatus.PENDING, RunStatus.RUNNING], deadline__lt=now - after)
    ids.update(str(pk) for pk in late.values_list("pk", flat=True)[:limit])
    return sorted(ids)[:limit]


def collect(tenant_id: str | None = None) -> dict[str, Any]:
    """Run every check and return the report (shape in the module docstring). Never raises.

    ``tenant_id``: the stuck runs counted and listed are that tenant's only (what a step may
    see); None: every tenant's (the operator's view).
    """
    from orchestrator_site.health import check_broker, check_database

    stuck = find_stuck_runs(tenant_id=tenant_id)
    workers = check_workers()
    if tenant_id is not None:
        workers.pop("names", None)  # host names of the deployment are not a tenant's business
    checks = {
        "database": _timed(check_database),
        "broker": _timed(check_broker),
        "workers": workers,
        "stuck_runs": {"ok": not stuck, "count": len(stuck), "run_ids": stuck[:10]},
    }
    status = "ok" if all(c["ok"] for c in checks.values()) else "degraded"
    return {"status": status, "checked_at": timezone.now().isoformat(), "checks": checks}


def record_metrics(report: dict[str, Any], stuck_everywhere: int | None = None) -> None:
    """Set the orchestrator_health_* gauges from a report. Never raises.

    ``stuck_everywhere``: the deployment-wide count of stuck runs when the report is one
    tenant's (the gauges are the operator's and cover every tenant).
    """
    try:
        stuck = report["checks"]["stuck_runs"]["count"] if stuck_everywhere is None else stuck_everywhere
        for name in CHECKS:
            ok = report["checks"].get(name, {}).get("ok") if name != "stuck_runs" else not stuck
            CHECK_OK.labels(check=name).set(1 if ok else 0)
        STUCK_RUNS.set(stuck)
        LAST_REPORT.set(time.time())
    except Exception:  # pragma: no cover - a metric must never fail the report
        log.debug("health metrics failed", exc_info=True)


def check(ctx: Any = None) -> dict[str, Any]:
    """The ``python`` step of ``system-health``: collect, trace, set metrics, fail when degraded.

    A step sees only its own tenant (``ctx.tenant_id``): the stuck runs in its report are that
    tenant's, worker names are left out. The orchestrator_health_* gauges still count every
    tenant (they go to the operator's scrape, not to the step). ``ctx`` None: the operator's
    full report.
    """
    from agents.registry import StepError

    tenant_id = None if ctx is None else str(getattr(ctx, "tenant_id", "") or "")
    report = collect(tenant_id)
    record_metrics(report, None if tenant_id is None else len(find_stuck_runs()))
    failed = [name for name, result in report["checks"].items() if not result["ok"]]
    summary = f"health {report['status']}" + (f": {', '.join(failed)} failed" if failed else "")
    if ctx is not None:
        ctx.trace("checkpoint", summary, report)
    if failed:
        log.warning(summary, extra={"report": report})
        raise StepError(summary, permanent=True, output=report)
    return report


def ensure_template(tenant_id: str = "default") -> Any:
    """The ``system-health`` template (saved or refreshed from :data:`SYSTEM_TEMPLATE`)."""
    from templates_app.services import save_template
    from templates_app.spec import load_spec

    spec = load_spec(SYSTEM_TEMPLATE, source="scheduler/health.py")
    return save_template(spec, SYSTEM_TEMPLATE, source_path="scheduler/health.py", tenant_id=tenant_id).template


def start_health_run(now=None) -> Any:
    """Start the health-check run of this minute (one, whichever beat sends it). Returns the Run."""
    from runs import engine
    from runs.choices import TriggerKind

    now = now or timezone.now()
    template = ensure_template()
    return engine.start_run(
        template.spec,
        {},
        template=template,
        trigger=TriggerKind.CRON,
        idempotency_key=f"health:{now:%Y-%m-%dT%H:%M}",
        correlation_id="system-health",
        priority=0,  # a backlog must not hide the report
    )
