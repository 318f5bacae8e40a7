"""``llm`` steps end to end on the real Celery worker: structured output through a tenant's own
provider (the scripted server), failover from a dead provider, and the budget wait (StepDeferred)."""

from __future__ import annotations

import time

from agents.models import LLMProvider, TokenBudget
from runs.models import Trace
from tests.conftest import run_to_end, start
from tests.llm_server import Reply
from tests.test_llm_router import closed_port_url

SCHEMA_YAML = """\
key: llm-structured
steps:
  - id: extract
    type: llm
    params:
      prompt: "Which city and how many people? Paris, 2102650."
      schema_name: city
      schema:
        type: object
        properties: {city: {type: string}, population: {type: integer}}
        required: [city, population]
        additionalProperties: false
      max_tokens: 64
  - id: use
    type: noop
    depends_on: [extract]
    params:
      output: "${steps.extract.output.json.city}"
"""


def test_structured_llm_step_on_the_worker_records_usage_in_output_and_trace(worker, llm_server):
    LLMProvider.objects.create(tenant_id="default", name="scripted", base_url=llm_server.url, model="tiny")
    llm_server.script(
        Reply(
            content='{"city": "Paris", "population": 2102650}',
            usage={"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30},
        ),
        schema="city",
    )

    run, steps = run_to_end(SCHEMA_YAML)

    assert run.status == "succeeded", run.error
    output = steps["extract"].output
    assert output["json"] == {"city": "Paris", "population": 2102650}
    assert (output["provider"], output["model"]) == ("scripted", "tiny")
    assert output["usage"] == {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30, "estimated": False}
    assert steps["use"].output == "Paris"
    sent = llm_server.calls("city")[0]
    assert sent["response_format"]["json_schema"]["strict"] is True
    trace = Trace.objects.get(run=run, kind="llm")
    assert trace.data["usage"]["total_tokens"] == 30 and trace.data["provider"] == "scripted"


def test_llm_step_fails_over_from_a_dead_provider_on_the_worker(worker, agent_server):
    # the tenant's own provider is down; the deployment's (the agent server's /v1) answers
    LLMProvider.objects.create(tenant_id="default", name="down", base_url=closed_port_url(), model="m")

    run, steps = run_to_end("key: failover\nsteps:\n  - {id: ask, type: ai, params: {prompt: hello}}\n")

    assert run.status == "succeeded", run.error
    assert steps["ask"].output["content"] == "echo: hello"
    assert steps["ask"].output["provider"] == "local"
    outcomes = list(Trace.objects.filter(run=run, kind="llm").order_by("id").values_list("data__outcome", flat=True))
    assert outcomes == ["error", "ok"]


def test_llm_step_over_a_wait_budget_waits_without_spending_an_attempt(worker, llm_server):
    from runs import engine

    LLMProvider.objects.create(tenant_id="default", name="scripted", base_url=llm_server.url, model="tiny")
    TokenBudget.objects.create(tenant_id="default", period="day", limit=10_000, used=10_000, policy="wait")
    run = start("key: waits\nsteps:\n  - {id: ask, type: llm, retry: {max_attempts: 1}, params: {prompt: hi}}\n")
    try:
        deadline = time.time() + 30
        step = run.steps.get(step_id="ask")
        while time.time() < deadline:
            step.refresh_from_db()
            if step.status not in ("pending", "queued", "running"):
                break
            time.sleep(0.1)
        assert step.status == "retry_wait", (step.status, step.error)
        # the deferred attempt is kept (outcome `deferred`) and not counted: one real try is left
        assert step.max_attempts - step.attempts == 1
        assert list(step.attempt_rows.values_list("outcome", flat=True)) == ["deferred"]
        assert step.next_attempt_at is not None
        assert llm_server.calls() == []
    finally:
        engine.cancel_run(run.pk)


def test_every_provider_throttled_retries_the_step_after_retry_after(worker, llm_server, agent_server):
    from runs.models import Attempt

    # Given: the tenant's provider and the deployment's both answer 429 with Retry-After: 2 once
    LLMProvider.objects.create(tenant_id="default", name="scripted", base_url=llm_server.url, model="tiny")
    llm_server.script(Reply.rate_limited(retry_after=2), "answered after the wait")
    agent_server.program("/v1/chat/completions", [(429, {"error": {"message": "slow down"}}, {"Retry-After": "2"})])

    run, steps = run_to_end(
        "key: throttled\nsteps:\n  - id: ask\n    type: llm\n"
        "    retry: {max_attempts: 3, initial_delay: 0.1, jitter: false}\n    params: {prompt: hi}\n",
        sweep=True,
    )

    # Then: the first attempt failed throttled, the second came after the Retry-After and answered
    assert run.status == "succeeded", run.error
    assert steps["ask"].output["content"] == "answered after the wait"
    first, second = Attempt.objects.filter(step=steps["ask"]).order_by("number")
    assert "every LLM provider is throttled" in first.error and "429" in first.error
    assert (second.started_at - first.finished_at).total_seconds() >= 2.0
