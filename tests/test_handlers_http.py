"""``http`` and ``llm`` handlers against real HTTP servers on 127.0.0.1 (random ports)."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

from agents.httpclient import parse_retry_after
from agents.registry import StepContext, StepError, StepTimeout, get_handler, run_with_timeout

TOKEN = "svc-token-7f3a9c1e"
LLM_KEY = "llm-key-c0ffee42"


@dataclass
class Reply:
    """What the fake server answers: status, JSON (or text) body, headers, delay (seconds)."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class FakeServer:
    """A ThreadingHTTPServer in a thread; routes by path to a Reply or to fn(Request) -> Reply."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.routes: dict[str, Reply | Callable[[Request], Reply]] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length) if length else b"",
                )
                outer.requests.append(request)
                route = outer.routes.get(urlsplit(self.path).path, Reply(body={"ok": True, "path": self.path}))
                reply = route(request) if callable(route) else route
                if reply.delay:
                    time.sleep(reply.delay)
                if isinstance(reply.body, str):
                    payload, content_type = reply.body.encode(), "text/plain; charset=utf-8"
                else:
                    payload, content_type = json.dumps(reply.body).encode(), "application/json"
                self.send_response(reply.status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_one

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        # A client that gave up (timeout tests) makes the late write fail: not worth a traceback.
        self.httpd.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = FakeServer()
    yield srv
    srv.close()


@pytest.fixture
def server2():
    srv = FakeServer()
    yield srv
    srv.close()


@pytest.fixture
def dead_url():
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def agents(settings, server):
    """The fake server is the agents base URL; a service token is configured."""
    settings.ORCHESTRATOR_AGENTS_BASE_URL = server.base
    settings.ORCHESTRATOR_SERVICE_TOKEN = TOKEN
    return server


def make_ctx(params: dict[str, Any], timeout: float = 5.0) -> StepContext:
    events: list[tuple[str, str, dict[str, Any] | None]] = []
    ctx = StepContext(
        run_id="run-1",
        step_id="call_agent",
        step_pk=7,
        attempt=1,
        params=params,
        timeout=timeout,
        idempotency_key="run-1:call_agent",
        tenant_id="t1",
        correlation_id="corr-42",
        trace=lambda kind, message, data=None: events.append((kind, message, data)),
    )
    ctx.events = events  # type: ignore[attr-defined]
    return ctx


def run_http(params: dict[str, Any], timeout: float = 5.0) -> tuple[Any, StepContext]:
    ctx = make_ctx(params, timeout)
    return run_with_timeout(get_handler("http"), ctx), ctx


def fail_http(params: dict[str, Any], timeout: float = 5.0) -> tuple[StepError, StepContext]:
    ctx = make_ctx(params, timeout)
    with pytest.raises(StepError) as info:
        run_with_timeout(get_handler("http"), ctx)
    return info.value, ctx


# --------------------------------------------------------------------------------------------
# http
# --------------------------------------------------------------------------------------------


def test_get_json_success_output_and_trace(server):
    server.routes["/items"] = Reply(body={"ok": True, "items": [1, 2]}, headers={"X-Request-Id": "req-9"})
    output, ctx = run_http({"url": server.url("/items"), "params": {"page": 2}})

    assert output["status"] == 200
    assert output["body"] == {"ok": True, "items": [1, 2]}
    assert output["headers"]["content-type"] == "application/json"
    assert output["headers"]["x-request-id"] == "req-9"
    assert server.requests[0].method == "GET"
    assert server.requests[0].path == "/items?page=2"
    [(kind, message, data)] = ctx.events
    assert kind == "http"
    assert message.startswith(f"GET {server.url('/items')} -> 200 in ")
    assert message.endswith(" ms")
    assert data["status"] == 200 and data["method"] == "GET" and isinstance(data["duration_ms"], int)


def test_call_posts_to_base_url_with_agent_headers(agents):
    output, ctx = run_http({"call": "/functions/v1/agent-proxy/notify", "json": {"user": "u1"}})

    request = agents.requests[0]
    assert request.method == "POST"  # seed 004: call defaults to POST
    assert request.path == "/functions/v1/agent-proxy/notify"
    assert request.json() == {"user": "u1"}
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["x-idempotency-key"] == "run-1:call_agent"
    assert request.headers["x-correlation-id"] == "corr-42"
    assert request.headers["user-agent"].startswith("orchestrator-agents/")
    assert output["status"] == 200
    # the token never reaches the trace; the header is there, masked
    assert TOKEN not in json.dumps(ctx.events)
    assert ctx.events[0][2]["request_headers"]["Authorization"] == "***"
    assert ctx.events[0][2]["request_headers"]["X-Idempotency-Key"] == "run-1:call_agent"


def test_explicit_authorization_header_wins(agents):
    run_http({"call": "/x", "headers": {"Authorization": "Bearer other-credential"}})
    assert agents.requests[0].headers["authorization"] == "Bearer other-credential"


def test_token_is_not_sent_to_another_origin(agents, server2):
    run_http({"url": server2.url("/elsewhere")})
    assert "authorization" not in server2.requests[0].headers
    # but it is to a full URL on the agents origin
    run_http({"url": agents.url("/same-origin")})
    assert agents.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


def test_token_echoed_back_is_redacted_from_output(agents):
    agents.routes["/echo"] = lambda request: Reply(body={"ok": True, "you_sent": request.headers["authorization"]})
    output, ctx = run_http({"call": "/echo"})
    assert output["body"]["you_sent"] == "Bearer ***"
    assert TOKEN not in json.dumps([output, ctx.events])


def test_ok_false_is_a_transient_failure(agents):
    agents.routes["/plan"] = Reply(body={"ok": False, "error": f"quota exhausted for {TOKEN}"})
    error, ctx = fail_http({"call": "/plan"})

    assert not error.permanent
    assert error.http_status == 200
    assert "ok: false" in error.message and "quota exhausted" in error.message
    assert TOKEN not in error.message
    assert error.output["body"]["ok"] is False
    assert TOKEN not in json.dumps([error.output, ctx.events])
    assert ctx.events[0][2]["error"] == error.message


def test_ok_field_can_be_renamed_or_disabled(server):
    server.routes["/s"] = Reply(body={"success": False, "ok": False})
    error, _ = fail_http({"url": server.url("/s"), "ok_field": "success"})
    assert "success: false" in error.message
    output, _ = run_http({"url": server.url("/s"), "ok_field": None})
    assert output["body"]["success"] is False


def test_500_is_transient(server):
    server.routes["/boom"] = Reply(500, {"error": "database exploded"})
    error, ctx = fail_http({"url": server.url("/boom"), "method": "post", "json": {"a": 1}})
    assert not error.permanent
    assert error.http_status == 500
    assert error.message == f"POST {server.url('/boom')} -> 500 Internal Server Error: database exploded"
    assert error.retry_after is None
    assert ctx.events[0][1].startswith(f"POST {server.url('/boom')} -> 500 in ")


def test_404_is_permanent(server):
    server.routes["/missing"] = Reply(404, {"detail": "no such agent"})
    error, _ = fail_http({"url": server.url("/missing")})
    assert error.permanent
    assert error.http_status == 404
    assert "no such agent" in error.message


@pytest.mark.parametrize("status", [408, 429])
def test_408_and_429_are_transient(server, status):
    server.routes["/busy"] = Reply(status, {"error": "busy"}, headers={"Retry-After": "7"})
    error, _ = fail_http({"url": server.url("/busy")})
    assert not error.permanent
    assert error.retry_after == (7.0 if status == 429 else None)


def test_503_retry_after_http_date(server):
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    server.routes["/maint"] = Reply(
        503, "down for maintenance", headers={"Retry-After": email.utils.format_datetime(when, usegmt=True)}
    )
    error, _ = fail_http({"url": server.url("/maint")})
    assert not error.permanent
    assert 25 <= error.retry_after <= 31
    assert error.message.endswith("503 Service Unavailable: down for maintenance")


def test_redirect_not_followed_is_permanent(server):
    server.routes["/old"] = Reply(302, "", headers={"Location": "/new"})
    error, _ = fail_http({"url": server.url("/old")})
    assert error.permanent
    assert "redirect to /new not followed" in error.message
    output, _ = run_http({"url": server.url("/old"), "follow_redirects": True})
    assert output["body"]["path"] == "/new"


def test_text_body_and_expect_json(server):
    server.routes["/text"] = Reply(body="plain words")
    output, _ = run_http({"url": server.url("/text")})
    assert output["body"] == "plain words"
    error, _ = fail_http({"url": server.url("/text"), "expect_json": True})
    assert "expected a JSON body" in error.message


def test_password_in_url_is_masked(server):
    server.routes["/private"] = Reply(401, {"error": "who are you"})
    url = server.url("/private").replace("http://", "http://robot:pw-very-secret@")
    error, ctx = fail_http({"url": url})
    assert server.requests[0].headers["authorization"].startswith("Basic ")
    assert error.permanent
    assert "pw-very-secret" not in json.dumps([error.message, ctx.events])
    assert "robot:***@" in error.message


def test_connection_refused_is_transient_and_traced(dead_url):
    error, ctx = fail_http({"url": dead_url + "/x"})
    assert not error.permanent
    assert error.http_status is None
    assert "ConnectError" in error.message
    [(kind, message, data)] = ctx.events
    assert kind == "http" and "connection error" in message and data["status"] is None


def test_slow_server_times_out(server):
    server.routes["/slow"] = Reply(body={"ok": True}, delay=3)
    started = time.monotonic()
    error, ctx = fail_http({"url": server.url("/slow"), "timeout": 0.3})
    assert time.monotonic() - started < 2
    assert isinstance(error, StepTimeout)
    assert not error.permanent
    assert "timed out" in ctx.events[0][1]


def test_step_timeout_caps_the_param_timeout(server):
    server.routes["/slow"] = Reply(body={"ok": True}, delay=3)
    started = time.monotonic()
    error, _ = fail_http({"url": server.url("/slow"), "timeout_ms": 60000}, timeout=0.3)
    assert isinstance(error, StepTimeout)
    assert time.monotonic() - started < 2


def test_call_without_base_url_is_permanent(settings):
    settings.ORCHESTRATOR_AGENTS_BASE_URL = ""
    error, _ = fail_http({"call": "/functions/v1/x"})
    assert error.permanent
    assert "ORCHESTRATOR_AGENTS_BASE_URL" in error.message


def test_seed002_data_task_posts_to_data_service(settings, server):
    settings.ORCHESTRATOR_DATA_SERVICE_URL = server.url("/data")
    params = {"operation": "traverse", "query": {"cypher": "MATCH (n) RETURN n"}, "enrich": ["metadata"]}
    get_handler("data").validate_params(params)
    run_http(params)
    assert server.requests[0].method == "POST"
    assert server.requests[0].json() == params


def test_http_validate_params():
    http = get_handler("http")
    http.validate_params({"call": "/a", "method": "GET", "timeout_ms": 8000})  # seed 004
    http.validate_params({"url": "${vars.endpoint}", "headers": "${steps.a.output}", "timeout": "${vars.t}"})
    for params, message in [
        ({}, "url or call is required"),
        ({"url": "http://a", "call": "/b"}, "either url or call"),
        ({"url": "ftp://a"}, "http:// or https://"),
        ({"call": "https://evil.example/x"}, "call must be a path"),
        ({"url": "http://a", "method": "BREW"}, "method must be one of"),
        ({"url": "http://a", "headers": ["x"]}, "headers must be a mapping"),
        ({"url": "http://a", "json": {}, "body": "x"}, "either json or body"),
        ({"url": "http://a", "timeout": 0}, "timeout must be a positive number"),
    ]:
        with pytest.raises(ValueError, match=message):
            http.validate_params(params)


def test_parse_retry_after():
    now = dt.datetime(2015, 10, 21, 7, 28, 0, tzinfo=dt.UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("-5") is None


# --------------------------------------------------------------------------------------------
# llm
# --------------------------------------------------------------------------------------------


def chat_reply(content: str, model: str = "fake-model") -> Reply:
    return Reply(
        body={
            "id": "cmpl-1",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        }
    )


@pytest.fixture
def llm_server(settings, server):
    """An OpenAI-compatible fake at {base}/v1; answers JSON when asked for JSON."""

    def complete(request: Request) -> Reply:
        body = request.json()
        if body.get("response_format") == {"type": "json_object"}:
            return chat_reply('```json\n{"answer": 42}\n```')
        return chat_reply(f"echo: {body['messages'][-1]['content']}")

    server.routes["/v1/chat/completions"] = complete
    settings.ORCHESTRATOR_LLM_API_KEY = LLM_KEY
    settings.ORCHESTRATOR_LLM_MODEL = "local-model"
    return server


def run_llm(params: dict[str, Any], timeout: float = 5.0) -> tuple[Any, StepContext]:
    ctx = make_ctx(params, timeout)
    return run_with_timeout(get_handler("ai"), ctx), ctx


@pytest.mark.django_db
def test_llm_prompt_with_system(settings, llm_server):
    settings.ORCHESTRATOR_LLM_BASE_URL = llm_server.url("/v1")
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = []
    output, ctx = run_llm({"prompt": "hello", "system": "be brief", "temperature": 0.2, "max_tokens": 50})

    assert output == {
        "content": "echo: hello",
        "model": "fake-model",
        "provider": "local",
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, "estimated": False},
        "finish_reason": "stop",
    }
    request = llm_server.requests[0]
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {LLM_KEY}"
    assert request.json() == {
        "model": "local-model",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        "temperature": 0.2,
        "max_tokens": 50,
    }
    [(kind, message, data)] = ctx.events
    assert kind == "llm" and "-> 200" in message
    assert data["request"]["messages"][1]["content"] == "hello"
    assert data["response"]["content"] == "echo: hello"
    assert LLM_KEY not in json.dumps(ctx.events)


@pytest.mark.django_db
def test_llm_falls_back_when_the_first_provider_is_down(settings, llm_server, dead_url):
    settings.ORCHESTRATOR_LLM_BASE_URL = dead_url + "/v1"
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = [llm_server.url("/v1")]
    output, ctx = run_llm({"prompt": "hi"})

    assert output["provider"] == "fallback-1"
    assert output["content"] == "echo: hi"
    assert [event[0] for event in ctx.events] == ["llm", "llm"]
    assert "ConnectError" in ctx.events[0][2]["error"]


@pytest.mark.django_db
def test_llm_falls_back_on_5xx_and_429(settings, server, server2):
    server.routes["/v1/chat/completions"] = Reply(503, {"error": "overloaded"}, headers={"Retry-After": "3"})
    server2.routes["/v1/chat/completions"] = Reply(429, {"error": "slow down"})
    settings.ORCHESTRATOR_LLM_BASE_URL = server.url("/v1")
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = [server2.url("/v1")]
    with pytest.raises(StepError) as info:
        run_llm({"prompt": "hi"})
    error = info.value
    assert not error.permanent
    assert error.message.startswith("every LLM provider failed: ")
    assert "HTTP 503" in error.message and "HTTP 429" in error.message
    assert error.retry_after == 3.0
    assert len(server.requests) == len(server2.requests) == 1


@pytest.mark.django_db
def test_llm_json_response_format(settings, llm_server):
    settings.ORCHESTRATOR_LLM_BASE_URL = llm_server.url("/v1")
    output, _ = run_llm({"prompt": "give json", "response_format": "json", "provider": "anthropic"})
    assert output["json"] == {"answer": 42}
    assert llm_server.requests[0].json()["response_format"] == {"type": "json_object"}


@pytest.mark.django_db
def test_llm_invalid_json_answer_is_transient(settings, server):
    server.routes["/v1/chat/completions"] = chat_reply("not json at all")
    settings.ORCHESTRATOR_LLM_BASE_URL = server.url("/v1")
    with pytest.raises(StepError, match="not JSON") as info:
        run_llm({"prompt": "x", "response_format": "json"})
    assert not info.value.permanent
    assert info.value.output["content"] == "not json at all"


@pytest.mark.django_db
def test_llm_bad_request_is_permanent(settings, server, server2):
    server.routes["/v1/chat/completions"] = Reply(400, {"error": {"message": "unknown model"}})
    settings.ORCHESTRATOR_LLM_BASE_URL = server.url("/v1")
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = [server2.url("/v1")]
    with pytest.raises(StepError, match="unknown model") as info:
        run_llm({"prompt": "x"})
    assert info.value.permanent
    assert info.value.http_status == 400
    assert server2.requests == []


@pytest.mark.django_db
def test_llm_without_provider_is_permanent(settings):
    settings.ORCHESTRATOR_LLM_BASE_URL = ""
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = []
    with pytest.raises(StepError) as info:
        run_llm({"prompt": "x"})
    assert info.value.permanent
    assert info.value.message.startswith("no LLM provider configured: set LLM_BASE_URL")


@pytest.mark.django_db
def test_llm_key_not_sent_to_an_unconfigured_base_url(settings, llm_server):
    settings.ORCHESTRATOR_LLM_BASE_URL = ""
    output, _ = run_llm({"prompt": "x", "base_url": llm_server.url("/v1")})
    assert output["content"] == "echo: x"
    assert "authorization" not in llm_server.requests[0].headers


def test_llm_validate_params():
    llm = get_handler("llm")
    llm.validate_params(
        {"provider": "anthropic", "prompt": "x", "model": "m", "response_format": "json", "max_tokens": 2000}
    )
    llm.validate_params({"messages": "${steps.build.output}"})
    for params, message in [
        ({}, "prompt or messages is required"),
        ({"messages": [{"content": "x"}]}, r"messages\[0\]"),
        ({"prompt": "x", "temperature": 5}, "temperature"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "response_format": "yaml"}, "response_format"),
        ({"prompt": "x", "base_url": "localhost:8000"}, "base_url"),
    ]:
        with pytest.raises(ValueError, match=message):
            llm.validate_params(params)
