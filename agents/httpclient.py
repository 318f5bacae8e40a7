"""HTTP plumbing shared by the ``http`` and ``llm`` handlers.

One ``httpx.Client`` per thread (connection pooling without sharing a client across threads or
across a fork), a bounded body reader, and ``Retry-After`` parsing (RFC 9110 section 10.2.3).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import os
import threading
import time
from typing import Any

import httpx

#: Sent on every outgoing call.
USER_AGENT = "orchestrator-agents/1.0 (+https://github.com/encode/httpx)"

#: Response headers copied into step outputs and traces (lower case).
KEPT_RESPONSE_HEADERS = (
    "content-type",
    "content-length",
    "location",
    "etag",
    "last-modified",
    "retry-after",
    "x-request-id",
    "x-correlation-id",
    "x-idempotency-key",
)

_local = threading.local()


def get_client() -> httpx.Client:
    """The calling thread's ``httpx.Client`` (created on first use, recreated after a fork).

    Timeouts, headers and ``follow_redirects`` are given per request, so one client serves
    every handler in the thread. Its transport is ``agents.netguard.GuardedTransport``: a
    connection to a loopback, link-local or private address not on ``ORCHESTRATOR_HTTP_ALLOW_HOSTS``
    raises ``agents.netguard.BlockedAddress``.
    """
    pid = os.getpid()
    client = getattr(_local, "client", None)
    if client is None or getattr(_local, "pid", None) != pid:
        from .netguard import GuardedTransport

        # Every connection, redirects included, passes the SSRF guard (agents.netguard).
        client = httpx.Client(follow_redirects=False, headers={"User-Agent": USER_AGENT}, transport=GuardedTransport())
        _local.client = client
        _local.pid = pid
    return client


class BodyTooLarge(Exception):
    """The response body is larger than the limit given to :func:`read_body`."""


class Deadline(Exception):
    """The deadline passed while the response body was still arriving."""


def read_body(response: httpx.Response, limit: int, deadline: float) -> bytes:
    """Read a streamed response body of at most ``limit`` bytes before ``deadline``.

    ``deadline`` is a ``time.monotonic()`` value; checked between chunks so a server that drips
    bytes slower than the read timeout still cannot hold the step past its deadline.

    Raises:
        BodyTooLarge: more than ``limit`` bytes arrived.
        Deadline: the deadline passed mid-body.
    """
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"response body larger than {limit} bytes")
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise Deadline("deadline passed while reading the response body")
    return b"".join(chunks)


def decode_body(content: bytes, content_type: str, force_json: bool = False) -> tuple[Any, bool]:
    """Decode a body: ``(parsed JSON, True)`` when it is JSON, else ``(text, False)``.

    A body is tried as JSON when its Content-Type mentions json, when ``force_json`` is set, or
    when it looks like a JSON object or array. An empty body is ``(None, False)``.
    """
    if not content:
        return None, False
    text = content.decode(_charset(content_type), errors="replace")
    stripped = text.lstrip()
    if force_json or "json" in content_type.lower() or stripped[:1] in ("{", "["):
        try:
            return json.loads(text), True
        except ValueError:
            pass
    return text, False


def _charset(content_type: str) -> str:
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "charset" and value:
            charset = value.strip("\"' ")
            try:
                "".encode(charset)
            except LookupError:
                break
            return charset
    return "utf-8"


def kept_headers(headers: httpx.Headers) -> dict[str, str]:
    """The few response headers worth keeping (see ``KEPT_RESPONSE_HEADERS``), lower-cased."""
    return {name: headers[name] for name in KEPT_RESPONSE_HEADERS if name in headers}


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value, or None when absent or invalid.

    RFC 9110 section 10.2.3: either delay-seconds (a non-negative integer) or an HTTP-date
    (``Wed, 21 Oct 2015 07:28:00 GMT``); a date in the past gives 0. ``now`` is for tests.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = now or dt.datetime.now(dt.UTC)
    return max(0.0, (when - now).total_seconds())


def duration_ms(started: float) -> int:
    """Milliseconds elapsed since ``started`` (a ``time.monotonic()`` value)."""
    return int(round((time.monotonic() - started) * 1000))
