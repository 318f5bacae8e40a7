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
``enqueue_steps``. Errors raised to callers: ``templates_app.errors.WorkflowError`` for bad inputs.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from templates_app.errors import ExpressionError, WorkflowError

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
    """What one transaction collects: traces to insert and step ids to enqueue on commit."""

    traces: list[Trace] = field(default_factory=list)
    enqueue: list[int] = field(default_factory=list)

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
        """Insert the traces now and schedule the enqueue for after commit."""
        if self.traces:
            Trace.objects.bulk_create(self.traces)
            self.traces = []
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
            batch.trace(run.pk, TraceKind.STATE, f"run started ({trigger})", data={"inputs_keys": sorted(values)})
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
        now = _now()
        Step.objects.filter(pk=step.pk, status=StepStatus.PENDING).update(status=StepStatus.QUEUED, queued_at=now)
        step.status = StepStatus.QUEUED
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
        parents = {
            row["step_id"]: row
            for row in Step.objects.filter(run_id=step.run_id, parent__isnull=True, step_id__in=step.depends_on).values(
                "step_id", "status", "output"
            )
        }
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
            if not step.dependents:
                self.leaf_finished = True
                continue
            ready_pks = _decrement_dependents(step)
            if ready_pks:
                ready = list(Step.objects.filter(pk__in=ready_pks, status=StepStatus.PENDING).order_by("id"))
                for candidate in ready:
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


def _in_clause(values: list[Any]) -> str:
    return ", ".join(["%s"] * len(values))


def _decrement_dependents(step: Step) -> list[int]:
    """Decrement ``pending_deps`` of ``step``'s dependents; return the pks that reached zero.

    One UPDATE ... RETURNING. On PostgreSQL the rows are locked in id order first, so two
    completions that share dependents cannot deadlock; the row lock also serializes concurrent
    decrements, so exactly one completion sees a dependent reach zero.
    """
    names = list(step.dependents)
    table = Step._meta.db_table
    if connection.vendor == "postgresql":
        sql = (
            f"UPDATE {table} SET pending_deps = pending_deps - 1 WHERE id IN ("
            f"SELECT id FROM {table} WHERE run_id = %s AND parent_id IS NULL AND step_id IN ({_in_clause(names)}) "
            f"ORDER BY id FOR UPDATE) RETURNING id, pending_deps"
        )
    else:
        sql = (
            f"UPDATE {table} SET pending_deps = pending_deps - 1 "
            f"WHERE run_id = %s AND parent_id IS NULL AND step_id IN ({_in_clause(names)}) RETURNING id, pending_deps"
        )
    with connection.cursor() as cursor:
        cursor.execute(sql, [step.run_id.hex if connection.vendor != "postgresql" else step.run_id, *names])
        return [pk for pk, pending in cursor.fetchall() if pending == 0]


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
    locked = Run.objects.select_for_update().only("id", "status", "spec", "inputs").get(pk=run.pk)
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
    Run.objects.filter(pk=run.pk, status__in=[RunStatus.PENDING, RunStatus.RUNNING]).update(
        status=status, finished_at=now, outputs=_json_safe(outputs), error=error
    )
    batch.trace(run.pk, TraceKind.STATE, f"run {status}" + (f": {error}" if error else ""))


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


def execute_step(step_pk: int, worker: str = "") -> str:
    """Claim, run and record one step. Returns what happened (for logs and tests).

    Returns one of "not-claimed" (already taken, finished or gone: a late duplicate message),
    "cancelled", "succeeded", "retry", "dead", "failed", "refused" (the lease was taken over
    while the handler ran; its result is discarded).
    """
    from agents.registry import StepContext, StepError, get_handler, run_with_timeout

    now = _now()
    token = uuid.uuid4()
    claimed = (
        Step.objects.filter(pk=step_pk)
        .filter(Q(status=StepStatus.QUEUED) | Q(status=StepStatus.RETRY_WAIT, next_attempt_at__lte=now))
        .filter(attempts__lt=F("max_attempts"))
    )
    step = Step.objects.filter(pk=step_pk).only("spec").first()
    if step is None:
        return "not-claimed"
    timeout = float(step.spec.get("timeout") or settings.ORCHESTRATOR_DEFAULT_STEP_TIMEOUT)
    with transaction.atomic():
        if not claimed.update(
            status=StepStatus.RUNNING,
            attempts=F("attempts") + 1,
            lease_token=token,
            lease_expires_at=now + timedelta(seconds=timeout + settings.ORCHESTRATOR_LEASE_GRACE),
            worker=worker[:200],
            next_attempt_at=None,
            started_at=now,
        ):
            return "not-claimed"
        step = Step.objects.select_related("run").defer("run__spec").get(pk=step_pk)
        run = step.run
        batch = _Batch()
        if run.status in RUN_TERMINAL:
            Step.objects.filter(pk=step_pk, lease_token=token).update(
                status=StepStatus.CANCELLED,
                finished_at=now,
                lease_token=None,
                lease_expires_at=None,
                error=f"run is {run.status}",
                attempts=F("attempts") - 1,
            )
            return "cancelled"
        Attempt.objects.create(
            step=step, run=run, number=step.attempts, worker=worker[:200], lease_token=token, started_at=now
        )
        batch.trace(
            run.pk,
            TraceKind.STATE,
            f"step '{step.step_id}' running (attempt {step.attempts}/{step.max_attempts})",
            step_pk=step.pk,
            attempt=step.attempts,
            data={"worker": worker},
        )
        batch.flush()

    if run.deadline:
        timeout = min(timeout, max(0.0, (run.deadline - now).total_seconds()))
    started = time.monotonic()
    output: Any = None
    error: StepError | None = None
    resolved: Any = None
    try:
        from templates_app.expressions import render

        ctx_values = build_context(run, step.spec.get("refs", []), step)
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
        log.exception("handler of step %s raised", step_pk)
        error = StepError(f"{type(exc).__name__}: {exc}")
    duration_ms = int((time.monotonic() - started) * 1000)
    if error is None:
        return _complete(step, token, output=output, resolved=resolved, duration_ms=duration_ms)
    return _fail(step, token, error, resolved=resolved, duration_ms=duration_ms)


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


def _complete(step: Step, token: uuid.UUID, *, output: Any, resolved: Any, duration_ms: int) -> str:
    now = _now()
    with transaction.atomic():
        if not Step.objects.filter(pk=step.pk, status=StepStatus.RUNNING, lease_token=token).update(
            status=StepStatus.SUCCEEDED,
            output=output,
            input=_json_safe(resolved),
            error="",
            finished_at=now,
            lease_token=None,
            lease_expires_at=None,
        ):
            return _refuse(step, token, duration_ms)
        Attempt.objects.filter(step=step, lease_token=token).update(
            outcome=AttemptOutcome.SUCCEEDED, finished_at=now, duration_ms=duration_ms
        )
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
        batch.flush(priority=step.run.priority)
    return "succeeded"


def _refuse(step: Step, token: uuid.UUID, duration_ms: int) -> str:
    now = _now()
    Attempt.objects.filter(step=step, lease_token=token).update(
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
        batch.flush(priority=step.run.priority)
    return result


# --- enqueueing -----------------------------------------------------------------------------


def enqueue_steps(step_pks: list[int], *, countdown: float | None = None, priority: int | None = None) -> None:
    """Send one ``runs.execute_step`` message per step id, over one broker connection.

    Called from ``transaction.on_commit`` only, so a worker never sees an uncommitted row. A send
    that fails is logged and left to the sweeper, which re-sends steps queued for too long.
    """
    from .tasks import execute_step_task

    if not step_pks:
        return
    options: dict[str, Any] = {}
    if countdown:
        options["countdown"] = countdown
    try:
        with execute_step_task.app.producer_or_acquire() as producer:
            for pk in step_pks:
                execute_step_task.apply_async(args=[pk], producer=producer, **options)
    except Exception:
        log.exception("enqueue of %d steps failed; the sweeper will re-send them", len(step_pks))


# --- the sweeper, cancellation, deadlines -------------------------------------------------------


def sweep(now: datetime | None = None) -> dict[str, int]:
    """One pass of recovery. Safe to run concurrently and as often as wanted.

    - due retries (``retry_wait`` past ``next_attempt_at``) are queued and sent;
    - running steps whose lease expired (worker killed or stalled) count as a lost attempt and
      retry or die like any failure;
    - steps ``queued`` for longer than ``ORCHESTRATOR_REQUEUE_AFTER`` seconds are sent again
      (the broker lost the message; a duplicate is harmless because claiming is conditional);
    - active runs past their deadline are timed out.

    Returns counts: {"retries", "expired_leases", "requeued", "timed_out_runs"}.
    """
    now = now or _now()
    counts = {"retries": 0, "expired_leases": 0, "requeued": 0, "timed_out_runs": 0}

    due = list(
        Step.objects.filter(status=StepStatus.RETRY_WAIT, next_attempt_at__lte=now).values_list("pk", flat=True)[:5000]
    )
    if due:
        with transaction.atomic():
            moved = list(Step.objects.filter(pk__in=due, status=StepStatus.RETRY_WAIT).values_list("pk", flat=True))
            Step.objects.filter(pk__in=moved, status=StepStatus.RETRY_WAIT).update(
                status=StepStatus.QUEUED, queued_at=now
            )
            Trace.objects.bulk_create(
                Trace(run_id=run_id, step_id=pk, kind=TraceKind.STATE, message=f"step '{step_id}' queued (retry due)")
                for pk, run_id, step_id in Step.objects.filter(pk__in=moved).values_list("pk", "run_id", "step_id")
            )
            transaction.on_commit(lambda: enqueue_steps(moved))
        counts["retries"] = len(moved)

    expired = Step.objects.filter(status=StepStatus.RUNNING, lease_expires_at__lt=now).select_related("run")[:1000]
    for step in expired:
        from agents.registry import StepError

        result = _fail(
            step,
            step.lease_token,
            StepError("lease expired: the worker was lost or stalled"),
            resolved=step.input,
            duration_ms=0,
            outcome=AttemptOutcome.LOST,
        )
        if result != "refused":
            counts["expired_leases"] += 1

    stale = now - timedelta(seconds=settings.ORCHESTRATOR_REQUEUE_AFTER)
    lost = list(Step.objects.filter(status=StepStatus.QUEUED, queued_at__lt=stale).values_list("pk", flat=True)[:5000])
    if lost:
        with transaction.atomic():
            Step.objects.filter(pk__in=lost, status=StepStatus.QUEUED).update(queued_at=now)
            transaction.on_commit(lambda: enqueue_steps(lost))
        counts["requeued"] = len(lost)

    for run_id in Run.objects.filter(status__in=[RunStatus.PENDING, RunStatus.RUNNING], deadline__lt=now).values_list(
        "pk", flat=True
    )[:1000]:
        if expire_run(run_id):
            counts["timed_out_runs"] += 1
    return counts


def _stop_run(run_id: Any, status: str, reason: str) -> bool:
    """Move an active run to a terminal ``status`` and cancel its unfinished steps."""
    now = _now()
    with transaction.atomic():
        run = Run.objects.select_for_update().filter(pk=run_id).only("id", "status").first()
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
