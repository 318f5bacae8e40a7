"""An agent task survives its whole worker being SIGKILLed mid-task: a new worker finishes it, no
completed tool step is called again, the in-flight one at most once more with the same key."""

from __future__ import annotations

import time

from agents.models import LLMProvider
from runs.models import Step
from tasks_app import services
from tasks_app.models import AgentEndpoint
from tests.flow_support import route_to
from tests.test_agent_tasks import PLAN, verdict, wait_for_task
from tests.workers import purge_queue, start_workers


def test_whole_worker_sigkill_mid_task_completes_without_repeating_a_completed_tool(
    worker, worker_env, llm_server, agent_server, tmp_path
):
    # given a task whose second step is a slow tool call (3 s), on a worker of its own
    LLMProvider.objects.create(tenant_id="default", name="scripted", base_url=llm_server.url, model="tiny")
    AgentEndpoint.objects.create(tenant_id="default", name="fetch_issues", call="/tools/fetch_issues")
    AgentEndpoint.objects.create(tenant_id="default", name="slow_tool", call="/slow/3", expensive=True)
    AgentEndpoint.objects.create(tenant_id="default", name="store_report", call="/tools/store_report")
    plan = {
        **PLAN,
        "steps": [PLAN["steps"][0], {**PLAN["steps"][1], "tool": "slow_tool", "arguments": {}}, PLAN["steps"][2]],
    }
    llm_server.script(plan, schema="decompose_goal")
    llm_server.script(verdict(33), verdict(66), verdict(100, "finish", True), schema="evaluate_progress")
    env = {"ORCHESTRATOR_WORKER_HEARTBEAT": "0.5", "ORCHESTRATOR_WORKER_LOST_AFTER": "3"}
    first = start_workers(worker_env, tmp_path, concurrency=2, env=env)
    try:
        with route_to(first.queue):
            task = services.start_task("default", "Summarize", ["fetch_issues", "slow_tool", "store_report"])
        deadline = time.time() + 30
        while len(agent_server.calls("/slow/")) < 1:
            assert time.time() < deadline, first.log_text()[-3000:]
            time.sleep(0.05)
        # when the whole worker node is SIGKILLed while the slow tool call is in flight...
        first.kill(0)
        assert Step.objects.get(run_id=task.run_id, step_id="step_2").status == "running"
        # ...and a new worker starts on the same queue
        second = start_workers(worker_env, tmp_path, concurrency=2, queue=first.queue, env=env)
        try:
            task = wait_for_task(task.pk, timeout=90, sweep=True)
        finally:
            second.stop()
    finally:
        first.stop()
        purge_queue(first.queue)

    # then the task completed; the completed tool step was not called again, the in-flight one at
    # most once more, always with the same idempotency key
    assert task.status == "completed", task.error
    assert len(agent_server.calls("/tools/fetch_issues")) == 1
    assert len(agent_server.calls("/tools/store_report")) == 1
    slow = agent_server.calls("/slow/")
    assert 1 <= len(slow) <= 2
    assert {r.headers["Idempotency-Key"] for r in slow} == {f"{task.pk}:step_2"}
    step = Step.objects.get(run_id=task.run_id, step_id="step_2")
    assert step.attempt_rows.filter(outcome="lost").count() == 1
    # a checkpoint was written before the expensive step
    assert any("before expensive step 2" in c["reason"] for c in task.checkpoints)
