"""Recording an attempt: begin (through the gate), throttle, complete, defer, fail, refuse.

Each outcome is one transaction that takes the run's lock first and writes through ``state``;
the cascade then decides what the outcome makes ready.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db import transaction

from orchestrator_site import logging as logctx
from orchestrator_site.conf import conf

from ..choices import RUN_TERMINAL, AttemptOutcome, StepStatus, TraceKind
from ..models import Run, Step, Trace
from . import append, broker, cascade, gate, lifecycle, sql, state


def backoff_delay(retry: dict[str, Any], attempt: int, rng: Any = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    ``retry``: {"backoff": "exponential" | "linear" | "fixed", "initial_delay": s, "max_delay": s,
    "jitter": bool}. Exponential is ``initial * 2**(attempt-1)``, linear ``initial * attempt``,
    both capped at ``max_delay``. With jitter the delay is drawn uniformly from
    ``[d/2, d]`` ("equal jitter", AWS Architecture Blog, "Exponential Backoff And Jitter", 2015),
    which spreads retries of many steps while keeping a floor.
    """
    import random

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


def begin(
    step: Step, run: Run, token: uuid.UUID, at: Any, worker: str, task_id: str, batch: state.Batch
) -> state.Claim | str:
    """In the claim's transaction: check the run, pass the flow-control gate, write the Attempt.

    Returns the claim to run, or "cancelled" (the run ended: the step is cancelled, the attempt
    not counted) or "throttled" (no rate-limit token or concurrency slot: the step waits).
    """
    logctx.bind(run_id=run.pk, step_id=step.step_id, tenant=run.tenant_id, correlation_id=run.correlation_id)
    gate_error: str | None = None
    if run.status in RUN_TERMINAL:
        state.cancel_claimed(step, token, run.status, at)
        return "cancelled"
    if gate.gated(step.spec):
        # rate limit and concurrency slot: without a token or a slot the step goes back to
        # retry_wait for the exact wait, no attempt spent
        try:
            wait = gate.admit_step(step, run, token, step.lease_expires_at, state.now())
        except gate.GateError as exc:
            gate_error = str(exc)  # recorded below as a permanent failure of this attempt
        else:
            if wait is not None:
                throttle(step, token, wait.seconds, wait.reason if wait.trace else None, batch)
                return "throttled"
        # admitted after waiting on the gate's locks: the attempt starts now, not at the claim
        at = state.now()
        state.restart_clock(step, at)
    state.begin(step, run, token, at, worker, task_id)
    batch.trace(
        run.pk,
        TraceKind.STATE,
        f"step '{step.step_id}' running (attempt {step.attempts}/{step.max_attempts})",
        step_pk=step.pk,
        attempt=step.attempts,
        data={"worker": worker},
    )
    return state.Claim(step, run, token, at, gate_error)


def throttle(step: Step, token: uuid.UUID, seconds: float, reason: str | None, batch: state.Batch) -> None:
    """Hand a just-claimed step back for ``seconds`` without spending an attempt (a gate's wait, or
    a handler's StepDeferred); re-sent then by a countdown, or by the sweeper for long waits."""
    delay = max(0.0, float(seconds))
    countdown = delay <= conf.countdown_max
    state.throttle(step, token, delay, countdown=countdown)
    if reason:
        trace_wait(batch, step, delay, reason)
    batch.flush()
    if countdown:
        send_later(step, delay)


def send_later(step: Step, delay: float) -> None:
    """After commit, send ``step``'s message with a ``delay``-second countdown (its run's priority)."""
    pk, priority = step.pk, step.run.priority
    transaction.on_commit(lambda: broker.enqueue_steps([pk], countdown=delay, priority=priority))


def trace_wait(batch: state.Batch, step: Step, delay: float, reason: str, attempt: int | None = None) -> None:
    """The ``decision`` trace of a step handed back to wait ``delay`` seconds, and why."""
    reason = state.one_line(reason)
    batch.trace(
        step.run_id,
        TraceKind.DECISION,
        f"step '{step.step_id}' waits {delay:.3f} s: {reason}",
        step_pk=step.pk,
        attempt=attempt,
        data={"wait_s": round(delay, 3), "reason": reason},
    )


def complete(
    step: Step,
    token: uuid.UUID,
    *,
    output: Any,
    resolved: Any,
    duration_ms: int,
    follow: tuple[str, str] | None = None,
    continuation: Any = None,
) -> tuple[str, state.Claim | None]:
    """Record a successful attempt and propagate it (:func:`complete_many` with one success).
    Returns (outcome, claim): "succeeded", or "refused" when its lease was taken over."""
    success = state.Success(step, token, output, resolved, duration_ms)
    results, next_claim = complete_many([success], follow=follow, continuation=continuation)
    return results[0], next_claim


def complete_many(
    successes: list[state.Success], *, follow: tuple[str, str] | None = None, continuation: Any = None
) -> tuple[list[str], state.Claim | None]:
    """Record successful attempts of steps of one run in one transaction (one flushed commit)
    and propagate them.

    With ``follow`` = (worker, task id), also claim one newly ready dependent to run inline
    (``claim_inline``). With ``continuation`` (an ``agents.registry.StepContinuation``, for a
    single success), its steps are appended to the run in the same transaction
    (``append.continue_run``). Returns the outcome of each success in order ("succeeded", or
    "refused": its lease was taken over and nothing of it was written) and the inline claim.

    A single success of a step with dependents takes the run's lock shared
    (runs/engine/state.py, "Shared completions"); when its cascade needs the exclusive lock
    (``state.RunLockNeeded``), the transaction is rolled back and run again with it.
    """
    if not _may_share(successes, continuation):
        return _complete_many(successes, follow, continuation, shared=False)
    before = [(s.step.status, s.step.output) for s in successes]
    try:
        return _complete_many(successes, follow, continuation, shared=True)
    except state.RunLockNeeded:
        for success, (status, output) in zip(successes, before, strict=True):
            success.step.status, success.step.output = status, output
        return _complete_many(successes, follow, continuation, shared=False)


def _may_share(successes: list[state.Success], continuation: Any) -> bool:
    """Whether a completion may take the run's lock shared (state.py, "Shared completions"): one
    top-level step with dependents, no concurrency slot to free, no steps to append, not inside a
    caller's transaction, PostgreSQL (SQLite has one writer at a time)."""
    if len(successes) != 1 or continuation is not None or not sql.is_postgresql():
        return False
    if transaction.get_connection().in_atomic_block:  # a caller's transaction: its locks are its own
        return False
    step = successes[0].step
    return step.parent_id is None and bool(step.dependents) and not step.spec.get("concurrency")


def _complete_many(
    successes: list[state.Success], follow: tuple[str, str] | None, continuation: Any, *, shared: bool
) -> tuple[list[str], state.Claim | None]:
    """:func:`complete_many`'s transaction, with the run's lock ``shared`` or exclusive."""
    run = successes[0].step.run
    with transaction.atomic():
        # the run's lock, then each step's, attempt's and trace's rows and its dependents'
        # counters, in one round trip; appended steps come before the cascade (the run must not
        # look finished), so a continuation's completion counts its dependents down there
        items = [(s, continuation is None and s.step.parent_id is None and bool(s.step.dependents)) for s in successes]
        results: list[str] = []
        done: list[Step] = []
        ready_by: dict[int, list[Step]] = {}
        # a chain's next step claimed, and the transaction committed, in the first round trip
        # when there is nothing for the cascade to decide (sql.FastClaim)
        fast = state.fast_claim(*follow, cascade.PLAIN_STEP_SQL) if shared and follow else None
        closes = state.close_successes(run.pk, items, shared=shared, fast=fast)
        for success, (closed, ready) in zip(successes, closes, strict=True):
            if not closed:
                results.append(refuse(success.step, success.token, success.duration_ms))
                continue
            results.append("succeeded")
            done.append(success.step)
            if ready is not None:
                ready_by[success.step.pk] = ready
        if not done:
            return results, None
        if fast is not None and fast.committed:
            return results, _claimed_fast(fast, ready_by[done[0].pk], run)
        batch = state.Batch()
        if continuation is not None:
            append.continue_run(done[0], continuation, batch)
        cascade.Cascade(run, batch, shared=shared).finished(done, ready=ready_by)
        for step in done:
            lifecycle.wake_on_commit(gate.release_step(step))  # its concurrency slot, if it holds one
        # a fresh time: the decrement may have waited for another completion of a shared
        # dependent, and the inline step must not look started before that one finished
        next_claim = claim_inline(batch, run, state.now(), *follow) if follow is not None else None
        batch.flush(priority=run.priority, last=True)  # with the COMMIT, unless the claim had it
    return results, next_claim


def claim_inline(batch: state.Batch, run: Run, at: Any, worker: str, task_id: str) -> state.Claim | None:
    """In a completion's transaction: claim one of the steps it queued, to run it next in-process.

    The step is taken out of the messages to send, marked queued with the others, then claimed
    like a message would claim it, so the flushed completion commit also records the claim.
    Steps behind a flow-control gate are left to their messages. The claim is the transaction's
    last write: its COMMIT goes in the claim's round trip (``state.claim``, ``last``), and the
    caller only registers its on-commit callbacks after it.
    """
    candidate = next((s for s in batch.decided if not gate.gated(s.spec)), None)
    if candidate is None or candidate.pk not in batch.enqueue:
        return None
    batch.enqueue.remove(candidate.pk)
    queued = candidate.pk in batch.queue
    if queued:  # still pending: queued and claimed in one update
        batch.queue.remove(candidate.pk)
    token = uuid.uuid4()
    # part of the completion's transaction, whose commit is flushed; the other steps decided so
    # far are marked queued and the traces written in the claim's round trip
    claimed = state.claim(
        candidate.pk,
        token,
        at,
        worker,
        task_id,
        relaxed=False,
        batch=batch,
        decided=queued,
        reuse=(candidate, run),
        last=True,
    )
    if claimed is None:  # not claimable after all: queued, and its message goes out
        if queued:
            batch.queue.append(candidate.pk)
        batch.enqueue.append(candidate.pk)
        return None
    step, run, begun = claimed
    started = state.Claim(step, run, token, at) if begun else begin(step, run, token, at, worker, task_id, batch)
    return started if isinstance(started, state.Claim) else None


def _claimed_fast(fast: sql.FastClaim, ready: list[Step], run: Run) -> state.Claim | None:
    """The step a completion's first round trip claimed (``sql.FastClaim``, committed), as
    :func:`claim_inline` returns it; ``ready``: what the decrement returned (the one step when
    one was claimed). A claimed step not begun (its run ended: the run's shared lock makes
    that impossible) is begun or handed back as :func:`claim_inline` does, in a transaction of
    its own."""
    if fast.row is None:
        return None
    step, run, begun = sql.apply_claim(fast.row, ready[0], run)
    at = step.started_at or fast.now  # the claim's time: the close's
    if begun:
        return state.Claim(step, run, fast.token, at)
    batch = state.Batch()
    started = begin(step, run, fast.token, at, fast.worker, fast.task_id, batch)
    batch.flush(priority=run.priority)
    return started if isinstance(started, state.Claim) else None


def refuse(step: Step, token: uuid.UUID, duration_ms: int) -> str:
    state.refuse(step, token, duration_ms)
    Trace.objects.create(
        run_id=step.run_id,
        step_row_id=step.pk,
        attempt=step.attempts,
        kind=TraceKind.ERROR,
        message=f"step '{step.step_id}' attempt {step.attempts}: late completion refused",
    )
    return "refused"


def defer(step: Step, token: uuid.UUID, deferred: Any, duration_ms: int) -> str:
    """A handler said "not yet" (StepDeferred): the attempt closes as ``deferred`` and is not
    counted; the step waits ``deferred.seconds`` in ``retry_wait``. Returns "deferred"."""
    delay = deferred.seconds
    countdown = delay <= conf.countdown_max
    with transaction.atomic():
        if state.lock_run(step.run_id) is None:
            return "refused"
        if not state.defer(step, token, delay, countdown=countdown, reason=deferred.reason, duration_ms=duration_ms):
            return refuse(step, token, duration_ms)
        batch = state.Batch()
        trace_wait(batch, step, delay, deferred.reason, attempt=step.attempts)
        lifecycle.wake_on_commit(gate.release_step(step))
        batch.flush()
        if countdown:
            send_later(step, delay)
    return "deferred"


def fail(
    step: Step, token: uuid.UUID, error: Any, *, resolved: Any, duration_ms: int, outcome: str | None = None
) -> str:
    """Record a failed attempt: retry_wait with backoff, or dead/failed when it was the last.

    ``error`` is a StepError (its ``permanent``, ``retry_after`` and ``http_status`` are read).
    Takes the run's lock first. Returns "retry", "dead", "failed" or "refused" (the lease was
    taken over: nothing recorded).
    """
    from agents.redaction import known_secrets, redact

    message = state.one_line(redact(str(error), known_secrets()))
    permanent = bool(getattr(error, "permanent", False))
    retry_after = getattr(error, "retry_after", None)
    http_status = getattr(error, "http_status", None)
    from agents.registry import StepTimeout

    is_timeout = isinstance(error, StepTimeout)
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
    # a short delay rides on a Celery countdown; an executor's step waits for the sweeper instead
    countdown = delay <= conf.countdown_max and not cascade.is_external(step.spec)
    with transaction.atomic():
        if state.lock_run(step.run_id) is None:
            return "refused"
        if not state.close_failure(
            step,
            token,
            status=status,
            message=message,
            resolved=resolved,
            delay=delay,
            countdown=countdown,
            outcome=outcome or (AttemptOutcome.TIMED_OUT if is_timeout else AttemptOutcome.FAILED),
            duration_ms=duration_ms,
            http_status=http_status,
        ):
            return refuse(step, token, duration_ms)
        batch = state.Batch()
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
            if countdown:
                send_later(step, delay)
        else:
            cascade.Cascade(step.run, batch).finished([step])
        lifecycle.wake_on_commit(gate.release_step(step))  # its concurrency slot, if it holds one
        batch.flush(priority=step.run.priority, last=True)
    return result
