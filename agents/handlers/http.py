"""``http`` steps (alias ``data``): call an agent endpoint or any HTTP API.

Agent endpoints follow seed 004's contract: ``Authorization: Bearer <service token>``,
``X-Idempotency-Key: <key stable across attempts>``, a JSON answer with ``ok: true|false``.

Params:
    url: absolute ``http(s)://`` URL; or
    call: a path joined to ``ORCHESTRATOR_AGENTS_BASE_URL`` (seed 004: ``/functions/v1/...``).
    method: default ``POST`` with ``call`` (seed 004) or a seed-002 data task, else ``GET``.
    headers: mapping of extra request headers.
    json / body: the JSON request body (``body`` given as a string is sent as raw text).
    params: mapping of query parameters.
    timeout: seconds (``timeout_ms``: milliseconds, seed 004), capped by the step's timeout.
    ok_field: field of a JSON object body whose value ``false`` means failure (default ``ok``;
        ``null``/``false`` disables the check).
    expect_json: a 2xx answer that is not JSON is a failure.
    follow_redirects: default false (a 3xx is then a permanent failure).
    credential: alias of a :class:`~agents.models.Credential` of the run's tenant, resolved and
        decrypted when the attempt runs (``agents.credentials.resolve``): bearer, basic, header
        or api key. It replaces the service token; its secret is masked in traces, errors,
        outputs and logs. Unknown alias, a host outside its ``allowed_hosts`` or an undecryptable
        secret are permanent failures.
    operation (with neither url nor call): a seed-002 data task; the params minus the ones above
        are POSTed as JSON to ``ORCHESTRATOR_DATA_SERVICE_URL``.

Output on success: ``{"status": int, "body": parsed JSON | text | None, "headers": {...}}``
(headers: the few listed in ``agents.httpclient.KEPT_RESPONSE_HEADERS``).

Failures (``StepError``, with ``http_status`` and the same shape as ``output``): non-2xx; a 2xx
JSON object with ``ok: false`` (transient); 4xx other than 408/429 and unfollowed 3xx are
permanent; 429/503 carry ``retry_after`` from ``Retry-After`` (RFC 9110 section 10.2.3);
connection errors are transient; timeouts raise ``StepTimeout``. A destination refused by the
SSRF guard (loopback, link-local, private ranges, also behind a redirect or a DNS name, unless on
``ORCHESTRATOR_HTTP_ALLOW_HOSTS``: ``agents.netguard``) is a permanent failure.

With ``ORCHESTRATOR_SERVICE_JWT_KEY`` set, the service credential is a short-lived signed JWT
naming the tenant, run, step and attempt (``agents.service_auth``) instead of the static token.
The service token is sent only to the configured agents base URL's origin (``call`` steps, and
``url`` steps pointing there) and to the data service: never to a URL a workflow chose freely.
"""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
from django.conf import settings

from orchestrator_site.conf import conf

from ..httpclient import (
    BodyTooLarge,
    Deadline,
    decode_body,
    duration_ms,
    get_client,
    kept_headers,
    parse_retry_after,
    read_body,
)
from ..netguard import BlockedAddress
from ..redaction import known_secrets, redact, redact_headers
from ..registry import StepContext, StepError, StepHandler, StepTimeout, is_expression, register

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
#: A credential alias (a slug, as ``agents.models.Credential.alias``).
_ALIAS = re.compile(r"[-a-zA-Z0-9_]+")

#: Params that shape the request; the others of a seed-002 data task form its body.
TRANSPORT_PARAMS = frozenset(
    {
        "url",
        "call",
        "method",
        "headers",
        "json",
        "body",
        "params",
        "timeout",
        "timeout_ms",
        "ok_field",
        "expect_json",
        "follow_redirects",
        "credential",
    }
)

#: Characters of an error body quoted in a failure message.
DETAIL_CHARS = 300


@register
class HttpHandler(StepHandler):
    """Make one HTTP request; see the module docstring for params, output and failures."""

    type_name = "http"
    aliases = ("data",)
    enforces_timeout = True

    def validate_params(self, params: dict[str, Any]) -> None:
        """Check url/call, method, headers, body, query, timeouts. Raises ValueError."""
        super().validate_params(params)
        url, call = params.get("url"), params.get("call")
        if url is not None and call is not None:
            raise ValueError("give either url or call, not both")
        if url is None and call is None and "operation" not in params:
            raise ValueError("url or call is required")
        if url is not None and not is_expression(url):
            if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
                raise ValueError("url must be an http:// or https:// URL")
        if call is not None and not is_expression(call):
            if not isinstance(call, str) or not call.strip():
                raise ValueError("call must be a path such as /functions/v1/agent")
            if "://" in call or call.startswith("//"):
                raise ValueError("call must be a path, not a URL (use url for a full URL)")
        method = params.get("method")
        if method is not None and not is_expression(method):
            if not isinstance(method, str) or method.upper() not in METHODS:
                raise ValueError(f"method must be one of {', '.join(sorted(METHODS))}")
        for name in ("headers", "params"):
            value = params.get(name)
            if value is not None and not is_expression(value) and not isinstance(value, dict):
                raise ValueError(f"{name} must be a mapping")
        if params.get("json") is not None and params.get("body") is not None:
            raise ValueError("give either json or body, not both")
        for name in ("timeout", "timeout_ms"):
            value = params.get(name)
            if value is not None and not is_expression(value):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ValueError(f"{name} must be a positive number")
        ok_field = params.get("ok_field", "ok")
        if ok_field not in (None, False) and not isinstance(ok_field, str):
            raise ValueError("ok_field must be a string or null")
        for name in ("expect_json", "follow_redirects"):
            value = params.get(name)
            if value is not None and not is_expression(value) and not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false")
        credential = params.get("credential")
        if credential is not None and not is_expression(credential):
            if not isinstance(credential, str) or not _ALIAS.fullmatch(credential):
                raise ValueError("credential must be a credential alias (letters, digits, '-' and '_')")

    def run(self, ctx: StepContext) -> Any:
        """Send the request and map the answer (see the module docstring)."""
        p = ctx.params
        url, default_method, body = self._target(p)
        shown = _display_url(url)
        method = str(p.get("method") or default_method).upper()
        headers = {str(k): str(v) for k, v in (p.get("headers") or {}).items() if v is not None}
        secret_query = self._apply_credential(p, headers, url, method, shown, ctx)
        self._add_standard_headers(headers, url, ctx)

        cap = _param_timeout(p)
        timeout = ctx.remaining(cap)
        if timeout <= 0:
            raise StepTimeout(f"{method} {shown}: no time left before the step's deadline")
        request: dict[str, Any] = {
            "headers": headers,
            "params": {**(p.get("params") or {}), **secret_query} or None,
            "timeout": timeout,
            # a credential is never carried along a redirect (it could lead to another host)
            "follow_redirects": bool(p.get("follow_redirects", False)) and not p.get("credential"),
        }
        if isinstance(body, (str, bytes)):
            request["content"] = body
        elif body is not None:
            request["json"] = body
        limit = int(conf.http_max_response_bytes)

        trace_data: dict[str, Any] = {
            "method": method,
            "url": shown,
            "query": p.get("params") or None,
            "request_headers": redact_headers(headers),
            "attempt": ctx.attempt,
        }
        if p.get("credential"):
            trace_data["credential"] = str(p["credential"])  # the alias, never the secret
        started = time.monotonic()
        try:
            with get_client().stream(method, url, **request) as response:
                content = read_body(response, limit, started + timeout)
        except (httpx.TimeoutException, Deadline) as exc:
            self._trace_error(ctx, trace_data, started, f"timed out after {timeout:.3g}s", exc)
            raise StepTimeout(_clean(f"{method} {shown}: timed out after {timeout:.3g}s")) from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL, httpx.TooManyRedirects, UnicodeEncodeError) as exc:
            self._trace_error(ctx, trace_data, started, "invalid request", exc)
            raise StepError(_clean(f"{method} {shown}: {_describe(exc)}"), permanent=True) from None
        except BodyTooLarge as exc:
            self._trace_error(ctx, trace_data, started, "response too large", exc)
            raise StepError(_clean(f"{method} {shown}: {exc}"), permanent=True) from None
        except BlockedAddress as exc:
            # SSRF guard (agents.netguard): the same URL will be refused again, do not retry.
            self._trace_error(ctx, trace_data, started, "refused by the SSRF guard", exc)
            raise StepError(_clean(f"{method} {shown}: {exc}"), permanent=True) from None
        except httpx.HTTPError as exc:
            self._trace_error(ctx, trace_data, started, "connection error", exc)
            raise StepError(_clean(f"{method} {shown}: {_describe(exc)}")) from None

        status = response.status_code
        content_type = response.headers.get("content-type", "")
        parsed, is_json = decode_body(content, content_type, bool(p.get("expect_json")))
        output = redact(
            {"status": status, "body": parsed, "headers": kept_headers(response.headers)},
            known_secrets(),
        )
        elapsed = duration_ms(started)
        trace_data.update(status=status, duration_ms=elapsed, response_headers=output["headers"], bytes=len(content))
        failure = self._failure(p, method, shown, status, response, parsed, is_json, output)
        if failure is not None:
            trace_data["error"] = failure.message
            trace_data["response_excerpt"] = _excerpt(parsed)
        self.trace(ctx, "http", f"{method} {shown} -> {status} in {elapsed} ms", trace_data)
        if failure is not None:
            raise failure
        return output

    # -- helpers -------------------------------------------------------------------------------

    def _target(self, p: dict[str, Any]) -> tuple[str, str, Any]:
        """``(url, default method, body)`` for the params; permanent StepError when unusable."""
        body = p["json"] if p.get("json") is not None else p.get("body")
        if p.get("url") is not None:
            return str(p["url"]), "GET", body
        if p.get("call") is not None:
            base = conf.agents_base_url or ""
            if not base:
                raise StepError("call needs a base URL: set ORCHESTRATOR_AGENTS_BASE_URL", permanent=True)
            return _join(base, str(p["call"])), "POST", body
        data_url = conf.data_service_url or ""
        if not data_url:
            raise StepError("data task without url or call: set ORCHESTRATOR_DATA_SERVICE_URL", permanent=True)
        if body is None:
            body = {k: v for k, v in p.items() if k not in TRANSPORT_PARAMS}
        return data_url, "POST", body

    def _apply_credential(
        self, p: dict[str, Any], headers: dict[str, str], url: str, method: str, shown: str, ctx: StepContext
    ) -> dict[str, str]:
        """Add the step's ``credential`` to ``headers``; return its query parameters (secret).

        Raises a permanent StepError when the credential cannot be used (one line, no secret).
        """
        alias = p.get("credential")
        if alias is None or alias == "":
            return {}
        from ..credentials import CredentialError, resolve

        try:
            resolved = resolve(ctx.tenant_id or "default", str(alias), url)
        except CredentialError as exc:
            self.trace(ctx, "http", f"{method} {shown}: {exc}", {"credential": str(alias), "error": str(exc)})
            raise StepError(_clean(f"{method} {shown}: {exc}"), permanent=True) from None
        lowered = {name.lower(): name for name in headers}
        for name, value in resolved.headers.items():
            headers.pop(lowered.get(name.lower(), name), None)
            headers[name] = value
        return dict(resolved.query)

    def _add_standard_headers(self, headers: dict[str, str], url: str, ctx: StepContext) -> None:
        """Service credential (trusted origins only), idempotency key and correlation id.

        The service credential is a signed JWT for this attempt when ``ORCHESTRATOR_SERVICE_JWT_KEY``
        is set (``agents.service_auth``), else the static ``ORCHESTRATOR_SERVICE_TOKEN``; a step's
        own ``Authorization`` header or credential wins.
        """
        present = {name.lower() for name in headers}
        if "authorization" not in present and _trusted(url):
            from .. import service_auth

            if service_auth.enabled():
                token = service_auth.mint(
                    tenant_id=ctx.tenant_id,
                    run_id=ctx.run_id,
                    step_id=ctx.step_id,
                    attempt=ctx.attempt,
                    idempotency_key=ctx.idempotency_key,
                )
            else:
                token = conf.service_token or ""
            if token:
                headers["Authorization"] = f"Bearer {token}"
        if ctx.idempotency_key and "x-idempotency-key" not in present:
            headers["X-Idempotency-Key"] = ctx.idempotency_key
        if ctx.correlation_id and "x-correlation-id" not in present:
            headers["X-Correlation-Id"] = ctx.correlation_id

    def _failure(
        self,
        p: dict[str, Any],
        method: str,
        url: str,
        status: int,
        response: httpx.Response,
        parsed: Any,
        is_json: bool,
        output: dict[str, Any],
    ) -> StepError | None:
        """The StepError this answer amounts to, or None when it is a success."""
        where = f"{method} {url} -> {status}"
        if 200 <= status < 300:
            if p.get("expect_json") and not is_json:
                content_type = response.headers.get("content-type", "no content type")
                return StepError(
                    _clean(f"{where}: expected a JSON body, got {content_type}"),
                    http_status=status,
                    output=output,
                )
            ok_field = p.get("ok_field", "ok")
            if ok_field and isinstance(parsed, dict) and parsed.get(ok_field) is False:
                detail = _detail(parsed)
                return StepError(
                    _clean(f"{where} with {ok_field}: false" + (f": {detail}" if detail else "")),
                    http_status=status,
                    output=output,
                )
            return None
        retry_after = None
        if status in (429, 503):
            retry_after = parse_retry_after(response.headers.get("retry-after"))
        permanent = 300 <= status < 400 or (400 <= status < 500 and status not in (408, 429))
        detail = _detail(parsed)
        message = f"{where} {response.reason_phrase}".rstrip()
        if 300 <= status < 400:
            detail = f"redirect to {response.headers.get('location', '?')} not followed"
        if detail:
            message += f": {detail}"
        return StepError(
            _clean(message),
            permanent=permanent,
            retry_after=retry_after,
            http_status=status,
            output=output,
        )

    def _trace_error(
        self,
        ctx: StepContext,
        data: dict[str, Any],
        started: float,
        what: str,
        exc: BaseException,
    ) -> None:
        elapsed = duration_ms(started)
        data.update(status=None, duration_ms=elapsed, error=_describe(exc))
        self.trace(ctx, "http", f"{data['method']} {data['url']} -> {what} in {elapsed} ms", data)


def _join(base: str, path: str) -> str:
    """``base`` + ``path`` with exactly one slash between (the base's own path is kept)."""
    return base.rstrip("/") + "/" + path.lstrip("/")


def _display_url(url: str) -> str:
    """``url`` for messages and traces: a password in its userinfo is masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}"
    return parts._replace(netloc=netloc).geturl()


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def _trusted(url: str) -> bool:
    """True when ``url`` has the origin of the agents base URL or of the data service URL."""
    origin = _origin(url)
    for name in ("ORCHESTRATOR_AGENTS_BASE_URL", "ORCHESTRATOR_DATA_SERVICE_URL"):
        configured = getattr(settings, name, "") or ""
        if configured and _origin(configured) == origin:
            return True
    return False


def _param_timeout(p: dict[str, Any]) -> float | None:
    """The params' own timeout in seconds (``timeout`` s, else ``timeout_ms`` ms), or None."""
    if p.get("timeout") is not None:
        return float(p["timeout"])
    if p.get("timeout_ms") is not None:
        return float(p["timeout_ms"]) / 1000.0
    return None


def _detail(parsed: Any) -> str:
    """A short explanation taken from an error body (its error/message/detail field or text)."""
    if isinstance(parsed, dict):
        for key in ("error", "message", "detail", "error_description"):
            value = parsed.get(key)
            if value:
                text = value if isinstance(value, str) else str(value)
                return _one_line(text)
        return ""
    if isinstance(parsed, str):
        return _one_line(parsed)
    return ""


def _excerpt(parsed: Any) -> str:
    text = parsed if isinstance(parsed, str) else repr(parsed)
    return text[:1000]


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line[:DETAIL_CHARS] + ("..." if len(line) > DETAIL_CHARS else "")


def _describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {_one_line(text)}"


def _clean(message: str) -> str:
    """A failure message with the known secrets masked."""
    return redact(message, known_secrets())
