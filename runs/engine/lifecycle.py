"""A run's life: start (with admission), activation of a waiting run, cancel, deadline.

Each verb is one transaction that takes the run's lock first (runs/engine/state.py) and lets the
cascade decide the steps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db import IntegrityError, transaction

from .. import metrics
from ..choices import STEP_TERMINAL, RunStatus, StepStatus, TraceKind, TriggerKind
from ..models import Attempt, Run, Step, Trace
from . import broker, cascade, gate, state


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
    metadata: dict[str, Any] | None = None,
) -> Run:
    """Create a run with one row per step and queue its root steps (after commit).

    ``spec`` is a normalized spec (docs/spec-contract.md); ``inputs`` raw variable values (CLI
    strings are coerced). With an ``idempotency_key`` already used in the tenant, the existing run
    is returned and nothing is created. ``metadata``: caller data kept on the run (``parent_step``:
    the step a finished run wakes; ``agent_task``: see ``state.run_finished_on_commit``). A run over a
    concurrent-run limit is created ``pending`` and started later (``activate_run``). Raises
    ``WorkflowError`` (one line) on bad inputs; nothing is saved then.
    """
    new = _NewRun.build(
        spec,
        inputs,
        template=template,
        trigger=trigger,
        tenant_id=tenant_id,
        user_id=user_id,
        correlation_id=correlation_id,
        idempotency_key=idempotency_key,
        priority=priority,
        metadata=metadata,
    )
    return _start(new)


def _start(new: _NewRun) -> Run:
    """:func:`start_run` for a run already built (inputs validated)."""
    tenant_id, idempotency_key, trigger = new.fields["tenant_id"], new.fields["idempotency_key"], new.trigger
    if idempotency_key:
        existing = Run.objects.filter(tenant_id=tenant_id, idempotency_key=idempotency_key).first()
        if existing is not None:
            return existing
    try:
        with transaction.atomic():
            run, steps = state.create_run(new.fields, new.rows)
            batch = state.Batch()
            # concurrent-run limits (template, tenant): over one, the run waits `pending` until
            # the gate admits it (activate_run)
            waiting = gate.admit_run(run)
            if waiting is not None:
                state.hold_pending(run)
                tenant = run.tenant_id
                transaction.on_commit(lambda: cascade.admit_waiting_runs(tenant))
                batch.trace(run.pk, TraceKind.STATE, f"run waiting for a slot ({trigger}): {waiting}")
                batch.flush()
            else:
                new.begin(run, steps, batch)
                batch.flush(priority=run.priority, last=True)
    except IntegrityError:
        if idempotency_key:
            # A concurrent request with the same key won the race: return its run.
            return Run.objects.get(tenant_id=tenant_id, idempotency_key=idempotency_key)
        raise
    return run


@dataclass
class _NewRun:
    """A run about to be created: its Run fields and step rows, inputs validated (nothing saved)."""

    fields: dict[str, Any]
    rows: list[dict[str, Any]]
    trigger: str
    input_keys: list[str]
    timeout: Any

    @classmethod
    def build(cls, spec: dict[str, Any], inputs: dict[str, Any] | None, **options: Any) -> _NewRun:
        """Validate ``inputs`` against ``spec`` and lay out the rows (``options``: start_run's
        keyword arguments). Raises WorkflowError (one line) on bad inputs."""
        from templates_app.spec import validate_inputs

        values = validate_inputs(spec, inputs or {})
        at = state.now()
        timeout = spec.get("timeout")
        dependents: dict[str, list[str]] = {s["id"]: [] for s in spec["steps"]}
        for s in spec["steps"]:
            for dep in s.get("depends_on", []):
                dependents[dep].append(s["id"])
        rows = [
            {
                "step_id": s["id"],
                "type": s["type"],
                "spec": s,
                "depends_on": list(s.get("depends_on", [])),
                "dependents": dependents[s["id"]],
                "pending_deps": len(s.get("depends_on", [])),
                "max_attempts": max(1, int(s.get("retry", {}).get("max_attempts", 1))),
            }
            for s in spec["steps"]
        ]
        template = options["template"]
        fields = {
            "template": template,
            "template_key": spec["key"],
            "template_version": getattr(template, "version", None),
            "spec": spec,
            "inputs": values,
            "tenant_id": options["tenant_id"],
            "user_id": options["user_id"],
            "correlation_id": options["correlation_id"],
            "idempotency_key": options["idempotency_key"] or None,
            "priority": options["priority"],
            "trigger": options["trigger"],
            "metadata": options["metadata"] or {},
            "steps_total": len(spec["steps"]),
            "started_at": at,
            "deadline": at + timedelta(seconds=timeout) if timeout else None,
        }
        return cls(fields, rows, options["trigger"], sorted(values), timeout)

    def begin(self, run: Run, steps: list[Step], batch: state.Batch) -> None:
        """In the creating transaction: trace the start, decide the root steps into ``batch``
        (queued, skipped, expanded: the cascade), and ask for the deadline check after commit."""
        batch.trace(run.pk, TraceKind.STATE, f"run started ({self.trigger})", data={"inputs_keys": self.input_keys})
        # bulk_create set the primary keys (PostgreSQL RETURNING): no need to read the roots back
        roots = [s for s in steps if s.pending_deps == 0]
        if any(s.pk is None for s in roots):
            roots = list(Step.objects.filter(run=run, pending_deps=0).order_by("id"))
        cascade.Cascade(run, batch).decide(roots)
        if run.deadline:
            run_id, timeout = run.pk, self.timeout
            transaction.on_commit(lambda: broker.schedule_deadline(run_id, timeout))


def start_runs(spec: dict[str, Any], items: list[dict[str, Any]], *, template: Any = None, **common: Any) -> list[Run]:
    """Start many runs of one spec in ONE transaction (one flushed commit instead of one per run).

    ``items``: per run, ``{"inputs", "correlation_id", "priority", "idempotency_key"}`` (each
    optional); ``common``: the other :func:`start_run` arguments (trigger, tenant_id, user_id).
    One bad item raises ``WorkflowError`` naming its index and nothing is created. A run whose
    idempotency key exists already is returned as it is. Returns the runs in item order.

    When no item has an idempotency key and no concurrent-run limit applies to the spec in the
    tenant (the common case), the runs and their steps are inserted with one statement each,
    their root steps queued and traced with one more, and their messages sent over one broker
    connection per priority; otherwise each item goes the way of :func:`start_run` (admission in
    priority order, idempotency races) inside the one transaction. Inputs are validated once.
    """
    from templates_app.errors import WorkflowError

    options = {
        "template": template,
        "trigger": common.get("trigger", TriggerKind.MANUAL),
        "tenant_id": common.get("tenant_id", "default"),
        "user_id": common.get("user_id", ""),
        "metadata": common.get("metadata"),
    }
    per_item = [
        {
            "correlation_id": item.get("correlation_id", "") or "",
            "priority": item.get("priority", 5),
            "idempotency_key": item.get("idempotency_key") or None,
        }
        for item in items
    ]
    new: list[_NewRun] = []
    for index, (item, own) in enumerate(zip(items, per_item, strict=True)):
        try:
            new.append(_NewRun.build(spec, item.get("inputs") or {}, **options, **own))
        except WorkflowError as exc:
            raise WorkflowError(f"runs[{index}]: {exc}") from None
    keyed = any(own["idempotency_key"] for own in per_item)
    if keyed or gate.run_limits_apply(options["tenant_id"], spec):
        with transaction.atomic():  # one failing item rolls back the runs started before it
            return [_start(n) for n in new]
    with transaction.atomic():
        created = state.create_runs([(n.fields, n.rows) for n in new])
        batches: dict[int, state.Batch] = {}
        for n, (run, steps) in zip(new, created, strict=True):
            n.begin(run, steps, batches.setdefault(run.priority, state.Batch()))
        ordered = sorted(batches.items())
        for i, (priority, batch) in enumerate(ordered):
            batch.flush(priority=priority, last=i == len(ordered) - 1)
    return [run for run, _steps in created]


def wake_steps(step_pks: list[int], *, priority: int | None = None) -> None:
    """Make waiting steps (``retry_wait``) due now and send them: a concurrency slot they waited for
    was released. Steps no longer waiting are left alone; a spare message finds nothing to claim."""
    if step_pks:
        broker.enqueue_steps(state.make_due(step_pks), priority=priority)


def wake_on_commit(woken: list[tuple[int, int]]) -> None:
    """After commit, wake the ``(step pk, priority)`` waiters the gate picked (most urgent first)."""
    if not woken:
        return
    by_priority: dict[int, list[int]] = {}
    for step_pk, priority in woken:
        by_priority.setdefault(priority, []).append(step_pk)

    def wake() -> None:
        for priority, pks in sorted(by_priority.items()):
            wake_steps(pks, priority=priority)

    transaction.on_commit(wake)


def _stop_run(run_id: Any, status: str, reason: str) -> bool:
    """Move an active run to a terminal ``status`` and cancel its unfinished steps."""
    at = state.now()
    with transaction.atomic():
        stopped = state.stop_run(run_id, status, reason, at)
        if stopped is None:
            return False
        run, cancelled = stopped
        transaction.on_commit(lambda: metrics.attempts_cancelled(cancelled))
        batch = state.Batch()
        batch.trace(run_id, TraceKind.STATE, f"run {status}: {reason}")
        batch.flush()
        cascade.count_finished_run(status, run.started_at, at)
        state.run_finished_on_commit(run, status)  # a step waiting for it, runs.signals.run_finished
        wake_on_commit(gate.run_stopped(run_id))  # concurrency slots, rate-limit lines, run slot
        transaction.on_commit(lambda: cascade.admit_waiting_runs(run.tenant_id))
    return True


def expire_run(run_id: Any) -> bool:
    """Time out the run if it is still active past its deadline. Returns True when it did."""
    run = Run.objects.filter(pk=run_id).only("deadline", "status").first()
    if run is None or run.deadline is None or run.deadline > state.now():
        return False
    return _stop_run(run_id, RunStatus.TIMED_OUT, "run deadline exceeded")


def cancel_run(run_id: Any, reason: str = "cancelled by user") -> bool:
    """Cancel an active run: unfinished steps become ``cancelled``, running attempts are closed
    with outcome ``cancelled``; late completions are refused. False when it had already ended."""
    return _stop_run(run_id, RunStatus.CANCELLED, reason)


def limit_changed(key: str) -> int:
    """An operator changed the concurrency limit ``key``: wake the waiting steps that now fit
    (after commit) or, for a run limit, admit waiting runs. Returns how many steps were woken."""
    with transaction.atomic():
        tenant, woken = gate.limit_changed(key)
        wake_on_commit(woken)
    if tenant is not None:
        transaction.on_commit(lambda: cascade.admit_waiting_runs(tenant))
    return len(woken)


# --- retry -----------------------------------------------------------------------------------------

#: Step statuses a retry starts again.
RETRYABLE = frozenset({StepStatus.FAILED, StepStatus.DEAD, StepStatus.CANCELLED})


class RetryRefused(Exception):
    """A retry that cannot be done (one line). ``conflict``: nothing to retry (HTTP 409), else a
    bad request (an unknown or unfinished step id, HTTP 400)."""

    def __init__(self, message: str, *, conflict: bool = False) -> None:
        super().__init__(message)
        self.conflict = conflict


@dataclass
class RetryResult:
    """What a retry reset: ``steps`` retried (ids), ``downstream`` reset because they depend on them."""

    run: Run
    steps: list[str]
    downstream: list[str]


def _base_attempts(step: Step) -> int:
    return max(1, int((step.spec.get("retry") or {}).get("max_attempts", 1)))


def reset_for_retry(
    run_pk: Any, wanted: list[str] | None, reason: str, params: dict[str, dict[str, Any]] | None = None
) -> RetryResult:
    """Run failed, dead and cancelled steps again, and everything downstream of them; keep the rest.

    ``wanted`` None: every failed/dead/cancelled step; else those step ids (top-level ids, or map
    children such as ``fetch[3]``). A map step whose items partly failed retries only those
    items. Each retried step gets its full number of attempts again (attempt numbers go on:
    Airflow's "clear"). The run becomes ``running`` again (deadline renewed). One transaction,
    the run locked first, then its steps by id.

    ``params``: {top-level step id: new params} for steps to run with edited input (an operator's
    "rerun this step with edited input"); such a step may also have succeeded or been skipped,
    it must only be finished. Its expressions may read the steps it already reads or depends on.

    Raises RetryRefused.
    """
    at = state.now()
    with transaction.atomic():
        run = Run.objects.select_for_update(no_key=True).get(pk=run_pk)
        top = list(
            Step.objects.select_for_update(no_key=True).filter(run_id=run_pk, parent__isnull=True).order_by("id")
        )
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
                Step.objects.select_for_update(no_key=True)
                .filter(run_id=run_pk, step_id__in=child_ids, parent__isnull=False)
                .order_by("id")
            )
            unknown = set(child_ids) - {c.step_id for c in children}
            if unknown:
                raise RetryRefused(f"run has no step {sorted(unknown)[0]!r}")
            edited = set(params or {})
            for step in [*seeds, *children]:
                if step.step_id in edited and step.parent_id is None and step.status in STEP_TERMINAL:
                    continue
                if step.status not in RETRYABLE:
                    raise RetryRefused(
                        f"step {step.step_id!r} is {step.status}: only failed, dead or cancelled steps retry"
                    )
        if not seeds and not children:
            raise RetryRefused(
                f"nothing to retry: run is {run.status} and no step failed, died or was cancelled", conflict=True
            )

        mapped = {s.pk for s in seeds if s.pending_children is not None}
        kids_of: dict[int, list[Step]] = {}
        if mapped:
            for child in Step.objects.select_for_update(no_key=True).filter(parent_id__in=mapped).order_by("id"):
                kids_of.setdefault(child.parent_id, []).append(child)
        for seed in seeds:
            failed_kids = [c for c in kids_of.get(seed.pk, []) if c.status in RETRYABLE]
            # a large map whose expansion did not finish (worker.expand_claimed) expands afresh
            unexpanded = isinstance(seed.input, list) and len(kids_of.get(seed.pk, [])) < len(seed.input)
            if failed_kids and not unexpanded:
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
            Trace.objects.filter(step_row__in=old_items).update(step_row=None)
            removed = old_items.count()
            if removed:
                Attempt.objects.filter(step__in=old_items).delete()
                old_items.delete()
        for step_id in sorted(full, key=lambda s: by_id[s].pk):
            step = by_id[step_id]
            pending = sum(1 for dep in step.depends_on if dep in resetting or by_id[dep].status not in STEP_TERMINAL)
            spec = None
            if params and step_id in params:
                refs = sorted(set(step.spec.get("refs") or []) | set(step.depends_on))
                spec = {**step.spec, "params": params[step_id], "refs": refs}
            state.reset_step(step, pending_deps=pending, base_attempts=_base_attempts(step), spec=spec)
        requeue: list[int] = []
        for step_id, kids in partial.items():
            for child in kids:
                state.requeue_child(child, base_attempts=_base_attempts(child), at=at)
                if not cascade.is_external(child.spec):
                    requeue.append(child.pk)
            state.reopen_parent(by_id[step_id])

        timeout = run.spec.get("timeout")
        changes: dict[str, Any] = {}
        if timeout:
            changes["deadline"] = at + timedelta(seconds=timeout)
        if removed:
            changes["steps_total"] = max(0, run.steps_total - removed)
        state.reopen_run(run, changes)
        retried = sorted(
            [s for s in full if s not in downstream] + [c.step_id for kids in partial.values() for c in kids]
        )
        message = f"run {reason}: {', '.join(retried)}"
        if downstream:
            message += f"; downstream reset: {', '.join(sorted(downstream))}"
        Trace.objects.create(run=run, kind=TraceKind.STATE, message=state.one_line(message))
        cascade.decide_pending(run, enqueue=requeue)
        if timeout:
            transaction.on_commit(lambda: broker.schedule_deadline(run.pk, timeout))
    run.refresh_from_db()
    return RetryResult(run=run, steps=retried, downstream=sorted(downstream))
