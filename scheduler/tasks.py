"""Thin Celery entry points of the scheduler: arguments are ids and small values."""

from __future__ import annotations

import logging

from celery import shared_task

log = logging.getLogger("orchestrator.scheduler")


@shared_task(name="scheduler.run_schedule", ignore_result=True)
def run_schedule_task(schedule_id: int, tick: str | None = None) -> str | None:
    """Start schedule ``schedule_id``'s run for ``tick`` (ISO 8601, set by beat); one run per tick."""
    from . import services, ticks

    when = None
    if tick:
        try:
            when = ticks.parse_tick(tick)
        except ValueError:
            log.warning("schedule %s: bad tick %r in the message; using the tick now", schedule_id, tick)
    run = services.fire_schedule(schedule_id, when)
    return str(run.pk) if run is not None else None


@shared_task(name="scheduler.health_report", ignore_result=True)
def health_report_task() -> str | None:
    """Start the hourly health-check run (database, broker, workers, stuck runs)."""
    from . import health

    run = health.start_health_run()
    return str(run.pk) if run is not None else None


@shared_task(name="scheduler.purge_runs", ignore_result=True)
def purge_runs_task() -> int:
    """Delete finished runs older than ORCHESTRATOR_RUN_RETENTION_DAYS."""
    from . import services

    return services.purge_runs()
