"""External executors (seed 001): steps taken by workers outside Celery over HTTP.

An executor polls for steps of its queues (``poll``), keeps its lease alive (``heartbeat``) and
reports the outcome (``complete`` / ``fail``: seed 001's task_done / task_failed). Every rule is
a Celery worker's: the same conditional claim and lease (``state.claim``), one Attempt row per
try, a completion refused once the lease has passed or the run was cancelled, retries with
backoff then the dead letter (``attempts.fail``), and the sweeper recovers a step whose
executor died when its lease expires.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import Q

from templates_app.errors import ExpressionError, WorkflowError

from ..choices import RUN_ACTIVE, StepStatus
from ..models import Step
from . import attempts, state
from .context import build_context

#: Most steps one poll hands out, and the longest lease an executor may ask for (seconds).
MAX_TASKS = 100
MAX_LEASE_SECONDS = 3600.0
MIN_LEASE_SECONDS = 1.0


class LeaseLost(Exception):
    """The step is no longer running under this lease (expired and recovered, or cancelled)."""


@dataclass
class Task:
    """A step handed to an executor: what it needs to do the work and report it."""

    step_pk: int
    lease_token: uuid.UUID
    lease_expires_at: Any
    run_id: Any
    step_id: str
    type: str
    queue: str
    params: Any
    attempt: int
    max_attempts: int
    idempotency_key: str
    timeout: float


def poll(
    *, tenant_id: str, queues: list[str], executor_id: str, max_tasks: int = 1, lease_seconds: float = 60.0
) -> list[Task]:
    """Claim up to ``max_tasks`` queued steps of ``queues`` in ``tenant_id``, most urgent run first.

    Each is claimed like a Celery message would claim it (conditional UPDATE, lease, Attempt row),
    the lease then set to ``lease_seconds`` from now (capped 1..3600 s); params are resolved
    (expressions evaluated). A step whose params do not resolve fails permanently and is not
    handed out. Returns the tasks claimed (empty when there is nothing to do).
    """
    max_tasks = max(1, min(MAX_TASKS, int(max_tasks)))
    lease = max(MIN_LEASE_SECONDS, min(MAX_LEASE_SECONDS, float(lease_seconds)))
    if not queues:
        return []
    candidates = list(
        Step.objects.filter(
            status=StepStatus.QUEUED,
            run__tenant_id=tenant_id,
            run__status__in=sorted(RUN_ACTIVE),
            spec__queue__in=list(queues),
        )
        # not a large map step (a Celery worker expands it): specs carry `for_each: null` otherwise
        .filter(Q(parent__isnull=False) | Q(spec__for_each=None) | Q(spec__for_each__isnull=True))
        .order_by("run__priority", "queued_at", "id")
        .values_list("pk", flat=True)[: max_tasks * 3]
    )
    tasks: list[Task] = []
    for pk in candidates:
        if len(tasks) >= max_tasks:
            break
        token = uuid.uuid4()
        claimed = state.claim(pk, token, state.now(), f"executor:{executor_id}"[:200], "", relaxed=True)
        if claimed is None:
            continue  # another executor took it first
        step, run, begun = claimed
        if not begun:  # the portable claim (SQLite) writes no Attempt row: begin does, as for a worker
            with transaction.atomic():
                batch = state.Batch()
                started = attempts.begin(step, run, token, state.now(), f"executor:{executor_id}", "", batch)
                batch.flush()
            if isinstance(started, str):
                continue  # the run ended meanwhile: the step was cancelled
        until = state.now() + timedelta(seconds=lease)
        state.extend_lease(step.pk, token, until)
        step.lease_expires_at = until
        try:
            from templates_app.expressions import limits, render

            with limits(max_seconds=5.0):
                params = render(step.spec.get("params", {}), build_context(run, step.spec.get("refs", []), step))
        except (ExpressionError, WorkflowError) as exc:
            from agents.registry import StepError

            attempts.fail(step, token, StepError(str(exc), permanent=True), resolved=None, duration_ms=0)
            continue
        tasks.append(
            Task(
                step_pk=step.pk,
                lease_token=token,
                lease_expires_at=until,
                run_id=run.pk,
                step_id=step.step_id,
                type=step.type,
                queue=step.spec.get("queue", ""),
                params=params,
                attempt=step.attempts,
                max_attempts=step.max_attempts,
                idempotency_key=step.idempotency_key,
                timeout=float(step.spec.get("timeout") or 0) or lease,
            )
        )
    return tasks


def _running(step_pk: int, token: uuid.UUID, tenant_id: str) -> Step:
    step = (
        Step.objects.select_related("run")
        .filter(pk=step_pk, run__tenant_id=tenant_id, status=StepStatus.RUNNING, lease_token=token)
        .first()
    )
    if step is None or step.lease_expires_at is None or step.lease_expires_at <= state.now():
        raise LeaseLost(f"step {step_pk}: not running under this lease (it expired, or the run was cancelled)")
    return step


def heartbeat(*, tenant_id: str, step_pk: int, token: uuid.UUID, lease_seconds: float = 60.0) -> Any:
    """Extend the lease of a step the executor holds to ``lease_seconds`` from now (capped).

    Returns the new expiry. Raises LeaseLost when the lease has passed or was taken over.
    """
    _running(step_pk, token, tenant_id)
    lease = max(MIN_LEASE_SECONDS, min(MAX_LEASE_SECONDS, float(lease_seconds)))
    until = state.now() + timedelta(seconds=lease)
    if not state.extend_lease(step_pk, token, until):
        raise LeaseLost(f"step {step_pk}: not running under this lease")
    return until


def complete(*, tenant_id: str, step_pk: int, token: uuid.UUID, output: Any, duration_ms: int = 0) -> str:
    """task_done: record the step's output. Returns "succeeded"; raises LeaseLost when refused
    (the lease passed: its step may already run elsewhere, exactly like a late Celery result)."""
    step = _running(step_pk, token, tenant_id)
    result, _ = attempts.complete(
        step, token, output=state.json_safe(output), resolved=step.input, duration_ms=max(0, int(duration_ms))
    )
    if result != "succeeded":
        raise LeaseLost(f"step {step_pk}: completion refused")
    return result


def fail(
    *, tenant_id: str, step_pk: int, token: uuid.UUID, error: str, retryable: bool = True, duration_ms: int = 0
) -> str:
    """task_failed: record a failed attempt. ``retryable`` False fails the step at once. Returns
    "retry", "dead" or "failed"; raises LeaseLost when refused."""
    from agents.registry import StepError

    step = _running(step_pk, token, tenant_id)
    result = attempts.fail(
        step,
        token,
        StepError(state.one_line(error or "failed", 2000), permanent=not retryable),
        resolved=step.input,
        duration_ms=max(0, int(duration_ms)),
    )
    if result == "refused":
        raise LeaseLost(f"step {step_pk}: failure refused")
    return result
