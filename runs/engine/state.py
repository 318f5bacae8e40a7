"""The only code that writes the status of runs, steps and attempts.

Every transition is a conditional UPDATE that checks the state it leaves (STYLE.md: "claim work
with a conditional update and check the count"), so a racing writer finds nothing to change
instead of overwriting a newer state. The callers (``worker``, ``sweeper``, ``lifecycle``,
``cascade``) decide *what* happens; this module is *how* it is written.

Lock order, everywhere: the run row first (``lock_run``: ``SELECT ... FOR NO KEY UPDATE``), then
its steps by id. Completions, failures, cancels, expiries, retries and the sweeper's recovery
all take the run first, so none of them can wait for another in a circle (healthchecks'
``Check.ping`` locks the check before its pings for the same reason). ``NO KEY UPDATE`` rather
than ``UPDATE``: inserting an Attempt or a Trace row takes a KEY SHARE lock on its run (the
foreign key check), which NO KEY UPDATE does not block, so claims and traces of other steps go
on while a completion holds its run. Two statements take no run lock and need none: a claim
(one step row, its own short transaction) and the sweeper's moves of waiting steps (rows taken
with SKIP LOCKED, which never waits).

Shared completions. One kind of transaction takes the run's lock ``FOR SHARE`` instead: the
completion of a single top-level step that has dependents, no concurrency slot and no
continuation, whose cascade only queues the dependents it makes ready
(``attempts.complete_many``). Such completions of one run hold the lock at the same time; every
other writer still waits for them, and they for it (``FOR SHARE`` conflicts with ``NO KEY
UPDATE``). They cannot wait for each other in a circle: each one locks its own step, then its
dependents in id order in one statement, and the dependents it queues and claims are among
those; no step it locks is another one's own step (a running step's dependents are all pending).
A shared completion never finishes the run, since the dependents it counted down are left
pending or queued, so the check for the run's end stays serialized. When its cascade finds more
to do (a skip, a condition, an expansion, a failed expression: anything that finishes or
expands a step), it raises ``RunLockNeeded``; the transaction rolls back and runs again with the
exclusive lock. Measured: W3 (lattice) 10 % faster, same hour (README, Performance).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from ..choices import STEP_TERMINAL, AttemptOutcome, RunStatus, StepStatus
from ..models import Attempt, Run, Step, Trace
from . import sql


def now() -> datetime:
    return timezone.now()


def json_safe(value: Any) -> Any:
    """Round-trip through JSON so what we store is exactly what a reader gets back."""
    return json.loads(json.dumps(value, default=str))


def one_line(text: str, limit: int = 2000) -> str:
    """``text`` on one line, at most ``limit`` characters (an ellipsis marks a cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def lock_run(run_id: Any) -> Run | None:
    """Lock the run row (first lock of every status-writing transaction). None: it is gone."""
    return sql.lock_run(run_id)


class RunLockNeeded(Exception):
    """Raised in a shared completion (module docstring, "Shared completions") whose cascade
    must do more than queue steps; its caller rolls the transaction back and runs it again
    with the run's exclusive lock."""


def finish_check(run_id: Any) -> tuple[Run | None, bool, list[dict[str, Any]], Any]:
    """Lock the run (as :func:`lock_run`) and read whether every step of it is finished:
    ``(run, unfinished, top-level step rows, declared outputs)`` (``sql.finish_check``)."""
    return sql.finish_check(run_id, sorted(str(s) for s in STEP_TERMINAL))


# --- what one transaction collects --------------------------------------------------------------


@dataclass
class Batch:
    """What one transaction collects: steps to mark queued, traces to insert, step ids to send
    after commit. ``flush`` writes them in one round trip (``sql.write_batch``)."""

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
            Trace(run_id=run_id, step_row_id=step_pk, attempt=attempt, kind=kind, message=message, data=data)
        )

    def flush(self, priority: int | None = None, last: bool = False) -> None:
        """Mark the decided steps queued, insert the traces now, send the messages after commit.
        ``last``: nothing is written after, so the transaction's COMMIT goes in the same round
        trip where it may (``sql.may_commit``)."""
        commit = last and sql.may_commit()
        if self.queue or self.traces or commit:
            pks, traces, self.queue, self.traces = self.queue, self.traces, [], []
            sql.write_batch(pks, now(), traces, commit=commit)
        if self.enqueue:
            from .broker import enqueue_steps

            ids, self.enqueue = self.enqueue, []
            transaction.on_commit(lambda: enqueue_steps(ids, priority=priority))


# --- runs ----------------------------------------------------------------------------------------


def create_run(fields: dict[str, Any], step_rows: list[dict[str, Any]]) -> tuple[Run, list[Step]]:
    """Insert a run (status ``running``) and its step rows (``pending``) in the caller's transaction.

    ``step_rows``: Step field values without ``run``. Returns the run and its steps (primary keys
    set where the database returns them). Two statements (:func:`create_runs`).
    """
    return create_runs([(fields, step_rows)])[0]


def create_runs(items: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> list[tuple[Run, list[Step]]]:
    """:func:`create_run` for many runs: ``items`` of (Run fields, step rows); one INSERT for the
    runs and one for all their steps, in one round trip. Returns (run, its steps) per item, in
    order."""
    runs = [Run(status=RunStatus.RUNNING, **fields) for fields, _rows in items]
    per_run = [[Step(run=run, **row) for row in rows] for run, (_fields, rows) in zip(runs, items, strict=True)]
    sql.insert(runs, [step for steps in per_run for step in steps])  # a run's id is set in Python
    return list(zip(runs, per_run, strict=True))


def append_steps(run_id: Any, step_rows: list[dict[str, Any]]) -> list[Step]:
    """Insert step rows (``pending``) into a running run and count them in ``steps_total``.

    The caller holds the run's lock (a completion's transaction: runs/engine/append.py).
    ``step_rows`` as in :func:`create_run`. Returns the new steps in order, primary keys set.
    """
    steps = [Step(run_id=run_id, **row) for row in step_rows]
    Step.objects.bulk_create(steps)
    if any(s.pk is None for s in steps):
        by_id = {
            s.step_id: s for s in Step.objects.filter(run_id=run_id, step_id__in=[r["step_id"] for r in step_rows])
        }
        steps = [by_id[r["step_id"]] for r in step_rows]
    Run.objects.filter(pk=run_id).update(steps_total=F("steps_total") + len(steps))
    return steps


def run_finished_on_commit(run: Run, status: str) -> None:
    """After the commit that ended ``run`` (as :func:`lock_run` read it): wake the step waiting for
    it, if any (``Run.metadata["parent_step"]``: an agent task's tool call started it as a child
    run), and send ``runs.signals.run_finished`` when the run carries metadata. The waiting step
    is in ``retry_wait`` (StepDeferred); one still running finds nothing to wake and re-checks."""
    run_id, metadata = run.pk, run.metadata
    if not metadata:
        return
    parent = metadata.get("parent_step")
    if isinstance(parent, int):
        from .broker import enqueue_steps

        transaction.on_commit(lambda: enqueue_steps(make_due([parent])))

    def notify() -> None:
        import logging

        from ..signals import run_finished

        for receiver, result in run_finished.send_robust(Run, run_id=run_id, status=status, metadata=metadata):
            if isinstance(result, Exception):
                logging.getLogger("orchestrator.engine").error(
                    "run_finished receiver %s failed for run %s: %s", receiver, run_id, result
                )

    transaction.on_commit(notify)


def hold_pending(run: Run) -> None:
    """A run over a concurrent-run limit waits ``pending`` (not started, no deadline yet)."""
    Run.objects.filter(pk=run.pk, status=RunStatus.RUNNING).update(
        status=RunStatus.PENDING, started_at=None, deadline=None
    )
    run.status, run.started_at, run.deadline = RunStatus.PENDING, None, None


def activate(run_id: Any, at: datetime) -> Run | None:
    """``pending`` -> ``running`` (started ``at``, deadline from then). Locks the run; None when
    it is gone or no longer pending."""
    run = Run.objects.select_for_update(no_key=True).filter(pk=run_id, status=RunStatus.PENDING).first()
    if run is None:
        return None
    timeout = run.spec.get("timeout")
    run.status, run.started_at = RunStatus.RUNNING, at
    run.deadline = at + timedelta(seconds=timeout) if timeout else None
    Run.objects.filter(pk=run.pk).update(status=run.status, started_at=at, deadline=run.deadline)
    return run


def finish_run(run_id: Any, status: str, *, outputs: Any, error: str, at: datetime) -> bool:
    """An active run reaches ``status`` (succeeded or failed). False when it had already ended."""
    return sql.finish_run(
        run_id, status, outputs=json_safe(outputs), error=error, at=at, active=[RunStatus.PENDING, RunStatus.RUNNING]
    )


def stop_run(run_id: Any, status: str, reason: str, at: datetime) -> tuple[Run, int] | None:
    """Move an active run to a terminal ``status`` (cancelled, timed_out) with its unfinished steps.

    Lock order: the run, then its unfinished steps by id. Unfinished steps become ``cancelled``;
    their running attempts are closed with outcome ``cancelled`` (their late completions are
    refused: the lease is cleared). Returns the run as it was (status before the stop) and how
    many attempts were cancelled, or None when it is gone or already finished.
    """
    run = lock_run(run_id)
    if run is None or run.status not in (RunStatus.PENDING, RunStatus.RUNNING):
        return None
    unfinished = list(
        Step.objects.select_for_update(no_key=True)
        .filter(run_id=run_id)
        .exclude(status__in=STEP_TERMINAL)
        .order_by("id")
        .values_list("pk", flat=True)
    )
    if unfinished:
        Step.objects.filter(pk__in=unfinished).update(
            status=StepStatus.CANCELLED, error=reason, finished_at=at, lease_token=None, lease_expires_at=None
        )
    cancelled = Attempt.objects.filter(run_id=run_id, outcome=AttemptOutcome.RUNNING).update(
        outcome=AttemptOutcome.CANCELLED, finished_at=at, error=reason
    )
    Run.objects.filter(pk=run_id).update(status=status, finished_at=at, error=reason)
    return run, cancelled


# --- steps decided by the cascade -----------------------------------------------------------------


def finish_inline(step: Step, status: str, *, output: Any = None, error: str = "") -> bool:
    """A step decided without a worker (skipped, condition evaluated, empty map) reaches ``status``.

    Only from the status the caller read (``step.status``). Updates ``step`` in place; False
    when another writer moved it first.
    """
    at = now()
    updated = Step.objects.filter(pk=step.pk, status=step.status).update(
        status=status, output=output, error=error, finished_at=at, started_at=at
    )
    if updated:
        step.status, step.output, step.error = status, output, error
    return bool(updated)


def expand(step: Step, children: list[Step]) -> list[int]:
    """Insert a map step's children (``queued``) and set the parent ``running`` on them.

    Returns the children's ids in item order (to send after commit).
    """
    at = now()
    for child in children:
        child.status, child.queued_at = StepStatus.QUEUED, at
    Step.objects.bulk_create(children, batch_size=1000)
    Step.objects.filter(pk=step.pk).update(status=StepStatus.RUNNING, pending_children=len(children), started_at=at)
    step.status = StepStatus.RUNNING
    Run.objects.filter(pk=step.run_id).update(steps_total=F("steps_total") + len(children))
    return list(Step.objects.filter(parent=step).order_by("map_index").values_list("pk", flat=True))


def stage_items(step: Step, items: list[Any]) -> None:
    """A large map step's items, kept on its ``input`` for the worker that will expand it in
    batches (runs/engine/worker.py ``expand_claimed``); the step is queued by the caller."""
    Step.objects.filter(pk=step.pk).update(input=items)
    step.input = items


def expand_batch(
    step: Step, token: uuid.UUID, items: list[Any], make_rows: Any, size: int, lease_until: datetime
) -> tuple[list[int], int, int] | None:
    """Insert the next ``size`` children of a claimed large map step; the caller holds the run's lock.

    ``items``: the step's staged items (its ``input``, as the claim read it: never rewritten
    while it is expanded). ``make_rows(items, start)`` builds the unsaved child rows of ``items`` (indexes from
    ``start``). The first batch sets the step's ``pending_children`` to the item count (and the
    run's ``steps_total``); each batch extends the lease to ``lease_until``, so a long expansion
    is not taken for a lost one. Resumes after the last child already inserted (a retry after a
    lost attempt inserts nothing twice). Returns (the new children's ids in order, children
    inserted so far, item count), or None when the step is no longer running under ``token``
    (cancelled, or its lease taken over).
    """
    parent = (
        Step.objects.select_for_update(of=("self",))
        .only("id", "pending_children")
        .filter(pk=step.pk, status=StepStatus.RUNNING, lease_token=token)
        .first()
    )
    if parent is None:
        return None
    start = Step.objects.filter(parent_id=step.pk).count()
    changes: dict[str, Any] = {"lease_expires_at": lease_until}
    if parent.pending_children is None:
        changes["pending_children"] = len(items)
        Run.objects.filter(pk=step.run_id).update(steps_total=F("steps_total") + len(items))
    rows = make_rows(items[start : start + size], start)
    at = now()
    for child in rows:
        child.status, child.queued_at = StepStatus.QUEUED, at
    Step.objects.bulk_create(rows)
    Step.objects.filter(pk=step.pk).update(**changes)
    ids = list(
        Step.objects.filter(parent_id=step.pk, map_index__gte=start).order_by("map_index").values_list("pk", flat=True)
    )
    return ids, start + len(rows), len(items)


def expanded(step: Step, token: uuid.UUID, duration_ms: int) -> Step | None:
    """Every child of a large map step is inserted: its attempt closes as ``succeeded`` and its
    lease is released; the step stays ``running`` until its children finish (``cascade.join``).
    The caller holds the run's lock. Returns the step as it is now (for a join when its children
    all finished already), or None when the lease is no longer ``token``'s."""
    at = now()
    if not Step.objects.filter(pk=step.pk, status=StepStatus.RUNNING, lease_token=token).update(
        lease_token=None, lease_expires_at=None, worker=""
    ):
        return None
    Attempt.objects.filter(step_id=step.pk, lease_token=token).update(
        outcome=AttemptOutcome.SUCCEEDED, finished_at=at, duration_ms=duration_ms
    )
    return Step.objects.get(pk=step.pk)


def finish_parent(parent: Step, status: str, *, output: Any, error: str) -> None:
    """A map parent whose last child finished reaches ``status`` (joined outputs or the first error)."""
    Step.objects.filter(pk=parent.pk, status=StepStatus.RUNNING).update(
        status=status, output=output, error=one_line(error), finished_at=now()
    )
    parent.status, parent.output, parent.error = status, output, error


# --- attempts: claim, begin, throttle, close -------------------------------------------------------


@dataclass
class Claim:
    """A step claimed under a lease whose Attempt row is written: what the worker runs."""

    step: Step
    run: Run
    token: uuid.UUID
    now: datetime
    gate_error: str | None = None


class InputsCache:
    """The ``inputs`` of the runs this process claimed steps of lately: at most ``size`` runs
    and ``max_chars`` characters of JSON in all, least recently used out first.

    A run's inputs never change once it is created (runs/services.py, lifecycle.py write them
    once), so a claim need not read them again for a run whose steps this process ran before. A
    map over a run input of 10,000 items read, detoasted and decoded all 10,000 at each of its
    10,000 children's claims: quadratic in the items (README, Performance). Only inputs of at
    least ``min_chars`` characters of JSON are kept (smaller ones cost less to read again than
    the run id the claim would be sent), and none larger than ``max_chars``. Callers must not
    mutate what they get (expressions cannot: templates_app.expressions is an immutable
    sandbox; contexts copy the top level). Thread-safe (the embedded worker runs threads).
    """

    def __init__(self, size: int = 16, min_chars: int = 2048, max_chars: int = 8 * 1024 * 1024) -> None:
        self.size, self.min_chars, self.max_chars = size, min_chars, max_chars
        self._runs: OrderedDict[Any, tuple[Any, int]] = OrderedDict()  # run id -> (inputs, chars)
        self._chars = 0
        self._lock = threading.Lock()

    def snapshot(self) -> dict[Any, Any]:
        """{run id: inputs} held now (what a claim may leave out)."""
        with self._lock:
            return {pk: inputs for pk, (inputs, _chars) in self._runs.items()}

    def fill(self, run: Run, held: dict[Any, Any]) -> None:
        """Give ``run`` its inputs from ``held`` (the snapshot the claim was told of) when the
        claim left them out (None); remember them either way."""
        chars = 0
        if run.pk in held:
            if run.inputs is None:
                run.inputs = held[run.pk]
        elif run.inputs is None:
            return
        else:
            chars = len(json.dumps(run.inputs, default=str))
            if not self.min_chars <= chars <= self.max_chars:
                return
        with self._lock:
            if run.pk in self._runs:
                self._runs.move_to_end(run.pk)
                return
            if not chars:  # pushed out since the snapshot: kept again at its next read
                return
            self._runs[run.pk] = (run.inputs, chars)
            self._chars += chars
            while len(self._runs) > self.size or self._chars > self.max_chars:
                _pk, (_inputs, gone) = self._runs.popitem(last=False)
                self._chars -= gone


#: this process's run inputs (:class:`InputsCache`), shared by every claim it makes
run_inputs = InputsCache()


def claim(
    step_pk: int,
    token: uuid.UUID,
    at: datetime,
    worker: str,
    task_id: str,
    *,
    relaxed: bool,
    batch: Batch | None = None,
    decided: bool = False,
    reuse: tuple[Step, Run] | None = None,
    last: bool = False,
) -> tuple[Step, Run, bool] | None:
    """Claim a step under a lease (``sql.claim_and_begin``); see there for the shape. ``batch``:
    the transaction's steps to mark queued and traces so far are written first, in the claim's
    round trip (they are taken out of the batch). ``decided``: a pending step this transaction
    decided to run, queued and claimed at once; ``reuse``: the caller's step and run instances,
    updated in place (see there for both). ``last``: the claim is the transaction's last write,
    so its COMMIT goes in the claim's round trip where it may (``sql.may_commit``: the outermost
    atomic block on PostgreSQL); what the caller writes after a claim that took nothing, or did
    not begin, is then a transaction of its own."""
    from orchestrator_site.conf import conf

    writes: tuple[list[int], list[Trace]] | None = None
    if batch is not None:
        writes, batch.queue, batch.traces = (batch.queue, batch.traces), [], []
    held = run_inputs.snapshot()
    claimed = sql.claim_and_begin(
        step_pk,
        token,
        at,
        worker[:200],
        task_id,
        conf.default_step_timeout,
        conf.lease_grace,
        relaxed=relaxed,
        writes=writes,
        inputs_known=list(held),
        decided=decided,
        reuse=reuse,
        commit=last and sql.may_commit(),
    )
    if claimed is not None and (reuse is None or claimed[1] is not reuse[1]):  # a run read by this claim
        run_inputs.fill(claimed[1], held)
    return claimed


def fast_claim(worker: str, task_id: str, plain: str) -> sql.FastClaim:
    """A request to claim the next step of a chain in a completion's first round trip
    (``sql.FastClaim``), with a new lease token and the timeouts :func:`claim` uses."""
    from orchestrator_site.conf import conf

    return sql.FastClaim(uuid.uuid4(), worker[:200], task_id, conf.default_step_timeout, conf.lease_grace, plain)


def begin(step: Step, run: Run, token: uuid.UUID, at: datetime, worker: str, task_id: str) -> None:
    """Write the Attempt row of a claimed step (the claim's SQL did not: gated step or ORM path)."""
    sql.insert(
        [
            Attempt(
                step=step,
                run=run,
                number=step.attempts,
                worker=worker[:200],
                lease_token=token,
                started_at=at,
                task_id=task_id[:255],
            )
        ]
    )


def restart_clock(step: Step, at: datetime) -> None:
    """A gated step admitted after waiting on the gate's locks starts now, not at its claim."""
    Step.objects.filter(pk=step.pk).update(started_at=at)


def cancel_claimed(step: Step, token: uuid.UUID, run_status: str, at: datetime) -> None:
    """A step claimed for a run that ended meanwhile: cancelled, the attempt not counted."""
    Step.objects.filter(pk=step.pk, lease_token=token).update(
        status=StepStatus.CANCELLED,
        finished_at=at,
        lease_token=None,
        lease_expires_at=None,
        error=f"run is {run_status}",
        attempts=F("attempts") - 1,
    )


def throttle(step: Step, token: uuid.UUID, delay: float, *, countdown: bool) -> None:
    """Hand a just-claimed step back without running it: ``retry_wait`` for ``delay`` seconds,
    the claim undone (``attempts`` back, lease cleared). ``countdown``: a delayed message carries
    it (``queued_at`` set so the sweeper does not send another), else the sweeper sends it when due."""
    at = now()
    Step.objects.filter(pk=step.pk, lease_token=token).update(
        status=StepStatus.RETRY_WAIT,
        attempts=F("attempts") - 1,
        lease_token=None,
        lease_expires_at=None,
        worker="",
        next_attempt_at=at + timedelta(seconds=delay),
        queued_at=at if countdown else None,
    )


def defer(step: Step, token: uuid.UUID, delay: float, *, countdown: bool, reason: str, duration_ms: int) -> bool:
    """A handler's "not yet" (StepDeferred): ``running`` -> ``retry_wait`` for ``delay`` seconds
    with the attempt closed as ``deferred``; one more attempt is allowed, so the deferral costs
    none. ``countdown`` as in :func:`throttle`. False when the lease is no longer ``token``'s."""
    at = now()
    if not Step.objects.filter(pk=step.pk, status=StepStatus.RUNNING, lease_token=token).update(
        status=StepStatus.RETRY_WAIT,
        max_attempts=F("max_attempts") + 1,
        lease_token=None,
        lease_expires_at=None,
        next_attempt_at=at + timedelta(seconds=delay),
        queued_at=at if countdown else None,
    ):
        return False
    Attempt.objects.filter(step=step, lease_token=token).update(
        outcome=AttemptOutcome.DEFERRED, finished_at=at, duration_ms=duration_ms, error=one_line(reason)
    )
    step.status, step.max_attempts = StepStatus.RETRY_WAIT, step.max_attempts + 1
    return True


@dataclass
class Success:
    """A successful attempt to record: the claimed ``step`` and its lease ``token``, the
    handler's ``output`` and the rendered params (``resolved``), both JSON-safe, and its
    duration in ms."""

    step: Step
    token: uuid.UUID
    output: Any
    resolved: Any
    duration_ms: int


def close_successes(
    run_id: Any, items: list[tuple[Success, bool]], *, shared: bool = False, fast: sql.FastClaim | None = None
) -> list[tuple[bool, list[Step] | None]]:
    """Each ``(success, decrement)``: ``running`` -> ``succeeded`` with its attempt closed and
    its "succeeded" trace written, only while the lease is the success's token; with
    ``decrement``, its dependents counted down too. All steps are of run ``run_id``.

    Locks the run first (same round trip: ``sql.close_successes``; ``shared``: the shared lock,
    see "Shared completions" above; ``fast``: the next step of a chain claimed and the
    transaction committed in that round trip, see ``sql.FastClaim``). Per item, ``(False, None)``
    when the lease was taken over or the step was cancelled (nothing of it is written), else
    ``(True, ready)``: the dependents that reached zero (None without ``decrement``). Updates
    each closed step in place.
    """
    at = now()
    closes = [
        sql.Close(
            step=success.step,
            token=success.token,
            output_json=json.dumps(success.output),
            input_json=json.dumps(success.resolved, default=str),
            duration_ms=success.duration_ms,
            message=f"step '{success.step.step_id}' succeeded in {success.duration_ms} ms",
            decrement=decrement,
        )
        for success, decrement in items
    ]
    if fast is not None:  # the next step starts when this one finished
        fast.now = at
    results = sql.close_successes(run_id, closes, at, shared=shared, fast=fast)
    for (success, _), (ok, _ready) in zip(items, results, strict=True):
        if ok:
            success.step.status, success.step.output = StepStatus.SUCCEEDED, success.output
    return results


def close_failure(
    step: Step,
    token: uuid.UUID,
    *,
    status: str,
    message: str,
    resolved: Any,
    delay: float,
    countdown: bool,
    outcome: str,
    duration_ms: int,
    http_status: int | None,
) -> bool:
    """``running`` -> ``retry_wait`` (next try in ``delay`` seconds), ``dead`` or ``failed``, with
    the attempt closed as ``outcome``; only while the lease is ``token``'s (False: nothing written).
    ``countdown`` as in :func:`throttle`. The caller holds the run's lock. Updates ``step``."""
    at = now()
    changes: dict[str, Any] = {
        "status": status,
        "error": message,
        "lease_token": None,
        "lease_expires_at": None,
        "input": json_safe(resolved),
    }
    if status == StepStatus.RETRY_WAIT:
        changes["next_attempt_at"] = at + timedelta(seconds=delay)
        changes["queued_at"] = at if countdown else None
    else:
        changes["finished_at"] = at
    if not Step.objects.filter(pk=step.pk, status=StepStatus.RUNNING, lease_token=token).update(**changes):
        return False
    Attempt.objects.filter(step=step, lease_token=token).update(
        outcome=outcome,
        finished_at=at,
        duration_ms=duration_ms,
        error=message,
        http_status=http_status if isinstance(http_status, int) and 0 < http_status < 1000 else None,
    )
    step.status, step.error = status, message
    return True


def refuse(step: Step, token: uuid.UUID, duration_ms: int) -> None:
    """A completion that came too late: its attempt (running, or closed as lost) becomes ``refused``."""
    Attempt.objects.filter(
        step=step, lease_token=token, outcome__in=[AttemptOutcome.RUNNING, AttemptOutcome.LOST]
    ).update(
        outcome=AttemptOutcome.REFUSED,
        finished_at=now(),
        duration_ms=duration_ms,
        error="completion refused: the lease was taken over or the step was cancelled",
    )


def extend_lease(step_pk: int, token: uuid.UUID, until: datetime) -> bool:
    """Heartbeat: push the lease of a running step to ``until``, only while the lease is ``token``'s."""
    return bool(
        Step.objects.filter(pk=step_pk, status=StepStatus.RUNNING, lease_token=token).update(lease_expires_at=until)
    )


# --- waiting steps made due ------------------------------------------------------------------------


def make_due(step_pks: list[int]) -> list[int]:
    """Waiting steps (``retry_wait``) become due now. Returns those that were still waiting."""
    due = list(Step.objects.filter(pk__in=step_pks, status=StepStatus.RETRY_WAIT).values_list("pk", flat=True))
    if due:
        Step.objects.filter(pk__in=due, status=StepStatus.RETRY_WAIT).update(next_attempt_at=now())
    return due


def queue_due_retries(candidates: list[int], due_filter: Any, at: datetime) -> list[tuple[int, Any, str]]:
    """Sweeper: due ``retry_wait`` steps -> ``queued``. Rows another sweeper holds are skipped
    (SKIP LOCKED) and the condition re-checked under the lock, so a step is moved (and sent) once.

    Returns ``[(pk, run id, step id)]`` of the moved steps.
    """
    moved = list(
        Step.objects.select_for_update(skip_locked=True)
        .filter(due_filter, pk__in=candidates, status=StepStatus.RETRY_WAIT, next_attempt_at__lte=at)
        .values_list("pk", flat=True)
    )
    Step.objects.filter(pk__in=moved, status=StepStatus.RETRY_WAIT).update(status=StepStatus.QUEUED, queued_at=at)
    return list(Step.objects.filter(pk__in=moved).values_list("pk", "run_id", "step_id"))


def mark_resent(candidates: list[int], stale: datetime, at: datetime) -> list[int]:
    """Sweeper: queued steps whose message looks lost get ``queued_at`` = ``at`` (they are sent
    again). Locked and re-checked as in :func:`queue_due_retries`. Returns their ids."""
    resent = list(
        Step.objects.select_for_update(skip_locked=True)
        .filter(pk__in=candidates, status=StepStatus.QUEUED, queued_at__lt=stale)
        .values_list("pk", flat=True)
    )
    Step.objects.filter(pk__in=resent).update(queued_at=at)
    return resent


def resend_queued(step_pks: list[int], at: datetime) -> list[int]:
    """Sweeper: steps of a worker that died while holding their messages, still ``queued``, are
    sent again now. Returns those still queued (locked with SKIP LOCKED, re-checked)."""
    resent = list(
        Step.objects.select_for_update(skip_locked=True)
        .filter(pk__in=step_pks, status=StepStatus.QUEUED)
        .values_list("pk", flat=True)
    )
    Step.objects.filter(pk__in=resent).update(queued_at=at)
    return resent


# --- retry: rows reset for another pass ------------------------------------------------------------


def reset_step(step: Step, *, pending_deps: int, base_attempts: int, spec: dict[str, Any] | None = None) -> None:
    """A step retried from scratch (Airflow's "clear"): ``pending`` again with its dependencies
    still to finish, and ``base_attempts`` more attempts (numbers go on); ``spec`` replaces its
    spec (edited params). Caller holds the run."""
    extra = {"spec": spec} if spec is not None else {}
    Step.objects.filter(pk=step.pk).update(
        **extra,
        status=StepStatus.PENDING,
        pending_deps=pending_deps,
        pending_children=None,
        max_attempts=step.attempts + base_attempts,
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


def requeue_child(child: Step, *, base_attempts: int, at: datetime) -> None:
    """A map item retried on its own: ``queued`` again with ``base_attempts`` more attempts."""
    Step.objects.filter(pk=child.pk).update(
        status=StepStatus.QUEUED,
        queued_at=at,
        max_attempts=child.attempts + base_attempts,
        next_attempt_at=None,
        lease_expires_at=None,
        lease_token=None,
        output=None,
        error="",
        started_at=None,
        finished_at=None,
    )


def reopen_parent(parent: Step) -> None:
    """A map parent some of whose items run again: ``running``, waiting for the unfinished ones."""
    unfinished = Step.objects.filter(parent_id=parent.pk).exclude(status__in=STEP_TERMINAL).count()
    Step.objects.filter(pk=parent.pk).update(
        status=StepStatus.RUNNING, pending_children=unfinished, output=None, error="", finished_at=None
    )


def reopen_run(run: Run, changes: dict[str, Any]) -> None:
    """A retried run is ``running`` again (``changes``: deadline, steps_total as the retry says)."""
    changes = {"status": RunStatus.RUNNING, "finished_at": None, "error": "", "outputs": None, **changes}
    Run.objects.filter(pk=run.pk).update(**changes)
    for name, value in changes.items():
        setattr(run, name, value)
