"""Rate limits: the `rate_limit` declaration, the shared token bucket, waiting without spending an
attempt, and a burst of 10x the capacity across 4 worker processes staying within the limit."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from agents.models import ManagedBy, RateLimit, TokenReservation
from runs import engine
from runs.engine.gate import ratelimit
from runs.models import Attempt, Step, Trace
from templates_app.spec import WorkflowError, load_spec
from tests.conftest import start, wait_for_run
from tests.flow_support import purge_queue, route_to, start_workers

# --- the declaration ---------------------------------------------------------------------------


def spec_of(step_extra: str, defaults: str = "") -> dict:
    text = "key: rl\n" + (f"defaults:\n  {defaults}\n" if defaults else "")
    text += f"variables: {{tier: {{default: gold}}}}\nsteps:\n  - {{id: a, type: noop, {step_extra}}}\n"
    return load_spec(text, source="rl.yaml")


def test_rate_limit_forms_normalize():
    step = spec_of("rate_limit: {key: 'user:${run.user_id}:agent:clo', capacity: 5, rate: 30/m}")["steps"][0]
    assert step["rate_limit"] == {"key": "user:${run.user_id}:agent:clo", "capacity": 5, "refill_rate": 0.5}
    assert spec_of("rate_limit: {refill_rate: 2, capacity: 4}")["steps"][0]["rate_limit"] == {
        "key": None,
        "capacity": 4,
        "refill_rate": 2.0,
    }
    # shorthands: a rate (no burst), or the key of a bucket defined in the admin
    assert spec_of("rate_limit: 100/h")["steps"][0]["rate_limit"] == {
        "key": None,
        "capacity": 1,
        "refill_rate": 100 / 3600,
    }
    assert spec_of("rate_limit: openai")["steps"][0]["rate_limit"] == {
        "key": "openai",
        "capacity": None,
        "refill_rate": None,
    }
    # a key may use variables, run fields and the step's host
    assert spec_of("rate_limit: {key: 'host:${step.host}:${tier}', rate: 1/s}")["steps"][0]["rate_limit"]["key"]


def test_defaults_apply_and_a_step_can_opt_out():
    spec = load_spec(
        "key: rl\ndefaults:\n  rate_limit: {key: shared, capacity: 2, rate: 1/s}\nsteps:\n"
        "  - {id: a, type: noop}\n  - {id: b, type: noop, rate_limit: null}\n  - {id: c, type: noop, rate_limit: 5/s}\n"
    )
    steps = {s["id"]: s for s in spec["steps"]}
    assert steps["a"]["rate_limit"] == {"key": "shared", "capacity": 2, "refill_rate": 1.0}
    assert "rate_limit" not in steps["b"]  # absent when not declared: the engine skips the gate
    assert steps["c"]["rate_limit"] == {"key": None, "capacity": 1, "refill_rate": 5.0}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("rate_limit: {capacity: 0, rate: 1/s}", "step 'a': rate_limit.capacity: must be an integer >= 1, got 0"),
        ("rate_limit: {capacity: many, rate: 1/s}", "rate_limit.capacity: must be an integer >= 1"),
        ("rate_limit: {rate: 0/s}", "rate_limit.rate: the rate must be greater than zero"),
        ("rate_limit: {rate: fast}", "rate_limit.rate: expected a rate such as '10/s'"),
        ("rate_limit: {refill_rate: '2'}", "rate_limit.refill_rate: must be tokens per second"),
        ("rate_limit: {rate: 1/s, refill_rate: 1}", "rate_limit: give refill_rate or rate, not both"),
        ("rate_limit: {capacity: 3}", "rate_limit: capacity needs a rate"),
        ("rate_limit: {burst: 3, rate: 1/s}", "rate_limit: unknown key 'burst'"),
        ("rate_limit: {}", "rate_limit: give a rate (and capacity), or the key of a bucket"),
        ("rate_limit: [1]", "rate_limit: must be a mapping"),
        ("rate_limit: {key: '', rate: 1/s}", "rate_limit.key: must be a non-empty string"),
        ("rate_limit: {key: 'u:${nope}', rate: 1/s}", "rate_limit.key references undefined name 'nope'"),
        ("rate_limit: {key: 'u:${steps.a.output}', rate: 1/s}", "rate_limit.key: may not use step outputs"),
        ("rate_limit: {key: 'u:${run.', rate: 1/s}", "rate_limit.key:"),
    ],
)
def test_bad_rate_limits_are_refused_with_one_line(extra, message):
    with pytest.raises(WorkflowError) as caught:
        spec_of(extra)
    assert message in str(caught.value)
    assert str(caught.value).startswith("rl.yaml: step 'a': ")
    assert "\n" not in str(caught.value)


def test_bad_defaults_rate_limit_and_condition_steps():
    with pytest.raises(WorkflowError, match="defaults.rate_limit.capacity: must be an integer >= 1"):
        load_spec("key: rl\ndefaults:\n  rate_limit: {capacity: -1, rate: 1/s}\nsteps: [{id: a, type: noop}]")
    with pytest.raises(WorkflowError, match="rate_limit does not apply to condition steps"):
        load_spec("key: rl\nsteps:\n  - {id: c, type: condition, condition: 'true', rate_limit: 1/s}\n")
    # a default leaves the condition steps alone
    spec = load_spec("key: rl\ndefaults: {rate_limit: 1/s}\nsteps:\n  - {id: c, type: condition, condition: 'true'}\n")
    assert "rate_limit" not in spec["steps"][0]


def test_parse_rate():
    assert ratelimit.parse_rate("10/s") == 10.0
    assert ratelimit.parse_rate("30/m") == 0.5
    assert ratelimit.parse_rate("36/h") == 0.01
    assert ratelimit.parse_rate(2) == 2.0
    for bad in ("0/m", "-1/s", "x", True, "1/d"):
        with pytest.raises(ValueError):
            ratelimit.parse_rate(bad)


# --- the bucket -----------------------------------------------------------------------------------


def test_token_bucket_burst_then_exact_waits(db):
    """Capacity 2, 4 tokens/s: two at once, then none until the refill makes the next one."""
    now = timezone.now()
    bucket = ratelimit.Bucket("b1", capacity=2, refill_rate=4.0)
    waits = [ratelimit.take(bucket, now).wait for _ in range(3)]
    assert waits == [0.0, 0.0, 0.25]  # the third took nothing: its token comes in 0.25 s
    row = RateLimit.objects.get(key="b1")
    assert row.tokens == 0.0 and row.managed_by == ManagedBy.WORKFLOW
    assert ratelimit.take(bucket, now + timedelta(seconds=0.25)).wait == 0.0
    # later the bucket is full again, capped at its capacity
    assert ratelimit.current_tokens(RateLimit.objects.get(key="b1"), now + timedelta(seconds=10)) == 2.0


def test_admin_numbers_win_over_the_workflow(db):
    now = timezone.now()
    RateLimit.objects.create(
        key="op", capacity=1, refill_rate=1.0, tokens=1.0, last_refill=now, managed_by=ManagedBy.ADMIN
    )
    ratelimit.take(ratelimit.Bucket("op", capacity=100, refill_rate=100.0), now)
    assert RateLimit.objects.get(key="op").capacity == 1
    # a workflow-managed bucket follows its declaration
    ratelimit.take(ratelimit.Bucket("wf", capacity=1, refill_rate=1.0), now)
    ratelimit.take(ratelimit.Bucket("wf", capacity=5, refill_rate=2.0), now)
    assert RateLimit.objects.filter(key="wf").values_list("capacity", "refill_rate").get() == (5, 2.0)
    with pytest.raises(ratelimit.RateLimitNotConfigured, match="rate limit 'nobody' is not configured"):
        ratelimit.take(ratelimit.Bucket("nobody"), now)


LIMITED_MAP = """\
key: limited
steps:
  - id: each
    type: noop
    for_each: [1, 2, 3]
    retry: {max_attempts: 1}
    rate_limit: {key: KEY, capacity: 1, rate: 1/s}
"""


def children(run):
    return list(Step.objects.filter(run=run, parent__isnull=False).order_by("map_index"))


def test_a_step_without_a_token_waits_and_spends_no_attempt(db):
    key = f"unit-{uuid.uuid4().hex[:6]}"
    run = start(LIMITED_MAP.replace("KEY", key))  # `db`: no commit, so no message is sent
    first, second, third = children(run)
    assert engine.execute_step(first.pk) == "succeeded"

    assert engine.execute_step(second.pk) == "throttled"
    second.refresh_from_db()
    assert (second.status, second.attempts, second.lease_token) == ("retry_wait", 0, None)
    wait = (second.next_attempt_at - timezone.now()).total_seconds()
    assert 0.8 < wait <= 1.0  # exactly until the next token
    assert TokenReservation.objects.get(step=second).key == f"default/{key}"  # its place in line
    assert not Attempt.objects.filter(step=second).exists()
    assert Trace.objects.filter(step_row=second, kind="decision", message__contains=f"rate limit '{key}'").count() == 1

    # the third waits behind it: the token after next, 2 s
    assert engine.execute_step(third.pk) == "throttled"
    third.refresh_from_db()
    assert 1.8 < (third.next_attempt_at - timezone.now()).total_seconds() <= 2.0

    # not due yet: nothing to claim; made due early: no token yet, it waits the rest (one trace only)
    assert engine.execute_step(second.pk) == "not-claimed"
    Step.objects.filter(pk=second.pk).update(next_attempt_at=timezone.now())
    assert engine.execute_step(second.pk) == "throttled"
    assert Trace.objects.filter(step_row=second, kind="decision").count() == 1

    # once the refill made its token, it runs on its first attempt and leaves the line
    RateLimit.objects.filter(key=f"default/{key}").update(last_refill=timezone.now() - timedelta(seconds=1))
    Step.objects.filter(pk=second.pk).update(next_attempt_at=timezone.now())
    assert engine.execute_step(second.pk) == "succeeded"
    second.refresh_from_db()
    assert second.attempts == 1 and second.max_attempts == 1
    assert not TokenReservation.objects.filter(step=second).exists()


def test_newcomers_do_not_jump_the_line_and_cancelling_leaves_it(db):
    key = f"line-{uuid.uuid4().hex[:6]}"
    run = start(LIMITED_MAP.replace("KEY", key))
    first, second, third = children(run)
    engine.execute_step(first.pk)
    engine.execute_step(second.pk)  # waits in line
    # a token appears: a newcomer (third) still queues behind `second`
    RateLimit.objects.filter(key=f"default/{key}").update(last_refill=timezone.now() - timedelta(seconds=1))
    assert engine.execute_step(third.pk) == "throttled"
    assert TokenReservation.objects.filter(key=f"default/{key}").count() == 2
    # cancelling the run takes its steps out of the line
    engine.cancel_run(run.pk)
    assert not TokenReservation.objects.filter(key=f"default/{key}").exists()
    other = start(LIMITED_MAP.replace("KEY", key))
    assert engine.execute_step(children(other)[0].pk) == "succeeded"  # nobody ahead any more


def test_an_unconfigured_bucket_fails_the_step_permanently(db):
    run = start("key: x\nsteps:\n  - {id: a, type: noop, retry: {max_attempts: 3}, rate_limit: nowhere}\n")
    step = run.steps.get()
    assert engine.execute_step(step.pk) == "failed"
    step.refresh_from_db()
    assert step.status == "failed" and "rate limit 'nowhere' is not configured" in step.error
    assert step.attempts == 1  # permanent: not retried


def test_key_expressions_render_per_run(db):
    run = start(
        "key: k\nvariables: {agent: {default: clo}}\nsteps:\n"
        "  - {id: a, type: noop, rate_limit: {key: 'user:${run.user_id}:agent:${agent}', rate: 5/s}}\n",
        user_id="u42",
    )
    assert engine.execute_step(run.steps.get().pk) == "succeeded"
    assert RateLimit.objects.filter(key="default/user:u42:agent:clo").exists()


# --- across worker processes ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def flow_workers(django_db_setup, worker_env, tmp_path_factory):
    """2 worker nodes x 2 prefork children = 4 worker processes on a queue of their own."""
    workers = start_workers(worker_env, tmp_path_factory.mktemp("rl-workers"), nodes=2, concurrency=2)
    yield workers
    workers.stop()
    purge_queue(workers.queue)


@pytest.fixture
def flow(flow_workers, transactional_db, agent_server, settings):
    agent_server.reset()
    settings.ORCHESTRATOR_AGENTS_BASE_URL = agent_server.url
    settings.ORCHESTRATOR_REQUEUE_AFTER = 5.0  # the test's sweeps re-send a message lost on a busy box
    with route_to(flow_workers.queue):
        yield flow_workers


BURST = """\
key: burst
steps:
  - id: call
    call: /rl/${item}
    for_each: ${range(30) | list}
    retry: {max_attempts: 1}
    rate_limit: {key: KEY, capacity: 3, rate: 6/s}
"""


WARM_UP = """\
key: warm-up
steps:
  - {id: call, call: /slow/0.3, for_each: "${range(8) | list}", retry: {max_attempts: 1}}
"""


def warm_up() -> None:
    """One slow call per worker process (8 at once on 4 processes): imports, connections and HTTP
    clients are set up before the measurement, as in a worker that has been running a while."""
    assert wait_for_run(start(WARM_UP).pk, timeout=60, sweep=True).status == "succeeded"


def test_burst_across_four_worker_processes_stays_within_the_limit(flow, agent_server):
    # given warm workers, a bucket of 3 tokens refilled at 6/s and 30 calls at once (10x the capacity)
    warm_up()
    agent_server.reset()
    key = f"burst-{uuid.uuid4().hex[:6]}"
    run = start(BURST.replace("KEY", key))
    run = wait_for_run(run.pk, timeout=60, sweep=True)
    assert run.status == "succeeded", run.error

    # then the target saw at most capacity + rate * t calls in any window of t seconds
    times = sorted(r.at for r in agent_server.calls("/rl/"))
    assert len(times) == 30
    capacity, rate = 3, 6.0
    for i in range(len(times)):
        for j in range(i, len(times)):
            calls = j - i + 1
            allowed = capacity + rate * (times[j] - times[i])
            assert calls <= allowed + 1, f"{calls} calls in {times[j] - times[i]:.3f} s (limit {allowed:.1f})"
    # the limit really bit: 27 tokens beyond the burst take 27 / 6 = 4.5 s
    assert times[-1] - times[0] >= 27 / rate - 0.3

    # and waiting cost no attempt: one attempt per call, none retried (max_attempts is 1)
    items = Step.objects.filter(run=run, parent__isnull=False)
    assert sorted(items.values_list("attempts", flat=True)) == [1] * 30
    assert Attempt.objects.filter(run=run, step__parent__isnull=False).count() == 30
    assert Trace.objects.filter(run=run, kind="decision", message__contains="rate limit").count() >= 20
    # served by several worker processes sharing the one bucket
    assert len(set(Attempt.objects.filter(run=run).values_list("worker", flat=True))) >= 2
    assert not TokenReservation.objects.filter(step__run=run).exists()
