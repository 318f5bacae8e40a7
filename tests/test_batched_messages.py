"""Batched step messages: one message carries several ready steps (runs/engine/broker.py
``batches``) and one worker runs them one after the other, each with its own claim, Attempt row
and commit; a slow step gives the rest back to the broker. Runs on PostgreSQL and on SQLite
(ORCHESTRATOR_TEST_SQLITE=1).
"""

from __future__ import annotations

import threading
import time
import uuid
from unittest import mock

import pytest

from runs import engine
from runs.engine import attempts, broker, sql, state
from runs.models import Attempt, Step, Trace
from tests.conftest import start
from tests.flow_support import route_to

FAN_OUT = """
key: batched
steps:
  - id: root
    type: noop
%s
  - id: join
    type: noop
    depends_on: [%s]
"""


def fan_out(width: int, child: str = "type: noop") -> str:
    names = [f"c{i}" for i in range(width)]
    children = "\n".join(f"  - id: {n}\n    {child}\n    depends_on: [root]" for n in names)
    return FAN_OUT % (children, ", ".join(names))


class Sends:
    """Records each ``enqueue_steps`` call (step ids, batch flag) instead of sending it."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], bool]] = []
        self.lock = threading.Lock()

    def __call__(self, ids, *, countdown=None, priority=None, batch=True) -> None:
        with self.lock:
            self.calls.append((list(ids), batch))


@pytest.fixture
def sends():
    recorder = Sends()
    with route_to(f"nobody-{uuid.uuid4().hex[:8]}"), mock.patch.object(broker, "enqueue_steps", recorder):
        yield recorder


@pytest.mark.parametrize(
    ("count", "size", "spread", "expected"),
    [
        (10, 16, 8, [2, 2, 1, 1, 1, 1, 1, 1]),
        (199, 16, 8, [16] * 4 + [15] * 9),
        (3, 16, 8, [1, 1, 1]),
        (40, 1, 8, [1] * 40),  # ORCHESTRATOR_BATCH_STEPS=1: one message per step
        (100, 50, 1, [50, 50]),
    ],
)
def test_batches_keep_order_cap_the_size_and_spread_the_fan_out(count, size, spread, expected):
    ids = list(range(1, count + 1))
    groups = broker.batches(ids, size, spread)
    assert [len(g) for g in groups] == expected
    assert [pk for g in groups for pk in g] == ids


@pytest.mark.django_db(transaction=True)
def test_a_batched_message_runs_each_step_with_its_own_claim_and_attempt(settings, sends):
    settings.ORCHESTRATOR_BATCH_HOLD = 5.0  # no step here is slow: one group, however slow the machine
    # Given a fan-out whose root has finished: its 6 children are ready (as one send)
    run = start(fan_out(6))
    sends.calls.clear()  # the root's own message
    root = Step.objects.get(run=run, step_id="root")
    assert engine.execute_step(root.pk, task_id="root-task") == "succeeded"
    children = list(Step.objects.filter(run=run, step_id__startswith="c").order_by("id"))
    sent = [pk for ids, _ in sends.calls for pk in ids]
    # the root continued one child inline; the other five were sent after its commit
    inline = [c for c in children if c.pk not in sent]
    assert len(inline) == 1 and sorted(sent) == sorted(c.pk for c in children if c not in inline)
    # When one message carries the other five ...
    first, *rest = sorted(sent)
    assert engine.execute_step(first, worker="w:1", task_id="batch-task", more=rest) == "succeeded"
    # ... each ran once, under its own lease and Attempt row, recorded with the message's task id
    for pk in [first, *rest]:
        step = Step.objects.get(pk=pk)
        assert step.status == "succeeded" and step.attempts == 1 and step.lease_token is None
        attempt = Attempt.objects.get(step_id=pk)
        assert (attempt.outcome, attempt.task_id) == ("succeeded", "batch-task")
    # their successes were recorded together: one transaction (one time), one flushed commit
    closed = {a.finished_at for a in Attempt.objects.filter(step_id__in=[first, *rest])}
    assert len(closed) == 1
    # which made the join ready and continued it inline: the run is done
    run.refresh_from_db()
    assert run.status == "succeeded"
    assert Attempt.objects.filter(run=run).count() == 8
    assert Trace.objects.filter(run=run, message__contains="succeeded in").count() == 8


@pytest.mark.django_db(transaction=True)
def test_a_group_commit_refuses_only_the_success_whose_lease_was_taken_over(sends):
    run = start(fan_out(4))  # the root continues one child inline and sends the other three
    engine.execute_step(Step.objects.get(run=run, step_id="root").pk, worker="w:1", task_id="t")
    children = sorted(pk for ids, _ in sends.calls for pk in ids if pk != run.steps.get(step_id="root").pk)
    successes = []
    for pk in children:
        token, at = uuid.uuid4(), state.now()
        step, run_row, begun = state.claim(pk, token, at, "w:1", "t", relaxed=True)
        if not begun:  # the ORM claim (SQLite) leaves the Attempt row to begin()
            batch = state.Batch()
            attempts.begin(step, run_row, token, at, "w:1", "t", batch)
            batch.flush()
        successes.append(state.Success(step, token, {"n": pk}, {}, 1))
    # Given the second one's lease was taken over while it ran ...
    Step.objects.filter(pk=children[1]).update(lease_token=uuid.uuid4())
    # ... recording the three together refuses it alone
    results, _claim = attempts.complete_many(successes)
    assert results == ["succeeded", "refused", "succeeded"]
    assert [Step.objects.get(pk=pk).status for pk in children] == ["succeeded", "running", "succeeded"]
    assert Attempt.objects.get(step_id=children[1]).outcome == "refused"
    assert not Trace.objects.filter(step_row_id=children[1], message__contains="succeeded").exists()
    # the join counts the two that succeeded, plus the child the root continued inline
    assert Step.objects.get(run=run, step_id="join").pending_deps == 1


@pytest.mark.django_db(transaction=True)
def test_a_slow_step_gives_the_rest_of_its_batch_back_to_the_broker(settings, sends):
    settings.ORCHESTRATOR_BATCH_HOLD = 0.05
    run = start(fan_out(4, "type: sleep\n    params: {seconds: 0.4}"))
    sends.calls.clear()
    root = Step.objects.get(run=run, step_id="root")
    engine.execute_step(root.pk)
    children = sorted(pk for ids, _ in sends.calls for pk in ids)
    inline = Step.objects.filter(run=run, step_id__startswith="c").exclude(pk__in=children).get()
    assert inline.status == "succeeded"  # the root continued it (0.4 s)
    sends.calls.clear()
    first, *rest = children
    started = time.monotonic()
    # When the first step of a batch runs longer than ORCHESTRATOR_BATCH_HOLD ...
    assert engine.execute_step(first, more=rest) == "succeeded"
    elapsed = time.monotonic() - started
    # ... the others were given back as messages of their own while it ran, and not run here
    assert sends.calls == [(rest, False)]
    assert elapsed < 0.4 * 2
    assert list(Step.objects.filter(pk__in=rest).values_list("status", flat=True)) == ["queued"] * len(rest)
    # and each runs from its own message
    for pk in rest:
        assert engine.execute_step(pk) == "succeeded"
    run.refresh_from_db()
    assert run.status == "succeeded"


@pytest.mark.django_db(transaction=True)
def test_steps_a_batch_did_not_reach_within_the_budget_go_back_as_messages(settings, sends):
    settings.ORCHESTRATOR_INLINE_STEPS = 2  # the message's own step and two more
    run = start(fan_out(7))
    sends.calls.clear()
    engine.execute_step(Step.objects.get(run=run, step_id="root").pk)
    children = sorted(pk for ids, _ in sends.calls for pk in ids)
    sends.calls.clear()
    first, *rest = children
    engine.execute_step(first, more=rest)
    ran = set(Step.objects.filter(pk__in=children, status="succeeded").values_list("pk", flat=True))
    assert ran == set(children[:3])
    assert sends.calls == [(children[3:], False)]
    assert set(Step.objects.filter(pk__in=children[3:]).values_list("status", flat=True)) == {"queued"}


@pytest.mark.django_db(transaction=True)
def test_successes_waiting_in_a_group_are_recorded_when_a_later_step_fails_to_start(settings, sends, monkeypatch):
    from django.db import OperationalError

    settings.ORCHESTRATOR_BATCH_HOLD = 5.0  # one group, however slow the machine
    run = start(fan_out(6))
    sends.calls.clear()
    engine.execute_step(Step.objects.get(run=run, step_id="root").pk)
    children = sorted(pk for ids, _ in sends.calls for pk in ids)
    sends.calls.clear()
    real_claim = state.claim

    def claim(step_pk, *args, **kwargs):
        if step_pk == children[2]:  # the database goes away as the third step is claimed
            raise OperationalError("server closed the connection unexpectedly")
        return real_claim(step_pk, *args, **kwargs)

    monkeypatch.setattr(state, "claim", claim)
    with pytest.raises(OperationalError):
        engine.execute_step(children[0], more=children[1:])
    # the two successes waiting in the group were recorded before the error went on (not left
    # running until their leases expire), and the steps not started went back to the broker
    statuses = dict(Step.objects.filter(pk__in=children).values_list("pk", "status"))
    assert [statuses[pk] for pk in children[:2]] == ["succeeded", "succeeded"]
    assert sends.calls == [(children[3:], False)]


@pytest.mark.django_db(transaction=True)
def test_a_step_continued_inline_is_queued_and_claimed_in_one_update(sends):
    """The completion that makes a step ready decides it (queued) and claims it in the same
    transaction; on PostgreSQL one UPDATE takes it from pending to running. Its record is that of
    any step: queued_at, the "queued" trace before the "running" one, an Attempt, one message
    fewer."""
    run = start("key: two\nsteps:\n  - id: a\n    type: noop\n  - id: b\n    type: noop\n    depends_on: [a]\n")
    a = run.steps.get(step_id="a")
    marked: list[int] = []
    mark = sql._mark_queued

    def spy(step_pks, now):
        marked.extend(step_pks)
        return mark(step_pks, now)

    with mock.patch.object(sql, "_mark_queued", spy):
        assert engine.execute_step(a.pk, worker="test@host:1", task_id="t1") == "succeeded"
    b = Step.objects.get(run=run, step_id="b")
    assert b.pk not in marked  # no UPDATE of its own to queue it (PostgreSQL's statement)
    assert (b.status, b.attempts) == ("succeeded", 1)
    assert b.queued_at is not None and b.queued_at <= b.started_at
    messages = list(Trace.objects.filter(step_row=b).order_by("id").values_list("message", flat=True))
    assert messages[:2] == ["step 'b' queued", "step 'b' running (attempt 1/3)"]  # the default retry
    assert Attempt.objects.filter(step=b, outcome="succeeded", task_id="t1").count() == 1
    assert all(b.pk not in ids for ids, _ in sends.calls)  # only a was sent


def _round_trips(run_chain) -> int:
    """How many times the client waited for PostgreSQL while ``run_chain()`` ran: the
    ReadyForQuery messages in libpq's protocol trace (one per pipeline sync or simple query)."""
    import tempfile

    from django.db import connection
    from psycopg import pq

    connection.ensure_connection()
    pgconn = connection.connection.pgconn
    with tempfile.TemporaryFile("w+") as log:
        pgconn.trace(log.fileno())
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            run_chain()
        finally:
            pgconn.untrace()
        log.seek(0)
        return sum(1 for line in log if line.startswith("B\t") and "\tReadyForQuery\t" in line)


@pytest.mark.django_db(transaction=True)
def test_a_chain_step_continued_inline_costs_one_round_trip(sends):
    """Each further step of an inline chain costs one wait on PostgreSQL: the completion (its
    BEGIN, the run's lock, the close, the decrement) with the next step's claim, its traces and
    the COMMIT (``sql.FastClaim``). It was two before the fast claim (the claim, traces and
    COMMIT after the cascade), four before that (psycopg's own BEGIN and COMMIT)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("round trips are PostgreSQL's pipeline (SQLite has none)")

    def chain(length: int) -> int:
        steps = "".join(
            f"  - id: s{i}\n    type: noop\n" + (f"    depends_on: [s{i - 1}]\n" if i else "") for i in range(length)
        )
        run = start(f"key: chain{length}\nsteps:\n{steps}")
        first = run.steps.get(step_id="s0")
        trips = _round_trips(lambda: engine.execute_step(first.pk, worker="test@host:1", task_id="t1"))
        assert set(run.steps.values_list("status", flat=True)) == {"succeeded"}
        return trips

    chain(2)  # statements prepared, caches warm
    assert chain(6) - chain(3) == 3 * 1


@pytest.mark.django_db(transaction=True)
def test_a_completion_and_a_new_run_commit_in_their_last_round_trip(sends):
    """A completion that makes no step ready costs one wait (the close and decrement with the
    COMMIT: nothing is left for the cascade, ``sql.FastClaim``); starting a run costs three (its
    BEGIN and both INSERTs, the concurrent-run limits, the root steps queued and traced with the
    COMMIT)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("round trips are PostgreSQL's pipeline (SQLite has none)")
    yaml_text = (
        "key: join\nsteps:\n  - id: a\n    type: noop\n  - id: b\n    type: noop\n"
        "  - id: c\n    type: noop\n    depends_on: [a, b]\n"
    )
    warm = start(yaml_text)  # statements prepared, caches warm
    engine.execute_step(warm.steps.get(step_id="a").pk, worker="test@host:1", task_id="t0")
    runs = []
    assert _round_trips(lambda: runs.append(start(yaml_text))) == 3
    a = runs[0].steps.get(step_id="a")
    # the claim (its own transaction: one statement), then the completion, which makes nothing
    # ready (c waits for b)
    assert _round_trips(lambda: engine.execute_step(a.pk, worker="test@host:1", task_id="t1")) == 1 + 1
    assert runs[0].steps.get(step_id="c").status == "pending"
    assert Trace.objects.filter(step_row=a, message__startswith="step 'a' succeeded").count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_step_claimed_by_a_commit_whose_answer_was_lost_is_recovered_at_once(sends, monkeypatch):
    """The database dies after a completion's COMMIT (which carries the next step's inline claim)
    and before its answer: the worker finds the attempt closed when it is back, so the commit
    went through, and the step it had claimed inline is counted lost now, not left ``running``
    until its lease ends (the step's timeout: minutes)."""
    from django.db import OperationalError

    run = start("key: lost-answer\nsteps:\n  - id: a\n    type: noop\n  - id: b\n    type: noop\n    depends_on: [a]\n")
    a = run.steps.get(step_id="a")
    real = attempts.complete_many
    calls = []

    def answer_lost(*args, **kwargs):
        result = real(*args, **kwargs)
        if not calls:
            calls.append(result)
            raise OperationalError("server closed the connection unexpectedly")
        return result

    monkeypatch.setattr(attempts, "complete_many", answer_lost)
    assert engine.execute_step(a.pk, worker="test@host:1", task_id="t1") == "succeeded"
    assert calls and calls[0][1] is not None  # the lost answer held the inline claim of b
    b = run.steps.get(step_id="b")
    assert b.status in ("retry_wait", "queued")  # recovered: not running under a forgotten lease
    assert Attempt.objects.get(step=b, number=1).outcome == "lost"


def test_the_watchdog_releases_each_held_set_at_its_own_deadline():
    """One thread serves every message of a process (the embedded worker's threads too): a
    deadline armed after a later one still fires on time, and a disarmed one never does."""
    from runs.engine.worker import Watchdog

    class Probe:
        def __init__(self) -> None:
            self.released = threading.Event()

        def release(self) -> None:
            self.released.set()

    dog = Watchdog()
    slow, fast, disarmed = Probe(), Probe(), Probe()
    now = time.monotonic()
    dog.arm(slow, now + 30)
    time.sleep(0.1)  # the thread is asleep until the slow one's deadline
    now = time.monotonic()
    dog.arm(disarmed, now + 0.05)
    dog.disarm(disarmed)
    dog.arm(fast, now + 0.1)
    assert fast.released.wait(5)
    assert not slow.released.is_set() and not disarmed.released.wait(0.2)
    dog.disarm(slow)
