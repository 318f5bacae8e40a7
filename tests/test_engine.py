"""The engine end to end: real PostgreSQL, Redis and a real ``celery worker`` process."""

from __future__ import annotations

import json
import re
import time

import pytest

from runs import engine
from runs.choices import AttemptOutcome, StepStatus
from runs.models import Attempt, Run, Step, Trace
from tests.conftest import EXAMPLES, SERVICE_TOKEN, run_to_end, start, wait_for_run


def noop_steps(edges: dict[str, list[str]]) -> str:
    """YAML for noop steps with the given dependencies (in insertion order)."""
    lines = ["key: shape", "steps:"]
    for step_id, deps in edges.items():
        lines.append(f"  - id: {step_id}")
        lines.append("    type: noop")
        lines.append(f"    params: {{output: {{id: {step_id}}}}}")
        if deps:
            lines.append(f"    depends_on: [{', '.join(deps)}]")
    return "\n".join(lines) + "\n"


def finished_order(run) -> list[str]:
    return list(run.steps.filter(parent__isnull=True).order_by("finished_at", "id").values_list("step_id", flat=True))


def assert_started_after_deps(run) -> None:
    steps = {s.step_id: s for s in run.steps.filter(parent__isnull=True)}
    for s in steps.values():
        for dep in s.depends_on:
            assert steps[dep].finished_at <= s.started_at, f"{s.step_id} started before {dep} finished"


def test_chain(worker):
    run, steps = run_to_end(noop_steps({"a": [], "b": ["a"], "c": ["b"], "d": ["c"]}))
    assert run.status == "succeeded"
    assert finished_order(run) == ["a", "b", "c", "d"]
    assert all(s.attempts == 1 for s in steps.values())
    assert run.outputs == {"d": {"id": "d"}}
    assert_started_after_deps(run)


def test_fan_out_fan_in(worker):
    edges = {"start": []} | {f"w{i}": ["start"] for i in range(20)} | {"join": [f"w{i}" for i in range(20)]}
    run, steps = run_to_end(noop_steps(edges))
    assert run.status == "succeeded"
    assert steps["join"].pending_deps == 0
    assert all(s.status == "succeeded" for s in steps.values())
    assert_started_after_deps(run)
    # the join ran exactly once
    assert Attempt.objects.filter(step=steps["join"]).count() == 1


def test_diamond(worker):
    run, steps = run_to_end(noop_steps({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}))
    assert run.status == "succeeded"
    assert_started_after_deps(run)
    assert Attempt.objects.filter(run=run).count() == 4


def test_w3_lattice(worker):
    """DESIGN.md's W3: 10 layers x 20 nodes, each node depending on two of the layer before."""
    edges: dict[str, list[str]] = {}
    for layer in range(10):
        for i in range(20):
            deps = [] if layer == 0 else [f"n{layer - 1}_{i}", f"n{layer - 1}_{(i + 1) % 20}"]
            edges[f"n{layer}_{i}"] = deps
    run, steps = run_to_end(noop_steps(edges), timeout=120)
    assert run.status == "succeeded"
    assert len(steps) == 200
    assert_started_after_deps(run)
    # every node ran exactly once, each join counted down to zero
    assert Attempt.objects.filter(run=run).count() == 200
    assert all(s.pending_deps == 0 for s in steps.values())


def test_for_each_map(worker):
    yaml_text = """
key: mapper
variables:
  items: {type: array, default: [3, 1, 2]}
steps:
  - id: source
    type: noop
    params: {output: {values: "${items}"}}
  - id: square
    type: python
    depends_on: [source]
    for_each: ${steps.source.output.values}
    params:
      callable: agents.testing.echo
      kwargs: {n: "${item}", i: "${index}"}
  - id: total
    type: noop
    depends_on: [square]
    params: {output: {count: "${steps.square.output | length}"}}
"""
    run, steps = run_to_end(yaml_text)
    assert run.status == "succeeded", run.error
    assert steps["square"].output == [{"n": 3, "i": 0}, {"n": 1, "i": 1}, {"n": 2, "i": 2}]
    assert Step.objects.filter(parent=steps["square"]).count() == 3
    assert steps["total"].output == {"count": 3}


def test_for_each_empty_list(worker):
    yaml_text = """
key: empty-map
steps:
  - id: m
    type: noop
    for_each: ${[]}
  - id: after
    type: noop
    depends_on: [m]
"""
    run, steps = run_to_end(yaml_text)
    assert run.status == "succeeded"
    assert steps["m"].output == []
    assert steps["after"].status == "succeeded"


def test_retries_then_success(worker, tmp_path):
    counter = tmp_path / "calls"
    yaml_text = f"""
key: flaky
steps:
  - id: flaky
    type: python
    params:
      callable: agents.testing.flaky
      kwargs: {{counter_path: "{counter}", failures: 2}}
    retry: {{max_attempts: 4, backoff: exponential, initial_delay: 0.1s, max_delay: 1s, jitter: true}}
"""
    run, steps = run_to_end(yaml_text)
    assert run.status == "succeeded"
    flaky = steps["flaky"]
    assert flaky.attempts == 3
    outcomes = list(Attempt.objects.filter(step=flaky).order_by("number").values_list("outcome", flat=True))
    assert outcomes == ["failed", "failed", "succeeded"]
    # the retries waited at least the jittered backoff (>= half the nominal delay)
    a = list(Attempt.objects.filter(step=flaky).order_by("number"))
    assert (a[1].started_at - a[0].finished_at).total_seconds() >= 0.05
    assert (a[2].started_at - a[1].finished_at).total_seconds() >= 0.1


def test_retries_then_dead_with_downstream_skipped(worker):
    yaml_text = """
key: doomed
steps:
  - id: ok
    type: noop
  - id: bad
    type: python
    depends_on: [ok]
    params: {callable: agents.testing.fail, kwargs: {message: "always broken"}}
    retry: {max_attempts: 3, initial_delay: 0.05s, max_delay: 0.1s}
  - id: after
    type: noop
    depends_on: [bad]
  - id: after2
    type: noop
    depends_on: [after]
  - id: side
    type: noop
    depends_on: [ok]
  - id: cleanup
    type: noop
    depends_on: [bad]
    trigger_rule: all_done
"""
    run, steps = run_to_end(yaml_text)
    assert run.status == "failed"
    assert steps["bad"].status == "dead"
    assert steps["bad"].attempts == 3
    assert "always broken" in steps["bad"].error
    assert steps["after"].status == "skipped" and "bad" in steps["after"].error
    assert steps["after2"].status == "skipped"
    assert steps["side"].status == "succeeded"  # other branches finish
    assert steps["cleanup"].status == "succeeded"  # all_done runs anyway
    assert "bad" in run.error
    assert Attempt.objects.filter(step=steps["bad"]).count() == 3


def test_condition_branches(worker):
    yaml_text = """
key: branchy
variables:
  score: {type: number, required: true}
steps:
  - id: check
    type: condition
    condition: ${score > 0.8}
    on_success: [publish]
    on_failure: [rework]
  - id: publish
    type: noop
    params: {output: {went: publish}}
  - id: rework
    type: noop
    params: {output: {went: rework}}
  - id: after_publish
    type: noop
    depends_on: [publish]
  - id: report
    type: noop
    depends_on: [publish, rework]
    trigger_rule: none_failed
"""
    run, steps = run_to_end(yaml_text, {"score": "0.9"})
    assert run.status == "succeeded"
    assert steps["check"].output == {"result": True}
    assert steps["publish"].status == "succeeded"
    assert steps["rework"].status == "skipped"
    assert steps["after_publish"].status == "succeeded"
    assert steps["report"].status == "succeeded"

    run, steps = run_to_end(yaml_text, {"score": 0.5})
    assert run.status == "succeeded"
    assert steps["check"].output == {"result": False}
    assert steps["publish"].status == "skipped"
    assert steps["after_publish"].status == "skipped"
    assert steps["rework"].status == "succeeded"
    assert steps["report"].status == "succeeded"


def test_when_false_skips(worker):
    yaml_text = """
key: when
variables:
  go: {type: boolean, default: false}
steps:
  - id: maybe
    type: noop
    when: ${go}
  - id: next
    type: noop
    depends_on: [maybe]
"""
    run, steps = run_to_end(yaml_text)
    assert steps["maybe"].status == "skipped"
    assert steps["next"].status == "skipped"
    assert run.status == "succeeded"


def test_batch_start_lays_out_runs_as_start_run_does(worker):
    # Given: a spec whose roots are a skipped `when`, a for_each and a plain step, with a deadline
    from templates_app.spec import load_spec

    spec = load_spec(
        """
key: batchy
timeout: 300
variables:
  go: {type: boolean, default: false}
  items: {type: array, default: [1, 2]}
steps:
  - {id: maybe, type: noop, when: "${go}"}
  - {id: each, type: noop, for_each: "${items}", params: {output: "${item}"}}
  - {id: plain, type: noop}
  - {id: after, type: noop, depends_on: [each, plain]}
""",
        source="batchy.yaml",
    )
    items = [
        {"inputs": {"items": [i, i + 1]}, "priority": p, "correlation_id": f"c{i}"} for i, p in enumerate([9, 0, 5])
    ]

    # When: they start through the batch path (no idempotency key, no run limit) and through
    # start_run one by one
    batched = engine.start_runs(spec, items)
    single = [
        engine.start_run(spec, i["inputs"], priority=i["priority"], correlation_id=i["correlation_id"]) for i in items
    ]

    # Then: in item order, the same rows, traces and outcome either way
    assert [r.correlation_id for r in batched] == ["c0", "c1", "c2"]
    for index, (a, b) in enumerate(zip(batched, single, strict=True)):
        a, b = wait_for_run(a.pk), wait_for_run(b.pk)
        assert (
            (a.status, a.priority, a.steps_total)
            == (b.status, b.priority, b.steps_total)
            == ("succeeded", items[index]["priority"], 6)  # 4 steps, 2 map children
        )
        assert a.deadline is not None and 299 <= (a.deadline - a.started_at).total_seconds() <= 300

        def layout(run):
            return sorted(Step.objects.filter(run=run).values_list("step_id", "status", "output"), key=str)

        assert layout(a) == layout(b)
        assert dict(Step.objects.filter(run=a, parent__isnull=True).values_list("step_id", "status")) == {
            "maybe": "skipped",
            "each": "succeeded",
            "plain": "succeeded",
            "after": "succeeded",
        }
        assert Step.objects.get(run=a, step_id="each").output == [index, index + 1]
        messages = list(Trace.objects.filter(run=a).order_by("id").values_list("message", flat=True))
        assert messages[0] == "run started (manual)"

        # the same traces (the map children finish in either order; durations vary)
        def texts(run):
            return sorted(
                re.sub(r"\d+ ms", "N ms", m) for m in Trace.objects.filter(run=run).values_list("message", flat=True)
            )

        assert texts(a) == texts(b)


def test_parallel_step(worker):
    yaml_text = """
key: par
steps:
  - id: fan
    type: parallel
    params:
      tasks:
        - {type: noop, params: {output: {branch: 1}}}
        - {type: sleep, params: {seconds: 0.1}}
        - {type: python, params: {callable: agents.testing.echo, kwargs: {branch: 3}}}
  - id: after
    type: noop
    depends_on: [fan]
"""
    run, steps = run_to_end(yaml_text)
    assert run.status == "succeeded", run.error
    assert steps["fan"].output[0] == {"branch": 1}
    assert steps["fan"].output[2] == {"branch": 3}
    assert Step.objects.filter(parent=steps["fan"]).count() == 3


def test_step_timeout_is_dead_after_attempts(worker):
    yaml_text = """
key: slow
steps:
  - id: slow
    type: sleep
    params: {seconds: 5}
    timeout: 0.3s
    retry: {max_attempts: 2, initial_delay: 0.05s}
"""
    started = time.time()
    run, steps = run_to_end(yaml_text)
    assert time.time() - started < 5
    assert steps["slow"].status == "dead"
    outcomes = set(Attempt.objects.filter(step=steps["slow"]).values_list("outcome", flat=True))
    assert outcomes == {AttemptOutcome.TIMED_OUT}
    assert run.status == "failed"


def test_run_deadline_times_out(worker):
    yaml_text = """
key: deadline
timeout: 1s
steps:
  - id: long
    type: sleep
    params: {seconds: 30}
    timeout: 60s
  - id: after
    type: noop
    depends_on: [long]
"""
    run = start(yaml_text)
    run = wait_for_run(run.pk, timeout=30)
    assert run.status == "timed_out"
    statuses = dict(run.steps.values_list("step_id", "status"))
    assert statuses["after"] == "cancelled"


def test_exec_step(worker):
    yaml_text = """
key: exec
steps:
  - id: py
    type: exec
    params:
      command:
        - python
        - -c
        - |
          import json, os, sys
          print(json.dumps({"arg": sys.argv[1], "cwd_empty": os.listdir(".") == [],
                            "secret": os.environ.get("ORCHESTRATOR_SERVICE_TOKEN")}))
        - hello
"""
    run, steps = run_to_end(yaml_text)
    assert run.status == "succeeded", run.error
    out = steps["py"].output
    assert out["exit_code"] == 0
    assert out["stdout"] == {"arg": "hello", "cwd_empty": True, "secret": None}


def test_http_and_llm_steps(worker, agent_server):
    yaml_text = """
key: calls
steps:
  - id: get
    type: http
    params: {method: GET, call: /agent/info}
  - id: post
    type: http
    depends_on: [get]
    params:
      method: POST
      url: "${steps.get.output.body.path}"
      json: {from: "${steps.get.output.body.path}"}
  - id: ask
    type: ai
    depends_on: [get]
    params: {prompt: "summarize ${steps.get.output.body.path}"}
"""
    yaml_text = yaml_text.replace('url: "${steps.get.output.body.path}"', f'url: "{agent_server.url}/agent/post"')
    run, steps = run_to_end(yaml_text)
    assert run.status == "succeeded", run.error
    assert steps["post"].output["body"]["ok"] is True
    assert steps["ask"].output["content"] == "echo: summarize /agent/info"
    post = agent_server.calls("/agent/post")[0]
    assert post.body == {"from": "/agent/info"}
    assert post.headers["Authorization"] == f"Bearer {SERVICE_TOKEN}"
    # the token never reaches traces or outputs
    for trace in Trace.objects.filter(run=run):
        assert SERVICE_TOKEN not in trace.message + json.dumps(trace.data)
    assert SERVICE_TOKEN not in json.dumps(list(run.steps.values("output", "input", "error")), default=str)
    assert Trace.objects.filter(run=run, kind="http").count() >= 2


def test_http_permanent_failure_not_retried(worker, agent_server):
    agent_server.program("/agent/missing", [404, 404, 404])
    yaml_text = """
key: perm
steps:
  - id: call
    call: /agent/missing
    retry: {max_attempts: 3, initial_delay: 0.05s}
"""
    run, steps = run_to_end(yaml_text)
    assert steps["call"].status == "failed"
    assert steps["call"].attempts == 1
    assert Attempt.objects.get(step=steps["call"]).http_status == 404
    assert len(agent_server.calls("/agent/missing")) == 1


# Seed 004's two workflow files, exactly as printed there.
SEED_004_DAILY = (EXAMPLES / "seed004" / "daily_instructor_v1.yml").read_text()

SEED_004_WEEKLY = (EXAMPLES / "seed004" / "weekly_seed_v1.yml").read_text()


def test_seed_004_daily_instructor(worker, agent_server):
    # the plan endpoint fails once with a 500: the retry must carry the same idempotency key
    agent_server.program("/functions/v1/agent-proxy/instructor/daily", [500])
    run, steps = run_to_end(SEED_004_DAILY, sweep=True)
    assert run.status == "succeeded", run.error
    calls = agent_server.calls("/functions/v1/agent-proxy/")
    assert [(c.method, c.path.rsplit("agent-proxy", 1)[1]) for c in calls] == [
        ("GET", "/snapshot"),
        ("POST", "/instructor/daily"),
        ("POST", "/instructor/daily"),
        ("POST", "/notify"),
    ]
    assert all(c.headers["Authorization"] == f"Bearer {SERVICE_TOKEN}" for c in calls)
    keys = [c.headers["X-Idempotency-Key"] for c in calls]
    assert keys[1] == keys[2] == f"{run.pk}:create_plan"
    assert len({keys[0], keys[1], keys[3]}) == 3
    assert steps["create_plan"].attempts == 2


def test_seed_004_weekly_seed(worker, agent_server):
    run, steps = run_to_end(SEED_004_WEEKLY)
    assert run.status == "succeeded", run.error
    paths = [c.path.rsplit("agent-proxy", 1)[1] for c in agent_server.calls("/functions/v1/agent-proxy/")]
    assert paths[0] == "/clo/begin-week"
    assert set(paths[1:3]) == {"/ta/generate-week", "/socratic/seed"}
    assert paths[3] == "/brand/update-briefing"
    assert all(c.method == "POST" for c in agent_server.calls("/functions/v1/"))


def test_late_completion_refused_after_lease_takeover(worker):
    """The sweeper hands a stalled step on; the old attempt's late completion is refused."""
    import uuid

    from django.utils import timezone

    yaml_text = """
key: lease
steps:
  - id: s
    type: sleep
    params: {seconds: 1.0}
    retry: {max_attempts: 3, initial_delay: 0.05s}
"""
    run = start(yaml_text)
    step = Step.objects.get(run=run, step_id="s")
    deadline = time.time() + 10
    while Step.objects.get(pk=step.pk).status != StepStatus.RUNNING and time.time() < deadline:
        time.sleep(0.02)
    # Given the lease was taken over while the first attempt sleeps (as after a SIGSTOP) ...
    Step.objects.filter(pk=step.pk).update(
        lease_token=uuid.uuid4(), lease_expires_at=timezone.now() - timezone.timedelta(seconds=1)
    )
    # ... when the first attempt finishes, its completion is refused
    deadline = time.time() + 10
    while not Attempt.objects.filter(step=step, outcome=AttemptOutcome.REFUSED).exists() and time.time() < deadline:
        time.sleep(0.05)
    assert Attempt.objects.get(step=step, number=1).outcome == AttemptOutcome.REFUSED
    assert Step.objects.get(pk=step.pk).status == StepStatus.RUNNING
    # ... and the sweeper recovers the expired lease: the step runs again and succeeds once
    run = wait_for_run(run.pk, sweep=True)
    assert run.status == "succeeded"
    step.refresh_from_db()
    assert step.attempts == 2
    assert Trace.objects.filter(step_row=step, message__contains="late completion refused").count() == 1
    # a duplicate message for a finished step finds nothing to claim
    assert engine.execute_step(step.pk, worker="late") == "not-claimed"


@pytest.mark.django_db(transaction=True)
def test_a_refused_completion_counts_no_dependent_down(monkeypatch):
    """The close, its trace and the dependents' decrement are one round trip: a completion whose
    lease was taken over writes none of them."""
    import uuid

    from runs.engine import attempts, broker, state

    monkeypatch.setattr(broker, "enqueue_steps", lambda *a, **k: None)  # this test drives the steps
    run = start(
        "key: refused-fan-in\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop}\n"
        "  - {id: join, type: noop, depends_on: [a, b]}\n"
    )

    def claim(step_id: str) -> tuple[Step, uuid.UUID]:
        token, at = uuid.uuid4(), state.now()
        step, run_row, begun = state.claim(
            Step.objects.get(run=run, step_id=step_id).pk, token, at, "w:1", "t", relaxed=True
        )
        if not begun:  # the ORM claim (SQLite) leaves the Attempt row to begin()
            batch = state.Batch()
            attempts.begin(step, run_row, token, at, "w:1", "t", batch)
            batch.flush()
        return step, token

    a = Step.objects.get(run=run, step_id="a")
    step, token = claim("a")
    # Given the lease was taken over while the handler ran ...
    Step.objects.filter(pk=a.pk).update(lease_token=uuid.uuid4())
    # ... the completion is refused and nothing of it is written
    assert attempts.complete(step, token, output={}, resolved={}, duration_ms=1)[0] == "refused"
    assert Step.objects.get(run=run, step_id="join").pending_deps == 2
    assert not Trace.objects.filter(step_row=a, message__contains="succeeded").exists()
    assert Attempt.objects.get(step=a).outcome == AttemptOutcome.REFUSED
    # while a completion under its lease closes, traces and counts down in one go
    b = Step.objects.get(run=run, step_id="b")
    step, token = claim("b")
    assert attempts.complete(step, token, output={"ok": 1}, resolved={}, duration_ms=1)[0] == "succeeded"
    assert Step.objects.get(run=run, step_id="join").pending_deps == 1
    assert Trace.objects.filter(step_row=b, message="step 'b' succeeded in 1 ms").count() == 1


def test_sweeper_recovers_expired_lease_and_lost_message(worker, monkeypatch):
    from django.utils import timezone

    yaml_text = """
key: sweep
steps:
  - id: a
    type: noop
"""
    from templates_app.spec import load_spec

    spec = load_spec(yaml_text)
    # Given a step stuck in running with an expired lease (its worker died) ...
    run = engine.start_run(spec, {})
    wait_for_run(run.pk)
    step = Step.objects.get(run=run, step_id="a")
    Run.objects.filter(pk=run.pk).update(status="running", finished_at=None)
    Step.objects.filter(pk=step.pk).update(
        status="running",
        attempts=1,
        lease_expires_at=timezone.now() - timezone.timedelta(seconds=1),
        lease_token="00000000-0000-0000-0000-000000000001",
        max_attempts=3,
    )
    # ... the sweeper counts a lost attempt and the step runs again to success
    counts = engine.sweep()
    assert counts["expired_leases"] == 1
    run = wait_for_run(run.pk, sweep=True)
    assert run.status == "succeeded"
    assert Step.objects.get(pk=step.pk).attempts == 2

    # Given a step whose message the broker lost (the send never happened) ...
    monkeypatch.setattr(engine.broker, "enqueue_steps", lambda *a, **k: None)
    run2 = engine.start_run(spec, {})
    monkeypatch.undo()
    s2 = Step.objects.get(run=run2, step_id="a")
    time.sleep(1)
    assert Step.objects.get(pk=s2.pk).status == "queued"
    Step.objects.filter(pk=s2.pk).update(queued_at=timezone.now() - timezone.timedelta(hours=1))
    # ... the sweeper sends it again and the run finishes
    assert engine.sweep()["requeued"] == 1
    assert wait_for_run(run2.pk).status == "succeeded"
    assert Step.objects.get(pk=s2.pk).attempts == 1


def test_idempotency_key_returns_same_run(worker):
    yaml_text = "key: idem\nsteps:\n  - id: a\n    type: noop\n"
    first = start(yaml_text, idempotency_key="abc")
    second = start(yaml_text, idempotency_key="abc")
    assert first.pk == second.pk
    assert Run.objects.filter(idempotency_key="abc").count() == 1
    wait_for_run(first.pk)


def test_missing_required_variable_saves_nothing(db):
    from templates_app.errors import WorkflowError

    yaml_text = "key: needs\nvariables:\n  x: {type: integer, required: true}\nsteps:\n  - id: a\n    type: noop\n"
    with pytest.raises(WorkflowError, match="x"):
        start(yaml_text)
    with pytest.raises(WorkflowError, match="x"):
        start(yaml_text, {"x": "not-a-number"})
    assert Run.objects.count() == 0 and Step.objects.count() == 0


def test_for_each_with_as_name(worker):
    yaml_text = """
key: as-name
variables:
  labels: {type: array, default: [bug, feature]}
steps:
  - id: tag
    type: noop
    for_each: ${labels}
    as: label
    params: {output: {label: "${label}", position: "${index}", text: "#${label}"}}
"""
    run, steps = run_to_end(yaml_text)
    assert run.status == "succeeded", run.error
    assert steps["tag"].output == [
        {"label": "bug", "position": 0, "text": "#bug"},
        {"label": "feature", "position": 1, "text": "#feature"},
    ]
