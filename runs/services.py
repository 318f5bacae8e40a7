"""Operator verbs on runs, built on ``runs.engine``: create (idempotent), cancel (with revoke), retry,
rerun, requeue dead steps, dispatch (seed 004), and the progress summary the API and admin show.

The engine's rules hold here too: rows change through conditional UPDATEs or under
``select_for_update``; step messages are sent from ``transaction.on_commit`` (through
``engine.decide_pending``), so a worker never sees a row that is not committed.

Errors are :class:`ServiceError` subclasses with a one-line message and the HTTP status an API
should answer with: :class:`Invalid` (400), :class:`NotFound` (404), :class:`Conflict` (409).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import OperationalError, transaction
from django.db.models import Count, F
from django.utils import timezone

from templates_app.errors import WorkflowError, one_line

from . import engine
from .choices import (
    RUN_TERMINAL,
    STEP_TERMINAL,
    AttemptOutcome,
    RunStatus,
    StepStatus,
    TraceKind,
    TriggerKind,
)
from .models import Attempt, Run, Step, Trace

log = logging.getLogger("orchestrator.services")

#: Step statuses a retry starts again.
RETRYABLE = frozenset({StepStatus.FAILED, StepStatus.DEAD, StepStatus.CANCELLED})


class ServiceError(Exception):
    """A refused operation. ``str()`` is one line; ``status_code`` is the HTTP answer."""

    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class Invalid(ServiceError):
    status_code = 400


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


# --- creating runs ------------------------------------------------------------------------------


def request_fingerprint(data: Any) -> str:
    """sha256 (hex) of ``data`` as canonical JSON: the same request body gives the same fingerprint."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _replay(run: Run, fingerprint: str | None) -> Run:
    if fingerprint and run.request_hash and run.request_hash != fingerprint:
        raise Conflict(f"idempotency key {run.idempotency_key!r} was already used with a different request")
    return run


def create_run(
    *,
    tenant: str,
    template_key: str,
    version: int | None = None,
    variables: dict[str, Any] | None = None,
    correlation_id: str = "",
    priority: int = 5,
    idempotency_key: str | None = None,
    fingerprint: str | None = None,
    user_id: str = "",
    trigger: str = TriggerKind.API,
    metadata: dict[str, Any] | None = None,
) -> tuple[Run, bool]:
    """Start a run of the template ``template_key`` (``version`` or the latest active) in ``tenant``.

    Returns ``(run, created)``. With an ``idempotency_key`` already used in the tenant, the earlier
    run is returned with ``created=False`` when ``fingerprint`` (see :func:`request_fingerprint`)
    matches the one stored with it, and :class:`Conflict` is raised when it does not. Concurrent
    requests with one key create exactly one run: the loser of the insert race gets the winner's
    run (``engine.start_run`` catches the unique violation), whose fingerprint was written in the
    same transaction as the run itself.

    Raises:
        Invalid: unknown template or version, bad variables (the loader's one-line message).
        Conflict: the idempotency key belongs to a different request.
    """
    from templates_app.services import get_template

    if idempotency_key:
        existing = Run.objects.filter(tenant_id=tenant, idempotency_key=idempotency_key).first()
        if existing is not None:
            return _replay(existing, fingerprint), False
    try:
        template = get_template(template_key, version, tenant_id=tenant)
    except WorkflowError as exc:
        raise Invalid(str(exc))
    try:
        with transaction.atomic():
            run = engine.start_run(
                template.spec,
                variables or {},
                template=template,
                trigger=trigger,
                tenant_id=tenant,
                user_id=user_id[:200],
                correlation_id=correlation_id,
                idempotency_key=idempotency_key or None,
                priority=priority,
            )
            created = False
            if not run.request_hash:
                changes: dict[str, Any] = {"request_hash": fingerprint or ""}
                if metadata:
                    changes["metadata"] = metadata
                created = Run.objects.filter(pk=run.pk, request_hash="").update(**changes) == 1
                if created:
                    run.request_hash, run.metadata = changes["request_hash"], metadata or run.metadata
    except WorkflowError as exc:
        raise Invalid(str(exc))
    if not created:
        return _replay(run, fingerprint), False
    log.info(
        "run created",
        extra={"run_id": str(run.pk), "template": template.key, "version": template.version, "trigger": trigger},
    )
    return run, True


def dispatch(
    *,
    tenant: str,
    workflow_key: str,
    user_id: str = "",
    intent_id: str = "",
    payload: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    fingerprint: str | None = None,
) -> tuple[Run, bool]:
    """Seed 004's dispatch: start ``workflow_key`` for an intent event.

    The template's declared variables are filled from ``payload`` (same names), and a variable
    called ``payload``, ``user_id`` or ``intent_id`` receives that value; keys of the payload that
    are not variables are kept on the run (``metadata.payload``) rather than refused, as events
    carry more than one workflow needs. ``intent_id`` doubles as the correlation id.

    Raises Invalid, Conflict as :func:`create_run`.
    """
    from templates_app.services import get_template

    payload = payload or {}
    try:
        declared = get_template(workflow_key, tenant_id=tenant).spec.get("variables") or {}
    except WorkflowError as exc:
        raise Invalid(str(exc))
    variables = {k: v for k, v in payload.items() if k in declared and "expr" not in declared[k]}
    for name, value in (("payload", payload), ("user_id", user_id), ("intent_id", intent_id)):
        if name in declared and "expr" not in declared[name] and value not in (None, ""):
            variables[name] = value
    return create_run(
        tenant=tenant,
        template_key=workflow_key,
        variables=variables,
        correlation_id=intent_id,
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
        user_id=user_id,
        trigger=TriggerKind.EVENT,
        metadata={"intent_id": intent_id or None, "payload": payload},
    )


def rerun(run: Run, *, user_id: str = "") -> Run:
    """A new run from scratch with the same frozen spec, inputs, tenant, correlation id and priority.

    The new run's ``rerun_of`` points at ``run``. Raises Invalid when the inputs no longer validate.
    """
    declared = run.spec.get("variables") or {}
    inputs = {k: v for k, v in (run.inputs or {}).items() if k in declared and "expr" not in declared[k]}
    try:
        with transaction.atomic():
            new = engine.start_run(
                run.spec,
                inputs,
                template=run.template,
                trigger=TriggerKind.RETRY,
                tenant_id=run.tenant_id,
                user_id=(user_id or run.user_id)[:200],
                correlation_id=run.correlation_id,
                priority=run.priority,
            )
            Run.objects.filter(pk=new.pk).update(rerun_of=run, metadata=run.metadata or {})
            new.rerun_of = run
            Trace.objects.create(run=new, kind=TraceKind.STATE, message=f"rerun of run {run.pk}")
    except WorkflowError as exc:
        raise Invalid(str(exc))
    log.info("run rerun", extra={"run_id": str(new.pk), "rerun_of": str(run.pk), "tenant": run.tenant_id})
    return new


def trigger_again(run: Run, *, user_id: str = "") -> Run:
    """A new run of the template's latest active version with ``run``'s inputs, correlation id and
    priority (``rerun`` keeps the old run's frozen spec instead). Raises Invalid when the template
    is gone or the inputs no longer validate."""
    declared = run.spec.get("variables") or {}
    inputs = {k: v for k, v in (run.inputs or {}).items() if k in declared and "expr" not in declared[k]}
    new, _created = create_run(
        tenant=run.tenant_id,
        template_key=run.template_key,
        variables=inputs,
        correlation_id=run.correlation_id,
        priority=run.priority,
        user_id=user_id or run.user_id,
        trigger=TriggerKind.MANUAL,
    )
    return new


# --- cancelling -----------------------------------------------------------------------------------


def cancel(run: Run, *, reason: str = "cancelled by user") -> Run:
    """Cancel an active run: pending and queued steps become ``cancelled`` and the Celery tasks of
    running steps are revoked (the worker process running them is terminated; their late results
    would be refused anyway).

    Returns the run re-read. Raises Conflict when the run is already finished.
    """
    started = timezone.now()
    if not engine.cancel_run(run.pk, reason):
        run.refresh_from_db(fields=["status"])
        raise Conflict(f"run is already {run.status}")
    # Attempts the cancel just closed: running ones, including any claimed while we cancelled.
    task_ids = list(
        Attempt.objects.filter(run_id=run.pk, outcome=AttemptOutcome.FAILED, error=reason, finished_at__gte=started)
        .exclude(task_id="")
        .values_list("task_id", flat=True)
    )
    if task_ids:
        transaction.on_commit(lambda: revoke_tasks(task_ids))
    log.info("run cancelled", extra={"run_id": str(run.pk), "tenant": run.tenant_id, "revoked": len(task_ids)})
    run.refresh_from_db()
    return run


def revoke_tasks(task_ids: list[str]) -> None:
    """Revoke Celery tasks and terminate the worker processes running them (prefork pools).

    A broadcast: every worker drops these ids. With the embedded thread pool nothing can be
    terminated; the tasks are only revoked. Never raises (a broker hiccup leaves the refusal of
    the late result as the safety net).
    """
    from orchestrator_site.celery import app

    try:
        app.control.revoke(task_ids, terminate=not settings.ORCHESTRATOR_EMBEDDED, signal="SIGTERM")
    except Exception:
        log.warning("could not revoke %d tasks; their late results will be refused", len(task_ids), exc_info=True)


# --- retrying -------------------------------------------------------------------------------------


@dataclass
class RetryResult:
    """What a retry reset: ``steps`` retried (ids), ``downstream`` reset because they depend on them."""

    run: Run
    steps: list[str]
    downstream: list[str]


def retry(run: Run, *, step_ids: Iterable[str] | None = None, reason: str = "retried by user") -> RetryResult:
    """Run failed, dead and cancelled steps again, and everything downstream of them; keep the rest.

    Without ``step_ids`` every failed/dead/cancelled step of the run is retried; with them, only
    those (top-level ids, or map children such as ``fetch[3]``). A map step whose items partly
    failed retries only those items. Each retried step gets its full number of attempts again
    (``max_attempts`` is raised by the original limit, attempt numbers go on: Airflow's "clear").
    The run becomes ``running`` again (deadline renewed).

    Works on a finished run and on a running one (e.g. requeueing a dead step while other branches
    still run). Raises Conflict when nothing can be retried, Invalid for an unknown or unfinished
    step id.
    """
    wanted = list(dict.fromkeys(step_ids)) if step_ids is not None else None
    for attempt in range(5):
        try:
            result = _retry_once(run.pk, wanted, reason)
            break
        except OperationalError as exc:  # a deadlock with a completion of the same run: try again
            if "deadlock" not in str(exc).lower() or attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))
    log.info(
        "run retried",
        extra={"run_id": str(run.pk), "tenant": run.tenant_id, "steps": result.steps, "downstream": result.downstream},
    )
    return result


def _base_attempts(step: Step) -> int:
    return max(1, int((step.spec.get("retry") or {}).get("max_attempts", 1)))


def _retry_once(run_pk: Any, wanted: list[str] | None, reason: str) -> RetryResult:
    now = timezone.now()
    with transaction.atomic():
        run = Run.objects.select_for_update().get(pk=run_pk)
        # Rows locked in id order, as the engine's decrements lock them.
        top = list(Step.objects.select_for_update().filter(run_id=run_pk, parent__isnull=True).order_by("id"))
        by_id = {s.step_id: s for s in top}
        by_pk = {s.pk: s for s in top}
        full: set[str] = set()
        partial: dict[str, list[Step]] = {}  # map parent id -> children to run again

        if wanted is None:
            seeds = [s for s in top if s.status in RETRYABLE]
            children: list[Step] = []
        else:
            seeds = [by_id[sid] for sid in wanted if sid in by_id]
            child_ids = [sid for sid in wanted if sid not in by_id]
            children = list(
                Step.objects.select_for_update().filter(run_id=run_pk, step_id__in=child_ids, parent__isnull=False)
            )
            unknown = set(child_ids) - {c.step_id for c in children}
            if unknown:
                raise Invalid(f"run has no step {sorted(unknown)[0]!r}")
            for step in [*seeds, *children]:
                if step.status not in RETRYABLE:
                    raise Invalid(f"step {step.step_id!r} is {step.status}: only failed, dead or cancelled steps retry")
        if not seeds and not children:
            raise Conflict(f"nothing to retry: run is {run.status} and no step failed, died or was cancelled")

        mapped = {s.pk for s in seeds if s.pending_children is not None}
        kids_of: dict[int, list[Step]] = {}
        if mapped:
            for child in Step.objects.select_for_update().filter(parent_id__in=mapped).order_by("id"):
                kids_of.setdefault(child.parent_id, []).append(child)
        for seed in seeds:
            failed_kids = [c for c in kids_of.get(seed.pk, []) if c.status in RETRYABLE]
            if failed_kids:
                partial[seed.step_id] = failed_kids
            else:
                full.add(seed.step_id)
        for child in children:
            kids = partial.setdefault(by_pk[child.parent_id].step_id, [])
            if all(k.pk != child.pk for k in kids):
                kids.append(child)

        # Everything downstream runs again: its inputs may change.
        downstream: list[str] = []
        queue = deque(full | set(partial))
        seen = set(queue)
        while queue:
            for dependent in by_id[queue.popleft()].dependents:
                if dependent not in seen:
                    seen.add(dependent)
                    downstream.append(dependent)
                    queue.append(dependent)
        full |= set(downstream)
        for step_id in list(partial):
            if step_id in full:
                del partial[step_id]  # a parent that is itself reset expands afresh

        resetting = full | set(partial)
        removed = 0
        if full:
            # A reset map step expands afresh; its old items go, their traces stay (unlinked).
            old_items = Step.objects.filter(parent__in=[by_id[s].pk for s in full])
            Trace.objects.filter(step__in=old_items).update(step=None)
            removed = old_items.count()
            if removed:
                Attempt.objects.filter(step__in=old_items).delete()
                old_items.delete()
        for step_id in sorted(full, key=lambda s: by_id[s].pk):
            step = by_id[step_id]
            pending = sum(1 for dep in step.depends_on if dep in resetting or by_id[dep].status not in STEP_TERMINAL)
            Step.objects.filter(pk=step.pk).update(
                status=StepStatus.PENDING,
                pending_deps=pending,
                pending_children=None,
                max_attempts=step.attempts + _base_attempts(step),
                next_attempt_at=None,
                lease_expires_at=None,
                lease_token=None,
                worker="",
                input=None,
                output=None,
                error="",
                queued_at=None,
                started_at=None,
                finished_at=None,
            )
        requeue: list[int] = []
        for step_id, kids in partial.items():
            for child in kids:
                Step.objects.filter(pk=child.pk).update(
                    status=StepStatus.QUEUED,
                    queued_at=now,
                    max_attempts=child.attempts + _base_attempts(child),
                    next_attempt_at=None,
                    lease_expires_at=None,
                    lease_token=None,
                    output=None,
                    error="",
                    started_at=None,
                    finished_at=None,
                )
                requeue.append(child.pk)
            parent = by_id[step_id]
            unfinished = Step.objects.filter(parent_id=parent.pk).exclude(status__in=STEP_TERMINAL).count()
            Step.objects.filter(pk=parent.pk).update(
                status=StepStatus.RUNNING, pending_children=unfinished, output=None, error="", finished_at=None
            )

        timeout = run.spec.get("timeout")
        run_changes: dict[str, Any] = {"status": RunStatus.RUNNING, "finished_at": None, "error": "", "outputs": None}
        if timeout:
            run_changes["deadline"] = now + timedelta(seconds=timeout)
        if removed:
            run_changes["steps_total"] = max(0, run.steps_total - removed)
        Run.objects.filter(pk=run_pk).update(**run_changes)
        for name, value in run_changes.items():
            setattr(run, name, value)
        retried = sorted(
            [s for s in full if s not in downstream] + [c.step_id for kids in partial.values() for c in kids]
        )
        message = f"run {reason}: {', '.join(retried)}"
        if downstream:
            message += f"; downstream reset: {', '.join(sorted(downstream))}"
        Trace.objects.create(run=run, kind=TraceKind.STATE, message=one_line(message))
        engine.decide_pending(run, enqueue=requeue)
        if timeout:
            transaction.on_commit(lambda: engine._schedule_deadline(run.pk, timeout))
    run.refresh_from_db()
    return RetryResult(run=run, steps=retried, downstream=sorted(downstream))


def requeue_dead(step_pks: Iterable[int]) -> int:
    """Retry the given dead-letter steps (and their downstream), grouped by run. Returns the steps requeued.

    Steps that are no longer dead are ignored (someone else requeued them).
    """
    by_run: dict[Any, list[str]] = {}
    for run_id, step_id in Step.objects.filter(pk__in=list(step_pks), status=StepStatus.DEAD).values_list(
        "run_id", "step_id"
    ):
        by_run.setdefault(run_id, []).append(step_id)
    count = 0
    for run_id, step_ids in by_run.items():
        run = Run.objects.filter(pk=run_id).first()
        if run is None:
            continue
        try:
            count += len(retry(run, step_ids=step_ids, reason="requeued from the dead letters").steps)
        except ServiceError:
            continue
    return count


# --- reading ----------------------------------------------------------------------------------------


def progress(run: Run) -> dict[str, Any]:
    """Counts and progress of ``run`` over all its step rows (map children included). One query.

    Returns ``{"counts": {status: n}, "total": int, "done": int, "percent": int 0-100}``; a
    finished run that succeeded is 100.
    """
    counts = {
        row["status"]: row["n"]
        for row in Step.objects.filter(run_id=run.pk).values("status").annotate(n=Count("id")).order_by()
    }
    total = sum(counts.values())
    done = sum(n for status, n in counts.items() if status in STEP_TERMINAL)
    percent = 100 if run.status == RunStatus.SUCCEEDED else (int(done * 100 / total) if total else 0)
    return {"counts": counts, "total": total, "done": done, "percent": percent}


def current_step(steps: Iterable[Step]) -> Step | None:
    """The step a person would call "current": the first running one, else the first queued or waiting."""
    steps = list(steps)
    for wanted in ((StepStatus.RUNNING,), (StepStatus.QUEUED, StepStatus.RETRY_WAIT)):
        for step in steps:
            if step.status in wanted:
                return step
    return None


def latest_traces(run: Run, limit: int = 10) -> list[Trace]:
    """The ``limit`` newest traces of ``run``, newest first (index ``trace_run_latest_idx``)."""
    return list(Trace.objects.filter(run_id=run.pk).annotate(step_code=F("step__step_id")).order_by("-id")[:limit])


def is_finished(run: Run) -> bool:
    return run.status in RUN_TERMINAL
