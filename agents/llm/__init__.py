"""The LLM router: one call, many OpenAI-compatible providers, budgets and structured output.

Public interface (other apps and the ``llm`` step handler use only this)::

    from agents import llm

    result = llm.complete(
        tenant_id="acme",
        messages=[{"role": "user", "content": "..."}],
        schema={...}, schema_name="workflow",   # optional: JSON answer validated against it
        tools=None,                             # optional: OpenAI "tools" list
        max_tokens=512, temperature=0.0,
        tag="planning",                         # optional: prefer providers carrying this tag
        model=None,                             # optional: override every provider's model
        timeout=None,                           # optional: seconds for the whole call (all providers)
    )
    result.content, result.parsed, result.tool_calls, result.provider, result.model,
    result.usage, result.latency_ms

Providers (``agents.llm.providers``): the deployment's (settings ``LLM_BASE_URL``/``LLM_MODEL``,
``ORCHESTRATOR_LLM_*`` aliases, fallbacks, Gemini through its OpenAI-compatible endpoint) and the
tenant's own :class:`agents.models.LLMProvider` rows, ordered by priority (lower first; a loopback
URL is priority 0 and tagged ``planning``). Each is called through the ``openai`` SDK with
``max_retries=0`` (retries belong to steps). The router fails over to the next provider on a
connection error, a timeout, a 5xx, a 429 (Retry-After kept) and a context-length error; any other
4xx is permanent. A circuit breaker per provider, shared by all workers through the database
(``agents.llm.breaker``), skips a provider that keeps failing for a cool-down.

Budgets (``agents.llm.budgets``): the tenant's :class:`agents.models.TokenBudget` rows are charged
``max_tokens`` before the call (one conditional UPDATE per budget) and settled to the real usage
after it (released on failure).

Errors: :class:`LLMError` (a StepError; ``permanent`` says whether retrying helps),
:class:`LLMSchemaError`, :class:`BudgetExceeded`, :class:`BudgetWait`. See /work/notes or README.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import BudgetExceeded, BudgetWait, LLMError, LLMSchemaError, LLMTimeout

__all__ = [
    "BudgetExceeded",
    "BudgetWait",
    "LLMError",
    "LLMResult",
    "LLMSchemaError",
    "LLMTimeout",
    "complete",
]


@dataclass
class LLMResult:
    """The answer of one successful call.

    Attributes:
        content: the assistant message's text ("" when it only called tools).
        parsed: the JSON answer, validated against ``schema``, when a schema was given; else None.
        tool_calls: ``[{"id": str, "type": "function", "function": {"name": str, "arguments": str}}]``
            as the provider sent them (arguments are a JSON string, not parsed).
        provider: the provider's name (``local``, ``gemini``, ``fallback-1``, or the tenant's
            LLMProvider name).
        model: the model that answered (as the provider reported it, else the one asked).
        usage: ``{"prompt_tokens": int, "completion_tokens": int, "total_tokens": int,
            "estimated": bool}``; ``estimated`` is True when the provider gave no usage and the
            numbers are counted from the text (about 4 characters per token).
        latency_ms: milliseconds from sending the request to the answer of the provider that
            answered (providers that failed before it are not counted).
        finish_reason: the choice's finish reason (``stop``, ``length``, ``tool_calls``) or None.
        attempts: one entry per provider tried, in order:
            ``{"provider", "model", "outcome": "ok"|"error"|"skipped", "error"?, "status"?, "latency_ms"}``.
    """

    content: str
    parsed: Any
    tool_calls: list[dict[str, Any]]
    provider: str
    model: str
    usage: dict[str, Any]
    latency_ms: int
    finish_reason: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serializable copy (step outputs, traces, generation jobs)."""
        return {
            "content": self.content,
            "parsed": self.parsed,
            "tool_calls": self.tool_calls,
            "provider": self.provider,
            "model": self.model,
            "usage": dict(self.usage),
            "latency_ms": self.latency_ms,
            "finish_reason": self.finish_reason,
        }


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
    kind_schemas: Mapping[str, dict[str, Any]] | None = None,
) -> LLMResult:
    """One chat completion through the tenant's providers, with failover, budget and schema.

    Args:
        tenant_id: the tenant's slug; selects its LLMProvider rows and its TokenBudget rows.
        messages: OpenAI chat messages (``{"role", "content"}``, tool messages too).
        schema: a JSON Schema the answer must satisfy; sent as ``response_format`` json_schema
            (``strict: true``), or ``{"type": "json_object", "schema": ...}`` to llama.cpp servers;
            the answer is parsed and validated with ``jsonschema`` into ``LLMResult.parsed``.
        schema_name: the json_schema ``name`` (``[a-zA-Z0-9_-]``, at most 64); default ``answer``.
        tools: OpenAI ``tools`` (function definitions); calls come back in ``LLMResult.tool_calls``.
        max_tokens: completion tokens asked for and reserved on the budget (1 to
            ``ORCHESTRATOR_LLM_MAX_TOKENS_CAP``).
        temperature: 0 to 2.
        tag: providers carrying this tag are tried first (the others after them, as fallbacks).
        model: the model asked of every provider (default: each provider's own).
        timeout: seconds for the whole call across providers (default ``ORCHESTRATOR_LLM_TIMEOUT``).
        kind_schemas: ``{provider kind: JSON Schema}`` sent instead of ``schema`` to providers of
            that kind (e.g. a tighter one for ``llamacpp`` servers, whose grammar can rule out
            more than OpenAI's strict mode accepts); the answer is validated against the schema
            its provider was sent. Needs ``schema``.

    Returns:
        LLMResult.

    Raises:
        ValueError: bad arguments (programming error, not a provider problem).
        LLMError: no provider configured (permanent, code ``no_provider``); a provider refused the
            request with a 4xx (permanent, code ``refused``, ``http_status`` set); every provider
            failed (transient, code ``unavailable``/``timeout``); every provider throttled
            (transient, code ``throttled``, ``retry_after`` = smallest Retry-After in seconds).
        LLMSchemaError: the answer is not valid JSON or does not validate (transient).
        BudgetExceeded: a budget with policy ``fail`` cannot cover ``max_tokens`` (permanent).
        BudgetWait: a budget with policy ``wait`` cannot cover it now (``seconds`` to the reset).
    """
    from .router import complete as _complete

    return _complete(
        tenant_id=tenant_id,
        messages=messages,
        schema=schema,
        schema_name=schema_name,
        tools=tools,
        max_tokens=max_tokens,
        temperature=temperature,
        tag=tag,
        model=model,
        timeout=timeout,
        kind_schemas=kind_schemas,
    )
