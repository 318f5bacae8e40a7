"""A short agent task against the real local model (llama-cpp-python's server on SmolLM2-135M):
it proves the protocol offline (schema-constrained decompose_goal and evaluate_progress answers,
usage reported, every call a step of the run), not the quality of the plan. Skipped with a reason
where requirements-llm.txt is not installed."""

from __future__ import annotations

import jsonschema

from agents.models import LLMProvider
from runs.models import Attempt, Step, Trace
from tasks_app import orchestrator, services
from tests.test_agent_tasks import wait_for_task


def test_a_short_task_on_the_local_model(worker, local_llm):
    LLMProvider.objects.create(
        tenant_id="default", name="smol", base_url=local_llm.url, model="smollm2-135m", kind="llamacpp"
    )

    task = services.start_task("default", "Say hello to the team in one sentence.", [], max_steps=1)
    task = wait_for_task(task.pk, timeout=240)

    # the plan came back valid under the decompose_goal schema (one step at most: max_steps 1)
    decompose = Step.objects.get(run_id=task.run_id, step_id="decompose")
    assert decompose.status == "succeeded", decompose.error
    jsonschema.validate(decompose.output["strategy"], orchestrator.decompose_schema(1, []))
    assert Step.objects.get(run_id=task.run_id, step_id="step_1").status == "succeeded"
    # the evaluation was answered under its schema (the task then completes, or stops at max_steps
    # when the tiny model asks for more work)
    evaluation = Trace.objects.get(run_id=task.run_id, kind="llm", data__schema="evaluate_progress")
    assert evaluation.data["usage"]["estimated"] is False
    assert task.status == "completed" or "max_steps (1) reached" in task.error, task.error
    usage = Attempt.objects.get(step=decompose, outcome="succeeded").usage
    assert usage["provider"] == "smol" and usage["prompt_tokens"] > 0 and usage["estimated"] is False
