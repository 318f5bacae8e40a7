"""Concurrency limits: concurrent steps per key (slots tied to leases), concurrent runs per template
and per tenant (runs wait `pending`, admitted by priority), and no slot leaked by a killed worker."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from agents.models import ConcurrencyLimit, ConcurrencySlot, ManagedBy, QueuedRun, SlotWaiter
from runs import engine
from runs.engine import gate as flowcontrol
from runs.engine import lifecycle
from runs.models import Attempt, Run, Step, Trace
from templates_app.spec import WorkflowError, load_spec
from tests.conftest import start, wait_for_run
from tests.flow_support import purge_queue, route_to, start_workers

# --- the declarations -------------------------------------------------------------------------------


def test_concurrency_forms_normalize():
    spec = load_spec(
        "key: c\nmax_active_runs: 3\ndefaults:\n  concurrency: {key: 'host:${step.host}', limit: 4}\nsteps:\n"
        "  - {id: a, type: noop}\n  - {id: b, type: noop, concurrency: 2}\n  - {id: c, type: noop, concurrency: gpu}\n"
        "  - {id: d, type: noop, concurrency: null}\n"
    )
    steps = {s["id"]: s for s in spec["steps"]}
    assert spec["max_active_runs"] == 3
    assert steps["a"]["concurrency"] == {"key": "host:${step.host}", "limit": 4}
    assert steps["b"]["concurrency"] == {"key": None, "limit": 2}
    assert steps["c"]["concurrency"] == {"key": "gpu", "limit": None}  # limit from the admin
    assert "concurrency" not in steps["d"]
    assert "max_active_runs" not in load_spec("key: c\nsteps: [{id: a, type: noop}]")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps: [{id: a, type: noop, concurrency: 0}]", "step 'a': concurrency.limit: must be an integer >= 1, got 0"),
        ("steps: [{id: a, type: noop, concurrency: {limit: two}}]", "concurrency.limit: must be an integer >= 1"),
        ("steps: [{id: a, type: noop, concurrency: {slots: 2}}]", "concurrency: unknown key 'slots'"),
        ("steps: [{id: a, type: noop, concurrency: {}}]", "concurrency: give a limit, or the key of a limit"),
        ("steps: [{id: a, type: noop, concurrency: true}]", "concurrency: must be a mapping"),
        (
            "steps: [{id: a, type: noop, concurrency: {key: 'k:${x}', limit: 1}}]",
            "concurrency.key references undefined",
        ),
        ("max_active_runs: 0\nsteps: [{id: a, type: noop}]", "max_active_runs: must be an integer >= 1, got 0"),
        ("max_active_runs: yes\nsteps: [{id: a, type: noop}]", "max_active_runs: must be an integer >= 1, got True"),
        ("defaults: {concurrency: -2}\nsteps: [{id: a, type: noop}]", "defaults.concurrency.limit: must be an integer"),
        (
            "steps: [{id: a, type: noop, for_each: [1], concurrency: {key: 'k:${item}', limit: 1}}]",
            None,  # the loop item may name the key in a for_each
        ),
    ],
)
def test_bad_concurrency_declarations(text, message):
    if message is None:
        load_spec(f"key: c\n{text}\n", source="c.yaml")
        return
    with pytest.raises(WorkflowError) as caught:
        load_spec(f"key: c\n{text}\n", source="c.yaml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("c.yaml: ")


# --- the gate, step by step (in this process, no worker) --------------------------------------------

ONE_AT_A_TIME = """\
key: serial
steps:
  - id: each
    type: noop
    for_each: [1, 2, 3]
    retry: {max_attempts: 1}
    concurrency: {key: KEY, limit: 1}
"""


def test_a_step_without_a_slot_waits_and_a_release_wakes_it(db, django_capture_on_commit_callbacks, settings):
    settings.ORCHESTRATOR_CONCURRENCY_POLL = 5.0
    key = f"k-{uuid.uuid4().hex[:6]}"
    stored = f"default/{key}"  # keys are scoped to the tenant that declares them
    run = start(ONE_AT_A_TIME.replace("KEY", key))
    first, second, _third = Step.objects.filter(run=run, parent__isnull=False).order_by("map_index")
    # given `first` holds the only slot under its lease
    holder_lease = timezone.now() + timedelta(seconds=30)
    ConcurrencySlot.objects.create(
        key=stored, step=first, lease_token=uuid.uuid4(), expires_at=holder_lease, acquired_at=timezone.now()
    )
    # when `second` is claimed it goes back to retry_wait: no attempt, a waiter, one trace
    assert engine.execute_step(second.pk) == "throttled"
    second.refresh_from_db()
    assert (second.status, second.attempts) == ("retry_wait", 0)
    assert 4.0 < (second.next_attempt_at - timezone.now()).total_seconds() <= 5.0  # the poll interval
    assert SlotWaiter.objects.filter(step=second, key=stored).exists()
    assert Trace.objects.filter(step_row=second, message__contains="is full (1 of 1 running)").count() == 1
    assert ConcurrencyLimit.objects.get(key=stored).limit == 1  # kept for the admin
    # when the holder's attempt ends, the waiter is due at once and re-sent
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        with transaction.atomic():
            lifecycle.wake_on_commit(flowcontrol.release_step(first))
    assert len(callbacks) == 1  # engine.wake_steps, after commit
    second.refresh_from_db()
    assert second.next_attempt_at <= timezone.now()
    assert not SlotWaiter.objects.filter(step=second).exists()
    # and it runs, on its first attempt, holding the slot until it ends
    assert engine.execute_step(second.pk) == "succeeded"
    second.refresh_from_db()
    assert second.attempts == 1
    assert not ConcurrencySlot.objects.filter(key=stored).exists()


def test_an_expired_lease_frees_its_slot_without_anyone_releasing_it(db):
    key = f"k-{uuid.uuid4().hex[:6]}"
    stored = f"default/{key}"  # keys are scoped to the tenant that declares them
    run = start(ONE_AT_A_TIME.replace("KEY", key))
    first, second, _third = Step.objects.filter(run=run, parent__isnull=False).order_by("map_index")
    # a holder whose worker died: its lease ended a moment ago
    ConcurrencySlot.objects.create(
        key=stored,
        step=first,
        lease_token=uuid.uuid4(),
        expires_at=timezone.now() - timedelta(seconds=1),
        acquired_at=timezone.now() - timedelta(seconds=60),
    )
    assert engine.execute_step(second.pk) == "succeeded"
    assert not ConcurrencySlot.objects.filter(step=first).exists()


def test_the_wait_ends_when_the_earliest_lease_does(db, settings):
    settings.ORCHESTRATOR_CONCURRENCY_POLL = 30.0
    key = f"k-{uuid.uuid4().hex[:6]}"
    stored = f"default/{key}"  # keys are scoped to the tenant that declares them
    run = start(ONE_AT_A_TIME.replace("KEY", key))
    first, second, _third = Step.objects.filter(run=run, parent__isnull=False).order_by("map_index")
    ConcurrencySlot.objects.create(
        key=stored,
        step=first,
        lease_token=uuid.uuid4(),
        expires_at=timezone.now() + timedelta(seconds=3),
        acquired_at=timezone.now(),
    )
    assert engine.execute_step(second.pk) == "throttled"
    second.refresh_from_db()
    assert 2.0 < (second.next_attempt_at - timezone.now()).total_seconds() <= 3.0


def test_admin_limit_wins_and_zero_pauses(db):
    key = f"k-{uuid.uuid4().hex[:6]}"
    stored = f"default/{key}"  # keys are scoped to the tenant that declares them
    ConcurrencyLimit.objects.create(key=stored, limit=0, managed_by=ManagedBy.ADMIN)
    run = start(ONE_AT_A_TIME.replace("KEY", key))
    first = Step.objects.filter(run=run, parent__isnull=False).order_by("map_index").first()
    assert engine.execute_step(first.pk) == "throttled"  # paused by the operator
    assert ConcurrencyLimit.objects.get(key=stored).limit == 0


def test_a_key_without_any_limit_fails_the_step(db):
    run = start("key: x\nsteps:\n  - {id: a, type: noop, retry: {max_attempts: 2}, concurrency: nolimit}\n")
    step = run.steps.get()
    assert engine.execute_step(step.pk) == "failed"
    step.refresh_from_db()
    assert "concurrency key 'nolimit' has no limit" in step.error and step.attempts == 1


# --- run limits -------------------------------------------------------------------------------------


def test_runs_over_the_tenant_limit_wait_pending_and_are_admitted_by_priority(
    db, django_capture_on_commit_callbacks, settings
):
    settings.ORCHESTRATOR_MAX_CONCURRENT_RUNS = 1  # seed 002's MAX_CONCURRENT_WORKFLOWS
    text = "key: t\nsteps: [{id: a, type: noop}]\n"
    first = start(text, tenant_id="acme")
    low = start(text, tenant_id="acme", priority=9)
    high = start(text, tenant_id="acme", priority=0)
    other_tenant = start(text, tenant_id="globex")
    assert first.status == "running" and other_tenant.status == "running"
    for waiting in (low, high):
        waiting.refresh_from_db()
        assert (waiting.status, waiting.started_at) == ("pending", None)
        assert "tenant:acme has 1 of 1 runs running" in QueuedRun.objects.get(run=waiting).reason
        assert not Step.objects.filter(run=waiting).exclude(status="pending").exists()  # nothing queued
    # when the running one ends, the most urgent waiting run starts
    with django_capture_on_commit_callbacks(execute=True):
        engine.cancel_run(first.pk)
    high.refresh_from_db()
    low.refresh_from_db()
    assert high.status == "running" and high.started_at is not None
    assert low.status == "pending"
    assert Trace.objects.filter(run=high, message__contains="concurrency slot is free").exists()
    # the admin's row overrides the default; raising it lets the last one in (through the sweeper)
    ConcurrencyLimit.objects.create(key="tenant:acme", limit=2, managed_by=ManagedBy.ADMIN)
    with django_capture_on_commit_callbacks(execute=True):
        counts = engine.sweep()
    assert counts["admitted_runs"] == 1
    low.refresh_from_db()
    assert low.status == "running"
    assert not QueuedRun.objects.exists()


def test_template_limit_and_cancelling_a_waiting_run(db, django_capture_on_commit_callbacks):
    text = "key: capped\nmax_active_runs: 1\nsteps: [{id: a, type: noop}]\n"
    first = start(text)
    second = start(text)
    third = start("key: free\nsteps: [{id: a, type: noop}]\n")  # another template is not limited
    assert Run.objects.get(pk=second.pk).status == "pending"
    assert third.status == "running"
    with django_capture_on_commit_callbacks(execute=True):
        engine.cancel_run(second.pk)  # cancelled while waiting: it never starts
        engine.cancel_run(first.pk)
    assert Run.objects.get(pk=second.pk).status == "cancelled"
    assert not QueuedRun.objects.exists()


# --- with real workers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flow_workers(django_db_setup, worker_env, tmp_path_factory):
    """2 worker nodes x 2 prefork children on a queue of their own, short lease grace."""
    workers = start_workers(
        worker_env,
        tmp_path_factory.mktemp("cc-workers"),
        nodes=2,
        concurrency=2,
        env={"ORCHESTRATOR_LEASE_GRACE": "0.5", "ORCHESTRATOR_CONCURRENCY_POLL": "0.5"},
    )
    yield workers
    workers.stop()
    purge_queue(workers.queue)


@pytest.fixture
def flow(flow_workers, transactional_db, agent_server, settings):
    agent_server.reset()
    settings.ORCHESTRATOR_LEASE_GRACE = 0.5
    settings.ORCHESTRATOR_REQUEUE_AFTER = 5.0  # the test's sweeps re-send a message lost on a busy box
    with route_to(flow_workers.queue):
        yield flow_workers


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    level = peak = 0
    for _when, change in events:
        level += change
        peak = max(peak, level)
    return peak


def attempt_intervals(queryset) -> list[tuple[float, float]]:
    return [(a.started_at.timestamp(), a.finished_at.timestamp()) for a in queryset]


SLEEPERS = """\
key: sleepers
steps:
  - id: nap
    type: sleep
    params: {seconds: 0.4}
    for_each: [1, 2, 3, 4, 5, 6]
    retry: {max_attempts: 1}
    concurrency: {key: KEY, limit: 2}
"""


def test_step_limit_holds_across_worker_processes(flow):
    key = f"naps-{uuid.uuid4().hex[:6]}"
    stored = f"default/{key}"
    run = wait_for_run(start(SLEEPERS.replace("KEY", key)).pk, timeout=60, sweep=True)
    assert run.status == "succeeded", run.error
    attempts = Attempt.objects.filter(run=run, step__parent__isnull=False)
    assert attempts.count() == 6  # waiting cost no attempt
    assert max_overlap(attempt_intervals(attempts)) == 2  # never 3, and the limit was used
    assert not ConcurrencySlot.objects.filter(key=stored).exists()
    assert not SlotWaiter.objects.filter(key=stored).exists()


CAPPED_RUNS = """\
key: capped-runs
max_active_runs: 2
steps:
  - {id: nap, type: sleep, params: {seconds: 0.5}}
"""


def test_run_limit_holds_and_admits_by_priority(flow):
    runs = [start(CAPPED_RUNS, priority=p) for p in (5, 5, 9, 0, 4)]
    assert [Run.objects.get(pk=r.pk).status for r in runs[2:]] == ["pending"] * 3
    finished = [wait_for_run(r.pk, timeout=60, sweep=True) for r in runs]
    assert all(r.status == "succeeded" for r in finished)
    intervals = [(r.started_at.timestamp(), r.finished_at.timestamp()) for r in finished]
    assert max_overlap(intervals) <= 2
    # the waiting ones started most urgent first: priority 0, then 4, then 9
    waited = sorted(finished[2:], key=lambda r: r.started_at)
    assert [r.priority for r in waited] == [0, 4, 9]


KILLABLE = """\
key: killable
steps:
  - id: nap
    type: sleep
    params: {seconds: 1.0}
    timeout: 1.5
    for_each: [1, 2, 3]
    retry: {max_attempts: 3, initial_delay: 0.1, jitter: false}
    concurrency: {key: KEY, limit: 1}
"""


def test_a_killed_worker_leaks_no_slot(django_db_setup, flow, worker_env, tmp_path, settings):
    settings.ORCHESTRATOR_REQUEUE_AFTER = 1.0  # messages left in the dead worker's queue: re-sent soon
    # given a worker of its own that takes the only slot...
    victim = start_workers(
        worker_env,
        tmp_path,
        nodes=1,
        concurrency=1,
        env={"ORCHESTRATOR_LEASE_GRACE": "0.5", "ORCHESTRATOR_CONCURRENCY_POLL": "0.5"},
    )
    key = f"kill-{uuid.uuid4().hex[:6]}"
    stored = f"default/{key}"
    try:
        with route_to(victim.queue):
            run = start(KILLABLE.replace("KEY", key))
        deadline = time.time() + 20
        while not ConcurrencySlot.objects.filter(key=stored).exists():
            assert time.time() < deadline, victim.log_text()[-2000:]
            time.sleep(0.05)
        holder = ConcurrencySlot.objects.get(key=stored)
        # ...when it is killed mid-step (no release, no ack)
        victim.kill(0)
    finally:
        victim.stop()
        purge_queue(victim.queue)
    # then the other workers finish the run once the dead lease ends (the sweeper re-sends)
    run = wait_for_run(run.pk, timeout=60, sweep=True)
    assert run.status == "succeeded", run.error
    lost = Attempt.objects.get(run=run, outcome="lost")
    assert lost.step_id == holder.step_id
    assert Attempt.objects.get(step_id=holder.step_id, outcome="succeeded").number == 2
    # the slot never had two live holders: the others started only once the dead holder was known
    # to be lost (its lease ended, or the sweeper saw its process gone: runs.engine), never before
    released = min(holder.expires_at, lost.finished_at).timestamp()
    others = Attempt.objects.filter(run=run, outcome="succeeded")
    assert all(a.started_at.timestamp() >= released for a in others)
    assert max_overlap(attempt_intervals(others)) == 1
    # and nothing is left behind
    assert not ConcurrencySlot.objects.filter(key=stored).exists()
    assert not SlotWaiter.objects.filter(key=stored).exists()


def test_admin_pages_of_flow_control(admin_client, db):
    from agents.models import RateLimit

    key = f"k-{uuid.uuid4().hex[:6]}"
    stored = f"default/{key}"  # keys are scoped to the tenant that declares them
    run = start(ONE_AT_A_TIME.replace("KEY", key))
    engine.execute_step(Step.objects.filter(run=run, parent__isnull=False).first().pk)
    RateLimit.objects.create(key="op", capacity=2, refill_rate=1.0, tokens=2.0, last_refill=timezone.now())
    for url in (
        "/admin/agents/ratelimit/",
        "/admin/agents/concurrencylimit/",
        "/admin/agents/concurrencyslot/",
        "/admin/agents/queuedrun/",
        "/admin/agents/credential/",
        "/admin/scheduler/schedule/",
        "/admin/scheduler/intentevent/",
    ):
        assert admin_client.get(url).status_code == 200, url
    # an operator's edit makes the numbers theirs
    bucket = RateLimit.objects.get(key="op")
    response = admin_client.post(
        f"/admin/agents/ratelimit/{bucket.pk}/change/", {"key": "op", "capacity": 5, "refill_rate": 2.5}
    )
    assert response.status_code == 302
    bucket.refresh_from_db()
    assert (bucket.capacity, bucket.refill_rate, bucket.managed_by) == (5, 2.5, ManagedBy.ADMIN)
    limit = ConcurrencyLimit.objects.get(key=stored)
    response = admin_client.post(f"/admin/agents/concurrencylimit/{limit.pk}/change/", {"key": stored, "limit": 4})
    assert response.status_code == 302
    assert ConcurrencyLimit.objects.get(key=stored).managed_by == ManagedBy.ADMIN


def test_limit_rows_are_for_superusers_only(client, owner):
    owner.is_staff = True
    owner.save()
    client.force_login(owner)
    assert client.get("/admin/agents/ratelimit/").status_code == 403
    assert client.get("/admin/agents/concurrencylimit/").status_code == 403


# --- keys are scoped to the tenant that declares them (issue 10) --------------------------------------


def test_a_workflow_cannot_reach_another_tenants_limits(db):
    from runs.engine.gate import ratelimit

    # given tenant tb's run limit and rate-limit bucket (an admin's rows)
    ConcurrencyLimit.objects.create(key="tenant:tb", limit=5, managed_by=ManagedBy.ADMIN)
    ratelimit.take(ratelimit.Bucket("tb/api", capacity=10, refill_rate=1.0))
    # when a workflow of tenant ta names them as its own keys, with other numbers
    hostile = (
        "key: hostile\nsteps:\n"
        "  - {id: a, type: noop, concurrency: {key: 'tenant:tb', limit: 1}}\n"
        "  - {id: b, type: noop, rate_limit: {key: 'tb/api', capacity: 1, rate: 1/h}}\n"
    )
    run = start(hostile, tenant_id="ta")
    for step in Step.objects.filter(run=run).order_by("id"):
        assert engine.execute_step(step.pk) == "succeeded"
    # then it got keys of its own, and tb's rows are untouched
    assert ConcurrencyLimit.objects.get(key="tenant:tb").limit == 5
    assert ConcurrencyLimit.objects.get(key="ta/tenant:tb").limit == 1
    from agents.models import RateLimit

    tb = RateLimit.objects.get(key="tb/api")
    assert (tb.capacity, tb.refill_rate) == (10, 1.0)
    assert RateLimit.objects.filter(key="ta/tb/api").exists()


def test_global_keys_are_the_admins_only(db):
    # a workflow may use a deployment-wide key an admin created, never create or change one
    run = start("key: g\nsteps:\n  - {id: a, type: noop, concurrency: {key: 'global:gpu', limit: 9}}\n")
    step = run.steps.get()
    assert engine.execute_step(step.pk) == "failed"
    step.refresh_from_db()
    assert "concurrency key 'global:gpu' has no limit" in step.error
    assert not ConcurrencyLimit.objects.filter(key="global:gpu").exists()
    ConcurrencyLimit.objects.create(key="global:gpu", limit=2, managed_by=ManagedBy.ADMIN)
    run = start("key: g\nsteps:\n  - {id: a, type: noop, concurrency: {key: 'global:gpu', limit: 9}}\n")
    assert engine.execute_step(run.steps.get().pk) == "succeeded"
    assert ConcurrencyLimit.objects.get(key="global:gpu").limit == 2  # the declared 9 was ignored
