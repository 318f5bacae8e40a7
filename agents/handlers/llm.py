"""``llm`` steps (alias ``ai``): one OpenAI-compatible chat completion, with provider fallback.

Providers (seed 000's router: the local endpoint first, then fallbacks): ``params.base_url`` when
given, else ``ORCHESTRATOR_LLM_BASE_URL`` followed by each of ``ORCHESTRATOR_LLM_FALLBACK_URLS``.
A base URL is the API root (``http://127.0.0.1:8000/v1``); ``/chat/completions`` is appended
unless already there. The next provider is tried after a connection error, a timeout, a 5xx, a
429 or an unreadable answer; any other 4xx is a permanent failure (the request itself is wrong).
``ORCHESTRATOR_LLM_API_KEY`` is sent as a Bearer token to the configured providers only (not to a
``params.base_url`` that is not one of them).

Params:
    messages: list of ``{"role", "content"}``; or
    prompt: one user message, with an optional ``system`` message before it.
    model: default ``ORCHESTRATOR_LLM_MODEL``.
    temperature, max_tokens, top_p, stop, seed: passed through.
    response_format: ``json`` (or ``json_object``, or ``{"type": "json_object"}``) asks for JSON
        and parses the answer (a fenced ```json block is accepted) into ``output["json"]``;
        ``text`` or absent: plain text; any other mapping is passed through.
    base_url: use this provider only.
    timeout: seconds, capped by the step's timeout (shared by all providers tried).
    provider: seed 002's provider name; recorded in the trace, routing ignores it.

Output: ``{"content": str, "model": str, "provider": base URL, "usage": {...},
"finish_reason": str | None, "json": Any}`` (``json`` only when JSON was asked for).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
from django.conf import settings

from ..httpclient import (
    BodyTooLarge,
    Deadline,
    decode_body,
    duration_ms,
    get_client,
    parse_retry_after,
    read_body,
)
from ..redaction import known_secrets, redact
from ..registry import StepContext, StepError, StepHandler, StepTimeout, is_expression, register

#: Characters of each message (and of the answer) kept in traces.
TRACE_CHARS = 500

#: Largest chat-completions answer read, bytes.
MAX_RESPONSE_BYTES = 20_000_000

_PASSTHROUGH = ("temperature", "max_tokens", "top_p", "stop", "seed")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?\s*```$", re.S)


@register
class LlmHandler(StepHandler):
    """Ask an OpenAI-compatible endpoint; see the module docstring."""

    type_name = "llm"
    aliases = ("ai",)
    enforces_timeout = True

    def validate_params(self, params: dict[str, Any]) -> None:
        """Check messages/prompt and the sampling options. Raises ValueError."""
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
        for name in ("prompt", "system", "model", "base_url"):
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
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise ValueError("max_tokens must be a positive integer")
        timeout = params.get("timeout")
        if timeout is not None and not is_expression(timeout):
            if not _is_number(timeout) or timeout <= 0:
                raise ValueError("timeout must be a positive number")
        fmt = params.get("response_format")
        if fmt is not None and not is_expression(fmt) and not isinstance(fmt, dict):
            if fmt not in ("json", "json_object", "text"):
                raise ValueError("response_format must be json, text or a mapping")

    def run(self, ctx: StepContext) -> Any:
        """Try each provider in turn; return the first answer (see the module docstring)."""
        p = ctx.params
        providers = _providers(p)
        if not providers:
            raise StepError("no LLM endpoint configured (set ORCHESTRATOR_LLM_BASE_URL)", permanent=True)
        want_json = _wants_json(p.get("response_format"))
        payload: dict[str, Any] = {
            "model": p.get("model") or getattr(settings, "ORCHESTRATOR_LLM_MODEL", "default"),
            "messages": _messages(p),
        }
        for name in _PASSTHROUGH:
            if p.get(name) is not None:
                payload[name] = p[name]
        fmt = p.get("response_format")
        if want_json:
            payload["response_format"] = {"type": "json_object"}
        elif isinstance(fmt, dict):
            payload["response_format"] = fmt
        cap = float(p["timeout"]) if p.get("timeout") is not None else None
        api_key = getattr(settings, "ORCHESTRATOR_LLM_API_KEY", "") or ""

        failures: list[str] = []
        retry_after: float | None = None
        timed_out = True
        for base, send_key in providers:
            timeout = ctx.remaining(cap)
            if timeout <= 0:
                failures.append(f"{base}: no time left")
                break
            endpoint = _endpoint(base)
            headers = {"Accept": "application/json"}
            if api_key and send_key:
                headers["Authorization"] = f"Bearer {api_key}"
            trace_data: dict[str, Any] = {
                "provider": base,
                "endpoint": endpoint,
                "requested_provider": p.get("provider"),
                "request": _request_summary(payload),
                "attempt": ctx.attempt,
            }
            started = time.monotonic()
            try:
                with get_client().stream("POST", endpoint, json=payload, headers=headers, timeout=timeout) as response:
                    content = read_body(response, MAX_RESPONSE_BYTES, started + timeout)
            except (httpx.TimeoutException, Deadline):
                failures.append(self._skip(ctx, trace_data, started, f"timed out after {timeout:.3g}s"))
                continue
            except (httpx.HTTPError, httpx.InvalidURL, BodyTooLarge) as exc:
                timed_out = False
                failures.append(self._skip(ctx, trace_data, started, _describe(exc)))
                continue
            timed_out = False

            status = response.status_code
            parsed, _ = decode_body(content, response.headers.get("content-type", ""), True)
            trace_data.update(status=status)
            if status == 429 or status >= 500:
                if status in (429, 503):
                    asked = parse_retry_after(response.headers.get("retry-after"))
                    if asked is not None:
                        retry_after = max(retry_after or 0.0, asked)
                failures.append(self._skip(ctx, trace_data, started, f"HTTP {status}", parsed))
                continue
            if status >= 300:
                reason = f"HTTP {status}: {_error_detail(parsed)}".rstrip(": ")
                self._skip(ctx, trace_data, started, reason, parsed)
                raise StepError(
                    _clean(f"LLM request refused by {base}: {reason}"),
                    permanent=True,
                    http_status=status,
                )
            answer = _answer(parsed)
            if answer is None:
                failures.append(self._skip(ctx, trace_data, started, "malformed answer", parsed))
                continue

            text, finish_reason = answer
            output: dict[str, Any] = {
                "content": text,
                "model": (parsed.get("model") if isinstance(parsed, dict) else None) or payload["model"],
                "provider": base,
                "usage": (parsed.get("usage") if isinstance(parsed, dict) else None) or {},
                "finish_reason": finish_reason,
            }
            elapsed = duration_ms(started)
            trace_data.update(
                duration_ms=elapsed,
                response={
                    "content": text[:TRACE_CHARS],
                    "model": output["model"],
                    "usage": output["usage"],
                    "finish_reason": finish_reason,
                },
            )
            self.trace(ctx, "llm", f"LLM {output['model']} at {base} -> {status} in {elapsed} ms", trace_data)
            output = redact(output, known_secrets())
            if want_json:
                try:
                    output["json"] = _parse_json(output["content"])
                except ValueError as exc:
                    raise StepError(f"LLM answer is not valid JSON: {exc}", output=output) from None
            return output

        message = _clean("all LLM providers failed: " + "; ".join(failures))
        if timed_out:
            raise StepTimeout(message)
        raise StepError(message, retry_after=retry_after)

    def _skip(
        self,
        ctx: StepContext,
        data: dict[str, Any],
        started: float,
        reason: str,
        parsed: Any = None,
    ) -> str:
        """Trace a failed provider and return ``"<base>: <reason>"`` for the final message."""
        elapsed = duration_ms(started)
        data.update(duration_ms=elapsed, error=reason)
        if parsed is not None:
            data["response_excerpt"] = (parsed if isinstance(parsed, str) else repr(parsed))[:TRACE_CHARS]
        self.trace(ctx, "llm", f"LLM at {data['provider']} -> {reason} in {elapsed} ms", data)
        return f"{data['provider']}: {reason}"


def _providers(p: dict[str, Any]) -> list[tuple[str, bool]]:
    """``[(base_url, send the API key?)]`` in the order to try."""
    configured = [getattr(settings, "ORCHESTRATOR_LLM_BASE_URL", "") or ""]
    configured += list(getattr(settings, "ORCHESTRATOR_LLM_FALLBACK_URLS", None) or [])
    configured = [url.strip() for url in configured if url and url.strip()]
    if p.get("base_url"):
        base = str(p["base_url"]).strip()
        known = {url.rstrip("/") for url in configured}
        return [(base, base.rstrip("/") in known)]
    # dict.fromkeys: drop duplicates, keep the order.
    return [(url, True) for url in dict.fromkeys(configured)]


def _endpoint(base: str) -> str:
    base = base.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


def _messages(p: dict[str, Any]) -> list[dict[str, Any]]:
    if p.get("messages") is not None:
        return list(p["messages"])
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


def _request_summary(payload: dict[str, Any]) -> dict[str, Any]:
    """The request for a trace: every message's content cut to ``TRACE_CHARS`` characters."""
    summary = {k: v for k, v in payload.items() if k != "messages"}
    summary["messages"] = [
        {
            "role": m.get("role") if isinstance(m, dict) else None,
            "content": _cut(m.get("content") if isinstance(m, dict) else m),
        }
        for m in payload["messages"]
    ]
    return summary


def _cut(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= TRACE_CHARS else text[:TRACE_CHARS] + f"... ({len(text)} chars)"


def _answer(parsed: Any) -> tuple[str, str | None] | None:
    """``(content, finish_reason)`` of the first choice, or None when the shape is wrong."""
    try:
        choice = parsed["choices"][0]
        content = choice["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    if isinstance(content, list):  # content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return (content if isinstance(content, str) else ""), choice.get("finish_reason")


def _parse_json(text: str) -> Any:
    """Parse an answer as JSON, accepting a fenced ```json block. Raises ValueError."""
    stripped = text.strip()
    match = _FENCE.match(stripped)
    if match:
        stripped = match.group(1).strip()
    try:
        return json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None


def _error_detail(parsed: Any) -> str:
    if isinstance(parsed, dict):
        error = parsed.get("error") or parsed.get("message") or parsed.get("detail")
        if isinstance(error, dict):
            error = error.get("message") or error
        return " ".join(str(error or "").split())[:300]
    if isinstance(parsed, str):
        return " ".join(parsed.split())[:300]
    return ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(exc: BaseException) -> str:
    text = " ".join((str(exc) or repr(exc)).split())[:300]
    return f"{type(exc).__name__}: {text}"


def _clean(message: str) -> str:
    return redact(message, known_secrets())
