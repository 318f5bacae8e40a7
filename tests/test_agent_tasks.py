"""Agent tasks (seed 003, tasks_app) end to end on the real Celery worker, against the scripted
OpenAI-compatible server (answers per json_schema name) and the counting agent server."""

from __future__ import annotations

import json
import time

import pytest

from agents.models import LLMProvider, TokenBudget
from runs.models import Attempt, Step, Trace
from tasks_app import services
from tasks_app.models import AgentEndpoint, AgentTask
from tests.llm_server import Reply

PLAN = {
    "steps": [
        {"id": "fetch", "description": "Fetch the issues", "tool": "fetch_issues", "arguments": {"repo": "acme/x"}},
        {"id": "think", "description": "Group the issues by theme"},
        {"id": "store", "description": "Store the report", "tool": "store_report", "arguments": {"title": "r"}},
    ],
    "estimated_duration_s": 30,
}


def verdict(progress: int, next_: str = "continue", done: bool = False) -> dict:
    return {"progress": progress, "done": done, "next": next_, "reason": f"at {progress}"}


@pytest.fixture
def scripted(llm_server, worker, settings):
    """The default tenant's LLM provider is the scripted server; two agent endpoints as tools."""
    LLMProvider.objects.create(tenant_id="default", name="scripted", base_url=llm_server.url, model="tiny")
    for name in ("fetch_issues", "store_report", "count_rows"):
        AgentEndpoint.objects.create(
            tenant_id="default",
            name=name,
            call=f"/tools/{name}",
            description=f"the {name} agent",
            arguments_schema={"type": "object", "properties": {}, "additionalProperties": True},
        )
    return llm_server


def wait_for_task(task_id, timeout: float = 60.0, sweep: bool = False, statuses=("completed", "failed", "cancelled")):
    """Poll until the task reaches one of ``statuses``; returns it."""
    from runs import engine

    deadline = time.time() + timeout
    task = AgentTask.objects.get(pk=task_id)
    while time.time() < deadline:
        task = services.sync(AgentTask.objects.get(pk=task_id))
        if task.status in statuses:
            return task
        if sweep:
            engine.sweep()
        time.sleep(0.1)
    steps = list(Step.objects.filter(run_id=task.run_id).values_list("step_id", "status", "error"))
    pytest.fail(f"task {task_id} still {task.status} after {timeout} s: {steps}")


def tool_calls(agent_server, name: str):
    return agent_server.calls(f"/tools/{name}")


def test_three_step_task_completes_at_100_with_every_tool_called_once(scripted, agent_server):
    # given a plan of two tool calls around one reasoning step
    scripted.script(PLAN, schema="decompose_goal")
    scripted.script(verdict(33), verdict(66), verdict(100, "finish", True), schema="evaluate_progress")
    scripted.script("Two themes: bugs and docs.")

    task = services.start_task("default", "Summarize the open issues", ["fetch_issues", "store_report"])
    task = wait_for_task(task.pk)

    # then it completed at 100 %, every tool called exactly once with the task's idempotency keys
    assert task.status == "completed", task.error
    assert task.progress == 100 and task.current_step == 3 and task.total_steps == 3
    fetch, store = tool_calls(agent_server, "fetch_issues"), tool_calls(agent_server, "store_report")
    assert len(fetch) == 1 and len(store) == 1
    assert fetch[0].headers["Idempotency-Key"] == f"{task.pk}:step_1"
    assert store[0].headers["Idempotency-Key"] == f"{task.pk}:step_3"
    assert fetch[0].body == {"repo": "acme/x"}
    # every LLM call and tool call is a step of the task's run, with attempts and token usage
    steps = list(Step.objects.filter(run_id=task.run_id).order_by("id").values_list("step_id", "status"))
    assert steps == [
        ("decompose", "succeeded"),
        ("step_1", "succeeded"),
        ("evaluate_1", "succeeded"),
        ("step_2", "succeeded"),
        ("evaluate_2", "succeeded"),
        ("step_3", "succeeded"),
        ("evaluate_3", "succeeded"),
    ]
    assert task.run.status == "succeeded"
    usage = Attempt.objects.get(step__run_id=task.run_id, step__step_id="decompose").usage
    assert usage["total_tokens"] > 0
    assert task.usage["llm_calls"] == 5 and task.usage["total_tokens"] > 0
    assert {c["response_format"]["json_schema"]["name"] for c in scripted.calls() if "response_format" in c} == {
        "decompose_goal",
        "evaluate_progress",
    }
    status = services.status_payload(task)
    assert [s["status"] for s in status["steps"]] == ["completed"] * 3
    assert status["progress"] == 100 and status["totalSteps"] == 3
    assert any(t["type"] == "tool-call" for t in services.status_payload(task, traces=100)["latestTraces"])


def test_replan_changes_the_remaining_steps(scripted, agent_server):
    scripted.script(PLAN, schema="decompose_goal")
    replanned = {
        "steps": [{"id": "count", "description": "Count rows instead", "tool": "count_rows", "arguments": {}}],
        "estimated_duration_s": 5,
    }
    scripted.script(replanned, schema="decompose_goal")
    scripted.script(verdict(30, "replan"), verdict(100, "finish", True), schema="evaluate_progress")

    task = services.start_task("default", "Report", ["fetch_issues", "store_report", "count_rows"])
    task = wait_for_task(task.pk)

    assert task.status == "completed", task.error
    assert [s["description"] for s in task.strategy["steps"]] == ["Fetch the issues", "Count rows instead"]
    assert task.total_steps == 2
    assert len(tool_calls(agent_server, "count_rows")) == 1
    assert tool_calls(agent_server, "store_report") == []  # the replaced step never ran
    ids = list(Step.objects.filter(run_id=task.run_id).order_by("id").values_list("step_id", flat=True))
    assert ids == ["decompose", "step_1", "evaluate_1", "replan_1", "step_2", "evaluate_2"]
    # the replan asked for the remaining work only, telling the model what was done
    replan_call = scripted.calls("decompose_goal")[1]
    assert "completed_steps" in replan_call["messages"][-1]["content"]


def test_summarization_fires_past_the_limit_and_the_next_call_has_a_smaller_context(scripted):
    plan = {"steps": [{"id": f"s{i}", "description": f"think {i}"} for i in range(1, 4)], "estimated_duration_s": 9}
    scripted.script(plan, schema="decompose_goal")
    scripted.script(verdict(30), verdict(60), verdict(100, "finish", True), schema="evaluate_progress")
    scripted.script({"summary": "short"}, schema="summarize_context")
    # each reasoning answer adds about 250 tokens: the context passes 500 after the second step
    scripted.script(*["x" * 1000] * 3)

    task = services.start_task("default", "Think a lot", [], context_window_limit=500)
    task = wait_for_task(task.pk)

    assert task.status == "completed", task.error
    ids = list(Step.objects.filter(run_id=task.run_id).order_by("id").values_list("step_id", flat=True))
    assert ids[-4:] == ["evaluate_2", "summarize_2", "step_3", "evaluate_3"]
    assert "summarize_1" not in ids
    trace = Trace.objects.get(run_id=task.run_id, message__startswith="context summarized")
    assert trace.data["tokens_after"] < trace.data["tokens_before"]
    # the context becomes the summary plus the last step's messages
    assert task.context[0] == {"role": "system", "content": "Summary of the work so far: short"}
    # the next call (step 3's reasoning) sent less context than there was before the summary
    plain = [c for c in scripted.calls() if "response_format" not in c]
    assert len(plain) == 3
    sent = (len(json.dumps(plain[2]["messages"], ensure_ascii=False)) + 3) // 4
    assert sent < trace.data["tokens_before"]
    assert task.summary == "short"


def test_a_checkpoint_every_n_steps(scripted):
    plan = {"steps": [{"id": f"s{i}", "description": f"think {i}"} for i in range(1, 5)], "estimated_duration_s": 9}
    scripted.script(plan, schema="decompose_goal")
    scripted.script(verdict(25), verdict(50), verdict(75), verdict(100, "finish", True), schema="evaluate_progress")

    task = services.start_task("default", "Four steps", [], checkpoint_interval=2)
    task = wait_for_task(task.pk)

    assert task.status == "completed", task.error
    assert [c["after_step"] for c in task.checkpoints] == [2, 4]
    assert task.checkpoints[0]["progress"] == 50 and task.checkpoints[0]["cursor"] == 3
    assert task.checkpoints[0]["context"]  # a snapshot of the context
    assert Trace.objects.filter(run_id=task.run_id, kind="checkpoint").count() == 2


def test_pause_and_resume(scripted, agent_server):
    scripted.script(PLAN, schema="decompose_goal")
    scripted.script(verdict(33), verdict(66), verdict(100, "finish", True), schema="evaluate_progress")
    # the reasoning step answers slowly: the pause lands while the task runs
    scripted.script(Reply(content="themes", delay=1.5))

    task = services.start_task("default", "Summarize", ["fetch_issues", "store_report"])
    deadline = time.time() + 30
    while not Step.objects.filter(run_id=task.run_id, step_id="step_2", status="running").exists():
        assert time.time() < deadline
        time.sleep(0.05)
    services.pause(AgentTask.objects.get(pk=task.pk))
    time.sleep(3)
    # then the step in flight finished and the next one waits: no store call while paused
    task = AgentTask.objects.get(pk=task.pk)
    assert task.status == "paused"
    assert tool_calls(agent_server, "store_report") == []
    waiting = Step.objects.get(run_id=task.run_id, step_id="evaluate_2")
    assert waiting.status == "retry_wait"

    services.resume(task)
    task = wait_for_task(task.pk)
    assert task.status == "completed", task.error
    assert len(tool_calls(agent_server, "store_report")) == 1
    assert len(tool_calls(agent_server, "fetch_issues")) == 1


def test_a_changed_input_on_resume_fails_loudly(scripted, agent_server):
    scripted.script(PLAN, schema="decompose_goal")
    scripted.script(Reply(content=json.dumps(verdict(33)), delay=1.5), schema="evaluate_progress")

    task = services.start_task("default", "Summarize", ["fetch_issues", "store_report"])
    deadline = time.time() + 30
    while not Step.objects.filter(run_id=task.run_id, step_id="evaluate_1", status="running").exists():
        assert time.time() < deadline
        time.sleep(0.05)
    services.pause(AgentTask.objects.get(pk=task.pk))
    wait_for_task(task.pk, statuses=("paused",))
    # when the completed tool step's arguments are edited while the task is paused
    task = AgentTask.objects.get(pk=task.pk)
    strategy = task.strategy
    strategy["steps"][0]["arguments"] = {"repo": "acme/other"}
    AgentTask.objects.filter(pk=task.pk).update(strategy=strategy)

    # then resume refuses, naming the step, instead of replaying the stale answer
    with pytest.raises(services.TaskReplayError, match="completed step 'step_1' changed"):
        services.resume(AgentTask.objects.get(pk=task.pk))
    assert len(tool_calls(agent_server, "fetch_issues")) == 1
    services.cancel(AgentTask.objects.get(pk=task.pk))


def test_a_token_budget_stops_a_task_that_would_overrun_it(scripted, agent_server):
    # the decomposition spends 2500 tokens of a 3000-token daily budget: the evaluation cannot fit
    usage = {"prompt_tokens": 2000, "completion_tokens": 500, "total_tokens": 2500}
    scripted.script(Reply(content=json.dumps(PLAN), usage=usage), schema="decompose_goal")
    scripted.script(verdict(33), verdict(66), verdict(100, "finish", True), schema="evaluate_progress")
    TokenBudget.objects.create(tenant_id="default", period="day", limit=3000, policy="fail")

    task = services.start_task("default", "Summarize", ["fetch_issues", "store_report"])
    task = wait_for_task(task.pk)

    assert task.status == "failed"
    assert "budget_exceeded" in task.error and "evaluate_1" in task.error
    assert len(tool_calls(agent_server, "fetch_issues")) == 1
    assert tool_calls(agent_server, "store_report") == []
    assert TokenBudget.objects.get(tenant_id="default").used == 2500


def test_bad_input_is_refused_naming_the_field_and_saves_nothing(db, settings):
    before = AgentTask.objects.count()
    with pytest.raises(services.TaskInputError, match="^goal: "):
        services.start_task("default", "", [])
    with pytest.raises(services.TaskInputError, match="^goal: at most"):
        services.start_task("default", "x" * (settings.ORCHESTRATOR_TASK_MAX_GOAL_CHARS + 1), [])
    with pytest.raises(services.TaskInputError, match="no workflow template or agent endpoint named 'nope'"):
        services.start_task("default", "goal", ["nope"])
    with pytest.raises(services.TaskInputError, match="^max_steps: "):
        services.start_task("default", "goal", [], max_steps=settings.ORCHESTRATOR_TASK_MAX_STEPS_CAP + 1)
    with pytest.raises(services.TaskInputError, match="^checkpoint_interval: "):
        services.start_task("default", "goal", [], checkpoint_interval=0)
    assert AgentTask.objects.count() == before


def test_a_template_tool_runs_as_a_child_run_that_wakes_the_waiting_step(scripted, chain_template_default):
    # given the template `chain` (variables n required, greeting) granted as a tool
    plan = {
        "steps": [{"id": "run", "description": "Run the chain", "tool": "chain", "arguments": {"n": 3}}],
        "estimated_duration_s": 5,
    }
    scripted.script(plan, schema="decompose_goal")
    scripted.script(verdict(100, "finish", True), schema="evaluate_progress")

    task = services.start_task("default", "Run the chain once", ["chain"])
    task = wait_for_task(task.pk, timeout=30)

    # then the tool call started one child run, keyed <task>:<step>, whose outputs the step kept
    assert task.status == "completed", task.error
    from runs.models import Run

    child = Run.objects.get(tenant_id="default", idempotency_key=f"{task.pk}:step_1")
    assert child.status == "succeeded" and child.inputs["n"] == 3
    assert child.metadata["agent_task"] == str(task.pk)
    step = Step.objects.get(run_id=task.run_id, step_id="step_1")
    assert step.output["result"] == {"kind": "template", "child_run": str(child.pk), "outputs": child.outputs}
    # the step waited without a worker (a deferred attempt) and was woken by the child's finish,
    # well before the 10 s re-check
    outcomes = list(Attempt.objects.filter(step=step).order_by("number").values_list("outcome", flat=True))
    assert outcomes[-1] == "succeeded" and set(outcomes[:-1]) <= {"deferred"}
    assert (step.finished_at - child.finished_at).total_seconds() < 5


def test_the_arguments_are_picked_by_the_model_through_openai_tool_calls(scripted, agent_server):
    plan = {
        "steps": [{"id": "fetch", "description": "Fetch the issues of acme/x", "tool": "fetch_issues"}],
        "estimated_duration_s": 5,
    }
    scripted.script(plan, schema="decompose_goal")
    scripted.script(verdict(100, "finish", True), schema="evaluate_progress")
    scripted.script(Reply.tool_call("fetch_issues", {"repo": "acme/x", "state": "open"}))

    task = services.start_task("default", "Fetch", ["fetch_issues"])
    task = wait_for_task(task.pk)

    assert task.status == "completed", task.error
    call = [c for c in scripted.calls() if c.get("tools")][0]
    assert call["tools"][0]["function"]["name"] == "fetch_issues"
    assert [r.body for r in tool_calls(agent_server, "fetch_issues")] == [{"repo": "acme/x", "state": "open"}]
    assert task.strategy["steps"][0]["arguments"] == {"repo": "acme/x", "state": "open"}
    ids = list(Step.objects.filter(run_id=task.run_id).order_by("id").values_list("step_id", flat=True))
    assert ids == ["decompose", "args_1", "step_1", "evaluate_1"]


def test_an_unknown_tool_in_the_plan_goes_back_to_the_model_for_repair(scripted, agent_server):
    bad = {"steps": [{"id": "x", "description": "Delete prod", "tool": "drop_database"}], "estimated_duration_s": 1}
    scripted.script(bad, PLAN, schema="decompose_goal")
    scripted.script(verdict(33), verdict(66), verdict(100, "finish", True), schema="evaluate_progress")

    task = services.start_task("default", "Summarize", ["fetch_issues", "store_report"])
    task = wait_for_task(task.pk)

    assert task.status == "completed", task.error
    repair = scripted.calls("decompose_goal")[1]["messages"][-1]["content"]
    assert "That plan is not valid" in repair and "'drop_database' is not one of" in repair
    assert Attempt.objects.get(step__run_id=task.run_id, step__step_id="decompose").usage["calls"] == 2


@pytest.fixture
def chain_template_default(db):
    from templates_app.services import save_template
    from templates_app.spec import load_spec
    from tests.conftest import CHAIN_YAML

    return save_template(load_spec(CHAIN_YAML, source="chain.yaml"), CHAIN_YAML, tenant_id="default").template


def test_a_bad_continuation_fails_the_attempt_permanently_and_appends_nothing(db):
    # given a run whose step appends a step with a taken id and one with an unknown type
    from agents.registry import StepContinuation
    from runs import engine
    from runs.engine import append

    run = engine.start_run({"key": "k", "steps": [{"id": "a", "type": "noop"}]}, {})
    taken = StepContinuation(output=None, steps=[{"id": "a", "type": "noop"}])
    unknown = StepContinuation(output=None, steps=[{"id": "b", "type": "nope"}])
    dangling = StepContinuation(output=None, steps=[{"id": "c", "type": "noop", "depends_on": ["zz"]}])

    # then each is refused with one line naming the step
    with pytest.raises(ValueError, match="appended step 'a' already exists in the run"):
        append.check(run.pk, taken)
    with pytest.raises(ValueError, match="appended step 'b': unknown step type 'nope'"):
        append.check(run.pk, unknown)
    with pytest.raises(ValueError, match="depends_on 'zz' is not an earlier appended step"):
        append.check(run.pk, dangling)


def test_resume_after_a_failure_restores_the_latest_checkpoint_and_repeats_no_completed_step(scripted, agent_server):
    # given a task whose last tool call is refused (a permanent 400) once
    scripted.script(PLAN, schema="decompose_goal")
    scripted.script(verdict(33), verdict(66), verdict(100, "finish", True), schema="evaluate_progress")
    agent_server.program("/tools/store_report", [400])

    task = services.start_task("default", "Summarize", ["fetch_issues", "store_report"], checkpoint_interval=1)
    task = wait_for_task(task.pk)
    assert task.status == "failed" and "step_3" in task.error
    assert [c["after_step"] for c in task.checkpoints] == [1, 2]

    # when it is resumed (the endpoint answers again)
    services.resume(task)
    task = wait_for_task(task.pk)

    # then it completed from checkpoint 2: only the failed step ran again
    assert task.status == "completed", task.error
    assert task.retry_count == 1 and task.progress == 100
    assert len(tool_calls(agent_server, "fetch_issues")) == 1
    assert len(tool_calls(agent_server, "store_report")) == 2  # the refused call, then the one that worked
    assert Trace.objects.filter(run_id=task.run_id, message__contains="resumed from checkpoint 2").exists()
    assert Step.objects.get(run_id=task.run_id, step_id="step_1").attempts == 1
    assert len(scripted.calls("decompose_goal")) == 1


def test_cancelling_a_task_cancels_the_child_run_of_its_tool_call(scripted, chain_template_default):
    from runs.models import Run
    from templates_app.services import save_template
    from templates_app.spec import load_spec

    slow = "key: slow\nsteps:\n  - {id: nap, type: sleep, params: {seconds: 30}}\n"
    save_template(load_spec(slow, source="slow.yaml"), slow, tenant_id="default")
    plan = {
        "steps": [{"id": "nap", "description": "Wait", "tool": "slow", "arguments": {}}],
        "estimated_duration_s": 30,
    }
    scripted.script(plan, schema="decompose_goal")

    task = services.start_task("default", "Wait a while", ["slow"])
    deadline = time.time() + 30
    while not Run.objects.filter(idempotency_key=f"{task.pk}:step_1").exists():
        assert time.time() < deadline
        time.sleep(0.05)
    services.cancel(AgentTask.objects.get(pk=task.pk))

    child = Run.objects.get(idempotency_key=f"{task.pk}:step_1")
    assert child.status == "cancelled" and "agent task" in child.error
    assert AgentTask.objects.get(pk=task.pk).run.status == "cancelled"


def test_a_task_ends_with_its_run_even_when_nobody_reads_it(scripted, chain_template_default):
    """The run's end (here an operator's cancel of the run itself, in the engine) ends the task at
    once through runs.signals.run_finished, not when the API or the CLI next reads the task."""
    from runs import engine
    from templates_app.services import save_template
    from templates_app.spec import load_spec

    slow = "key: slow\nsteps:\n  - {id: nap, type: sleep, params: {seconds: 30}}\n"
    save_template(load_spec(slow, source="slow.yaml"), slow, tenant_id="default")
    scripted.script(
        {"steps": [{"id": "nap", "description": "Wait", "tool": "slow", "arguments": {}}], "estimated_duration_s": 30},
        schema="decompose_goal",
    )
    task = services.start_task("default", "Wait a while", ["slow"])
    deadline = time.time() + 30
    while not AgentTask.objects.get(pk=task.pk).run.steps.filter(step_id="step_1").exists():
        assert time.time() < deadline
        time.sleep(0.05)
    assert engine.cancel_run(task.run_id, "stopped by an operator")
    row = AgentTask.objects.get(pk=task.pk)  # read straight from the table: no sync() on the way
    assert row.status == "cancelled" and "stopped by an operator" in row.error


def test_a_workflow_file_may_not_name_the_internal_agent_step_type(db):
    """`agent` steps are written by tasks_app only: a file (hand-written or generated) naming the
    type is refused at load, so no workflow can drive a task's bookkeeping."""
    from templates_app.errors import WorkflowError
    from templates_app.spec import load_spec

    with pytest.raises(WorkflowError, match="unknown step type 'agent'"):
        load_spec("key: sneaky\nsteps:\n  - {id: a, type: agent, params: {op: step}}\n", source="sneaky.yaml")
