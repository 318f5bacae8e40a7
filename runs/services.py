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
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, F
from django.utils import timezone

from templates_app.errors import TemplateNotFound, WorkflowError, one_line

from . import engine
from .choices import (
    STEP_TERMINAL,
    AttemptOutcome,
    RunStatus,
    StepStatus,
    TraceKind,
    TriggerKind,
)
from .engine.lifecycle import RETRYABLE, RetryRefused, RetryResult  # noqa: F401 - RETRYABLE is API
from .models import Attempt, Run, Step, Trace

log = logging.getLogger("orchestrator.services")


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
    except TemplateNotFound as exc:
        raise NotFound(str(exc))
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
    except TemplateNotFound as exc:
        raise NotFound(str(exc))
    except WorkflowError as exc:
        raise Invalid(str(exc))
    if not created:
        return _replay(run, fingerprint), False
    log.info(
        "run created",
        extra={"run_id": str(run.pk), "template": template.key, "version": template.version, "trigger": trigger},
    )
    return run, True


#: Most runs one batch may start (``create_runs``, ``POST /api/v1/runs/batch``).
MAX_BATCH_RUNS = 1000


def create_runs(
    *,
    tenant: str,
    template_key: str,
    items: list[dict[str, Any]],
    version: int | None = None,
    user_id: str = "",
    trigger: str = TriggerKind.API,
) -> list[Run]:
    """Start many runs of one template in one transaction: the batch path.

    ``items``: per run ``{"variables", "correlation_id", "priority", "idempotency_key"}``. A key
    already used in the tenant returns its run (no fingerprint check: use ``create_run`` for
    replay-or-conflict semantics). At most ``MAX_BATCH_RUNS`` items.

    Raises:
        Invalid: unknown template, too many or no items, bad variables of any item (the message
            names the item); nothing is created then.
    """
    from templates_app.services import get_template

    if not items:
        raise Invalid("runs: give at least one run")
    if len(items) > MAX_BATCH_RUNS:
        raise Invalid(f"runs: {len(items)} runs, at most {MAX_BATCH_RUNS} per batch")
    try:
        template = get_template(template_key, version, tenant_id=tenant)
        runs = engine.start_runs(
            template.spec,
            [
                {
                    "inputs": item.get("variables") or {},
                    "correlation_id": item.get("correlation_id", ""),
                    "priority": item.get("priority", 5),
                    "idempotency_key": item.get("idempotency_key"),
                }
                for item in items
            ],
            template=template,
            trigger=trigger,
            tenant_id=tenant,
            user_id=user_id[:200],
        )
    except TemplateNotFound as exc:
        raise NotFound(str(exc))
    except WorkflowError as exc:
        raise Invalid(str(exc))
    log.info("runs created in a batch", extra={"template": template.key, "count": len(runs), "tenant": tenant})
    return runs


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
    except TemplateNotFound as exc:
        raise NotFound(str(exc))
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
                trigger=TriggerKind.RERUN,
                tenant_id=run.tenant_id,
                user_id=(user_id or run.user_id)[:200],
                correlation_id=run.correlation_id,
                priority=run.priority,
            )
            Run.objects.filter(pk=new.pk).update(rerun_of=run, metadata=run.metadata or {})
            new.rerun_of = run
            Trace.objects.create(run=new, kind=TraceKind.STATE, message=f"rerun of run {run.pk}")
    except TemplateNotFound as exc:
        raise NotFound(str(exc))
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
        Attempt.objects.filter(run_id=run.pk, outcome=AttemptOutcome.CANCELLED, error=reason, finished_at__gte=started)
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


def retry(
    run: Run,
    *,
    step_ids: Iterable[str] | None = None,
    reason: str = "retried by user",
    params: dict[str, dict[str, Any]] | None = None,
) -> RetryResult:
    """Run failed, dead and cancelled steps again, and everything downstream of them; keep the rest.

    Without ``step_ids`` every failed/dead/cancelled step of the run is retried; with them, only
    those (top-level ids, or map children such as ``fetch[3]``). A map step whose items partly
    failed retries only those items. Each retried step gets its full number of attempts again
    (``max_attempts`` is raised by the original limit, attempt numbers go on: Airflow's "clear").
    The run becomes ``running`` again (deadline renewed); ``engine.reset_for_retry`` does it.
    ``params`` ({step id: params}): run those steps with edited input (any finished step).

    Works on a finished run and on a running one (e.g. requeueing a dead step while other branches
    still run). Raises Conflict when nothing can be retried, Invalid for an unknown or unfinished
    step id.
    """
    wanted = list(dict.fromkeys(step_ids)) if step_ids is not None else None
    try:
        result = engine.reset_for_retry(run.pk, wanted, reason, params)
    except RetryRefused as exc:
        raise (Conflict if exc.conflict else Invalid)(str(exc)) from None
    log.info(
        "run retried",
        extra={"run_id": str(run.pk), "tenant": run.tenant_id, "steps": result.steps, "downstream": result.downstream},
    )
    return result


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
    return list(Trace.objects.filter(run_id=run.pk).annotate(step_code=F("step_row__step_id")).order_by("-id")[:limit])
