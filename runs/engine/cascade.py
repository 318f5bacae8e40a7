"""Deciding steps: dependency counting, trigger rules, expansion (for_each, parallel), context.

Every step that reaches a terminal state is passed to :meth:`Cascade.finished`; it decrements its
dependents' counters (and its map parent's), decides the dependents that reach zero (skip, run
inline, expand, queue), which may finish more steps (skips, conditions, empty maps), and so on
until nothing changes; when a leaf finished it checks whether the run is done. All inside the
caller's transaction, which holds the run's lock (runs/engine/state.py); the writes go through
``state``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django.db import transaction

from orchestrator_site.conf import conf
from templates_app.errors import ExpressionError, WorkflowError

from .. import metrics
from ..choices import RUN_TERMINAL, STEP_FAILED, RunStatus, StepStatus, TraceKind
from ..models import Run, Step
from . import broker, gate, sql, state
from .context import build_context

#: Step types the engine handles itself, without a worker round trip.
INLINE_TYPES = frozenset({"condition"})
#: Step types expanded into child rows (like a for_each) when they become ready.
GROUP_TYPES = frozenset({"parallel"})
#: Spec keys that make the cascade evaluate a ready step (``_decide_one``), gate it
#: (``gate.gated``) or leave it to an external executor (``is_external``).
DECIDING_KEYS = ("when", "for_each", "branch_of", "rate_limit", "concurrency", "queue")


def _plain_step_sql() -> str:
    absent = " AND ".join(f"COALESCE(jsonb_typeof(ready.spec -> '{key}'), 'null') = 'null'" for key in DECIDING_KEYS)
    types = ", ".join(f"'{t}'" for t in sorted(GROUP_TYPES | INLINE_TYPES))
    return (
        f"ready.type NOT IN ({types}) AND {absent} "
        "AND COALESCE(ready.spec ->> 'trigger_rule', 'all_success') = 'all_success' "
        "AND jsonb_array_length(ready.depends_on) = 1"
    )


#: SQL over a ready top-level step's columns (``ready``: type, spec, depends_on): true only for
#: a chain link this cascade would queue with nothing to evaluate and the inline claim would
#: take: not a group or inline type, none of DECIDING_KEYS, the trigger rule all_success, and
#: one upstream step (the one whose completion made it ready, succeeded: ``_trigger_rule_blocks``'
#: fast path). The fast chain claim (runs/engine/sql.py ``FastClaim``) claims such a step
#: itself; any other step, it leaves to the cascade. Where the two could differ, it says no (a
#: ``branch_of: {}`` the cascade ignores, say): the cascade then decides as always.
PLAIN_STEP_SQL = _plain_step_sql()


def is_external(spec: dict[str, Any]) -> bool:
    """True for a step done by an executor outside Celery (``queue`` declared): it waits
    ``queued`` for a poll (runs/engine/executors.py) and is never sent as a message. A map step
    is not (a Celery worker expands it when it is large); its children are."""
    return spec.get("queue") is not None and spec.get("for_each") is None


class Cascade:
    """Propagates finished steps through the DAG inside the current transaction (see the module)."""

    def __init__(self, run: Run, batch: state.Batch, *, shared: bool = False):
        self.run = run
        self.batch = batch
        # the transaction holds the run's lock shared (state.py, "Shared completions"): it may
        # only queue steps, anything more raises state.RunLockNeeded
        self.shared = shared
        self.leaf_finished = False
        # {step_id: {"status", "output"}} of top-level steps finished in this transaction: their
        # dependents' trigger rules need not read them back (a chain link reads nothing)
        self.known: dict[str, dict[str, Any]] = {}

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
                children = self._map_children(step)
                if len(children) <= conf.expand_batch or step.type in GROUP_TYPES:
                    return self._expand(step, children)
                # a large map: queued like any step, its children inserted by a worker in batches
                # (worker.expand_claimed), outside this transaction (an API request, or a
                # completion holding the run's lock)
                self._exclusive(f"step '{step.step_id}' stages its items")
                state.stage_items(step, [item for _spec, item in children])
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
        if not is_external(spec):
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
        if (
            rule == "all_success"
            and not step.spec.get("branch_of")
            and getattr(step, "upstream_unsucceeded", None) == 0
        ):
            return None  # the decrement that made it ready saw every upstream succeeded (sql._ready)
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
        self._exclusive(f"step '{step.step_id}' finishes in the cascade")
        if not state.finish_inline(step, status, output=output, error=error):
            return None
        self.batch.trace(self.run.pk, kind, f"step '{step.step_id}' {message}", step_pk=step.pk)
        return step

    def _map_children(self, step: Step) -> list[tuple[dict[str, Any], Any]]:
        """(child spec, item) per for_each item or parallel branch of a map step, in order.

        Raises ExpressionError (the for_each expression, or not a list) and WorkflowError (more
        items than ORCHESTRATOR_MAX_FOR_EACH_ITEMS).
        """
        from templates_app.spec import check_for_each_items

        spec = step.spec
        if step.type in GROUP_TYPES:
            return [({**child_spec(spec), **branch}, None) for branch in spec.get("params", {}).get("tasks", [])]
        from templates_app.expressions import render

        items = render(spec["for_each"], self.context(spec.get("refs", []), step))
        if not isinstance(items, list):
            raise ExpressionError(f"step '{step.step_id}': for_each must give a list, got {type(items).__name__}")
        check_for_each_items(step.step_id, items)
        child = child_spec(spec)
        return [(child, item) for item in items]

    def _expand(self, step: Step, children_specs: list[tuple[dict[str, Any], Any]]) -> Step | None:
        """Insert one child row per for_each item or parallel branch; the parent waits on them."""
        self._exclusive(f"step '{step.step_id}' expands")
        if not children_specs:
            return self._finish_inline(step, StepStatus.SUCCEEDED, output=[], message="mapped over 0 items")
        child_ids = state.expand(step, child_rows(step, children_specs))
        pairs = zip(child_ids, children_specs, strict=True)
        self.batch.enqueue.extend(pk for pk, (spec, _item) in pairs if not is_external(spec))
        self.batch.trace(
            self.run.pk,
            TraceKind.DECISION,
            f"step '{step.step_id}' fanned out to {len(children_specs)} children",
            step_pk=step.pk,
        )
        return None

    # finishing --------------------------------------------------------------------------
    def finished(self, steps: list[Step], ready: dict[int, list[Step]] | None = None) -> None:
        """Propagate steps that just reached a terminal state (already saved). ``ready``: for a
        step whose dependents were already counted down (``state.close_successes``), the ones that
        reached zero, by step pk."""
        ready = dict(ready or {})
        queue = list(steps)
        # map children finishing together count their parent down once, by how many they are
        counts = Counter(step.parent_id for step in steps if step.parent_id is not None)
        given = {id(step) for step in steps}
        while queue:
            step = queue.pop(0)
            if step.parent_id is not None:
                self._exclusive("a map child finished")
                # 0: a sibling given with it counted it already
                count = counts.pop(step.parent_id, 0) if id(step) in given else 1
                parent_done = self._child_finished(step, count) if count else None
                if parent_done is not None:
                    queue.append(parent_done)
                continue
            self.known[step.step_id] = {"step_id": step.step_id, "status": step.status, "output": step.output}
            if not step.dependents:
                self.leaf_finished = True
                continue
            # the dependents that reached zero, read by the decrement itself
            counted = ready.pop(step.pk) if step.pk in ready else sql.decrement_dependents(step)
            for candidate in counted:
                if candidate.status == StepStatus.PENDING:
                    outcome = self._decide_one(candidate)
                    if outcome is not None:
                        queue.append(outcome)
        if self.leaf_finished:
            self._exclusive("a leaf finished")
            maybe_finish_run(self.run, self.batch)

    def _exclusive(self, why: str) -> None:
        """Raise state.RunLockNeeded (``why``) in a shared completion: what comes next needs the
        run's exclusive lock."""
        if self.shared:
            raise state.RunLockNeeded(why)

    def _child_finished(self, child: Step, count: int = 1) -> Step | None:
        """Count ``count`` map children (``child`` and its siblings finished with it) down on
        their parent; finish the parent when they were the last ones."""
        if sql.decrement_parent(child.parent_id, count) != 0:
            return None
        return self.join(Step.objects.get(pk=child.parent_id))

    def join(self, parent: Step) -> Step | None:
        """Finish a map step whose children all finished: the joined outputs, or the first error.
        None (nothing done) unless it is ``running`` with no lease: a map step still being
        expanded by a worker (worker.expand_claimed) joins when that worker is done."""
        if parent.status != StepStatus.RUNNING or parent.lease_token is not None:
            return None
        rows = list(parent.children.order_by("map_index").values("status", "output", "error", "step_id"))
        failed = [r for r in rows if r["status"] != StepStatus.SUCCEEDED]
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
        state.finish_parent(parent, status, output=output, error=error)
        self.batch.trace(
            self.run.pk,
            TraceKind.STATE,
            f"step '{parent.step_id}' {status} (joined {len(rows)} items)",
            step_pk=parent.pk,
        )
        return parent


def child_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec of each child of a for_each step: its own, without the ``for_each``."""
    return {k: v for k, v in spec.items() if k != "for_each"}


def child_rows(step: Step, children_specs: list[tuple[dict[str, Any], Any]], start: int = 0) -> list[Step]:
    """Unsaved child rows of map step ``step``: one per (spec, item), map indexes from ``start``."""
    return [
        Step(
            run_id=step.run_id,
            step_id=f"{step.step_id}[{i}]",
            parent=step,
            map_index=i,
            type=spec["type"],
            spec=spec,
            item=state.json_safe(item),
            max_attempts=max(1, int(spec.get("retry", {}).get("max_attempts", 1))),
        )
        for i, (spec, item) in enumerate(children_specs, start)
    ]


def maybe_finish_run(run: Run, batch: state.Batch) -> None:
    """Finish the run when no step is left unfinished (the caller holds the run's lock, so two
    leaves finishing at once are serialized and the second sees the first's step)."""
    locked, unfinished, rows, declared = state.finish_check(run.pk)
    if locked is None or locked.status in RUN_TERMINAL or unfinished:
        return
    failed = [r for r in rows if r["status"] in STEP_FAILED or r["status"] == StepStatus.CANCELLED]
    at = state.now()
    outputs: Any = None
    error = ""
    if failed:
        status = RunStatus.FAILED
        first = failed[0]
        error = state.one_line(f"step '{first['step_id']}' {first['status']}: {first['error']}")
    else:
        status = RunStatus.SUCCEEDED
        try:
            outputs = run_outputs(declared, locked.inputs, run.pk, rows)
        except (ExpressionError, WorkflowError) as exc:
            status, error = RunStatus.FAILED, state.one_line(f"outputs: {exc}")
    if state.finish_run(run.pk, status, outputs=outputs, error=error, at=at):
        count_finished_run(status, locked.started_at, at)
        state.run_finished_on_commit(locked, status)  # a step waiting for it, runs.signals.run_finished
        if gate.runs_waiting(run.tenant_id):  # a run waiting for its run slot may start now
            tenant = run.tenant_id
            transaction.on_commit(lambda: admit_waiting_runs(tenant))
    batch.trace(run.pk, TraceKind.STATE, f"run {status}" + (f": {error}" if error else ""))


def count_finished_run(status: str, started_at: datetime | None, at: datetime) -> None:
    """Count the finished run in the metrics once the transaction commits."""
    seconds = (at - started_at).total_seconds() if started_at else None
    transaction.on_commit(lambda: metrics.run_finished(status, seconds))


def run_outputs(declared: Any, inputs: dict[str, Any], run_id: Any, rows: list[dict[str, Any]]) -> Any:
    """The run's outputs: its ``declared`` outputs (the spec's ``outputs``) rendered against
    ``inputs`` and the top-level step ``rows``, else the leaves' outputs by step id.
    Raises ExpressionError / WorkflowError from the rendering."""
    if not declared:
        return {r["step_id"]: r["output"] for r in rows if not r["dependents"] and r["status"] == StepStatus.SUCCEEDED}
    from templates_app.expressions import render

    ctx = {
        "vars": inputs,
        "steps": {r["step_id"]: {"output": r["output"], "status": r["status"]} for r in rows},
        "run": {"id": str(run_id)},
    }
    return render(declared, ctx)


def decide_pending(run: Run, enqueue: Iterable[int] = ()) -> None:
    """Decide ``run``'s top-level pending steps whose dependencies are all done, inside the caller's
    transaction (which holds the run's lock); also send the already-``queued`` steps ``enqueue``.

    For a run just admitted, and for ``runs.services`` after it reset rows for a retry: the same
    cascade as a completion, so skips, conditions and map expansion behave as on the first pass.
    """
    batch = state.Batch()
    batch.enqueue.extend(enqueue)
    ready = list(
        Step.objects.filter(run_id=run.pk, parent__isnull=True, status=StepStatus.PENDING, pending_deps=0).order_by(
            "id"
        )
    )
    Cascade(run, batch).decide(ready)
    batch.flush(priority=run.priority)


def activate_run(run_id: Any) -> bool:
    """Start a run that ``start_run`` left ``pending`` (a concurrent-run limit was full).

    Sets it running (started now, deadline from now) and queues its root steps after commit.
    Returns False when the run is gone or no longer pending (cancelled meanwhile).
    """
    with transaction.atomic():
        run = state.activate(run_id, state.now())
        if run is None:
            return False
        batch = state.Batch()
        batch.trace(run.pk, TraceKind.STATE, "run started: a concurrency slot is free")
        batch.flush()
        decide_pending(run)
        if run.deadline:
            timeout = run.spec.get("timeout")
            transaction.on_commit(lambda: broker.schedule_deadline(run.pk, timeout))
    return True


def admit_waiting_runs(tenant_id: str | None = None) -> int:
    """Start the waiting runs whose limits now have room (the gate decides which). Returns how many."""
    return gate.promote(tenant_id, activate_run)
