"""Large for_each maps are expanded off the request path, in batches (issue 10).

Before: ``POST /runs`` of a ``for_each`` over 100,000 items inserted every child row and sent every
message inside the request (120 s, 130,018 broker messages). Now a map with more items than
``ORCHESTRATOR_EXPAND_BATCH`` is queued like any step and a worker inserts its children a batch
at a time, each batch its own commit whose children are sent as it commits; the expansion is the
step's attempt, so a worker lost mid-expansion is recovered and the retry resumes where it
stopped. Runs on PostgreSQL and on SQLite (ORCHESTRATOR_TEST_SQLITE=1).
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from unittest import mock

import pytest

from runs import engine
from runs.choices import AttemptOutcome, StepStatus
from runs.engine import broker, state, sweeper
from runs.models import Attempt, Step, Trace
from tests.conftest import api_client_for, start, wait_for_run
from tests.flow_support import route_to

MAP_YAML = """
key: big-map
steps:
  - id: each
    type: noop
    for_each: ${range(%d)}
    retry: {max_attempts: 2}
    params: {output: {n: "${item}"}}
  - id: after
    type: noop
    depends_on: [each]
    params: {output: {count: "${steps.each.output | length}"}}
"""


@pytest.fixture
def nobody_consumes():
    """Send this process's messages to a queue no worker reads: the test drives the steps."""
    with route_to(f"nobody-{uuid.uuid4().hex[:8]}"):
        yield


def _sends():
    """Record the step ids of each message send (after each commit) without sending anything."""
    calls: list[list[int]] = []
    return calls, mock.patch.object(broker, "enqueue_steps", lambda ids, **kw: calls.append(list(ids)))


@pytest.mark.django_db(transaction=True)
def test_a_large_map_is_queued_not_expanded_then_a_worker_expands_it_in_batches(settings, nobody_consumes):
    settings.ORCHESTRATOR_EXPAND_BATCH = 50
    run = start(MAP_YAML % 120)
    each = run.steps.get(step_id="each")
    # nothing of the map was inserted by the transaction that started the run
    assert each.status == StepStatus.QUEUED
    assert each.children.count() == 0
    assert each.input == list(range(120))

    calls, patched = _sends()
    with patched:
        assert engine.execute_step(each.pk, worker="test@host:1", task_id="t1") == "expanded"
    assert [len(c) for c in calls] == [50, 50, 20]  # one send per committed batch, in item order
    children = list(each.children.order_by("map_index"))
    assert [c.map_index for c in children] == list(range(120))
    assert [c.item for c in children] == list(range(120))
    assert {c.status for c in children} == {StepStatus.QUEUED}
    assert [pk for call in calls for pk in call] == [c.pk for c in children]
    each.refresh_from_db()
    assert (each.status, each.pending_children, each.lease_token) == (StepStatus.RUNNING, 120, None)
    assert list(Attempt.objects.filter(step=each).values_list("outcome", flat=True)) == [AttemptOutcome.SUCCEEDED]
    assert Trace.objects.filter(step_row=each, message__contains="fanned out to 120 children (batches of 50)").exists()
    run.refresh_from_db()
    assert run.steps_total == 2 + 120

    # the children run (here, in this process) and the last one joins the map
    for child in children:
        assert engine.execute_step(child.pk, worker="test@host:1", task_id="t2") in ("succeeded", "not-claimed")
    engine.execute_step(run.steps.get(step_id="after").pk, worker="test@host:1", task_id="t3")
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    each.refresh_from_db()
    assert each.output == [{"n": i} for i in range(120)]


@pytest.mark.django_db(transaction=True)
def test_an_expansion_lost_midway_resumes_after_the_last_child_inserted(settings, nobody_consumes):
    settings.ORCHESTRATOR_EXPAND_BATCH = 40
    run = start(MAP_YAML % 100)
    each = run.steps.get(step_id="each")
    real = state.expand_batch
    seen = []

    def dies_at_the_second_batch(*args, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            raise SystemExit("worker killed")  # the second batch's transaction rolls back
        return real(*args, **kwargs)

    calls, patched = _sends()
    with patched, mock.patch.object(state, "expand_batch", dies_at_the_second_batch):
        with pytest.raises(SystemExit):
            engine.execute_step(each.pk, worker="test@host:1", task_id="t1")
    assert each.children.count() == 40
    each.refresh_from_db()
    assert each.status == StepStatus.RUNNING and each.lease_token is not None

    # the sweeper sees the lease expire: the attempt is lost, the step retries
    assert sweeper.recover_lost(each.pk, "lease expired", lease_expired_before=state.now() + timedelta(days=1))
    each.refresh_from_db()
    assert each.status == StepStatus.RETRY_WAIT
    state.make_due([each.pk])
    with patched:
        assert engine.execute_step(each.pk, worker="test@host:2", task_id="t2") == "expanded"
    children = list(each.children.order_by("map_index").values_list("map_index", flat=True))
    assert children == list(range(100))  # nothing inserted twice, nothing missed
    each.refresh_from_db()
    assert each.pending_children == 100
    outcomes = list(Attempt.objects.filter(step=each).order_by("number").values_list("outcome", flat=True))
    assert outcomes == [AttemptOutcome.LOST, AttemptOutcome.SUCCEEDED]


@pytest.mark.django_db(transaction=True)
def test_cancel_during_an_expansion_stops_it(settings, nobody_consumes):
    settings.ORCHESTRATOR_EXPAND_BATCH = 10
    run = start(MAP_YAML % 50)
    each = run.steps.get(step_id="each")
    real = state.expand_batch
    batches = []

    def cancel_after_the_first_batch(*args, **kwargs):
        batches.append(1)
        if len(batches) == 2:
            # a user's cancel lands between two batches: under the lock order (the run first) it
            # can land nowhere else; here it runs in the second batch's transaction, which has
            # just taken the run's lock, before the batch looks at its step
            engine.cancel_run(run.pk)
        return real(*args, **kwargs)

    calls, patched = _sends()
    with patched, mock.patch.object(state, "expand_batch", cancel_after_the_first_batch):
        result = engine.execute_step(each.pk, worker="test@host:1", task_id="t1")
    assert result == "refused"
    run.refresh_from_db()
    assert run.status == "cancelled"
    each.refresh_from_db()
    assert each.status == StepStatus.CANCELLED
    assert each.children.count() <= 20  # expansion stopped at the cancel
    assert not each.children.exclude(status=StepStatus.CANCELLED).exists()


def test_post_runs_of_a_large_map_answers_at_once_and_the_run_finishes(worker, owner):
    """Through the API and the real worker: the request inserts no child, the run completes with
    every item run exactly once (ORCHESTRATOR_EXPAND_BATCH is 1000 in the worker: 3 batches)."""
    client = api_client_for(owner)
    response = client.post("/api/v1/templates", {"source": MAP_YAML % 2500}, format="json")
    assert response.status_code in (200, 201), response.content
    began = time.monotonic()
    response = client.post("/api/v1/runs", {"template": "big-map"}, format="json")
    took = time.monotonic() - began
    assert response.status_code == 201, response.content
    run_id = response.json()["id"]
    run = wait_for_run(run_id, timeout=180)
    assert run.status == "succeeded", run.error
    each = Step.objects.get(run_id=run_id, step_id="each")
    assert len(each.output) == 2500
    attempts = Attempt.objects.filter(step__parent=each)
    assert attempts.count() == 2500  # every item once
    assert set(attempts.values_list("outcome", flat=True)) == {AttemptOutcome.SUCCEEDED}
    print(f"POST /runs of a 2,500-item map: {took * 1000:.0f} ms")


@pytest.mark.django_db(transaction=True)
def test_a_large_map_of_external_steps_is_expanded_by_a_worker_and_its_items_polled(settings, nobody_consumes):
    from runs.engine import executors

    settings.ORCHESTRATOR_EXPAND_BATCH = 50
    queue = f"ext-{uuid.uuid4().hex[:6]}"
    run = start(
        f"""
key: big-external-map
steps:
  - id: each
    type: external
    queue: {queue}
    for_each: ${{range(60)}}
    params: {{n: "${{item}}"}}
"""
    )
    each = run.steps.get(step_id="each")
    assert each.status == StepStatus.QUEUED
    # an executor never gets the map step itself: a Celery worker expands it
    assert executors.poll(tenant_id=run.tenant_id, queues=[queue], executor_id="x", max_tasks=5) == []
    calls, patched = _sends()
    with patched:
        assert engine.execute_step(each.pk, worker="test@host:1", task_id="t1") == "expanded"
    assert calls == []  # its items wait for executors' polls, not Celery messages
    tasks = executors.poll(tenant_id=run.tenant_id, queues=[queue], executor_id="x", max_tasks=5)
    assert [t.step_id for t in tasks] == [f"each[{i}]" for i in range(5)]
    assert [t.params for t in tasks] == [{"n": i} for i in range(5)]


INPUTS_MAP_YAML = """
key: map-over-inputs
variables:
  items: {type: array}
  prefix: {type: string}
steps:
  - id: each
    type: noop
    for_each: ${vars.items}
    params: {output: "${vars.prefix}-${item}"}
"""


@pytest.mark.django_db(transaction=True)
def test_a_worker_reads_a_runs_inputs_at_its_first_claim_only(nobody_consumes):
    """A map over a run input used to read, detoast and decode the whole input at each child's
    claim (quadratic in the items: W5's 10,000 took 1.7x the time of ten 1,000s). A process now
    keeps the inputs of the runs it claimed lately (they never change); the claim leaves them out
    for those, and every child still sees them."""
    from runs.engine import sql

    runs = [start(INPUTS_MAP_YAML, {"items": [1, 2, 3], "prefix": p}) for p in ("a", "b")]
    returned: list[object] = []
    claim = sql.claim_and_begin

    def spy(*args, **kwargs):
        claimed = claim(*args, **kwargs)
        returned.append(claimed[1].inputs if claimed else "none")
        return claimed

    # room for one run only: the second run's claims push the first one's inputs out (and
    # inputs this small are kept too: by default only those of 2 KB of JSON or more are)
    with (
        mock.patch.object(state, "run_inputs", state.InputsCache(size=1, min_chars=0)),
        mock.patch.object(sql, "claim_and_begin", spy),
    ):
        children = [c for run in runs for c in run.steps.get(step_id="each").children.order_by("map_index")]
        order = [children[0], children[1], children[3], children[4], children[2], children[5]]
        for child in order:
            assert engine.execute_step(child.pk, worker="test@host:1", task_id="t") == "succeeded"
    outputs = {c.step_id + c.run.inputs["prefix"]: Step.objects.get(pk=c.pk).output for c in children}
    assert outputs == {
        "each[0]a": "a-1", "each[1]a": "a-2", "each[2]a": "a-3",
        "each[0]b": "b-1", "each[1]b": "b-2", "each[2]b": "b-3",
    }  # fmt: skip
    a, b = ({"items": [1, 2, 3], "prefix": p} for p in ("a", "b"))
    assert returned == [a, None, b, None, a, b]  # read again only after being pushed out


def test_small_inputs_are_read_at_each_claim():
    cache = state.InputsCache()
    small = mock.Mock(pk=uuid.uuid4(), inputs={"n": 1})
    cache.fill(small, {})
    assert cache.snapshot() == {}  # cheaper to read again than to name in every claim
    big = mock.Mock(pk=uuid.uuid4(), inputs={"items": list(range(1000))})
    cache.fill(big, {})
    assert cache.snapshot() == {big.pk: big.inputs}


def test_the_inputs_kept_are_capped_in_characters():
    cache = state.InputsCache(min_chars=10, max_chars=12_000)
    runs = [mock.Mock(pk=uuid.uuid4(), inputs={"items": list(range(1000))}) for _ in range(3)]  # ~5 KB each
    for run in runs:
        cache.fill(run, {})
    assert list(cache.snapshot()) == [runs[1].pk, runs[2].pk]  # the oldest out, not the count
    huge = mock.Mock(pk=uuid.uuid4(), inputs={"items": list(range(5000))})
    cache.fill(huge, {})
    assert huge.pk not in cache.snapshot()  # larger than the cap: never kept


@pytest.mark.django_db(transaction=True)
def test_a_chain_continued_inline_sees_large_inputs_at_every_step(nobody_consumes):
    """An inline claim reuses the completed step's run (its inputs included) and reads none of
    the run's row; every link still renders ``vars``."""
    chain = """
key: big-inputs-chain
variables:
  blob: {type: array}
  tag: {type: string}
steps:
  - id: a
    type: noop
    params: {output: "${vars.tag}-a"}
  - id: b
    type: noop
    depends_on: [a]
    params: {output: "${vars.tag}-${vars.blob | length}"}
  - id: c
    type: noop
    depends_on: [b]
    params: {output: "${steps.b.output}-c"}
"""
    run = start(chain, {"blob": list(range(2000)), "tag": "t"})
    with mock.patch.object(state, "run_inputs", state.InputsCache()):
        assert engine.execute_step(run.steps.get(step_id="a").pk, worker="test@host:1", task_id="t") == "succeeded"
    outputs = dict(Step.objects.filter(run=run).values_list("step_id", "output"))
    assert outputs == {"a": "t-a", "b": "t-2000", "c": "t-2000-c"}
