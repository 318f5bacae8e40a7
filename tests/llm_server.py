"""A scripted OpenAI-compatible chat-completions server for deterministic LLM tests.

A small threaded ``http.server`` on 127.0.0.1 (a free port) that answers
``POST /v1/chat/completions`` (and ``GET /v1/models``) from a script the test writes. It runs in
the test process, so a real Celery worker process can call it while the test scripts it.

Usage::

    server = ScriptedLLM().start()          # or the ``llm_server`` fixture (tests/conftest.py)
    server.url                              # "http://127.0.0.1:<port>/v1": an LLM base URL
    server.script("plain text answer")      # answers consumed one per request, in order
    server.script({"key": "w"}, schema="workflow")   # only for requests whose json_schema name is "workflow"
    server.script(Reply.rate_limited(retry_after=3), Reply.server_error(), Reply.context_length())
    server.script(Reply.tool_call("lookup", {"q": "x"}))
    server.responder = lambda body: Reply(content="...")   # computed answers (runs when no script matches)
    server.requests                         # every request body received (dicts), in order
    server.reset()                          # forget scripts, responder and requests

An answer is a :class:`Reply`, a ``str`` (the content) or any other JSON value (sent as its JSON
text, as a model answering with JSON would). Scripts are looked up by the request's
``response_format.json_schema.name`` first, then the default script (``schema=None``); when both are
empty the ``responder`` runs, else the server echoes the last user message (``"echo: <text>"``).
``usage`` is included in every answer (counted from the text, 4 characters a token, unless the
Reply sets it; ``Reply(usage=None)`` leaves it out, as some servers do). ``"stream": true``
requests get server-sent events with the usage in the last chunk.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Reply", "ScriptedLLM"]

_UNSET: Any = object()


class _Server(ThreadingHTTPServer):
    """A thread per connection, and a listen backlog for a burst of clients: the standard
    library's 5 can overflow under a test's 50 simultaneous calls (a fresh-clone run of
    tests/test_llm_budgets.py saw one connection reset by peer)."""

    request_queue_size = 128


@dataclass
class Reply:
    """One scripted answer.

    Attributes:
        content: the assistant's text (None with tool calls only).
        tool_calls: ``[{"name": str, "arguments": dict | str}]`` (ids are made up).
        status: HTTP status; non-2xx answers send ``error`` as the body.
        headers: extra response headers (``Retry-After``).
        usage: the usage object; unset: counted from the text; None: left out.
        error: the error body for non-2xx answers (``{"error": {...}}``).
        delay: seconds to wait before answering (timeouts).
        model: the model named in the answer (default: the one asked).
        finish_reason: default ``stop`` (``tool_calls`` with tool calls).
    """

    content: str | None = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    usage: Any = _UNSET
    error: Any = None
    delay: float = 0.0
    model: str | None = None
    finish_reason: str | None = None

    @classmethod
    def rate_limited(cls, retry_after: float | str | None = 1) -> Reply:
        """A 429 with ``Retry-After: <retry_after>`` (seconds or an HTTP date; None: no header)."""
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        return cls(status=429, headers=headers, error=_error("Rate limit reached", "rate_limit_exceeded", "requests"))

    @classmethod
    def server_error(cls, status: int = 500) -> Reply:
        """A 5xx answer."""
        return cls(status=status, error=_error("The server had an error", None, "server_error"))

    @classmethod
    def context_length(cls) -> Reply:
        """OpenAI's 400 for a prompt longer than the model's context."""
        return cls(
            status=400,
            error=_error(
                "This model's maximum context length is 4096 tokens. However, your messages resulted in 9000 tokens.",
                "context_length_exceeded",
                "invalid_request_error",
            ),
        )

    @classmethod
    def bad_request(cls, message: str = "Invalid request") -> Reply:
        """A plain 400 (not retryable, no failover)."""
        return cls(status=400, error=_error(message, None, "invalid_request_error"))

    @classmethod
    def tool_call(cls, name: str, arguments: dict[str, Any] | str, content: str | None = None) -> Reply:
        """An answer calling one tool."""
        return cls(content=content, tool_calls=[{"name": name, "arguments": arguments}])


def _error(message: str, code: str | None, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


class ScriptedLLM:
    """The server; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.scripts: dict[str | None, list[Any]] = {}
        self.responder: Callable[[dict[str, Any]], Any] | None = None
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._json(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})
                else:
                    self._json(404, _error("not found", None, "not_found"))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    self._json(400, _error("body is not JSON", None, "invalid_request_error"))
                    return
                if not self.path.split("?", 1)[0].rstrip("/").endswith("/chat/completions"):
                    self._json(404, _error("not found", None, "not_found"))
                    return
                reply = server._next(body, dict(self.headers.items()))
                if reply.delay:
                    time.sleep(reply.delay)
                if not 200 <= reply.status < 300:
                    self._json(reply.status, reply.error or {"error": {"message": "error"}}, reply.headers)
                    return
                answer = server._completion(body, reply)
                if body.get("stream"):
                    self._stream(answer, reply.headers)
                else:
                    self._json(200, answer, reply.headers)

            def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, answer: dict[str, Any], headers: dict[str, str]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                message = answer["choices"][0]["message"]
                text = message.get("content") or ""
                base = {k: answer[k] for k in ("id", "object", "created", "model")}
                base["object"] = "chat.completion.chunk"
                pieces = [text[i : i + 8] for i in range(0, len(text), 8)] or [""]
                for index, piece in enumerate(pieces):
                    delta = {"content": piece}
                    if index == 0:
                        delta["role"] = "assistant"
                    chunk = dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": None}])
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                last = dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])
                if "usage" in answer:
                    last["usage"] = answer["usage"]
                self.wfile.write(f"data: {json.dumps(last)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True

        self.httpd = _Server((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        #: The base URL to configure as an LLM provider (the API root, ``/v1``).
        self.url = f"http://{host}:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> ScriptedLLM:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def reset(self) -> None:
        """Forget every script, the responder and the recorded requests."""
        with self.lock:
            self.requests.clear()
            self.headers.clear()
            self.scripts.clear()
            self.responder = None

    # --- scripting ---------------------------------------------------------------------------
    def script(self, *answers: Any, schema: str | None = None) -> None:
        """Queue answers (Reply, str or JSON value), for one json_schema name or for any request."""
        with self.lock:
            self.scripts.setdefault(schema, []).extend(answers)

    def pending(self, schema: str | None = None) -> int:
        """Scripted answers not yet consumed."""
        with self.lock:
            return len(self.scripts.get(schema, []))

    def calls(self, schema: str | None = _UNSET) -> list[dict[str, Any]]:
        """Request bodies received (only those asking for json_schema ``schema`` when given)."""
        with self.lock:
            bodies = list(self.requests)
        if schema is _UNSET:
            return bodies
        return [b for b in bodies if _schema_name(b) == schema]

    # --- internals ---------------------------------------------------------------------------
    def _next(self, body: dict[str, Any], headers: dict[str, str]) -> Reply:
        name = _schema_name(body)
        with self.lock:
            self.requests.append(body)
            self.headers.append(headers)
            answer: Any = _UNSET
            for key in ([name] if name is not None else []) + [None]:
                queue = self.scripts.get(key)
                if queue:
                    answer = queue.pop(0)
                    break
            responder = self.responder
        if answer is _UNSET and responder is not None:
            answer = responder(body)
        if answer is _UNSET:
            messages = body.get("messages") or [{}]
            last = messages[-1].get("content", "") if isinstance(messages[-1], dict) else ""
            answer = f"echo: {last}"
        if isinstance(answer, Reply):
            return answer
        if isinstance(answer, str):
            return Reply(content=answer)
        return Reply(content=json.dumps(answer))

    def _completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{index}",
                    "type": "function",
                    "function": {
                        "name": call["name"],
                        "arguments": call["arguments"]
                        if isinstance(call["arguments"], str)
                        else json.dumps(call["arguments"]),
                    },
                }
                for index, call in enumerate(reply.tool_calls)
            ]
        answer: dict[str, Any] = {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": reply.model or body.get("model") or "scripted",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop"),
                }
            ],
        }
        if reply.usage is _UNSET:
            prompt = _tokens(json.dumps(body.get("messages") or []))
            completion = _tokens((reply.content or "") + json.dumps(message.get("tool_calls") or ""))
            answer["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        elif reply.usage is not None:
            answer["usage"] = reply.usage
        return answer


def _schema_name(body: dict[str, Any]) -> str | None:
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and isinstance(fmt.get("json_schema"), dict):
        name = fmt["json_schema"].get("name")
        return name if isinstance(name, str) else None
    return None
