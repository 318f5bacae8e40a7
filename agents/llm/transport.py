"""The HTTP client under the ``openai`` SDK: the SSRF guard plus a cap on the answer's size.

A provider's URL may be chosen by a tenant (``LLMProvider``) or a workflow (``base_url``), so its
answer is hostile input: the body is counted as it streams in and the read fails past
``ORCHESTRATOR_LLM_MAX_RESPONSE_BYTES`` (the SDK reports it as a connection error, so the router
fails over). Connections go through :class:`agents.netguard.GuardedTransport`. One client per
thread and process, like ``agents.httpclient.get_client``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import httpx

from orchestrator_site.conf import conf

from ..httpclient import USER_AGENT

__all__ = ["AnswerTooLarge", "get_llm_client"]

_local = threading.local()


class AnswerTooLarge(httpx.ReadError):
    """The provider's answer passed the size cap (an ``httpx.ReadError``: the SDK sees a failed read)."""


class _CappedStream(httpx.SyncByteStream):
    def __init__(self, stream: httpx.SyncByteStream, limit: int) -> None:
        self._stream = stream
        self._limit = limit

    def __iter__(self) -> Iterator[bytes]:
        total = 0
        for chunk in self._stream:
            total += len(chunk)
            if total > self._limit:
                raise AnswerTooLarge(f"answer larger than {self._limit} bytes (ORCHESTRATOR_LLM_MAX_RESPONSE_BYTES)")
            yield chunk

    def close(self) -> None:
        self._stream.close()


class CappedTransport(httpx.BaseTransport):
    """Wraps a transport so every response body is read through a byte counter."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        limit = int(conf.llm_max_response_bytes)
        response.stream = _CappedStream(response.stream, limit)  # type: ignore[arg-type]
        return response

    def close(self) -> None:
        self._inner.close()


def get_llm_client() -> httpx.Client:
    """The calling thread's client for LLM calls (created on first use, recreated after a fork)."""
    pid = os.getpid()
    client = getattr(_local, "client", None)
    if client is None or getattr(_local, "pid", None) != pid:
        from ..netguard import GuardedTransport

        client = httpx.Client(
            follow_redirects=False, headers={"User-Agent": USER_AGENT}, transport=CappedTransport(GuardedTransport())
        )
        _local.client = client
        _local.pid = pid
    return client
