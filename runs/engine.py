"""The engine: runs as rows, dependency counting in the database, Celery only delivers step ids.

A run's steps are rows. A step is decided (queued, skipped, expanded into map children, or, for a
condition, evaluated on the spot) when its ``pending_deps`` count reaches zero; the count is
decremented by one UPDATE per finished dependency inside the transaction that records the
completion, and newly queued steps are sent to Celery from ``transaction.on_commit``. Executing a
step claims it with a conditional UPDATE that sets a lease; one Attempt row is written per try; a
completion whose lease was taken over is refused. Failures retry with exponential backoff and
jitter, then the step is ``dead`` and what depends on it is skipped (unless its trigger rule says
otherwise). The sweeper (``sweep``) enqueues due retries, recovers expired leases and re-sends
queued steps whose message was lost, so a run resumes after any crash from its rows alone.

Public verbs: ``start_run``, ``execute_step``, ``sweep``, ``cancel_run``, ``expire_run``,
``enqueue_steps``, ``decide_pending`` (after ``runs.services`` resets rows for a retry),
``activate_run`` and ``wake_steps`` (flow control: ``agents.flowcontrol`` gates steps on rate
limits and concurrency slots and holds runs over a concurrent-run limit ``pending``).
Errors raised to callers: ``templates_app.errors.WorkflowError`` for bad inputs.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, InterfaceError, OperationalError, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from agents import flowcontrol
from orchestrator_site import logging as logctx
from templates_app.errors import ExpressionError, WorkflowError

from . import hotpath, metrics
from .choices import (
    RUN_TERMINAL,
    STEP_FAILED,
    STEP_TERMINAL,
    AttemptOutcome,
    RunStatus,
    StepStatus,
    TraceKind,
    TriggerKind,
)
from .models import Attempt, Run, Step, Trace

log = logging.getLogger("orchestrator.engine")

#: Step types the engine handles itself, without a worker round trip.
INLINE_TYPES = frozenset({"condition"})
#: Step types expanded into child rows (like a for_each) when they become ready.
GROUP_TYPES = frozenset({"parallel"})


# --- helpers --------------------------------------------------------------------------------


def _now() -> datetime:
    return timezone.now()


def _one_line(text: str, limit: int = 2000) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class _Batch:
    """What one transaction collects: steps to mark queued, traces to insert, step ids to enqueue
    on commit. Written by ``flush`` in one UPDATE and one INSERT (runs.hotpath)."""

    traces: list[Trace] = field(default_factory=list)
    enqueue: list[int] = field(default_factory=list)
    queue: list[int] = field(default_factory=list)
    decided: list[Step] = field(default_factory=list)  # the queued steps, candidates to run inline

    def trace(
        self,
        run_id: Any,
        kind: str,
        message: str,
        *,
        step_pk: int | None = None,
        attempt: int | None = None,
        data: Any = None,
    ) -> None:
        self.traces.append(
            Trace(run_id=run_id, step_id=step_pk, attempt=attempt, kind=kind, message=message, data=data)
        )

    def flush(self, priority: int | None = None) -> None:
        """Mark the decided steps queued, insert the traces now, schedule the enqueue for after commit."""
        if self.queue or self.traces:
            pks, traces, self.queue, self.traces = self.queue, self.traces, [], []
            hotpath.write_batch(pks, _now(), traces)
        if self.enqueue:
            ids, self.enqueue = self.enqueue, []
            transaction.on_commit(lambda: enqueue_steps(ids, priority=priority))


def backoff_delay(retry: dict[str, Any], attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    ``retry``: {"backoff": "exponential" | "linear" | "fixed", "initial_delay": s, "max_delay": s,
    "jitter": bool}. Exponential is ``initial * 2**(attempt-1)``, linear ``initial * attempt``,
    both capped at ``max_delay``. With jitter the delay is drawn uniformly from
    ``[d/2, d]`` ("equal jitter", AWS Architecture Blog, "Exponential Backoff And Jitter", 2015),
    which spreads retries of many steps while keeping a floor.
    """
    initial = float(retry.get("initial_delay", 1.0))
    cap = float(retry.get("max_delay", 60.0))
    kind = retry.get("backoff", "exponential")
    if kind == "fixed":
        delay = initial
    elif kind == "linear":
        delay = initial * attempt
    else:
        delay = initial * (2 ** (attempt - 1))
    delay = min(delay, cap)
    if retry.get("jitter", True) and delay > 0:
        delay = (rng or random).uniform(delay / 2, delay)
    return delay


def _json_safe(value: Any) -> Any:
    """Round-trip through JSON so what we store is exactly what a reader gets back."""
    return json.loads(json.dumps(value, default=str))


# --- starting a run --------------------------------------------------------------------------


def start_run(
    spec: dict[str, Any],
    inputs: dict[str, Any] | None = None,
    *,
    template: Any = None,
    trigger: str = TriggerKind.MANUAL,
    tenant_id: str = "default",
    user_id: str = "",
    correlation_id: str = "",
    idempotency_key: str | None = None,
    priority: int = 5,
) -> Run:
    """Create a run with one row per step and queue its root steps (after commit).

    ``spec`` is a normalized spec (docs/spec-contract.md); ``inputs`` raw variable values (CLI
    strings are coerced). With an ``idempotency_key`` already used in the tenant, the existing run
    is returned and nothing is created. Raises ``WorkflowError`` (one line) on bad inputs; nothing
    is saved then.
    """
    from templates_app.spec import validate_inputs

    values = validate_inputs(spec, inputs or {})
    if idempotency_key:
        existing = Run.objects.filter(tenant_id=tenant_id, idempotency_key=idempotency_key).first()
        if existing is not None:
            return existing
    now = _now()
    run_timeout = spec.get("timeout")
    try:
        with transaction.atomic():
            run = Run.objects.create(
                template=template,
                template_key=spec["key"],
                template_version=getattr(template, "version", None),
                spec=spec,
                inputs=values,
                status=RunStatus.RUNNING,
                tenant_id=tenant_id,
                user_id=user_id,
                correlation_id=correlation_id,
                idempotency_key=idempotency_key or None,
                priority=priority,
                trigger=trigger,
                steps_total=len(spec["steps"]),
                started_at=now,
                deadline=now + timedelta(seconds=run_timeout) if run_timeout else None,
            )
            dependents: dict[str, list[str]] = {s["id"]: [] for s in spec["steps"]}
            for s in spec["steps"]:
                for dep in s.get("depends_on", []):
                    dependents[dep].append(s["id"])
            steps = [
                Step(
                    run=run,
                    step_id=s["id"],
                    type=s["type"],
                    spec=s,
                    depends_on=list(s.get("depends_on", [])),
                    dependents=dependents[s["id"]],
                    pending_deps=len(s.get("depends_on", [])),
                    max_attempts=max(1, int(s.get("retry", {}).get("max_attempts", 1))),
                )
                for s in spec["steps"]
            ]
            Step.objects.bulk_create(steps)
            batch = _Batch()
            # concurrent-run limits (template, tenant): over one, the run waits `pending` until
            # agents.concurrency admits it through activate_run
            waiting = flowcontrol.admit_run(run)
            if waiting is not None:
                Run.objects.filter(pk=run.pk).update(status=RunStatus.PENDING, started_at=None, deadline=None)
                run.status, run.started_at, run.deadline = RunStatus.PENDING, None, None
                batch.trace(run.pk, TraceKind.STATE, f"run waiting for a slot ({trigger}): {waiting}")
                batch.flush()
            else:
                batch.trace(run.pk, TraceKind.STATE, f"run started ({trigger})", data={"inputs_keys": sorted(values)})
                # bulk_create set the primary keys (PostgreSQL RETURNING): no need to read the roots back
                roots = [s for s in steps if s.pending_deps == 0]
                if any(s.pk is None for s in roots):
                    roots = list(Step.objects.filter(run=run, pending_deps=0).order_by("id"))
                _Cascade(run, batch).decide(roots)
                batch.flush(priority=run.priority)
    except IntegrityError:
        if idempotency_key:
            # A concurrent request with the same key won the race: return its run.
            return Run.objects.get(tenant_id=tenant_id, idempotency_key=idempotency_key)
        raise
    if run.deadline:
        transaction.on_commit(lambda: _schedule_deadline(run.pk, run_timeout))
    return run


def activate_run(run_id: Any) -> bool:
    """Start a run that ``start_run`` left ``pending`` (a concurrent-run limit was full).

    Sets it running (started now, deadline from now) and queues its root steps after commit.
    Returns False when the run is gone or no longer pending (cancelled meanwhile). Called by
    ``agents.concurrency.promote`` under the limits' locks.
    """
    now = _now()
    with transaction.atomic():
        run = Run.objects.select_for_update().filter(pk=run_id, status=RunStatus.PENDING).first()
        if run is None:
            return False
        run_timeout = run.spec.get("timeout")
        run.status, run.started_at = RunStatus.RUNNING, now
        run.deadline = now + timedelta(seconds=run_timeout) if run_timeout else None
        Run.objects.filter(pk=run.pk).update(status=run.status, started_at=now, deadline=run.deadline)
        Trace.objects.create(run_id=run.pk, kind=TraceKind.STATE, message="run started: a concurrency slot is free")
        decide_pending(run)
        if run.deadline:
            transaction.on_commit(lambda: _schedule_deadline(run.pk, run_timeout))
    return True


def wake_steps(step_pks: list[int], *, priority: int | None = None) -> None:
    """Make waiting steps (``retry_wait``) due now and send them: a concurrency slot they waited for
    was released. Steps no longer waiting are left alone; a spare message finds nothing to claim."""
    if not step_pks:
        return
    due = list(Step.objects.filter(pk__in=step_pks, status=StepStatus.RETRY_WAIT).values_list("pk", flat=True))
    if due:
        Step.objects.filter(pk__in=due, status=StepStatus.RETRY_WAIT).update(next_attempt_at=_now())
        enqueue_steps(due, priority=priority)


def _schedule_deadline(run_id: Any, seconds: float) -> None:
    from .tasks import expire_run_task

    try:
        expire_run_task.apply_async(args=[str(run_id)], countdown=seconds + 0.5)
    except Exception:  # the sweeper enforces deadlines too; a broker hiccup here loses nothing
        log.warning("could not schedule the deadline check of run %s; the sweeper will", run_id)


# --- deciding and finishing steps (inside a transaction) -------------------------------------


class _Cascade:
    """Propagates finished steps through the DAG inside the current transaction.

    Every step that reaches a terminal state is passed to ``finished``; it decrements its
    dependents' counters (and its map parent's), decides the dependents that reach zero, which
    may finish more steps (skips, conditions, empty maps), and so on until nothing changes.
    """

    def __init__(self, run: Run, batch: _Batch):
        self.run = run
        self.batch = batch
        self.leaf_finished = False
        # {step_id: {"status", "output"}} of top-level steps finished in this transaction: their
        # dependents' trigger rules need not read them back (a chain link reads nothing)
        self.known: dict[str, dict[str, Any]] = {}

    # context for expressions ------------------------------------------------------------
    def context(self, refs: Iterable[str], step: Step | None = None) -> dict[str, Any]:
        return build_context(self.run, refs, step)

    # deciding ---------------------------------------------------------------------------
    def decide(self, steps: list[Step]) -> None:
        """Decide each ready step (pending_deps == 0, status pending): skip, run inline, expand, queue."""
        finished: list[Step] = []
        for step in steps:
            if step.status != StepStatus.PENDING:
                continue
            outcome = self._decide_one(step)
            if outcome is not None:
                finished.append(outcome)
        if finished:
            self.finished(finished)

    def _decide_one(self, step: Step) -> Step | None:
        spec = step.spec
        reason = self._trigger_rule_blocks(step)
        if reason:
            return self._finish_inline(step, StepStatus.SKIPPED, error=reason, message=f"skipped: {reason}")
        try:
            when = spec.get("when")
            if when is not None and step.parent_id is None:
                from templates_app.expressions import evaluate

                if not evaluate(when, self.context(spec.get("refs", []), step)):
                    return self._finish_inline(
                        step, StepStatus.SKIPPED, error="when: condition is false", message="skipped: `when` is false"
                    )
            if step.parent_id is None and (spec.get("for_each") is not None or step.type in GROUP_TYPES):
                return self._expand(step)
            if step.type in INLINE_TYPES:
                from templates_app.expressions import evaluate

                result = bool(evaluate(spec.get("condition"), self.context(spec.get("refs", []), step)))
                return self._finish_inline(
                    step,
                    StepStatus.SUCCEEDED,
                    output={"result": result},
                    message=f"condition is {str(result).lower()}",
                    kind=TraceKind.DECISION,
                )
        except (ExpressionError, WorkflowError) as exc:
            return self._finish_inline(
                step, StepStatus.FAILED, error=str(exc), message=f"failed: {exc}", kind=TraceKind.ERROR
            )
        step.status = StepStatus.QUEUED
        self.batch.queue.append(step.pk)  # one UPDATE for all the steps decided in this transaction
        self.batch.decided.append(step)
        self.batch.enqueue.append(step.pk)
        self.batch.trace(self.run.pk, TraceKind.STATE, f"step '{step.step_id}' queued", step_pk=step.pk)
        return None

    def _trigger_rule_blocks(self, step: Step) -> str | None:
        """Why the step may not run, or None when it may.

        An untaken condition branch always skips. Otherwise the trigger rule decides (Airflow's
        names): ``all_success`` needs every upstream succeeded; ``none_failed`` needs no upstream
        failed, dead or cancelled and at least one succeeded (skipped ones are fine);
        ``all_done`` only needs them finished.
        """
        if not step.depends_on:
            return None
        rule = step.spec.get("trigger_rule", "all_success")
        parents = {dep: self.known[dep] for dep in step.depends_on if dep in self.known}
        missing = [dep for dep in step.depends_on if dep not in parents]
        if missing:
            parents.update(
                (row["step_id"], row)
                for row in Step.objects.filter(run_id=step.run_id, parent__isnull=True, step_id__in=missing).values(
                    "step_id", "status", "output"
                )
            )
        branch = step.spec.get("branch_of") or {}
        succeeded = 0
        failed_reason = other_reason = None
        for dep in step.depends_on:
            row = parents.get(dep) or {"status": StepStatus.SKIPPED, "output": None}
            status = row["status"]
            if status == StepStatus.SUCCEEDED and branch.get("step") == dep:
                result = bool((row["output"] or {}).get("result"))
                if result != bool(branch.get("when")):
                    return f"branch not taken ('{dep}' is {str(result).lower()})"
            if status == StepStatus.SUCCEEDED:
                succeeded += 1
            elif status in STEP_FAILED or status == StepStatus.CANCELLED:
                failed_reason = failed_reason or f"upstream '{dep}' is {status}"
            else:
                other_reason = other_reason or f"upstream '{dep}' is {status}"
        if rule == "all_done":
            return None
        if rule == "none_failed":
            if failed_reason:
                return failed_reason
            return None if succeeded else "no upstream step succeeded"
        return None if succeeded == len(step.depends_on) else (failed_reason or other_reason)

    def _finish_inline(
        self, step: Step, status: str, *, output: Any = None, error: str = "", message: str, kind: str = TraceKind.STATE
    ) -> Step | None:
        now = _now()
        updated = Step.objects.filter(pk=step.pk, status=step.status).update(
            status=status, output=output, error=error, finished_at=now, started_at=now
        )
        if not updated:
            return None
        step.status, step.output, step.error = status, output, error
        self.batch.trace(self.run.pk, kind, f"step '{step.step_id}' {message}", step_pk=step.pk)
        return step

    def _expand(self, step: Step) -> Step | None:
        """Insert one child row per for_each item or parallel branch; the parent waits on them."""
        spec = step.spec
        children_specs: list[tuple[dict[str, Any], Any]] = []
        if step.type in GROUP_TYPES:
            for branch in spec.get("params", {}).get("tasks", []):
                child = {**spec, **branch}
                child.pop("for_each", None)
                children_specs.append((child, None))
        else:
            from templates_app.expressions import render

            items = render(spec["for_each"], self.context(spec.get("refs", []), step))
            if not isinstance(items, list):
                raise ExpressionError(f"step '{step.step_id}': for_each must give a list, got {type(items).__name__}")
            child = {k: v for k, v in spec.items() if k != "for_each"}
            children_specs = [(child, item) for item in items]
        now = _now()
        if not children_specs:
            return self._finish_inline(step, StepStatus.SUCCEEDED, output=[], message="mapped over 0 items")
        children = [
            Step(
                run_id=step.run_id,
                step_id=f"{step.step_id}[{i}]",
                parent=step,
                map_index=i,
                type=child_spec["type"],
                spec=child_spec,
                item=_json_safe(item),
                status=StepStatus.QUEUED,
                queued_at=now,
                max_attempts=max(1, int(child_spec.get("retry", {}).get("max_attempts", 1))),
            )
            for i, (child_spec, item) in enumerate(children_specs)
        ]
        Step.objects.bulk_create(children, batch_size=1000)
        Step.objects.filter(pk=step.pk).update(
            status=StepStatus.RUNNING, pending_children=len(children), started_at=now
        )
        step.status = StepStatus.RUNNING
        Run.objects.filter(pk=self.run.pk).update(steps_total=F("steps_total") + len(children))
        child_ids = Step.objects.filter(parent=step).order_by("map_index").values_list("pk", flat=True)
        self.batch.enqueue.extend(child_ids)
        self.batch.trace(
            self.run.pk,
            TraceKind.DECISION,
            f"step '{step.step_id}' fanned out to {len(children)} children",
            step_pk=step.pk,
        )
        return None

    # finishing --------------------------------------------------------------------------
    def finished(self, steps: list[Step]) -> None:
        """Propagate steps that just reached a terminal state (already saved)."""
        queue = list(steps)
        while queue:
            step = queue.pop(0)
            if step.parent_id is not None:
                parent_done = self._child_finished(step)
                if parent_done is not None:
                    queue.append(parent_done)
                continue
            self.known[step.step_id] = {"step_id": step.step_id, "status": step.status, "output": step.output}
            if not step.dependents:
                self.leaf_finished = True
                continue
            # the dependents that reached zero, read by the decrement itself (runs.hotpath)
            for candidate in hotpath.decrement_dependents(step):
                if candidate.status == StepStatus.PENDING:
                    outcome = self._decide_one(candidate)
                    if outcome is not None:
                        queue.append(outcome)
        if self.leaf_finished:
            _maybe_finish_run(self.run, self.batch)

    def _child_finished(self, child: Step) -> Step | None:
        """Count a map child down on its parent; finish the parent when it was the last one."""
        remaining = _decrement_parent(child.parent_id)
        if remaining != 0:
            return None
        parent = Step.objects.get(pk=child.parent_id)
        if parent.status != StepStatus.RUNNING:
            return None
        rows = list(parent.children.order_by("map_index").values("status", "output", "error", "step_id"))
        failed = [r for r in rows if r["status"] != StepStatus.SUCCEEDED]
        now = _now()
        if failed:
            dead = any(r["status"] == StepStatus.DEAD for r in failed)
            status = StepStatus.DEAD if dead else StepStatus.FAILED
            first = failed[0]
            error = f"{len(failed)} of {len(rows)} items did not succeed; first: {first['step_id']} {first['status']}"
            if first["error"]:
                error += f": {first['error']}"
            output = None
        else:
            status, error, output = StepStatus.SUCCEEDED, "", [r["output"] for r in rows]
        Step.objects.filter(pk=parent.pk, status=StepStatus.RUNNING).update(
            status=status, output=output, error=_one_line(error), finished_at=now
        )
        parent.status, parent.output, parent.error = status, output, error
        self.batch.trace(
            self.run.pk,
            TraceKind.STATE,
            f"step '{parent.step_id}' {status} (joined {len(rows)} items)",
            step_pk=parent.pk,
        )
        return parent


def _decrement_parent(parent_pk: int) -> int:
    """Decrement a map parent's ``pending_children``; return the new count."""
    table = Step._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET pending_children = pending_children - 1 WHERE id = %s RETURNING pending_children",
            [parent_pk],
        )
        row = cursor.fetchone()
    return row[0] if row else -1


def _maybe_finish_run(run: Run, batch: _Batch) -> None:
    """Finish the run when no step is left unfinished. Locks the run row to serialize leaves."""
    locked = Run.objects.select_for_update().only("id", "status", "spec", "inputs", "started_at").get(pk=run.pk)
    if locked.status in RUN_TERMINAL:
        return
    if Step.objects.filter(run_id=run.pk).exclude(status__in=STEP_TERMINAL).exists():
        return
    rows = list(
        Step.objects.filter(run_id=run.pk, parent__isnull=True)
        .order_by("id")
        .values("step_id", "status", "error", "output", "dependents")
    )
    failed = [r for r in rows if r["status"] in STEP_FAILED or r["status"] == StepStatus.CANCELLED]
    now = _now()
    outputs: Any = None
    error = ""
    if failed:
        status = RunStatus.FAILED
        first = failed[0]
        error = _one_line(f"step '{first['step_id']}' {first['status']}: {first['error']}")
    else:
        status = RunStatus.SUCCEEDED
        try:
            outputs = _run_outputs(locked, rows)
        except (ExpressionError, WorkflowError) as exc:
            status, error = RunStatus.FAILED, _one_line(f"outputs: {exc}")
    if Run.objects.filter(pk=run.pk, status__in=[RunStatus.PENDING, RunStatus.RUNNING]).update(
        status=status, finished_at=now, outputs=_json_safe(outputs), error=error
    ):
        _on_run_finished(status, locked.started_at, now)
        flowcontrol.run_finished(run.tenant_id)  # admits a run waiting for its run slot
    batch.trace(run.pk, TraceKind.STATE, f"run {status}" + (f": {error}" if error else ""))


def _on_run_finished(status: str, started_at: datetime | None, now: datetime) -> None:
    """Count the finished run in the metrics once the transaction commits."""
    seconds = (now - started_at).total_seconds() if started_at else None
    transaction.on_commit(lambda: metrics.run_finished(status, seconds))


def _run_outputs(run: Run, rows: list[dict[str, Any]]) -> Any:
    declared = run.spec.get("outputs")
    if not declared:
        return {r["step_id"]: r["output"] for r in rows if not r["dependents"] and r["status"] == StepStatus.SUCCEEDED}
    from templates_app.expressions import render

    ctx = {
        "vars": run.inputs,
        "steps": {r["step_id"]: {"output": r["output"], "status": r["status"]} for r in rows},
        "run": {"id": str(run.pk)},
    }
    return render(declared, ctx)


def build_context(run: Run, refs: Iterable[str], step: Step | None = None) -> dict[str, Any]:
    """The expression context for a step: variables, referenced steps' outputs, loop item, run.

    Shape: {"vars": {...}, "steps": {id: {"output", "status"}}, "item", "index", "run": {...}}.
    Only the steps in ``refs`` are read (one query).
    """
    refs = list(refs)
    steps: dict[str, Any] = {}
    if refs:
        for row in Step.objects.filter(run_id=run.pk, parent__isnull=True, step_id__in=refs).values(
            "step_id", "status", "output"
        ):
            steps[row["step_id"]] = {"output": row["output"], "status": row["status"]}
    ctx: dict[str, Any] = {
        "vars": dict(run.inputs or {}),
        "steps": steps,
        "run": {"id": str(run.pk), "correlation_id": run.correlation_id, "tenant_id": run.tenant_id},
    }
    if step is not None:
        ctx["run"]["attempt"] = step.attempts
        if step.parent_id is not None:
            ctx["item"] = step.item
            ctx["index"] = step.map_index
            alias = step.spec.get("as") or "item"
            if alias != "item":
                ctx["vars"][alias] = step.item
    return ctx


# --- executing a step (the worker side) -------------------------------------------------------


@dataclass
class _Claim:
    """A step claimed under a lease whose Attempt row is written: what ``_run_claimed`` runs."""

    step: Step
    run: Run
    token: uuid.UUID
    now: datetime
    gate_error: str | None = None


def execute_step(step_pk: int, worker: str = "", task_id: str = "") -> str:
    """Claim, run and record one step. Returns what happened (for logs and tests).

    ``task_id`` (the Celery task's id) is kept on the Attempt so that cancelling the run can
    revoke the task.

    Inline continuation: when the step succeeds and makes dependents ready, the completion's
    transaction also claims one of them (same conditional claim, lease, Attempt row; its state
    goes queued -> running in that commit) and this call runs it next, without a broker round
    trip; the others are sent as messages. At most ``ORCHESTRATOR_INLINE_STEPS`` steps follow one
    message and none starts after ``ORCHESTRATOR_INLINE_SECONDS``, so a worker returns to the
    broker (and to more urgent messages) regularly. A step claimed inline whose worker dies is
    recovered like any other: by its lease. Profiled on bench W2 (a chain): this removes the
    broker hop and one transaction per link (docs/readme/reliability-performance.md).

    Returns one of "not-claimed" (already taken, finished or gone: a late duplicate message),
    "cancelled", "succeeded", "retry", "dead", "failed", "refused" (the lease was taken over
    while the handler ran; its result is discarded): the outcome of the message's own step.
    """
    now = _now()
    token = uuid.uuid4()
    # One statement, its own transaction: the conditional claim under a lease, the Attempt row
    # and the trace (runs.hotpath.claim_and_begin, which says why its commit need not wait for
    # the disk). Steps behind a flow-control gate, or of a run that ended, finish the job below.
    claimed = hotpath.claim_and_begin(
        step_pk,
        token,
        now,
        worker[:200],
        task_id,
        settings.ORCHESTRATOR_DEFAULT_STEP_TIMEOUT,
        settings.ORCHESTRATOR_LEASE_GRACE,
        relaxed=not connection.in_atomic_block,
    )
    if claimed is None:
        # A message redelivered after its pool process was killed (reject_on_worker_lost) finds
        # the step still running under the dead process: recover it now rather than at lease expiry.
        recover_dead_holders([step_pk])
        return "not-claimed"
    step, run, begun = claimed
    if begun:
        logctx.bind(run_id=run.pk, step_id=step.step_id, tenant=run.tenant_id, correlation_id=run.correlation_id)
        started: _Claim | str = _Claim(step, run, token, now)
    else:
        with transaction.atomic():
            batch = _Batch()
            started = _begin_attempt(step, run, token, now, worker, task_id, batch)
            batch.flush()
    if isinstance(started, str):
        return started
    budget_ends = time.monotonic() + settings.ORCHESTRATOR_INLINE_SECONDS
    followed = 0
    result, follow = _run_claimed(started, worker, task_id, settings.ORCHESTRATOR_INLINE_STEPS > 0)
    while follow is not None:
        followed += 1
        metrics.steps_sent(1)  # scheduled too, though continued inline instead of sent
        more = followed < settings.ORCHESTRATOR_INLINE_STEPS and time.monotonic() < budget_ends
        _, follow = _run_claimed(follow, worker, task_id, more)
    return result


def _begin_attempt(
    step: Step, run: Run, token: uuid.UUID, now: datetime, worker: str, task_id: str, batch: _Batch
) -> _Claim | str:
    """In the claim's transaction: check the run, pass the flow-control gate, write the Attempt.

    Returns the claim to run, or "cancelled" (the run ended: the step is cancelled, the attempt
    not counted) or "throttled" (no rate-limit token or concurrency slot: the step waits).
    """
    logctx.bind(run_id=run.pk, step_id=step.step_id, tenant=run.tenant_id, correlation_id=run.correlation_id)
    gate_error: str | None = None
    if run.status in RUN_TERMINAL:
        Step.objects.filter(pk=step.pk, lease_token=token).update(
            status=StepStatus.CANCELLED,
            finished_at=now,
            lease_token=None,
            lease_expires_at=None,
            error=f"run is {run.status}",
            attempts=F("attempts") - 1,
        )
        return "cancelled"
    if flowcontrol.gated(step.spec):
        # rate limit and concurrency slot (agents.flowcontrol): without a token or a slot the
        # step goes back to retry_wait for the exact wait, no attempt spent
        try:
            wait = flowcontrol.admit_step(step, run, token, step.lease_expires_at, _now())
        except flowcontrol.GateError as exc:
            gate_error = str(exc)  # recorded below as a permanent failure of this attempt
        else:
            if wait is not None:
                return _throttle(step, token, wait, batch)
        # admitted after waiting on the gate's locks: the attempt starts now, not at the claim
        now = _now()
        Step.objects.filter(pk=step.pk).update(started_at=now)
    hotpath.insert(
        [
            Attempt(
                step=step,
                run=run,
                number=step.attempts,
                worker=worker[:200],
                lease_token=token,
                started_at=now,
                task_id=task_id[:255],
            )
        ]
    )
    batch.trace(
        run.pk,
        TraceKind.STATE,
        f"step '{step.step_id}' running (attempt {step.attempts}/{step.max_attempts})",
        step_pk=step.pk,
        attempt=step.attempts,
        data={"worker": worker},
    )
    return _Claim(step, run, token, now, gate_error)


def _run_claimed(claim: _Claim, worker: str, task_id: str, follow: bool) -> tuple[str, _Claim | None]:
    """Run a claimed step's handler and record the outcome.

    Returns (outcome, the dependent claimed inline to run next or None); ``follow`` False: claim
    none (every ready dependent is sent as a message).
    """
    from agents.registry import StepContext, StepError, get_handler, run_with_timeout

    step, run, token, now = claim.step, claim.run, claim.token, claim.now
    timeout = float(step.spec.get("timeout") or settings.ORCHESTRATOR_DEFAULT_STEP_TIMEOUT)
    if run.deadline:
        timeout = min(timeout, max(0.0, (run.deadline - now).total_seconds()))
    started = time.monotonic()
    output: Any = None
    error: StepError | None = None
    resolved: Any = None
    try:
        from templates_app.expressions import render

        if claim.gate_error is not None:
            raise StepError(claim.gate_error, permanent=True)
        ctx_values = build_context(run, step.spec.get("refs", []), step)
        if settings.ORCHESTRATOR_RELEASE_DB_DURING_STEP and not connection.in_atomic_block:
            # a thread-pool worker with many threads in slow calls holds no idle connections
            connection.close()
        resolved = render(step.spec.get("params", {}), ctx_values)
        handler = get_handler(step.type)
        ctx = StepContext(
            run_id=str(run.pk),
            step_id=step.step_id,
            step_pk=step.pk,
            attempt=step.attempts,
            params=resolved,
            timeout=timeout,
            idempotency_key=step.idempotency_key,
            tenant_id=run.tenant_id,
            correlation_id=run.correlation_id,
            trace=_handler_tracer(run.pk, step.pk, step.attempts),
            deadline=started + timeout,
        )
        output = _json_safe(run_with_timeout(handler, ctx))
    except (ExpressionError, WorkflowError) as exc:
        error = StepError(str(exc), permanent=True)
    except StepError as exc:
        error = exc
    except Exception as exc:  # a handler bug must not lose the step: record it as a failed attempt
        log.exception("handler of step %s raised", step.pk)
        error = StepError(f"{type(exc).__name__}: {exc}")
    duration_ms = int((time.monotonic() - started) * 1000)
    next_claim: _Claim | None = None
    if error is None:
        result, next_claim = _outlasting_outages(
            step,
            token,
            lambda: _complete(
                step,
                token,
                output=output,
                resolved=resolved,
                duration_ms=duration_ms,
                follow=(worker, task_id) if follow else None,
            ),
        )
    else:
        result, _ = _outlasting_outages(
            step, token, lambda: (_fail(step, token, error, resolved=resolved, duration_ms=duration_ms), None)
        )
    metrics.attempt_finished(step.type, result, time.monotonic() - started)
    if result != "succeeded":
        log.info("step %s: %s", step.step_id, result, extra={"attempt": step.attempts, "duration_ms": duration_ms})
    return result, next_claim


def _throttle(step: Step, token: uuid.UUID, wait: Any, batch: _Batch) -> str:
    """Hand a just-claimed step back without running it: no rate-limit token or concurrency slot.

    Inside the claim transaction: the claim is undone (``attempts`` back to what it was, lease
    cleared), the step waits in ``retry_wait`` until ``wait.seconds`` from now and is re-sent
    then (a Celery countdown, or the sweeper for long waits). Returns "throttled".
    """
    delay = max(0.0, float(wait.seconds))
    Step.objects.filter(pk=step.pk, lease_token=token).update(
        status=StepStatus.RETRY_WAIT,
        attempts=F("attempts") - 1,
        lease_token=None,
        lease_expires_at=None,
        worker="",
        next_attempt_at=_now() + timedelta(seconds=delay),
        # as in _fail: set when a countdown message is sent, so the sweeper does not send another
        queued_at=_now() if delay <= settings.ORCHESTRATOR_COUNTDOWN_MAX else None,
    )
    if wait.trace:
        batch.trace(
            step.run_id,
            TraceKind.DECISION,
            f"step '{step.step_id}' waits {delay:.3f} s: {wait.reason}",
            step_pk=step.pk,
            data={"wait_s": round(delay, 3), "reason": wait.reason},
        )
    batch.flush()
    if delay <= settings.ORCHESTRATOR_COUNTDOWN_MAX:
        pk, priority = step.pk, step.run.priority
        transaction.on_commit(lambda: enqueue_steps([pk], countdown=delay, priority=priority))
    return "throttled"


#: What an attempt's recorded outcome says its step's outcome was (after an uncertain commit).
_OUTCOME_RESULT = {
    AttemptOutcome.SUCCEEDED: "succeeded",
    AttemptOutcome.FAILED: "failed",
    AttemptOutcome.TIMED_OUT: "failed",
    AttemptOutcome.REFUSED: "refused",
    AttemptOutcome.LOST: "refused",
}


def _outlasting_outages(step: Step, token: uuid.UUID, record: Any) -> tuple[str, _Claim | None]:
    """Run ``record`` (one transaction writing an attempt's outcome), retrying through a database
    outage until the attempt's lease expires.

    The handler's work is done; losing its outcome to a database restart would make the step run
    again when its lease expires. So a failed connection is dropped and the transaction retried
    (0.5 s, then doubling up to 5 s). If the error hit the COMMIT, the commit may have happened:
    before retrying, the Attempt row (found by lease token) tells; a closed attempt means it
    did. After the lease, the error propagates (the task retries; the sweeper recovers the step).
    """
    deadline = step.lease_expires_at
    delay = 0.5
    while True:
        try:
            return record()
        except (OperationalError, InterfaceError):
            if connection.in_atomic_block or deadline is None or _now() >= deadline:
                raise
            log.warning("database unavailable while recording step %s; retrying in %.1f s", step.pk, delay)
        while True:
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            try:
                connection.close()
                outcome = (
                    Attempt.objects.filter(step_id=step.pk, lease_token=token).values_list("outcome", flat=True).first()
                )
                break
            except (OperationalError, InterfaceError):
                if _now() >= deadline:
                    raise
        if outcome is not None and outcome != AttemptOutcome.RUNNING:
            return _OUTCOME_RESULT.get(outcome, "refused"), None  # the commit had gone through


def _handler_tracer(run_id: Any, step_pk: int, attempt: int):
    from agents.redaction import known_secrets, redact

    def trace(kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        secrets = known_secrets()
        Trace.objects.create(
            run_id=run_id,
            step_id=step_pk,
            attempt=attempt,
            kind=kind,
            message=redact(_one_line(message, 4000), secrets),
            data=_json_safe(redact(data, secrets)),
        )

    return trace


def _complete(
    step: Step,
    token: uuid.UUID,
    *,
    output: Any,
    resolved: Any,
    duration_ms: int,
    follow: tuple[str, str] | None = None,
) -> tuple[str, _Claim | None]:
    """Record a successful attempt and propagate it; with ``follow`` = (worker, task id), also
    claim one newly ready dependent to run inline (``_claim_inline``). Returns (outcome, claim)."""
    now = _now()
    with transaction.atomic():
        # step and attempt rows in one statement, only while the lease is ours (runs.hotpath)
        if not hotpath.close_success(
            step,
            token,
            output_json=json.dumps(output),
            input_json=json.dumps(resolved, default=str),
            now=now,
            duration_ms=duration_ms,
        ):
            return _refuse(step, token, duration_ms), None
        batch = _Batch()
        batch.trace(
            step.run_id,
            TraceKind.STATE,
            f"step '{step.step_id}' succeeded in {duration_ms} ms",
            step_pk=step.pk,
            attempt=step.attempts,
        )
        step.status, step.output = StepStatus.SUCCEEDED, output
        _Cascade(step.run, batch).finished([step])
        flowcontrol.release_step(step)  # its concurrency slot, if it holds one
        # a fresh time: the decrement may have waited for another completion of a shared
        # dependent, and the inline step must not look started before that one finished
        next_claim = _claim_inline(batch, _now(), *follow) if follow is not None else None
        batch.flush(priority=step.run.priority)
    return "succeeded", next_claim


def _claim_inline(batch: _Batch, now: datetime, worker: str, task_id: str) -> _Claim | None:
    """In a completion's transaction: claim one of the steps it queued, to run it next in-process.

    The step is taken out of the messages to send, marked queued with the others, then claimed
    like a message would claim it (``hotpath.claim_and_begin``), so the flushed completion commit also
    records the claim. Steps behind a flow-control gate are left to their messages.
    """
    candidate = next((s for s in batch.decided if not flowcontrol.gated(s.spec)), None)
    if candidate is None or candidate.pk not in batch.enqueue:
        return None
    batch.enqueue.remove(candidate.pk)
    pks, batch.queue = batch.queue, []
    hotpath.mark_queued(pks, now)
    token = uuid.uuid4()
    claimed = hotpath.claim_and_begin(
        candidate.pk,
        token,
        now,
        worker[:200],
        task_id,
        settings.ORCHESTRATOR_DEFAULT_STEP_TIMEOUT,
        settings.ORCHESTRATOR_LEASE_GRACE,
        relaxed=False,  # part of the completion's transaction, whose commit is flushed
    )
    if claimed is None:
        batch.enqueue.append(candidate.pk)  # not claimable after all: its message goes out
        return None
    step, run, begun = claimed
    started = _Claim(step, run, token, now) if begun else _begin_attempt(step, run, token, now, worker, task_id, batch)
    return started if isinstance(started, _Claim) else None


def _refuse(step: Step, token: uuid.UUID, duration_ms: int) -> str:
    now = _now()
    # an attempt the sweeper closed as lost becomes "refused": it did finish, too late to count
    Attempt.objects.filter(
        step=step, lease_token=token, outcome__in=[AttemptOutcome.RUNNING, AttemptOutcome.LOST]
    ).update(
        outcome=AttemptOutcome.REFUSED,
        finished_at=now,
        duration_ms=duration_ms,
        error="completion refused: the lease was taken over or the step was cancelled",
    )
    Trace.objects.create(
        run_id=step.run_id,
        step_id=step.pk,
        attempt=step.attempts,
        kind=TraceKind.ERROR,
        message=f"step '{step.step_id}' attempt {step.attempts}: late completion refused",
    )
    return "refused"


def _fail(
    step: Step, token: uuid.UUID, error: Any, *, resolved: Any, duration_ms: int, outcome: str | None = None
) -> str:
    """Record a failed attempt: retry_wait with backoff, or dead/failed when it was the last."""
    from agents.redaction import known_secrets, redact

    message = _one_line(redact(str(error), known_secrets()))
    permanent = bool(getattr(error, "permanent", False))
    retry_after = getattr(error, "retry_after", None)
    http_status = getattr(error, "http_status", None)
    is_timeout = type(error).__name__ == "StepTimeout"
    now = _now()
    retry = step.spec.get("retry", {})
    if permanent:
        status, result = StepStatus.FAILED, "failed"
    elif step.attempts >= step.max_attempts:
        status, result = StepStatus.DEAD, "dead"
    else:
        status, result = StepStatus.RETRY_WAIT, "retry"
    delay = 0.0
    if status == StepStatus.RETRY_WAIT:
        delay = backoff_delay(retry, step.attempts)
        if retry_after is not None:
            delay = max(delay, float(retry_after))
    with transaction.atomic():
        changes: dict[str, Any] = {
            "status": status,
            "error": message,
            "lease_token": None,
            "lease_expires_at": None,
            "input": _json_safe(resolved),
        }
        if status == StepStatus.RETRY_WAIT:
            changes["next_attempt_at"] = now + timedelta(seconds=delay)
            # queued_at set = a countdown message is on its way (the sweeper then re-sends the
            # retry only if that message looks lost); None = the sweeper sends it when due
            changes["queued_at"] = now if delay <= settings.ORCHESTRATOR_COUNTDOWN_MAX else None
        else:
            changes["finished_at"] = now
        if not Step.objects.filter(pk=step.pk, status=StepStatus.RUNNING, lease_token=token).update(**changes):
            return _refuse(step, token, duration_ms)
        Attempt.objects.filter(step=step, lease_token=token).update(
            outcome=outcome or (AttemptOutcome.TIMED_OUT if is_timeout else AttemptOutcome.FAILED),
            finished_at=now,
            duration_ms=duration_ms,
            error=message,
            http_status=http_status if isinstance(http_status, int) and 0 < http_status < 1000 else None,
        )
        batch = _Batch()
        label = {
            "retry": f"failed, retry in {delay:.2f} s",
            "dead": "dead (attempts exhausted)",
            "failed": "failed (permanent error, not retried)",
        }[result]
        batch.trace(
            step.run_id,
            TraceKind.ERROR,
            f"step '{step.step_id}' attempt {step.attempts} {label}: {message}",
            step_pk=step.pk,
            attempt=step.attempts,
            data={"delay_s": round(delay, 3), "http_status": http_status, "permanent": permanent},
        )
        if status == StepStatus.RETRY_WAIT:
            if delay <= settings.ORCHESTRATOR_COUNTDOWN_MAX:
                pk, priority = step.pk, step.run.priority
                transaction.on_commit(lambda: enqueue_steps([pk], countdown=delay, priority=priority))
        else:
            step.status, step.error = status, message
            _Cascade(step.run, batch).finished([step])
        flowcontrol.release_step(step)  # its concurrency slot, if it holds one
        batch.flush(priority=step.run.priority)
    return result


# --- enqueueing -----------------------------------------------------------------------------


def enqueue_steps(step_pks: list[int], *, countdown: float | None = None, priority: int | None = None) -> None:
    """Send one ``runs.execute_step`` message per step id, over one broker connection.

    Called from ``transaction.on_commit`` only, so a worker never sees an uncommitted row. A send
    that fails is logged and left to the sweeper, which re-sends steps queued for too long.
    ``priority`` is the run's (0 = most urgent .. 9): the broker serves a backlog in that order
    (settings: CELERY_BROKER_TRANSPORT_OPTIONS priority_steps); None = CELERY_TASK_DEFAULT_PRIORITY.
    """
    from .tasks import execute_step_task

    if not step_pks:
        return
    options: dict[str, Any] = {}
    if countdown:
        options["countdown"] = countdown
    if priority is not None:
        options["priority"] = max(0, min(9, int(priority)))
    try:
        with execute_step_task.app.producer_or_acquire() as producer:
            for pk in step_pks:
                execute_step_task.apply_async(args=[pk], producer=producer, **options)
        metrics.steps_sent(len(step_pks))
    except Exception:
        log.exception("enqueue of %d steps failed; the sweeper will re-send them", len(step_pks))


def decide_pending(run: Run, enqueue: Iterable[int] = ()) -> None:
    """Decide ``run``'s top-level pending steps whose dependencies are all done, inside the caller's
    transaction; also send the already-``queued`` steps ``enqueue`` (all after commit).

    For ``runs.services`` after it reset rows under lock (retry, requeue of dead steps): the same
    cascade as a completion, so skips, conditions and map expansion behave as on the first pass.
    """
    batch = _Batch()
    batch.enqueue.extend(enqueue)
    ready = list(
        Step.objects.filter(run_id=run.pk, parent__isnull=True, status=StepStatus.PENDING, pending_deps=0).order_by(
            "id"
        )
    )
    _Cascade(run, batch).decide(ready)
    batch.flush(priority=run.priority)


# --- the sweeper, cancellation, deadlines -------------------------------------------------------


def sweep(now: datetime | None = None) -> dict[str, int]:
    """One pass of recovery. Safe to run concurrently and as often as wanted.

    - due retries (``retry_wait`` past ``next_attempt_at``) are queued and sent: at once when no
      countdown message carries them (``queued_at`` empty), else only once that message looks
      lost (``ORCHESTRATOR_REQUEUE_AFTER`` past due), so a retry is not sent twice;
    - running steps whose lease expired (worker killed or stalled) count as a lost attempt and
      retry or die like any failure; so do, without waiting for the lease, running steps whose
      worker process on this host is gone (``recover_dead_holders``);
    - steps ``queued`` for longer than ``ORCHESTRATOR_REQUEUE_AFTER`` seconds are sent again
      (the broker lost the message; a duplicate is harmless because claiming is conditional);
    - active runs past their deadline are timed out;
    - concurrency slots whose lease expired are freed and runs waiting for a run slot admitted
      (``agents.flowcontrol.sweep``).

    Two sweepers at once never both act on a step: each takes the rows it moves under a row
    lock (``SELECT ... FOR UPDATE SKIP LOCKED``) and re-checks the condition under it.

    Returns counts: {"retries", "expired_leases", "dead_workers", "requeued", "timed_out_runs",
    "expired_slots", "admitted_runs"}.
    """
    now = now or _now()
    counts = {"retries": 0, "expired_leases": 0, "requeued": 0, "timed_out_runs": 0}

    stale = now - timedelta(seconds=settings.ORCHESTRATOR_REQUEUE_AFTER)
    # due retries: those without a countdown message when due, those with one when it looks lost
    due_now = Q(queued_at__isnull=True) | Q(next_attempt_at__lt=stale)
    due = list(
        Step.objects.filter(due_now, status=StepStatus.RETRY_WAIT, next_attempt_at__lte=now).values_list(
            "pk", flat=True
        )[:5000]
    )
    if due:
        with transaction.atomic():
            # row locks, skipping rows another sweeper holds: a due step is moved (and sent) once
            moved = list(
                Step.objects.select_for_update(skip_locked=True)
                .filter(due_now, pk__in=due, status=StepStatus.RETRY_WAIT, next_attempt_at__lte=now)
                .values_list("pk", flat=True)
            )
            Step.objects.filter(pk__in=moved, status=StepStatus.RETRY_WAIT).update(
                status=StepStatus.QUEUED, queued_at=now
            )
            Trace.objects.bulk_create(
                Trace(run_id=run_id, step_id=pk, kind=TraceKind.STATE, message=f"step '{step_id}' queued (retry due)")
                for pk, run_id, step_id in Step.objects.filter(pk__in=moved).values_list("pk", "run_id", "step_id")
            )
            transaction.on_commit(lambda: _enqueue_by_priority(moved))
        counts["retries"] = len(moved)

    expired = Step.objects.filter(status=StepStatus.RUNNING, lease_expires_at__lt=now).values_list("pk", flat=True)
    for pk in list(expired[:1000]):
        if _recover_lost(pk, "lease expired: the worker was lost or stalled", lease_expired_before=now):
            counts["expired_leases"] += 1
    # running steps whose worker process on this host is gone: no need to wait for the lease
    counts["dead_workers"] = recover_dead_holders()

    lost = list(Step.objects.filter(status=StepStatus.QUEUED, queued_at__lt=stale).values_list("pk", flat=True)[:5000])
    if lost:
        with transaction.atomic():
            # as for retries: locked and re-checked, so a second sweeper cannot send them again
            lost = list(
                Step.objects.select_for_update(skip_locked=True)
                .filter(pk__in=lost, status=StepStatus.QUEUED, queued_at__lt=stale)
                .values_list("pk", flat=True)
            )
            Step.objects.filter(pk__in=lost).update(queued_at=now)
            transaction.on_commit(lambda: _enqueue_by_priority(lost))
        counts["requeued"] = len(lost)

    for run_id in Run.objects.filter(status__in=[RunStatus.PENDING, RunStatus.RUNNING], deadline__lt=now).values_list(
        "pk", flat=True
    )[:1000]:
        if expire_run(run_id):
            counts["timed_out_runs"] += 1
    # concurrency slots whose lease expired, runs waiting for a run slot (agents.flowcontrol)
    counts.update(flowcontrol.sweep(now))
    return counts


def _recover_lost(pk: int, reason: str, *, lease_expired_before: datetime | None = None, holder: str = "") -> bool:
    """Count the running attempt of step ``pk`` as lost (retry or dead, like any failure).

    Under a row lock taken with SKIP LOCKED and the condition re-checked under it (the lease
    expired before ``lease_expired_before``, or the holder is still ``holder``), so a second
    sweeper or a worker completing at that moment cannot make it happen twice. Returns True
    when this call recorded the loss.
    """
    from agents.registry import StepError

    with transaction.atomic():
        rows = Step.objects.select_for_update(skip_locked=True, of=("self",)).select_related("run")
        rows = rows.filter(pk=pk, status=StepStatus.RUNNING)
        if lease_expired_before is not None:
            rows = rows.filter(lease_expires_at__lt=lease_expired_before)
        if holder:
            rows = rows.filter(worker=holder)
        step = rows.first()
        if step is None:
            return False
        result = _fail(
            step, step.lease_token, StepError(reason), resolved=step.input, duration_ms=0, outcome=AttemptOutcome.LOST
        )
    return result != "refused"


def holder_is_dead(worker: str) -> bool:
    """True when ``worker`` ("<node>@<host>:<pid>", as written on a claim) names a process of this
    host that no longer runs (gone, or a zombie). Unknown shapes and other hosts: False.

    Process ids are only comparable on one host (one pid namespace): the host is the part of the
    Celery node name after "@" (``%h``, the machine's hostname). Setting
    ORCHESTRATOR_RECOVER_DEAD_WORKERS = False turns this off (hosts sharing a hostname across
    pid namespaces); leases still recover every lost step.
    """
    if not getattr(settings, "ORCHESTRATOR_RECOVER_DEAD_WORKERS", True):
        return False
    node, _, pid_text = worker.rpartition(":")
    host = node.rpartition("@")[2] if "@" in node else ""
    if not host or host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rpartition(b")")[2].split()[0]
        return state in (b"Z", b"X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def recover_dead_holders(step_pks: Iterable[int] | None = None) -> int:
    """Count as lost the running attempts held by processes of this host that died.

    A SIGKILLed pool process or worker leaves its steps ``running`` until their lease expires
    (the step's timeout plus ORCHESTRATOR_LEASE_GRACE); when the holder is known dead the step
    can be retried at once. ``step_pks`` limits the check (default: every running step).
    Returns how many attempts were recovered.
    """
    rows = Step.objects.filter(status=StepStatus.RUNNING).exclude(worker="")
    if step_pks is not None:
        rows = rows.filter(pk__in=list(step_pks))
    recovered = 0
    for pk, worker in rows.values_list("pk", "worker")[:5000]:
        if holder_is_dead(worker):
            pid = worker.rpartition(":")[2]
            if _recover_lost(pk, f"worker process {pid} exited during the attempt", holder=worker):
                recovered += 1
    return recovered


def _enqueue_by_priority(step_pks: list[int]) -> None:
    """Send steps re-queued by the sweeper, each with its run's priority."""
    by_priority: dict[int, list[int]] = {}
    for pk, priority in Step.objects.filter(pk__in=step_pks).values_list("pk", "run__priority"):
        by_priority.setdefault(priority, []).append(pk)
    for priority in sorted(by_priority):
        enqueue_steps(by_priority[priority], priority=priority)


def _stop_run(run_id: Any, status: str, reason: str) -> bool:
    """Move an active run to a terminal ``status`` and cancel its unfinished steps."""
    now = _now()
    with transaction.atomic():
        run = Run.objects.select_for_update().filter(pk=run_id).only("id", "status", "started_at").first()
        if run is None or run.status in RUN_TERMINAL:
            return False
        Step.objects.filter(run_id=run_id).exclude(status__in=STEP_TERMINAL).update(
            status=StepStatus.CANCELLED, error=reason, finished_at=now, lease_token=None, lease_expires_at=None
        )
        Attempt.objects.filter(run_id=run_id, outcome=AttemptOutcome.RUNNING).update(
            outcome=AttemptOutcome.FAILED, finished_at=now, error=reason
        )
        Run.objects.filter(pk=run_id).update(status=status, finished_at=now, error=reason)
        Trace.objects.create(run_id=run_id, kind=TraceKind.STATE, message=f"run {status}: {reason}")
        _on_run_finished(status, run.started_at, now)
        flowcontrol.run_stopped(run_id)  # concurrency slots, rate-limit lines, run slot
    return True


def expire_run(run_id: Any) -> bool:
    """Time out the run if it is still active past its deadline. Returns True when it did."""
    run = Run.objects.filter(pk=run_id).only("deadline", "status").first()
    if run is None or run.deadline is None or run.deadline > _now():
        return False
    return _stop_run(run_id, RunStatus.TIMED_OUT, "run deadline exceeded")


def cancel_run(run_id: Any, reason: str = "cancelled by user") -> bool:
    """Cancel an active run: unfinished steps become ``cancelled``; late completions are refused."""
    return _stop_run(run_id, RunStatus.CANCELLED, reason)
