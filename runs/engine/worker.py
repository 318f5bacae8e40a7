"""The worker side: claim a step, pass the gate, run its handler, record the outcome.

Inline continuation (a worker runs one step it just made ready, within a step and time budget)
is here; docs/engine.md says why it is part of the design.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from django.db import InterfaceError, OperationalError, connection, transaction

from orchestrator_site import logging as logctx
from orchestrator_site.conf import conf
from templates_app.errors import ExpressionError, WorkflowError

from .. import metrics
from ..choices import RUN_TERMINAL, AttemptOutcome, StepStatus, TraceKind
from ..models import Attempt, Run, Step, Trace
from . import broker, cascade, gate, lifecycle, sql, state
from .context import build_context

log = logging.getLogger("orchestrator.engine")


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
    recovered like any other: by its lease, or at once when its worker is known dead.

    Returns one of "not-claimed" (already taken, finished or gone: a late duplicate message),
    "cancelled", "throttled", "deferred", "succeeded", "retry", "dead", "failed", "refused" (the
    lease was taken over while the handler ran; its result is discarded).
    """
    from .sweeper import recover_dead_holders

    at = state.now()
    token = uuid.uuid4()
    # One statement, its own transaction: the conditional claim under a lease, the Attempt row
    # and the trace (sql.claim_and_begin says why its commit need not wait for the disk). Steps
    # behind a flow-control gate, or of a run that ended, finish the job in begin().
    claimed = state.claim(step_pk, token, at, worker, task_id, relaxed=not connection.in_atomic_block)
    if claimed is None:
        # A message redelivered after its pool process was killed (reject_on_worker_lost) finds
        # the step still running under the dead process: recover it now rather than at lease expiry.
        recover_dead_holders([step_pk])
        return "not-claimed"
    step, run, begun = claimed
    if begun:
        logctx.bind(run_id=run.pk, step_id=step.step_id, tenant=run.tenant_id, correlation_id=run.correlation_id)
        started: state.Claim | str = state.Claim(step, run, token, at)
    else:
        with transaction.atomic():
            batch = state.Batch()
            started = _begin(step, run, token, at, worker, task_id, batch)
            batch.flush()
    if isinstance(started, str):
        return started
    budget_ends = time.monotonic() + conf.inline_seconds
    followed = 0
    result, follow = _run_claimed(started, worker, task_id, conf.inline_steps > 0)
    while follow is not None:
        followed += 1
        metrics.steps_sent(1)  # scheduled too, though continued inline instead of sent
        more = followed < conf.inline_steps and time.monotonic() < budget_ends
        _, follow = _run_claimed(follow, worker, task_id, more)
    return result


def _begin(
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
                _throttle(step, token, wait.seconds, wait.reason if wait.trace else None, batch)
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


def _throttle(step: Step, token: uuid.UUID, seconds: float, reason: str | None, batch: state.Batch) -> None:
    """Hand a just-claimed step back for ``seconds`` without spending an attempt (a gate's wait, or
    a handler's StepDeferred); re-sent then by a countdown, or by the sweeper for long waits."""
    delay = max(0.0, float(seconds))
    countdown = delay <= conf.countdown_max
    state.throttle(step, token, delay, countdown=countdown)
    if reason:
        batch.trace(
            step.run_id,
            TraceKind.DECISION,
            f"step '{step.step_id}' waits {delay:.3f} s: {reason}",
            step_pk=step.pk,
            data={"wait_s": round(delay, 3), "reason": reason},
        )
    batch.flush()
    if countdown:
        pk, priority = step.pk, step.run.priority
        transaction.on_commit(lambda: broker.enqueue_steps([pk], countdown=delay, priority=priority))


def step_timeout(step: Step, run: Run, at: Any) -> float:
    """Seconds the handler may take: the step's timeout (the lease's, sql.step_timeout), cut to
    what is left of the run's deadline."""
    timeout = sql.step_timeout(step.spec, conf.default_step_timeout)
    if run.deadline:
        timeout = min(timeout, max(0.0, (run.deadline - at).total_seconds()))
    return timeout


def _run_claimed(claim: state.Claim, worker: str, task_id: str, follow: bool) -> tuple[str, state.Claim | None]:
    """Run a claimed step's handler and record the outcome.

    Returns (outcome, the dependent claimed inline to run next or None); ``follow`` False: claim
    none (every ready dependent is sent as a message).
    """
    from agents.registry import StepContext, StepDeferred, StepError, get_handler, run_with_timeout

    step, run, token, at = claim.step, claim.run, claim.token, claim.now
    timeout = step_timeout(step, run, at)
    started = time.monotonic()
    output: Any = None
    error: StepError | None = None
    deferred: StepDeferred | None = None
    resolved: Any = None
    try:
        from templates_app.expressions import render

        if claim.gate_error is not None:
            raise StepError(claim.gate_error, permanent=True)
        ctx_values = build_context(run, step.spec.get("refs", []), step)
        if conf.release_db_during_step and not connection.in_atomic_block:
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
        output = state.json_safe(run_with_timeout(handler, ctx))
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
    if deferred is not None:
        result, _ = _outlasting_outages(step, token, lambda: (_defer(step, token, deferred, duration_ms), None))
    elif error is None:
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
            step, token, lambda: (fail(step, token, error, resolved=resolved, duration_ms=duration_ms), None)
        )
    metrics.attempt_finished(step.type, result, time.monotonic() - started)
    if result != "succeeded":
        log.info("step %s: %s", step.step_id, result, extra={"attempt": step.attempts, "duration_ms": duration_ms})
    return result, next_claim


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


def _outlasting_outages(step: Step, token: uuid.UUID, record: Any) -> tuple[str, state.Claim | None]:
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
            message=redact(state.one_line(message, 4000), secrets),
            data=state.json_safe(redact(data, secrets)),
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
) -> tuple[str, state.Claim | None]:
    """Record a successful attempt and propagate it; with ``follow`` = (worker, task id), also
    claim one newly ready dependent to run inline (``_claim_inline``). Returns (outcome, claim)."""
    with transaction.atomic():
        # the run's lock, then the step and attempt rows, in one round trip
        if not state.close_success(step, token, output=output, resolved=resolved, duration_ms=duration_ms):
            return _refuse(step, token, duration_ms), None
        batch = state.Batch()
        batch.trace(
            step.run_id,
            TraceKind.STATE,
            f"step '{step.step_id}' succeeded in {duration_ms} ms",
            step_pk=step.pk,
            attempt=step.attempts,
        )
        cascade.Cascade(step.run, batch).finished([step])
        lifecycle.wake_on_commit(gate.release_step(step))  # its concurrency slot, if it holds one
        # a fresh time: the decrement may have waited for another completion of a shared
        # dependent, and the inline step must not look started before that one finished
        next_claim = _claim_inline(batch, state.now(), *follow) if follow is not None else None
        batch.flush(priority=step.run.priority)
    return "succeeded", next_claim


def _claim_inline(batch: state.Batch, at: Any, worker: str, task_id: str) -> state.Claim | None:
    """In a completion's transaction: claim one of the steps it queued, to run it next in-process.

    The step is taken out of the messages to send, marked queued with the others, then claimed
    like a message would claim it, so the flushed completion commit also records the claim.
    Steps behind a flow-control gate are left to their messages.
    """
    candidate = next((s for s in batch.decided if not gate.gated(s.spec)), None)
    if candidate is None or candidate.pk not in batch.enqueue:
        return None
    batch.enqueue.remove(candidate.pk)
    pks, batch.queue = batch.queue, []
    sql.mark_queued(pks, at)
    token = uuid.uuid4()
    # part of the completion's transaction, whose commit is flushed
    claimed = state.claim(candidate.pk, token, at, worker, task_id, relaxed=False)
    if claimed is None:
        batch.enqueue.append(candidate.pk)  # not claimable after all: its message goes out
        return None
    step, run, begun = claimed
    started = state.Claim(step, run, token, at) if begun else _begin(step, run, token, at, worker, task_id, batch)
    return started if isinstance(started, state.Claim) else None


def _refuse(step: Step, token: uuid.UUID, duration_ms: int) -> str:
    state.refuse(step, token, duration_ms)
    Trace.objects.create(
        run_id=step.run_id,
        step_id=step.pk,
        attempt=step.attempts,
        kind=TraceKind.ERROR,
        message=f"step '{step.step_id}' attempt {step.attempts}: late completion refused",
    )
    return "refused"


def _defer(step: Step, token: uuid.UUID, deferred: Any, duration_ms: int) -> str:
    """A handler said "not yet" (StepDeferred): the attempt closes as ``deferred`` and is not
    counted; the step waits ``deferred.seconds`` in ``retry_wait``. Returns "deferred"."""
    delay = deferred.seconds
    countdown = delay <= conf.countdown_max
    with transaction.atomic():
        if state.lock_run(step.run_id) is None:
            return "refused"
        if not state.defer(step, token, delay, countdown=countdown, reason=deferred.reason, duration_ms=duration_ms):
            return _refuse(step, token, duration_ms)
        batch = state.Batch()
        batch.trace(
            step.run_id,
            TraceKind.DECISION,
            f"step '{step.step_id}' waits {delay:.3f} s: {state.one_line(deferred.reason)}",
            step_pk=step.pk,
            attempt=step.attempts,
            data={"wait_s": round(delay, 3)},
        )
        lifecycle.wake_on_commit(gate.release_step(step))
        batch.flush()
        if countdown:
            pk, priority = step.pk, step.run.priority
            transaction.on_commit(lambda: broker.enqueue_steps([pk], countdown=delay, priority=priority))
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
    is_timeout = type(error).__name__ == "StepTimeout"
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
    countdown = delay <= conf.countdown_max
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
            return _refuse(step, token, duration_ms)
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
                pk, priority = step.pk, step.run.priority
                transaction.on_commit(lambda: broker.enqueue_steps([pk], countdown=delay, priority=priority))
        else:
            cascade.Cascade(step.run, batch).finished([step])
        lifecycle.wake_on_commit(gate.release_step(step))  # its concurrency slot, if it holds one
        batch.flush(priority=step.run.priority)
    return result
