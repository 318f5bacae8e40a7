"""The fast chain claim (runs/engine/sql.py ``FastClaim``): a completion whose decrement makes
one plain step ready claims it, and commits, in its first round trip; any other outcome is left
to the cascade in the same transaction, as without it. PostgreSQL only (SQLite takes the ORM
path, which has no round trips to save).
"""

from __future__ import annotations

import uuid
from unittest import mock

import pytest
from django.db import connection

from runs import engine
from runs.engine import broker, sql
from runs.models import Attempt, Run, Trace
from tests.conftest import start
from tests.flow_support import route_to

WORKER = "test@host:1"


@pytest.fixture
def sent():
    if connection.vendor != "postgresql":
        pytest.skip("the fast claim is PostgreSQL's (a pipelined savepoint and COMMIT)")
    messages: list[int] = []
    with (
        route_to(f"nobody-{uuid.uuid4().hex[:8]}"),
        mock.patch.object(broker, "enqueue_steps", lambda ids, **kwargs: messages.extend(ids)),
    ):
        yield messages


@pytest.fixture
def fast_outcomes():
    """Each FastClaim ``sql.close_successes`` was given: ``committed`` says whether it was used."""
    real, seen = sql.close_successes, []

    def close_successes(*args, fast=None, **kwargs):
        result = real(*args, fast=fast, **kwargs)
        if fast is not None:
            seen.append(fast)
        return result

    with mock.patch.object(sql, "close_successes", close_successes):
        yield seen


def _drain(sent: list[int]) -> None:
    """Run the steps whose messages were sent, and the ones those send, here."""
    while sent:
        engine.execute_step(sent.pop(0), worker=WORKER, task_id=f"t-{uuid.uuid4().hex[:6]}")


@pytest.mark.django_db(transaction=True)
def test_a_chain_step_is_claimed_queued_and_traced_as_the_cascade_would(sent, fast_outcomes):
    run = start("key: fast\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop, depends_on: [a]}\n")
    sent.clear()  # a's message (run here instead)
    assert engine.execute_step(run.steps.get(step_id="a").pk, worker=WORKER, task_id="t1") == "succeeded"

    # a's completion claimed b and committed in one round trip (b's, a leaf's, takes the run's
    # exclusive lock: it may finish the run, so the cascade sees it)
    assert [f.committed for f in fast_outcomes] == [True] and fast_outcomes[0].row is not None
    run.refresh_from_db()
    assert run.status == "succeeded" and not sent
    b = run.steps.get(step_id="b")
    assert b.queued_at == b.started_at >= run.steps.get(step_id="a").finished_at
    (attempt,) = Attempt.objects.filter(step=b)
    assert (attempt.number, attempt.outcome, attempt.worker, attempt.task_id) == (1, "succeeded", WORKER, "t1")
    assert [t.message for t in Trace.objects.filter(step_row=b).order_by("id")] == [
        "step 'b' queued",
        "step 'b' running (attempt 1/3)",
        "step 'b' succeeded in 0 ms",
    ]


@pytest.mark.parametrize(
    ("dependents", "outcome"),
    [
        # two ready: one runs inline, one is sent
        ("  - {id: b, type: noop, depends_on: [a]}\n  - {id: c, type: noop, depends_on: [a]}\n", {"b", "c"}),
        ('  - {id: b, type: noop, depends_on: [a], when: "${false}"}\n', {"b": "skipped"}),
        ('  - {id: b, type: condition, depends_on: [a], condition: "${true}"}\n', {"b": "succeeded"}),
        ("  - {id: b, type: noop, depends_on: [a], trigger_rule: all_done}\n", {"b": "succeeded"}),
        ('  - {id: b, type: noop, depends_on: [a], for_each: "${[1, 2]}"}\n', {"b": "succeeded"}),
        ("  - {id: b, type: noop, depends_on: [a], concurrency: {key: k, limit: 1}}\n", {"b": "succeeded"}),
    ],
    ids=["two-ready", "when", "condition", "trigger-rule", "for-each", "concurrency"],
)
@pytest.mark.django_db(transaction=True)
def test_a_step_the_cascade_must_decide_is_left_to_it(sent, fast_outcomes, dependents, outcome):
    run = start(f"key: fast\nsteps:\n  - {{id: a, type: noop}}\n{dependents}")
    sent.clear()  # a's message (run here instead)
    engine.execute_step(run.steps.get(step_id="a").pk, worker=WORKER, task_id="t1")

    # the first round trip declined (rolled back to its savepoint), the cascade decided
    assert fast_outcomes and not fast_outcomes[0].committed
    _drain(sent)
    run.refresh_from_db()
    assert run.status == "succeeded", list(run.steps.values_list("step_id", "status"))
    statuses = dict(run.steps.filter(parent__isnull=True).values_list("step_id", "status"))
    expected = {name: "succeeded" for name in outcome} if isinstance(outcome, set) else outcome
    assert {name: statuses[name] for name in expected} == expected
    a = run.steps.get(step_id="a")
    assert [x.outcome for x in Attempt.objects.filter(step=a)] == ["succeeded"]
    assert Trace.objects.filter(step_row=a, message__startswith="step 'a' succeeded").count() == 1
    assert Trace.objects.filter(run=run, message="run succeeded").count() == 1
    assert not Run.objects.filter(pk=run.pk, status="running").exists()
