"""Thin Celery entry points: arguments are ids, bodies call ``runs.engine``."""

from __future__ import annotations

import os

from celery import shared_task

from . import engine


@shared_task(name="runs.execute_step", bind=True, ignore_result=True, acks_late=True, reject_on_worker_lost=True)
def execute_step_task(self, step_pk: int) -> str:
    """Claim and run step ``step_pk``; a duplicate or late message finds nothing to claim."""
    worker = f"{self.request.hostname or 'worker'}:{os.getpid()}"
    return engine.execute_step(step_pk, worker=worker)


@shared_task(name="runs.sweep", ignore_result=True)
def sweep_task() -> dict[str, int]:
    """One recovery pass (beat runs it every ORCHESTRATOR_SWEEP_INTERVAL seconds)."""
    return engine.sweep()


@shared_task(name="runs.expire_run", ignore_result=True)
def expire_run_task(run_id: str) -> bool:
    """Time out run ``run_id`` if it is still active past its deadline."""
    return engine.expire_run(run_id)
