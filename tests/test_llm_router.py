"""The LLM router (agents.llm) against the scripted OpenAI-compatible server (tests/llm_server.py):
structured output, failover, 429/Retry-After, the shared circuit breaker, tenant providers with
credential keys, Gemini settings, usage and metrics."""

from __future__ import annotations

import socket
import threading

import pytest
from django.db import connection

from agents import llm
from agents.llm import breaker
from agents.llm.providers import providers_for
from agents.models import Credential, LLMCircuit, LLMProvider
from agents.redaction import forget_registered_secrets
from tests.llm_server import Reply

pytestmark = pytest.mark.django_db

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "The largest city of France, as JSON"}]


def closed_port_url() -> str:
    """An LLM base URL on a loopback port nobody listens on (connection refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def routed(settings, llm_server):
    """The deployment's provider is the scripted server; no fallbacks, no Gemini."""
    settings.ORCHESTRATOR_LLM_BASE_URL = llm_server.url
    settings.ORCHESTRATOR_LLM_MODEL = "scripted-model"
    settings.ORCHESTRATOR_LLM_KIND = "openai"
    settings.ORCHESTRATOR_LLM_API_KEY = ""
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = []
    settings.GEMINI_API_KEY = ""
    settings.GEMINI_ENABLED = False
    settings.ORCHESTRATOR_LLM_BREAKER_FAILURES = 3
    settings.ORCHESTRATOR_LLM_BREAKER_COOLDOWN = 30.0
    yield llm_server
    forget_registered_secrets()  # keys resolved by these tests are masked process-wide otherwise


def test_structured_answer_is_asked_with_a_strict_json_schema_and_validated(routed):
    routed.script({"city": "Paris", "population": 2102650}, schema="city")

    result = llm.complete(tenant_id="default", messages=ASK, schema=SCHEMA, schema_name="city", max_tokens=64)

    assert result.parsed == {"city": "Paris", "population": 2102650}
    assert result.provider == "local" and result.model == "scripted-model"
    sent = routed.calls("city")[0]
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": SCHEMA, "strict": True},
    }
    assert sent["max_tokens"] == 64 and sent["temperature"] == 0.0
    assert result.usage["estimated"] is False
    assert result.usage["total_tokens"] == result.usage["prompt_tokens"] + result.usage["completion_tokens"] > 0
    assert result.latency_ms >= 0


def test_llamacpp_providers_get_json_object_with_the_schema(routed, settings):
    settings.ORCHESTRATOR_LLM_KIND = "llamacpp"
    routed.script({"city": "Lyon", "population": 522250})

    result = llm.complete(tenant_id="default", messages=ASK, schema=SCHEMA, schema_name="city")

    assert routed.calls()[0]["response_format"] == {"type": "json_object", "schema": SCHEMA}
    assert result.parsed["city"] == "Lyon"


def test_kind_schemas_send_each_provider_kind_its_own_schema_and_validate_against_it(routed, settings):
    # Given a llama.cpp primary that fails with a 500 and an OpenAI-kind fallback (the same server)
    settings.ORCHESTRATOR_LLM_KIND = "llamacpp"
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = [routed.url.replace("127.0.0.1", "localhost")]
    tight = {**SCHEMA, "properties": {**SCHEMA["properties"], "city": {"enum": ["Paris"]}}}
    routed.script(Reply.server_error(500), {"city": "Lyon", "population": 522250})

    # When the tight schema is for llamacpp only
    result = llm.complete(
        tenant_id="default", messages=ASK, schema=SCHEMA, schema_name="city", kind_schemas={"llamacpp": tight}
    )

    # Then the llama.cpp server got the tight schema, the fallback the strict default, and the
    # fallback's answer (outside the tight enum) was validated against the default
    first, second = routed.calls()
    assert first["response_format"] == {"type": "json_object", "schema": tight}
    assert second["response_format"]["json_schema"] == {"name": "city", "schema": SCHEMA, "strict": True}
    assert (result.provider, result.parsed["city"]) == ("fallback-1", "Lyon")

    # and a llama.cpp answer is held to the tight schema
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = []
    routed.script({"city": "Lyon", "population": 522250})
    with pytest.raises(llm.LLMSchemaError, match=r"\$\.city"):
        llm.complete(
            tenant_id="default", messages=ASK, schema=SCHEMA, schema_name="city", kind_schemas={"llamacpp": tight}
        )
    with pytest.raises(ValueError, match="kind_schemas: needs schema"):
        llm.complete(tenant_id="default", messages=ASK, kind_schemas={"llamacpp": tight})


def test_an_answer_that_does_not_validate_is_a_schema_error_naming_the_field(routed):
    routed.script({"city": "Paris", "population": "two million"}, schema="city")

    with pytest.raises(llm.LLMSchemaError) as caught:
        llm.complete(tenant_id="default", messages=ASK, schema=SCHEMA, schema_name="city")

    error = caught.value
    assert not error.permanent  # a failed attempt: the step's retry may get a better answer
    assert error.errors == ["$.population: 'two million' is not of type 'integer'"]
    assert error.result is not None and error.result.usage["total_tokens"] > 0


def test_an_answer_that_is_not_json_is_a_schema_error(routed):
    routed.script("Paris, about two million people", schema="city")
    with pytest.raises(llm.LLMSchemaError, match="not JSON"):
        llm.complete(tenant_id="default", messages=ASK, schema=SCHEMA, schema_name="city")


def test_failover_from_a_dead_provider_to_a_live_one(routed, settings):
    # Given a first provider on a closed port and the scripted server as the fallback
    settings.ORCHESTRATOR_LLM_BASE_URL = closed_port_url()
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = [routed.url]
    routed.script("fine")

    result = llm.complete(tenant_id="default", messages=ASK)

    assert result.content == "fine"
    assert result.provider == "fallback-1"
    assert [a["outcome"] for a in result.attempts] == ["error", "ok"]
    assert "ConnectError" in result.attempts[0]["error"]
    assert LLMCircuit.objects.get(key="deployment:local").failures == 1


@pytest.mark.parametrize(
    "failure",
    [Reply.server_error(500), Reply.server_error(503), Reply.context_length()],
    ids=["500", "503", "context-length"],
)
def test_failover_on_5xx_and_context_length(routed, settings, failure):
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = [
        routed.url.replace("127.0.0.1", "localhost")
    ]  # the same server, a second provider
    routed.script(failure, "second answer")

    result = llm.complete(tenant_id="default", messages=ASK)

    assert (result.provider, result.content) == ("fallback-1", "second answer")
    assert len(routed.calls()) == 2


def test_other_4xx_is_permanent_and_does_not_fail_over(routed, settings):
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = [routed.url.replace("127.0.0.1", "localhost")]
    routed.script(Reply.bad_request("'messages' must not be empty"), "never sent")

    with pytest.raises(llm.LLMError) as caught:
        llm.complete(tenant_id="default", messages=ASK)

    assert caught.value.permanent and caught.value.code == "refused" and caught.value.http_status == 400
    assert "must not be empty" in str(caught.value)
    assert len(routed.calls()) == 1


def test_429_with_retry_after_fails_over_and_holds_the_provider_for_every_worker(routed, settings):
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = [routed.url.replace("127.0.0.1", "localhost")]
    routed.script(Reply.rate_limited(retry_after=120), "from the fallback", "again from the fallback")

    first = llm.complete(tenant_id="default", messages=ASK)
    assert first.provider == "fallback-1"
    # the throttled provider is skipped (no request) until its Retry-After is over
    second = llm.complete(tenant_id="default", messages=ASK)
    assert second.provider == "fallback-1" and second.attempts[0]["outcome"] == "skipped"
    assert len(routed.calls()) == 3
    assert 100 < breaker.blocked_for("deployment:local") <= 120


def test_every_provider_throttled_is_a_retryable_error_carrying_retry_after(routed, settings):
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = [routed.url.replace("127.0.0.1", "localhost")]
    routed.script(Reply.rate_limited(retry_after=7), Reply.rate_limited(retry_after=3))

    with pytest.raises(llm.LLMError) as caught:
        llm.complete(tenant_id="default", messages=ASK)

    error = caught.value
    assert error.code == "throttled" and not error.permanent
    assert error.retry_after == 3
    assert len(error.failures) == 2 and all("429" in line for line in error.failures)


def test_the_breaker_opens_after_repeated_failures_and_lets_one_probe_through(routed, settings):
    settings.ORCHESTRATOR_LLM_BREAKER_FAILURES = 2
    routed.script(Reply.server_error(), Reply.server_error())
    for _ in range(2):
        with pytest.raises(llm.LLMError):
            llm.complete(tenant_id="default", messages=ASK)

    # open: the provider is skipped without a request
    with pytest.raises(llm.LLMError) as caught:
        llm.complete(tenant_id="default", messages=ASK)
    assert caught.value.code == "throttled" and "circuit open" in str(caught.value)
    assert len(routed.calls()) == 2

    # cool-down over: one probe is let through; a second caller meanwhile is refused
    LLMCircuit.objects.filter(key="deployment:local").update(open_until=None)
    assert breaker.allow("deployment:local") == (True, 0.0)
    allowed, _ = breaker.allow("deployment:local")
    assert not allowed
    # a successful probe closes it
    LLMCircuit.objects.filter(key="deployment:local").update(open_until=None)
    routed.script("back")
    assert llm.complete(tenant_id="default", messages=ASK).content == "back"
    assert LLMCircuit.objects.get(key="deployment:local").failures == 0


def test_tool_calls_come_back_in_openai_shape(routed):
    tools = [
        {
            "type": "function",
            "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
        }
    ]
    routed.script(Reply.tool_call("lookup", {"q": "paris"}))

    result = llm.complete(tenant_id="default", messages=ASK, tools=tools)

    assert routed.calls()[0]["tools"] == tools
    assert result.tool_calls == [
        {"id": "call_0", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "paris"}'}}
    ]
    assert result.finish_reason == "tool_calls"


def test_usage_is_estimated_when_the_provider_reports_none(routed):
    routed.script(Reply(content="x" * 40, usage=None))
    result = llm.complete(tenant_id="default", messages=ASK)
    assert result.usage == {
        "prompt_tokens": result.usage["prompt_tokens"],
        "completion_tokens": 10,
        "total_tokens": result.usage["prompt_tokens"] + 10,
        "estimated": True,
    }
    assert result.usage["prompt_tokens"] > 0


def test_no_provider_is_a_permanent_error(settings):
    settings.ORCHESTRATOR_LLM_BASE_URL = ""
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = []
    settings.GEMINI_API_KEY = ""
    with pytest.raises(llm.LLMError) as caught:
        llm.complete(tenant_id="default", messages=ASK)
    assert caught.value.permanent and caught.value.code == "no_provider"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"messages": []}, "messages must be a non-empty list"),
        ({"max_tokens": 0}, "max_tokens must be an integer"),
        ({"max_tokens": 10**9}, "max_tokens must be an integer"),
        ({"temperature": 3}, "temperature must be a number"),
        ({"schema": {"type": "nonsense"}}, "not a valid JSON Schema"),
        ({"schema": SCHEMA, "schema_name": "has spaces"}, "schema_name must be"),
    ],
)
def test_bad_arguments_are_a_clear_value_error_and_call_nobody(routed, kwargs, message):
    args = {"tenant_id": "default", "messages": ASK, **kwargs}
    with pytest.raises(ValueError, match=message):
        llm.complete(**args)
    assert routed.calls() == []


def test_tenant_provider_key_comes_from_a_credential_and_loopback_is_first_and_tagged_planning(routed, settings):
    # Given: the deployment has a non-loopback primary; the tenant adds its own loopback provider
    settings.ORCHESTRATOR_LLM_BASE_URL = "https://llm.example.invalid/v1"
    credential = Credential(tenant_id="acme", alias="llm-key", kind="bearer")
    credential.set_secret("sk-tenant-CANARY-77")
    credential.save()
    LLMProvider.objects.create(
        tenant_id="acme", name="own", base_url=routed.url, model="tiny", credential_alias="llm-key", priority=40
    )
    LLMProvider.objects.create(tenant_id="other", name="theirs", base_url=routed.url, model="x")

    order = providers_for("acme")
    assert [(p.name, p.priority, "planning" in p.tags) for p in order] == [("own", 0, True), ("primary", 10, False)]
    assert [p.name for p in providers_for("default")] == ["primary"]  # another tenant's row is not used

    result = llm.complete(tenant_id="acme", messages=ASK)

    assert (result.provider, result.model) == ("own", "tiny")
    assert routed.headers[0]["Authorization"] == "Bearer sk-tenant-CANARY-77"
    assert "sk-tenant-CANARY-77" not in Credential.objects.get(alias="llm-key").secret_encrypted


def test_a_tag_puts_its_providers_first(routed, settings):
    settings.ORCHESTRATOR_LLM_BASE_URL = "https://llm.example.invalid/v1"
    LLMProvider.objects.create(tenant_id="acme", name="cheap", base_url="https://a.example.invalid/v1", model="m")
    LLMProvider.objects.create(
        tenant_id="acme",
        name="planner",
        base_url="https://b.example.invalid/v1",
        model="m",
        priority=90,
        tags=["planning"],
    )
    assert [p.name for p in providers_for("acme")] == ["cheap", "primary", "planner"]
    assert [p.name for p in providers_for("acme", tag="planning")] == ["planner", "cheap", "primary"]


def test_gemini_is_a_fallback_with_its_own_key_and_model(routed, settings):
    settings.ORCHESTRATOR_LLM_BASE_URL = closed_port_url()
    settings.GEMINI_API_KEY = "gm-CANARY-key"
    settings.GEMINI_ENABLED = True
    settings.GEMINI_MODEL = "gemini-2.0-flash-exp"
    settings.GEMINI_BASE_URL = routed.url  # stands in for Google's OpenAI-compatible endpoint

    result = llm.complete(tenant_id="default", messages=ASK)

    assert (result.provider, result.model) == ("gemini", "gemini-2.0-flash-exp")
    assert routed.headers[0]["Authorization"] == "Bearer gm-CANARY-key"
    settings.GEMINI_ENABLED = False
    assert [p.name for p in providers_for("default")] == ["local"]


def test_metrics_count_requests_and_tokens(routed, settings, client):
    from tests.test_metrics import scrape, value

    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = [routed.url.replace("127.0.0.1", "localhost")]
    _, before = scrape(client)
    routed.script(
        Reply.server_error(),
        Reply(content="ok", usage={"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}),
    )

    llm.complete(tenant_id="metered", messages=ASK)

    _, after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("orchestrator_llm_requests_total", provider="local", status="server_error") == 1
    assert delta("orchestrator_llm_requests_total", provider="fallback-1", status="ok") == 1
    assert delta("orchestrator_llm_tokens_total", tenant="metered", provider="fallback-1", kind="prompt") == 11
    assert delta("orchestrator_llm_tokens_total", tenant="metered", provider="fallback-1", kind="completion") == 5


def test_a_key_echoed_by_a_provider_never_reaches_the_error(routed, settings):
    settings.ORCHESTRATOR_LLM_BASE_URL = closed_port_url()
    settings.GEMINI_API_KEY = "gm-CANARY-0b9e1d"
    settings.GEMINI_ENABLED = True
    settings.GEMINI_BASE_URL = routed.url
    routed.script(Reply(status=401, error={"error": {"message": "Incorrect API key provided: gm-CANARY-0b9e1d"}}))

    with pytest.raises(llm.LLMError) as caught:
        llm.complete(tenant_id="default", messages=ASK)

    assert caught.value.permanent and caught.value.http_status == 401
    assert "gm-CANARY-0b9e1d" not in str(caught.value) and "gm-CANARY-0b9e1d" not in repr(caught.value.failures)


@pytest.mark.django_db(transaction=True)  # the row must be visible to the call's own thread
def test_a_tenant_provider_on_an_internal_address_is_refused_by_the_ssrf_guard(routed, settings):
    settings.ORCHESTRATOR_LLM_BASE_URL = ""
    settings.ORCHESTRATOR_HTTP_ALLOW_HOSTS = []
    LLMProvider.objects.create(tenant_id="acme", name="sneaky", base_url=routed.url, model="m")

    # in a thread of its own: a fresh httpx client, so no pooled connection from another test
    # (the guard checks where connections are made)
    caught: list[BaseException] = []

    def call() -> None:
        try:
            llm.complete(tenant_id="acme", messages=ASK)
        except BaseException as exc:  # noqa: BLE001 - handed to the assertion below
            caught.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()

    assert len(caught) == 1 and isinstance(caught[0], llm.LLMError), caught
    assert "refused to connect" in str(caught[0])
    assert routed.calls() == []
    assert not LLMCircuit.objects.filter(key="tenant:acme:sneaky", failures__gt=0).exists()


def test_an_answer_past_the_size_cap_fails_that_provider_over(routed, settings):
    settings.ORCHESTRATOR_LLM_MAX_RESPONSE_BYTES = 4_000
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = [routed.url.replace("127.0.0.1", "localhost")]
    routed.script("x" * 10_000, "short")

    result = llm.complete(tenant_id="default", messages=ASK)

    assert (result.provider, result.content) == ("fallback-1", "short")
    assert "answer larger than 4000 bytes" in result.attempts[0]["error"]
