"""The router behind :func:`agents.llm.complete`: budget, providers in order, breaker, failover.

One call:

1. Check the arguments (ValueError) and list the providers (``agents.llm.providers``); none at
   all is a permanent ``no_provider`` error.
2. Reserve the estimated prompt plus ``max_tokens`` on the tenant's budgets (``budgets.reserve``).
3. Try each provider whose circuit is closed, through the ``openai`` SDK (``max_retries=0``; the
   thread's ``httpx.Client`` with the SSRF guard and a cap on the answer's size, ``agents.llm.transport``), within the
   time left of the call's timeout. Fail over on a connection error, a timeout, a 5xx, a 429 (its
   Retry-After opens that provider's circuit for as long, for every worker) and a context-length
   error; any other 4xx is permanent at once (the request itself is wrong).
4. Validate a structured answer (``structured.parse_and_validate``); settle the budget to the
   real usage (also when the answer fails validation: its tokens were spent), count metrics.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import openai
from django.conf import settings

from orchestrator_site.conf import conf

from ..credentials import CredentialError
from ..httpclient import parse_retry_after
from ..redaction import known_secrets, redact, register_secret
from . import breaker, budgets, structured
from . import usage as usage_mod
from .errors import LLMError, LLMSchemaError, LLMTimeout
from .metrics import count_request, count_tokens
from .providers import Provider, providers_for
from .transport import get_llm_client

log = logging.getLogger("orchestrator.llm")

__all__ = ["complete"]

#: Messages in one call at most, and characters of all of them together.
MAX_MESSAGES = 500
MAX_PROMPT_CHARS = 2_000_000

_CONTEXT_MARKERS = (
    "context_length_exceeded",
    "maximum context length",
    "context length",
    "context window",
    "too many tokens",
    "prompt is too long",
)


def _check_args(
    messages: Any, max_tokens: Any, temperature: Any, timeout: Any, tools: Any, schema: Any, schema_name: Any
) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} mappings")
    if len(messages) > MAX_MESSAGES:
        raise ValueError(f"messages: at most {MAX_MESSAGES} messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{index}] must be a mapping with a role")
    if len(json.dumps(messages, default=str)) > MAX_PROMPT_CHARS:
        raise ValueError(f"messages: at most {MAX_PROMPT_CHARS} characters in all")
    cap = int(conf.llm_max_tokens_cap)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= cap:
        raise ValueError(f"max_tokens must be an integer from 1 to {cap}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ValueError("temperature must be a number from 0 to 2")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError("timeout must be a positive number of seconds")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise ValueError("tools must be a list of OpenAI tool definitions")
    if schema is not None:
        structured.check_schema(schema, schema_name or "answer")


def complete(
    *,
    tenant_id: str,
    messages: list[dict[str, Any]],
    schema: dict[str, Any] | None = None,
    schema_name: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    max_tokens: int = 512,
    temperature: float = 0.0,
    tag: str | None = None,
    model: str | None = None,
    timeout: float | None = None,
    providers: list[Provider] | None = None,
    json_mode: bool = False,
    kind_schemas: Mapping[str, dict[str, Any]] | None = None,
):
    """See :func:`agents.llm.complete` (the documented entry point).

    Two more arguments for the ``llm`` step handler: ``providers`` replaces the tenant's list (a
    step's own ``base_url``), ``json_mode`` asks for any JSON (``{"type": "json_object"}``) and
    parses it into ``parsed`` when no schema is given.
    """
    _check_args(messages, max_tokens, temperature, timeout, tools, schema, schema_name)
    if kind_schemas:
        if schema is None:
            raise ValueError("kind_schemas: needs schema (the one for every other provider kind)")
        for other in kind_schemas.values():
            structured.check_schema(other, schema_name or "answer")
    tenant_id = tenant_id or "default"
    if providers is None:
        providers = providers_for(tenant_id, tag)
    if not providers:
        raise LLMError(
            "no LLM provider configured: set LLM_BASE_URL (or ORCHESTRATOR_LLM_BASE_URL), GEMINI_API_KEY, "
            "or add an LLM provider for the tenant",
            permanent=True,
            code="no_provider",
        )
    reservation = budgets.reserve(tenant_id, budgets.estimate_prompt_tokens(messages, tools) + max_tokens)
    charged = 0
    try:
        result, used = _route(
            tenant_id,
            providers,
            messages,
            schema=schema,
            kind_schemas=kind_schemas or {},
            schema_name=schema_name or "answer",
            tools=tools,
            max_tokens=max_tokens,
            temperature=temperature,
            model=model,
            timeout=float(timeout if timeout is not None else conf.llm_timeout),
            json_mode=json_mode,
        )
        charged = int(result.usage.get("total_tokens") or 0)
        if schema is not None or json_mode:
            try:
                # validated against the schema the answering provider was sent
                result.parsed = structured.parse_and_validate(result.content, used or {})
            except LLMSchemaError as exc:
                exc.result = result
                count_request(result.provider, "schema_invalid")
                raise
        return result
    finally:
        budgets.settle(reservation, charged)


def _client(provider: Provider, timeout: float) -> tuple[openai.OpenAI, dict[str, Any]]:
    """An SDK client for ``provider`` (no SDK retries; the thread's guarded httpx client), and the
    extra headers of each request (no ``Authorization`` at all for a provider without a key)."""
    api_key = ""
    headers: dict[str, str] = {}
    query: dict[str, str] = {}
    if provider.api_key_setting:
        api_key = getattr(settings, provider.api_key_setting, "") or ""
    elif provider.credential_alias:
        from ..credentials import resolve

        resolved = resolve(provider.tenant_id, provider.credential_alias, provider.base_url)
        headers, query = dict(resolved.headers), dict(resolved.query)
        auth = headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            api_key = auth[len("Bearer ") :]
            headers.pop("Authorization")
    extra: dict[str, Any] = {}
    if api_key:
        register_secret(api_key)
    elif "Authorization" not in headers:
        extra["Authorization"] = openai.Omit()  # a keyless provider gets no Authorization header
    client = openai.OpenAI(
        base_url=provider.base_url,
        api_key=api_key or "unused",  # the SDK insists on one; omitted from requests above
        max_retries=0,
        timeout=timeout,
        http_client=get_llm_client(),
        default_headers=headers or None,
        default_query=query or None,
    )
    return client, extra


def _retry_after(exc: openai.APIStatusError) -> float | None:
    headers = exc.response.headers if exc.response is not None else {}
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after"))


def _is_context_length(exc: openai.APIStatusError) -> bool:
    if exc.status_code not in (400, 413, 422):
        return False
    text = " ".join(str(part) for part in (getattr(exc, "code", None), exc.message, exc.body)).lower()
    return any(marker in text for marker in _CONTEXT_MARKERS)


def _error_message(exc: openai.APIStatusError) -> str:
    """The provider's own error message (``{"error": {"message"}}``), else the SDK's text."""
    body = exc.body
    if isinstance(body, str) and body.strip():
        return body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return exc.message


def _one_line(text: Any, limit: int = 300) -> str:
    return redact(" ".join(str(text).split())[:limit], known_secrets())


def _route(
    tenant_id: str,
    providers: list[Provider],
    messages: list[dict[str, Any]],
    *,
    schema: dict[str, Any] | None,
    schema_name: str,
    tools: list[dict[str, Any]] | None,
    max_tokens: int,
    temperature: float,
    model: str | None,
    timeout: float,
    json_mode: bool = False,
    kind_schemas: Mapping[str, dict[str, Any]] | None = None,
):
    """Try ``providers`` in order; return ``(LLMResult, the schema the answering provider was sent)``."""
    from . import LLMResult

    deadline = time.monotonic() + timeout
    failures: list[str] = []
    attempts: list[dict[str, Any]] = []
    waits: list[float] = []  # seconds until a throttled/open provider takes calls again
    kinds: set[str] = set()  # failure kinds seen: throttled, timeout, other
    prompt_text = json.dumps(messages, ensure_ascii=False, default=str)

    for provider in providers:
        asked_model = model or provider.model
        entry: dict[str, Any] = {"provider": provider.name, "model": asked_model, "base_url": provider.base_url}
        attempts.append(entry)
        left = deadline - time.monotonic()
        if left <= 0:
            entry.update(outcome="skipped", error="no time left")
            failures.append(f"{provider.name}: no time left")
            kinds.add("timeout")
            break
        allowed, open_for = breaker.allow(provider.breaker_key)
        if not allowed:
            count_request(provider.name, "circuit_open")
            entry.update(outcome="skipped", error=f"circuit open for {open_for:.1f} s")
            failures.append(f"{provider.name}: circuit open for {open_for:.1f} s")
            waits.append(open_for)
            kinds.add("throttled")
            continue

        request: dict[str, Any] = {
            "model": asked_model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        provider_schema = (kind_schemas or {}).get(provider.kind, schema) if schema is not None else None
        if provider_schema is not None:
            request["response_format"] = structured.response_format(provider_schema, schema_name, provider.kind)
        elif json_mode:
            request["response_format"] = {"type": "json_object"}
        if tools:
            request["tools"] = tools
        started = time.monotonic()
        try:
            client, extra_headers = _client(provider, left)
            response = client.chat.completions.create(**request, extra_headers=extra_headers or None)
        except CredentialError as exc:  # the tenant's key alias is missing or not for this host
            _fail(provider, entry, failures, "refused", _one_line(exc), started)
            kinds.add("other")
            continue
        except openai.APITimeoutError:
            reason = f"timed out after {left:.3g} s"
            _fail(provider, entry, failures, "timeout", reason, started)
            breaker.record_failure(provider.breaker_key, reason)
            kinds.add("timeout")
            continue
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            reason = _one_line(f"{type(cause).__name__}: {cause}")
            _fail(provider, entry, failures, "connection_error", reason, started)
            from ..netguard import BlockedAddress

            if not isinstance(cause, BlockedAddress):  # a refused destination is configuration, not health
                breaker.record_failure(provider.breaker_key, reason)
            kinds.add("other")
            continue
        except openai.APIStatusError as exc:
            status = exc.status_code
            detail = _one_line(_error_message(exc))
            if status == 429:
                wait = _retry_after(exc)
                reason = f"HTTP 429 (throttled{f', Retry-After {wait:g} s' if wait is not None else ''})"
                _fail(provider, entry, failures, "throttled", reason, started, status)
                if wait is not None:
                    breaker.record_failure(provider.breaker_key, reason, retry_after=wait)
                    waits.append(wait)
                kinds.add("throttled")
                continue
            if status >= 500:
                reason = f"HTTP {status}: {detail}"
                _fail(provider, entry, failures, "server_error", reason, started, status)
                breaker.record_failure(provider.breaker_key, reason)
                wait = _retry_after(exc) if status == 503 else None
                if wait is not None:  # RFC 9110: a 503 may say when to come back
                    waits.append(wait)
                kinds.add("other")
                continue
            if _is_context_length(exc):
                _fail(
                    provider,
                    entry,
                    failures,
                    "context_length",
                    f"HTTP {status}: context length: {detail}",
                    started,
                    status,
                )
                kinds.add("other")
                continue
            _fail(provider, entry, failures, "refused", f"HTTP {status}: {detail}", started, status)
            raise LLMError(
                f"LLM request refused by {provider.name}: HTTP {status}: {detail}",
                permanent=True,
                http_status=status,
                code="refused",
                failures=failures,
            ) from None
        except openai.OpenAIError as exc:  # an answer the SDK could not read
            reason = _one_line(f"unreadable answer: {exc}")
            _fail(provider, entry, failures, "server_error", reason, started)
            breaker.record_failure(provider.breaker_key, reason)
            kinds.add("other")
            continue

        latency = int(round((time.monotonic() - started) * 1000))
        choice = response.choices[0] if response.choices else None
        message = choice.message if choice is not None else None
        content = (message.content if message is not None else None) or ""
        tool_calls = [call.model_dump(exclude_none=True) for call in (message.tool_calls or [])] if message else []
        usage = usage_mod.normalize(
            response.usage, prompt_text, content + (json.dumps(tool_calls) if tool_calls else "")
        )
        breaker.record_success(provider.breaker_key)
        count_request(provider.name, "ok")
        count_tokens(tenant_id, provider.name, usage)
        entry.update(outcome="ok", latency_ms=latency, status=200)
        return LLMResult(
            content=content,
            parsed=None,
            tool_calls=tool_calls,
            provider=provider.name,
            model=response.model or asked_model,
            usage=usage,
            latency_ms=latency,
            finish_reason=choice.finish_reason if choice is not None else None,
            attempts=attempts,
        ), provider_schema

    summary = "; ".join(failures)
    retry_after = min(waits) if waits else None
    if kinds == {"throttled"}:
        raise LLMError(
            f"every LLM provider is throttled: {summary}",
            retry_after=retry_after if retry_after is not None else None,
            code="throttled",
            failures=failures,
            output={"attempts": attempts},
        )
    if kinds == {"timeout"}:
        raise LLMTimeout(f"every LLM provider timed out: {summary}", failures=failures, output={"attempts": attempts})
    raise LLMError(
        f"every LLM provider failed: {summary}",
        retry_after=retry_after,
        code="unavailable",
        failures=failures,
        output={"attempts": attempts},
    )


def _fail(
    provider: Provider,
    entry: dict[str, Any],
    failures: list[str],
    status: str,
    reason: str,
    started: float,
    http_status: int | None = None,
) -> None:
    count_request(provider.name, status)
    entry.update(outcome="error", error=reason, latency_ms=int(round((time.monotonic() - started) * 1000)))
    if http_status is not None:
        entry["status"] = http_status
    failures.append(f"{provider.name}: {reason}")
    log.info("LLM provider %s failed: %s", provider.name, reason)
