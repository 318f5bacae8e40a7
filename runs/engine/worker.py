"""The worker side: claim a step, pass the gate, run its handler, record the outcome.

Inline continuation (a worker runs one step it just made ready, within a step and time budget)
is here; docs/engine.md says why it is part of the design.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from django.db import InterfaceError, OperationalError, connection, transaction

from orchestrator_site import logging as logctx
from orchestrator_site.conf import conf
from templates_app.errors import ExpressionError, WorkflowError

from .. import metrics
from ..choices import AttemptOutcome, TraceKind
from ..models import Attempt, Run, Step, Trace
from . import append, attempts, broker, cascade, gate, sql, state, sweeper
from .context import build_context

log = logging.getLogger("orchestrator.engine")


def execute_step(step_pk: int, worker: str = "", task_id: str = "", more: Iterable[int] = ()) -> str:
    """Claim, run and record one step, then the steps ``more`` of a batched message. Returns what
    happened to ``step_pk`` (for logs and tests).

    ``task_id`` (the Celery task's id) is kept on the Attempt so that cancelling the run can
    revoke the task.

    Inline continuation: when the step succeeds and makes dependents ready, the completion's
    transaction also claims one of them (same conditional claim, lease, Attempt row; its state
    goes queued -> running in that commit) and this call runs it next, without a broker round
    trip; the others are sent as messages. At most ``ORCHESTRATOR_INLINE_STEPS`` steps follow one
    message and none starts after ``ORCHESTRATOR_INLINE_SECONDS``, so a worker returns to the
    broker (and to more urgent messages) regularly. A step claimed inline whose worker dies is
    recovered like any other: by its lease, or at once when its worker is known dead.

    Batched messages (``more``: broker.batches): each further step is claimed, run and recorded
    exactly as its own message would be, within the same step and time budget. The ones not
    started go back to the broker as messages of their own when the budget ends, or as soon as
    a step of this message runs longer than ``ORCHESTRATOR_BATCH_HOLD`` seconds (:class:`Held`),
    so a slow step delays the others by at most that long. They are ``queued`` rows all along:
    a worker that dies holding them is recovered by its heartbeat or the sweeper's re-send. The
    successes of a batched message's steps are recorded together (group commit, :class:`Group`).

    Returns one of "not-claimed" (already taken, finished or gone: a late duplicate message),
    "cancelled", "throttled", "deferred", "succeeded", "retry", "dead", "failed", "refused" (the
    lease was taken over while the handler ran; its result is discarded).
    """
    held = Held(more)
    budget = _Budget()
    group = Group() if held.holds() else None

    def record_group() -> None:  # and run inline the step it claims, if any
        if group is not None:
            _follow(group.flush(follow=(worker, task_id) if budget.room() else None), worker, task_id, held, budget)

    try:
        result = _execute_one(step_pk, worker, task_id, held, budget, group)
        while budget.room() and (pk := held.take()) is not None:
            budget.spend()
            if group is not None and group.due():
                record_group()
            _execute_one(pk, worker, task_id, held, budget, group)
    except BaseException:
        # a step of the message failed to be recorded (the database is gone past its lease,
        # say): the successes already in hand are recorded first, as any outcome would be
        # (through the outage), instead of waiting for their leases; the rest goes back
        held.release()
        if group is not None:
            group.flush()
        raise
    held.release()  # the budget ended: whatever is left goes back to the broker
    record_group()
    return result


class _Budget:
    """What one message may still run: ``ORCHESTRATOR_INLINE_STEPS`` steps after its own
    (continued inline or taken from a batch), none starting later than
    ``ORCHESTRATOR_INLINE_SECONDS`` after it began."""

    def __init__(self) -> None:
        self.ends = time.monotonic() + conf.inline_seconds
        self.started = 0  # steps started after the message's own

    def room(self) -> bool:
        """Whether another step may start now."""
        return self.started < conf.inline_steps and time.monotonic() < self.ends

    def spend(self) -> None:
        self.started += 1


class Held:
    """The step ids of a batched message not started yet, in order.

    ``take`` hands the next one to this worker; ``release`` sends the rest back to the broker as
    messages of one step each (they are committed ``queued`` rows: any worker may claim them).
    ``watch`` releases them from a timer thread when the step it wraps runs longer than
    ``ORCHESTRATOR_BATCH_HOLD`` seconds, so steps of a batch never wait long behind a slow one.
    ``take`` and ``release`` share a lock: each id is either run here or sent, never both (and a
    duplicate would find nothing to claim anyway).
    """

    def __init__(self, step_pks: Iterable[int]) -> None:
        self._pks = [int(pk) for pk in step_pks]
        self._lock = threading.Lock()
        self.priority: int | None = None  # the run's, as the last claimed step's run says

    def holds(self) -> bool:
        """Whether any step is still held."""
        with self._lock:
            return bool(self._pks)

    def take(self) -> int | None:
        with self._lock:
            return self._pks.pop(0) if self._pks else None

    def release(self) -> None:
        with self._lock:
            pks, self._pks = self._pks, []
        if pks:
            broker.enqueue_steps(pks, priority=self.priority, batch=False)

    @contextmanager
    def watch(self) -> Iterator[None]:
        """Release the held steps if the block lasts longer than ``ORCHESTRATOR_BATCH_HOLD``
        seconds (at once when that is 0), from this process's :class:`Watchdog` thread."""
        if not self._pks:
            yield
            return
        if conf.batch_hold <= 0:
            self.release()
            yield
            return
        watchdog.arm(self, time.monotonic() + conf.batch_hold)
        try:
            yield
        finally:
            watchdog.disarm(self)


class Watchdog:
    """One thread per process that releases a message's held steps (:meth:`Held.release`)
    when the step it runs passes its deadline.

    A ``threading.Timer`` per step cost a thread start and a cancel each: 7 % of the worker's
    CPU in the bench's W6 (py-spy). Arming and disarming here take a lock and a dict entry; the
    thread sleeps until the earliest deadline armed (woken only by an earlier one), so
    while steps run back to back it wakes at most once per ``ORCHESTRATOR_BATCH_HOLD``. Each
    thread of the embedded worker arms its own ``Held``. A prefork child starts its own thread
    at its first arm (a thread does not survive ``fork``).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[Held, float]] = {}  # id(held) -> (held, monotonic deadline)
        self._thread: threading.Thread | None = None

    def arm(self, held: Held, deadline: float) -> None:
        """Release ``held`` at ``deadline`` (``time.monotonic()`` seconds) unless disarmed first."""
        with self._cond:
            soonest = min((armed for _, armed in self._armed.values()), default=None)
            self._armed[id(held)] = (held, deadline)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="batch-hold-watchdog", daemon=True)
                self._thread.start()
            elif soonest is None or deadline < soonest:  # it sleeps past this deadline, or for ever
                self._cond.notify()

    def disarm(self, held: Held) -> None:
        with self._cond:
            self._armed.pop(id(held), None)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._armed:
                    self._cond.wait()
                now = time.monotonic()
                due = [held for held, deadline in self._armed.values() if deadline <= now]
                if not due:
                    self._cond.wait(min(deadline for _, deadline in self._armed.values()) - now)
                    continue
                for held in due:
                    del self._armed[id(held)]
            for held in due:  # outside the lock: it sends broker messages
                try:
                    held.release()
                except Exception:  # the broker is down: the steps stay queued rows (sweeper)
                    log.exception("releasing held steps failed")


#: this process's watchdog (:class:`Watchdog`)
watchdog = Watchdog()


def _execute_one(step_pk: int, worker: str, task_id: str, held: Held, budget: _Budget, group: Group | None) -> str:
    """:func:`execute_step` for one step of a message and the steps it continues inline; the
    message's other steps are watched (``held``) from its claim to the end of each step."""
    with held.watch():
        at = state.now()
        token = uuid.uuid4()
        # One statement, its own transaction: the conditional claim under a lease, the Attempt
        # row and the trace (sql.claim_and_begin says why its commit need not wait for the disk).
        # Steps behind a flow-control gate, or of a run that ended, finish the job in begin().
        claimed = state.claim(step_pk, token, at, worker, task_id, relaxed=not connection.in_atomic_block)
        if claimed is None:
            # A message redelivered after its pool process was killed (reject_on_worker_lost)
            # finds the step still running under the dead process: recover it now rather than
            # at lease expiry.
            sweeper.recover_dead_holders([step_pk])
            return "not-claimed"
        step, run, begun = claimed
        held.priority = run.priority
        if begun:
            logctx.bind(run_id=run.pk, step_id=step.step_id, tenant=run.tenant_id, correlation_id=run.correlation_id)
            started: state.Claim | str = state.Claim(step, run, token, at)
        else:
            with transaction.atomic():
                batch = state.Batch()
                started = attempts.begin(step, run, token, at, worker, task_id, batch)
                batch.flush()
        if isinstance(started, str):
            return started
        result, follow = _run_claimed(started, worker, task_id, budget.room(), group)
    _follow(follow, worker, task_id, held, budget)
    return result


def _follow(follow: state.Claim | None, worker: str, task_id: str, held: Held, budget: _Budget) -> None:
    """Run the steps continued inline, each claimed by the completion of the one before."""
    while follow is not None:
        metrics.steps_sent(1)  # scheduled too, though continued inline instead of sent
        budget.spend()
        with held.watch():
            _, follow = _run_claimed(follow, worker, task_id, budget.room())


class Group:
    """Successful attempts of a batched message's steps, recorded together: one transaction and
    one flushed commit for up to ``ORCHESTRATOR_BATCH_STEPS`` of them (group commit;
    ``attempts.complete_many``), instead of one each.

    Only plain successes wait here (no appended steps, no flow-control slot to give back), and
    only successes of one run (one run lock per commit; :meth:`accepts`). :func:`execute_step` records
    them before the next step when the oldest has waited ``ORCHESTRATOR_BATCH_HOLD`` seconds or
    the group is full, and when the message ends. Until then the steps stay ``running`` under
    their leases, so a worker that dies meanwhile loses only attempts that are then recovered
    like any attempt of a dead worker (run again), and a late record is refused as always. A
    waiting success can wait longer when the step after it is slow: at most that step's run.
    """

    def __init__(self) -> None:
        self.successes: list[state.Success] = []
        self.since = 0.0  # monotonic seconds when the oldest waiting success was added
        self.mixed = False

    def accepts(self, step: Step, continuation: Any) -> bool:
        """Whether ``step``'s success (with no ``continuation``) may wait here. Not once the
        message has shown steps of two runs (a batch of many runs' first steps): each of those
        is recorded at once and continues its own run inline, as without a group."""
        if continuation is not None or gate.gated(step.spec) or self.mixed:
            return False
        if self.successes and self.successes[0].step.run_id != step.run_id:
            self.mixed = True  # the waiting ones are recorded before the next step (due)
            return False
        return True

    def add(self, success: state.Success) -> None:
        if not self.successes:
            self.since = time.monotonic()
        self.successes.append(success)

    def due(self) -> bool:
        """Full, or its oldest success has waited ``ORCHESTRATOR_BATCH_HOLD`` seconds, or no
        more will join it (:meth:`accepts`)."""
        return bool(self.successes) and (
            self.mixed or len(self.successes) >= conf.batch_steps or time.monotonic() - self.since >= conf.batch_hold
        )

    def flush(self, follow: tuple[str, str] | None = None) -> state.Claim | None:
        """Record the waiting successes (retried through a database outage like any outcome);
        with ``follow`` = (worker, task id), claim one step they made ready to run inline.
        Returns that claim or None."""
        if not self.successes:
            return None
        successes, self.successes = self.successes, []
        first = successes[0]
        results, next_claim = _outlasting_outages(
            first.step,
            first.token,
            lambda: attempts.complete_many(successes, follow=follow),
            follow=follow,
            completed=[s.step for s in successes],
        )
        if isinstance(results, str):  # an uncertain commit that had gone through: one transaction
            results = [results] * len(successes)
        from agents.registry import dry_run

        for success, result in zip(successes, results, strict=True):
            if dry_run.get() is None:
                metrics.attempt_finished(success.step.type, result, success.duration_ms / 1000)
            if result != "succeeded":
                log.info("step %s: %s", success.step.step_id, result, extra={"attempt": success.step.attempts})
        return next_claim


def step_timeout(step: Step, run: Run, at: Any) -> float:
    """Seconds the handler may take: the step's timeout (the lease's, sql.step_timeout), cut to
    what is left of the run's deadline."""
    timeout = sql.step_timeout(step.spec, conf.default_step_timeout)
    if run.deadline:
        timeout = min(timeout, max(0.0, (run.deadline - at).total_seconds()))
    return timeout


def _run_claimed(
    claim: state.Claim, worker: str, task_id: str, follow: bool, group: Group | None = None
) -> tuple[str, state.Claim | None]:
    """Run a claimed step's handler and record the outcome.

    Returns (outcome, the dependent claimed inline to run next or None); ``follow`` False: claim
    none (every ready dependent is sent as a message). With ``group``, a success it accepts is
    left to it (recorded with others later: "succeeded", no inline claim).
    """
    from agents.registry import (
        StepContext,
        StepContinuation,
        StepDeferred,
        StepError,
        get_handler,
        run_with_timeout,
    )

    step, run, token, at = claim.step, claim.run, claim.token, claim.now
    if step.parent_id is None and step.spec.get("for_each") is not None and claim.gate_error is None:
        return expand_claimed(claim), None  # only a large map is ever claimed (cascade.Cascade)
    timeout = step_timeout(step, run, at)
    started = time.monotonic()
    output: Any = None
    error: StepError | None = None
    deferred: StepDeferred | None = None
    resolved: Any = None
    continuation: StepContinuation | None = None
    try:
        from templates_app.expressions import limits, render

        if claim.gate_error is not None:
            raise StepError(claim.gate_error, permanent=True)
        ctx_values = build_context(run, step.spec.get("refs", []), step)
        if conf.release_db_during_step and not connection.in_atomic_block:
            # a thread-pool worker with many threads in slow calls holds no idle connections
            connection.close()
        # expressions run under the step's timeout and size limits (templates_app.expressions)
        with limits(deadline=started + timeout):
            resolved = render(step.spec.get("params", {}), ctx_values, field="params")
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
        output = run_with_timeout(handler, ctx)
        if isinstance(output, StepContinuation):  # the handler appends steps (runs/engine/append.py)
            continuation, output = output, output.output
            try:
                append.check(run.pk, continuation)
            except ValueError as exc:
                raise StepError(f"step '{step.step_id}': {exc}", permanent=True) from None
        output = state.json_safe(output)
    except (ExpressionError, WorkflowError) as exc:
        error = StepError(str(exc), permanent=True)
    except StepDeferred as exc:
        deferred = exc
    except StepError as exc:
        error = exc
    except Exception as exc:  # a handler bug must not lose the step: record it as a failed attempt
        log.exception("handler of step %s raised", step.pk)
        error = StepError(f"{type(exc).__name__}: {exc}")
    duration_ms = int((time.monotonic() - started) * 1000)
    next_claim: state.Claim | None = None
    if error is None and deferred is None and group is not None and group.accepts(step, continuation):
        group.add(state.Success(step, token, output, resolved, duration_ms))
        return "succeeded", None  # its metrics when the group is recorded
    if deferred is not None:
        result, _ = _outlasting_outages(step, token, lambda: (attempts.defer(step, token, deferred, duration_ms), None))
    elif error is None:
        result, next_claim = _outlasting_outages(
            step,
            token,
            lambda: attempts.complete(
                step,
                token,
                output=output,
                resolved=resolved,
                duration_ms=duration_ms,
                follow=(worker, task_id) if follow else None,
                continuation=continuation,
            ),
            follow=(worker, task_id) if follow else None,
        )
    else:
        result, _ = _outlasting_outages(
            step, token, lambda: (attempts.fail(step, token, error, resolved=resolved, duration_ms=duration_ms), None)
        )
    from agents.registry import dry_run

    if dry_run.get() is None:  # a generation's dry run (stubbed handlers) is not production work
        metrics.attempt_finished(step.type, result, time.monotonic() - started)
    if result != "succeeded":
        log.info("step %s: %s", step.step_id, result, extra={"attempt": step.attempts, "duration_ms": duration_ms})
    return result, next_claim


def expand_claimed(claim: state.Claim) -> str:
    """Expand a claimed large map step (a ``for_each`` with more items than
    ``ORCHESTRATOR_EXPAND_BATCH``, whose items ``cascade`` staged on its ``input``): insert its
    children ``ORCHESTRATOR_EXPAND_BATCH`` at a time, each batch one transaction (the run's lock
    first, then the step) whose children are sent once it commits, so the first items run while
    later ones are inserted and no transaction holds the run for the whole map.

    The expansion is the step's attempt: leased, extended at each batch, and recovered like any
    attempt if its worker dies (the retry resumes after the last child inserted). When every
    child is in, the attempt closes ``succeeded`` and the step waits ``running`` for its children
    (the last one joins it, ``cascade.Cascade.join``). Returns "expanded", or "refused" when the
    step was cancelled or its lease taken over meanwhile (nothing more is inserted).
    """
    step, run, token = claim.step, claim.run, claim.token
    started = time.monotonic()
    size = max(1, conf.expand_batch)
    lease = sql.step_timeout(step.spec, conf.default_step_timeout) + conf.lease_grace
    spec = cascade.child_spec(step.spec)
    external = cascade.is_external(spec)
    items = step.input if isinstance(step.input, list) else []  # staged by cascade, read by the claim

    def rows(items: list[Any], start: int) -> list[Step]:
        return cascade.child_rows(step, [(spec, item) for item in items], start)

    while True:
        with transaction.atomic():
            if state.lock_run(run.pk) is None:
                return "refused"
            batch = state.expand_batch(step, token, items, rows, size, state.now() + timedelta(seconds=lease))
            if batch is None:
                return "refused"
            ids, inserted, total = batch
            if ids and not external:
                transaction.on_commit(lambda ids=ids: broker.enqueue_steps(ids, priority=run.priority))
            if inserted < total:
                continue
            duration_ms = int((time.monotonic() - started) * 1000)
            parent = state.expanded(step, token, duration_ms)
            if parent is None:
                return "refused"
            tracer = state.Batch()
            tracer.trace(
                run.pk,
                TraceKind.DECISION,
                f"step '{step.step_id}' fanned out to {total} children (batches of {size})",
                step_pk=step.pk,
                attempt=step.attempts,
            )
            decider = cascade.Cascade(run, tracer)
            # its children may all have finished while it waited for a retry: join it now
            joined = decider.join(parent) if parent.pending_children == 0 else None
            if joined is not None:
                decider.finished([joined])
            tracer.flush(priority=run.priority)
        return "expanded"


#: What an attempt's recorded outcome says its step's outcome was (after an uncertain commit).
_OUTCOME_RESULT = {
    AttemptOutcome.SUCCEEDED: "succeeded",
    AttemptOutcome.FAILED: "failed",
    AttemptOutcome.TIMED_OUT: "failed",
    AttemptOutcome.REFUSED: "refused",
    AttemptOutcome.LOST: "refused",
    AttemptOutcome.CANCELLED: "refused",
    AttemptOutcome.DEFERRED: "deferred",
}


def _outlasting_outages(
    step: Step,
    token: uuid.UUID,
    record: Any,
    *,
    follow: tuple[str, str] | None = None,
    completed: list[Step] | None = None,
) -> tuple[str, state.Claim | None]:
    """Run ``record`` (one transaction writing an attempt's outcome), retrying through a database
    outage until the attempt's lease expires.

    The handler's work is done; losing its outcome to a database restart would make the step run
    again when its lease expires. So a failed connection is dropped and the transaction retried
    (0.5 s, then doubling up to 5 s). If the error hit the COMMIT, the commit may have happened:
    before retrying, the Attempt row (found by lease token) tells; a closed attempt means it
    did. After the lease, the error propagates (the task retries; the sweeper recovers the step).

    ``follow`` = (worker, task id) when ``record`` may have claimed a dependent of ``completed``
    (default: ``[step]``) to run inline. A commit that went through although its answer was
    lost took that claim with it, and the claim is gone with the answer: the step is counted
    lost at once (:func:`_release_inline_claim`) instead of waiting ``running`` for its lease
    (the step's timeout: minutes).
    """
    deadline = step.lease_expires_at
    delay = 0.5
    while True:
        try:
            return record()
        except (OperationalError, InterfaceError):
            if connection.in_atomic_block or deadline is None or state.now() >= deadline:
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
                if state.now() >= deadline:
                    raise
        if outcome is not None and outcome != AttemptOutcome.RUNNING:  # the commit had gone through
            if follow is not None:
                _release_inline_claim(completed or [step], *follow)
            return _OUTCOME_RESULT.get(outcome, "refused"), None


def _release_inline_claim(completed: list[Step], worker: str, task_id: str) -> None:
    """After a completion's commit that went through while its answer was lost: the dependent
    of ``completed`` it claimed inline (its Attempt still running under this worker and this
    message's task id) is counted lost now (``sweeper.recover_lost``: retried, or dead when it
    has no attempt left), as its lease's end would. The steps of one message are never
    dependents of each other (they were ready together), so no other step of it is touched."""
    names = {name for done in completed for name in done.dependents or []}
    if not names:
        return
    pks = Attempt.objects.filter(
        run_id=completed[0].run_id,
        task_id=task_id[:255],
        worker=worker[:200],
        outcome=AttemptOutcome.RUNNING,
        step__parent__isnull=True,
        step__step_id__in=sorted(names),
    ).values_list("step_id", flat=True)
    for pk in list(pks):
        sweeper.recover_lost(pk, "its claim was committed with a completion whose answer was lost", holder=worker[:200])


def _handler_tracer(run_id: Any, step_pk: int, attempt: int):
    from agents.redaction import known_secrets, redact

    def trace(kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        secrets = known_secrets()
        Trace.objects.create(
            run_id=run_id,
            step_row_id=step_pk,
            attempt=attempt,
            kind=kind,
            message=redact(state.one_line(message, 4000), secrets),
            data=state.json_safe(redact(data, secrets)),
        )

    return trace
