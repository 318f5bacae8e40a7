"""``llm`` steps (alias ``ai``): one chat completion through the LLM router (``agents.llm``).

Providers, failover, the circuit breaker, token budgets and structured output are the router's
(see ``agents/llm/__init__.py`` and README "AI: the LLM router"). This handler turns step params
into one :func:`agents.llm.complete` call, traces every provider tried, and maps the outcome:

- an answer: the step's output (below), usage included;
- a tenant budget with policy ``wait`` that is full: :class:`agents.registry.StepDeferred` (the
  step waits for the window, no attempt spent);
- budget with policy ``fail``: permanent ``budget_exceeded``; a 4xx: permanent; every provider
  failed or throttled: transient (``retry_after`` from Retry-After); an answer that is not valid
  JSON / does not match ``schema``: transient (a failed attempt).

Params:
    messages: list of ``{"role", "content"}``; or
    prompt: one user message, with an optional ``system`` message before it.
    model: asked of every provider (default: each provider's own).
    temperature (0-2, default 0), max_tokens (default 512): passed on; max_tokens is reserved on
        the tenant's budgets.
    response_format: ``json`` (``json_object``, ``{"type": "json_object"}``) asks for any JSON
        and parses it into ``output["json"]``; ``text`` or absent: plain text.
    schema: a JSON Schema the answer must match (structured output, strict); ``output["json"]``
        is the validated value. ``schema_name``: its name (default ``answer``).
    tools: OpenAI tool definitions; the answer's calls are ``output["tool_calls"]``.
    tag: prefer providers carrying this tag (``planning``).
    base_url: use this OpenAI-compatible endpoint only (the SSRF guard applies; the deployment's
        key is sent only when it is one of the configured providers).
    timeout: seconds, capped by the step's timeout (shared by all providers tried).
    provider: seed 002's provider name; recorded in the trace, routing ignores it.

Output: ``{"content": str, "model": str, "provider": str, "usage": {"prompt_tokens",
"completion_tokens", "total_tokens", "estimated"}, "finish_reason": str | None, "json"?: Any,
"tool_calls"?: list}``.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from orchestrator_site.conf import conf

from .. import llm
from ..llm.providers import Provider, deployment_providers
from ..llm.router import complete as route
from ..llm.usage import record_attempt_usage
from ..redaction import known_secrets, redact
from ..registry import StepContext, StepDeferred, StepError, StepHandler, StepTimeout, is_expression, register

#: Characters of each message (and of the answer) kept in traces.
TRACE_CHARS = 500

#: max_tokens when a step sets none.
DEFAULT_MAX_TOKENS = 512


@register
class LlmHandler(StepHandler):
    """Ask the tenant's LLM providers through the router; see the module docstring."""

    type_name = "llm"
    aliases = ("ai",)
    enforces_timeout = True

    def validate_params(self, params: dict[str, Any]) -> None:
        """Check messages/prompt, sampling options, schema and tools. Raises ValueError."""
        super().validate_params(params)
        messages, prompt = params.get("messages"), params.get("prompt")
        if messages is None and prompt is None:
            raise ValueError("prompt or messages is required")
        if messages is not None and not is_expression(messages):
            if not isinstance(messages, list) or not messages:
                raise ValueError("messages must be a non-empty list")
            for index, message in enumerate(messages):
                if not isinstance(message, dict) or "role" not in message or "content" not in message:
                    raise ValueError(f"messages[{index}] must be a mapping with role and content")
        for name in ("prompt", "system", "model", "base_url", "tag", "schema_name"):
            value = params.get(name)
            if value is not None and not is_expression(value) and not isinstance(value, str):
                raise ValueError(f"{name} must be a string")
        base_url = params.get("base_url")
        if isinstance(base_url, str) and not is_expression(base_url):
            if urlsplit(base_url).scheme not in ("http", "https"):
                raise ValueError("base_url must be an http:// or https:// URL")
        temperature = params.get("temperature")
        if temperature is not None and not is_expression(temperature):
            if not _is_number(temperature) or not 0 <= temperature <= 2:
                raise ValueError("temperature must be a number between 0 and 2")
        max_tokens = params.get("max_tokens")
        if max_tokens is not None and not is_expression(max_tokens):
            cap = int(conf.llm_max_tokens_cap)
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= cap:
                raise ValueError(f"max_tokens must be an integer from 1 to {cap}")
        timeout = params.get("timeout")
        if timeout is not None and not is_expression(timeout):
            if not _is_number(timeout) or timeout <= 0:
                raise ValueError("timeout must be a positive number")
        fmt = params.get("response_format")
        if fmt is not None and not is_expression(fmt) and not isinstance(fmt, dict):
            if fmt not in ("json", "json_object", "text"):
                raise ValueError("response_format must be json, text or a mapping")
        schema = params.get("schema")
        if schema is not None and not is_expression(schema):
            from ..llm.structured import check_schema

            check_schema(schema, params.get("schema_name") or "answer")
        tools = params.get("tools")
        if tools is not None and not is_expression(tools):
            if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
                raise ValueError("tools must be a list of tool definitions (mappings)")

    def run(self, ctx: StepContext) -> Any:
        """One routed completion; see the module docstring."""
        p = ctx.params
        messages = _messages(p)
        cap = float(p["timeout"]) if p.get("timeout") is not None else None
        timeout = ctx.remaining(cap)
        if timeout <= 0:
            raise StepTimeout("no time left for the LLM call")
        schema, schema_name = p.get("schema"), p.get("schema_name")
        fmt = p.get("response_format")
        if schema is None and isinstance(fmt, dict) and isinstance(fmt.get("json_schema"), dict):
            # OpenAI's own response_format shape, as a workflow may copy it
            schema, schema_name = fmt["json_schema"].get("schema"), schema_name or fmt["json_schema"].get("name")
        request = {
            "model": p.get("model") or None,
            "max_tokens": int(p.get("max_tokens") or DEFAULT_MAX_TOKENS),
            "temperature": float(p.get("temperature") or 0.0),
            "schema_name": schema_name,
            "tag": p.get("tag"),
            "requested_provider": p.get("provider"),
            "messages": [_summary(m) for m in messages],
        }
        try:
            result = route(
                tenant_id=ctx.tenant_id or "default",
                messages=messages,
                schema=schema,
                schema_name=schema_name,
                tools=p.get("tools"),
                max_tokens=request["max_tokens"],
                temperature=request["temperature"],
                tag=p.get("tag"),
                model=request["model"],
                timeout=timeout,
                providers=_step_providers(p),
                json_mode=schema is None and _wants_json(p.get("response_format")),
            )
        except llm.BudgetWait as exc:
            self.trace(ctx, "llm", f"LLM call deferred: {exc.message}", {"request": request, "wait_s": exc.seconds})
            raise StepDeferred(exc.seconds, _clean(exc.message)) from None
        except llm.LLMSchemaError as exc:
            answered = exc.result
            if answered is not None:
                self._trace_attempts(ctx, request, answered.attempts, answered)
            output = _output(answered) if answered is not None else {"content": exc.content}
            raise StepError(_clean(f"LLM {exc.message}"), output=_redacted(output)) from None
        except llm.LLMError as exc:
            attempts = (exc.output or {}).get("attempts") if isinstance(exc.output, dict) else None
            self._trace_attempts(ctx, request, attempts or [], None)
            exc.message = _clean(exc.message)
            exc.args = (exc.message,)
            raise
        except ValueError as exc:  # arguments only known at run time (expressions)
            raise StepError(f"llm step: {exc}", permanent=True) from None
        self._trace_attempts(ctx, request, result.attempts, result)
        # the attempt's token usage (issue 6): provider, model, tokens, estimated
        usage = {**result.usage, "provider": result.provider, "model": result.model}
        record_attempt_usage(ctx.step_pk, ctx.attempt, usage)
        return _redacted(_output(result))

    def _trace_attempts(
        self, ctx: StepContext, request: dict[str, Any], attempts: list[dict[str, Any]], result: Any
    ) -> None:
        """One ``llm`` trace event per provider tried (the answer and usage on the one that answered)."""
        for entry in attempts:
            data: dict[str, Any] = {**entry, "request": request, "attempt": ctx.attempt}
            if entry.get("outcome") == "ok" and result is not None:
                data["response"] = {
                    "content": _cut(result.content),
                    "model": result.model,
                    "finish_reason": result.finish_reason,
                    "tool_calls": result.tool_calls[:10],
                }
                data["usage"] = result.usage
                message = f"LLM {result.model} at {entry['provider']} -> 200 in {entry.get('latency_ms', 0)} ms"
            else:
                message = f"LLM at {entry['provider']} -> {entry.get('error', entry.get('outcome'))}"
            self.trace(ctx, "llm", message, data)


def _step_providers(p: dict[str, Any]) -> list[Provider] | None:
    """A step's own ``base_url`` as its only provider (the key only for a configured one), else None."""
    base = p.get("base_url")
    if not base:
        return None
    base = str(base).strip()
    for provider in deployment_providers():
        if provider.base_url.rstrip("/") == base.rstrip("/"):
            return [provider]
    model = p.get("model") or conf.llm_model or "default"
    return [Provider(name="step", base_url=base, model=model, source="step")]


def _output(result: Any) -> dict[str, Any]:
    output: dict[str, Any] = {
        "content": result.content,
        "model": result.model,
        "provider": result.provider,
        "usage": result.usage,
        "finish_reason": result.finish_reason,
    }
    if result.parsed is not None:
        output["json"] = result.parsed
    if result.tool_calls:
        output["tool_calls"] = result.tool_calls
    return output


def _messages(p: dict[str, Any]) -> list[dict[str, Any]]:
    if p.get("messages") is not None:
        messages = p["messages"]
        if not isinstance(messages, list) or not messages:
            raise StepError("llm step: messages must be a non-empty list", permanent=True)
        return list(messages)
    messages = []
    if p.get("system"):
        messages.append({"role": "system", "content": str(p["system"])})
    prompt = p.get("prompt")
    messages.append({"role": "user", "content": prompt if isinstance(prompt, str) else json.dumps(prompt)})
    return messages


def _wants_json(fmt: Any) -> bool:
    if isinstance(fmt, dict):
        return fmt.get("type") == "json_object"
    return fmt in ("json", "json_object")


def _summary(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        return {"role": None, "content": _cut(message)}
    return {"role": message.get("role"), "content": _cut(message.get("content"))}


def _cut(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= TRACE_CHARS else text[:TRACE_CHARS] + f"... ({len(text)} chars)"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _clean(message: str) -> str:
    return redact(message, known_secrets())


def _redacted(value: Any) -> Any:
    return redact(value, known_secrets())
