"""Cancel raced against claims and completions: one lock order, so no deadlock and no lost cancel.

Each round starts two threads (each its own PostgreSQL connection) from a barrier: one cancels
the run, the other claims or completes a step of it. Before the engine took the run's lock first
everywhere, completions locked step rows then the run while cancel locked the run then the steps:
PostgreSQL broke the deadlock by aborting one side (the API answered 503), in up to half of the
rounds, and a cancel racing a claim was sometimes lost.
"""

from __future__ import annotations

import threading
import uuid

import pytest
from django.db import connection

from runs import engine
from runs.engine import attempts, state
from runs.models import Run, Step
from tests.conftest import start

pytestmark = pytest.mark.skipif("connection.vendor != 'postgresql'", reason="row locks are PostgreSQL's")

ROUNDS = 60

ONE_STEP = "key: race-one\nsteps:\n  - {id: a, type: noop}\n"
TWO_STEPS = "key: race-two\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop, depends_on: [a]}\n"


def _race(first, second) -> tuple[object, object]:
    """Run ``first`` and ``second`` at once from a barrier; return their results (or exceptions)."""
    barrier = threading.Barrier(2)
    results: list[object] = [None, None]

    def go(index: int, call) -> None:
        try:
            barrier.wait(5)
            results[index] = call()
        except Exception as exc:  # a deadlock is an OperationalError: record it, fail below
            results[index] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=go, args=(i, call)) for i, call in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for result in results:
        assert not isinstance(result, Exception), f"{type(result).__name__}: {result}"
    return results[0], results[1]


def _claimed(yaml_text: str) -> tuple[Run, Step, uuid.UUID]:
    """A run whose step ``a`` is claimed (running under a lease, its Attempt row written)."""
    run = start(yaml_text)
    step = Step.objects.get(run=run, step_id="a")
    token = uuid.uuid4()
    claimed = state.claim(step.pk, token, state.now(), "race:1", "", relaxed=True)
    assert claimed is not None
    step, _run, begun = claimed
    assert begun
    return run, step, token


@pytest.mark.parametrize("yaml_text", [ONE_STEP, TWO_STEPS], ids=["completion-finishes-run", "ordinary-completion"])
def test_cancel_against_completion_never_deadlocks(transactional_db, monkeypatch, yaml_text):
    monkeypatch.setattr(engine.broker, "enqueue_steps", lambda *a, **k: None)  # no worker here
    outcomes = set()
    for _ in range(ROUNDS):
        run, step, token = _claimed(yaml_text)
        completed, cancelled = _race(
            lambda step=step, token=token: attempts.complete(
                step, token, output={"ok": True}, resolved={}, duration_ms=1
            )[0],
            lambda run=run: engine.cancel_run(run.pk),
        )
        run.refresh_from_db()
        step.refresh_from_db()
        # both took effect in one order or the other, and the rows agree with what each said
        assert step.status == ("succeeded" if completed == "succeeded" else "cancelled")
        if cancelled:
            assert run.status == "cancelled"
            # a one-step run that its completion finished cannot be cancelled afterwards
            assert completed == "refused" or yaml_text == TWO_STEPS
        else:
            assert completed == "succeeded" and run.status == "succeeded" and yaml_text == ONE_STEP
        outcomes.add((completed, cancelled))
    assert outcomes <= {("refused", True), ("succeeded", False), ("succeeded", True)}


def test_cancel_against_claim_is_never_lost(transactional_db, monkeypatch):
    monkeypatch.setattr(engine.broker, "enqueue_steps", lambda *a, **k: None)
    for _ in range(ROUNDS):
        run = start(TWO_STEPS)
        step = Step.objects.get(run=run, step_id="a")
        token = uuid.uuid4()
        _claim, cancelled = _race(
            lambda step=step, token=token: state.claim(step.pk, token, state.now(), "race:1", "", relaxed=True),
            lambda run=run: engine.cancel_run(run.pk),
        )
        assert cancelled is True  # the run was running: the cancel always takes
        run.refresh_from_db()
        assert run.status == "cancelled"
        # whether the claim came first or not, nothing of the run is left to run
        assert set(Step.objects.filter(run=run).values_list("status", flat=True)) == {"cancelled"}
        # and a late completion of a claim that got in first is refused
        if _claim is not None:
            claimed_step = _claim[0]
            assert attempts.complete(claimed_step, token, output={}, resolved={}, duration_ms=1)[0] == "refused"
