"""Thin Celery entry points: arguments are ids, bodies call ``runs.engine``."""

from __future__ import annotations

import os

from celery import shared_task
from celery.signals import task_prerun
from django.db import InterfaceError, OperationalError, connections

from orchestrator_site import logging as logctx

from . import engine, workers  # noqa: F401 - workers: heartbeat signal handlers


@task_prerun.connect
def _check_database_connections(**kwargs) -> None:
    """Before every task, drop database connections that are too old or have failed.

    Django does this around each web request; Celery's fixup would instead close every connection
    around every task (we keep them: CELERY_DB_REUSE_MAX). The per-request health check query
    (CONN_HEALTH_CHECKS) is skipped here, a round trip per step saved: a connection broken by a
    database restart fails its next query, and ``execute_step_task`` retries the message.
    """
    for conn in connections.all(initialized_only=True):
        conn.close_if_unusable_or_obsolete()
        conn.health_check_done = True


#: Seconds before retrying a message whose database was unreachable: 1, 2, 4 ... 30.
def _db_retry_delay(retries: int) -> float:
    return float(min(30, 2 ** min(retries, 5)))


@shared_task(
    name="runs.execute_step",
    bind=True,
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
def execute_step_task(self, step_pk: int, more: list[int] | None = None) -> str:
    """Claim and run step ``step_pk``, then the steps ``more`` of a batched message
    (runs/engine/broker.py ``batches``); a duplicate or late message finds nothing to claim.

    The database unreachable (restart, failover): the broken connection is dropped and the
    message retried later (Celery ``retry``: a new message, then this one is acked). Nothing is
    left half-written: the claim and each outcome are single transactions, and outcomes are
    retried in-process first (runs/engine/worker.py ``_outlasting_outages``). If the retry message is lost too,
    the sweeper re-sends the step.
    """
    # "<node>:<pool process pid>": the sweeper matches it against worker heartbeats and local pids
    worker = f"{self.request.hostname or 'worker'}:{os.getpid()}"
    try:
        with logctx.scope(task_id=self.request.id):  # the engine binds run, step, tenant, correlation id
            return engine.execute_step(step_pk, worker=worker, task_id=self.request.id or "", more=more or ())
    except (OperationalError, InterfaceError) as exc:
        connections.close_all()
        raise self.retry(exc=exc, countdown=_db_retry_delay(self.request.retries))


@shared_task(name="runs.sweep", ignore_result=True)
def sweep_task() -> dict[str, int]:
    """One recovery pass (beat runs it every ORCHESTRATOR_SWEEP_INTERVAL seconds).

    A database outage skips the pass (the next one comes an interval later) instead of failing
    with a traceback in the worker log.
    """
    try:
        return engine.sweep()
    except (OperationalError, InterfaceError):
        connections.close_all()
        return {}


@shared_task(name="runs.expire_run", ignore_result=True)
def expire_run_task(run_id: str) -> bool:
    """Time out run ``run_id`` if it is still active past its deadline."""
    return engine.expire_run(run_id)
