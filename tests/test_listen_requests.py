"""Seed 002's Redis request channel (issue 9): ``manage.py listen_requests`` as a real process, on
real Redis (DB 11, channel and stream names of each test's own), PostgreSQL and the session's
Celery worker. One run per correlation id, the response with the run's outputs, error responses,
and the stream form surviving a listener restart and a dead consumer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis

from runs.channels import BadRequest, parse_request
from tests.conftest import ROOT

REDIS_URL = "redis://127.0.0.1:6379/11"

GREET_YAML = """\
key: greet
variables:
  who: {type: string, required: true}
steps:
  - id: hello
    type: noop
    params: {output: {text: "hello ${who}"}}
outputs:
  text: "${steps.hello.output.text}"
"""

SLOW_YAML = """\
key: slow-greet
steps:
  - {id: nap, type: sleep, params: {seconds: 1.5}}
outputs:
  slept: "${steps.nap.output.slept}"
"""

# --- the message rules, without Redis ------------------------------------------------------------------


def parse(raw, **caps):
    return parse_request(raw, **{"max_bytes": 1000, "max_variables_bytes": 100, **caps})


def test_a_valid_request_and_its_stream_fields_form():
    text = '{"correlation_id": "wf-1", "workflow_template": "greet", "variables": {"who": "x"}}'
    assert parse(text).idempotency_key == "request:wf-1"
    fields = {"correlation_id": "wf-1", "workflow_template": "greet", "variables": '{"who": "x"}'}
    assert parse(fields) == parse(text)


@pytest.mark.parametrize(
    ("raw", "message", "correlation_id"),
    [
        ("{", "message: not valid JSON", None),
        ("[1]", "message: expected a JSON object", None),
        ("x" * 1001, "message: 1001 bytes, at most 1000", None),
        ('{"workflow_template": "greet"}', "correlation_id: required", None),
        ('{"correlation_id": "has space", "workflow_template": "g"}', "correlation_id: required", None),
        ('{"correlation_id": "c", "workflow_template": 3}', "workflow_template: required", "c"),
        ('{"correlation_id": "c", "workflow_template": "g", "variables": [1]}', "variables: expected an object", "c"),
        (
            '{"correlation_id": "c", "workflow_template": "g", "variables": {"a": "' + "y" * 200 + '"}}',
            "variables: 2",
            "c",
        ),
        ('{"correlation_id": "c", "workflow_template": "g", "extra": 1}', "extra: unknown field", "c"),
        ('{"correlation_id": "c", "workflow_template": "g", "version": "2"}', "version: expected an integer", "c"),
    ],
)
def test_a_bad_request_is_one_line_naming_the_field(raw, message, correlation_id):
    with pytest.raises(BadRequest) as caught:
        parse(raw)
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)
    assert caught.value.correlation_id == correlation_id


# --- the listener process ----------------------------------------------------------------------------------


class Listener:
    """``manage.py listen_requests`` as a subprocess with its own channel names."""

    def __init__(self, worker_env: dict, log_dir, names: dict[str, str], *args: str) -> None:
        self.env = {
            **worker_env,
            "ORCHESTRATOR_REQUESTS_REDIS_URL": REDIS_URL,
            "ORCHESTRATOR_REQUESTS_POLL": "0.1",
            "ORCHESTRATOR_REQUESTS_CLAIM_IDLE": "1",
            **names,
        }
        self.args = args
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> Listener:
        self.starts += 1
        self.log = self.log_dir / f"listener-{self.starts}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "manage.py", "listen_requests", "--tenant", "acme", *self.args],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.time() + 30
        while "listening on" not in self.text():
            assert self.proc.poll() is None, self.text()
            assert time.time() < deadline, self.text()
            time.sleep(0.05)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        return self.proc.wait(30)


@pytest.fixture
def acme_templates(worker, tenants):
    from templates_app.services import save_template
    from templates_app.spec import load_spec

    for text in (GREET_YAML, SLOW_YAML):
        save_template(load_spec(text, source="t.yaml"), text, tenant_id="acme")


@pytest.fixture
def names():
    tag = uuid.uuid4().hex[:8]
    return {
        "ORCHESTRATOR_REQUESTS_CHANNEL": f"test-requests-{tag}",
        "ORCHESTRATOR_RESPONSES_CHANNEL": f"test-responses-{tag}",
        "ORCHESTRATOR_REQUESTS_GROUP": f"test-group-{tag}",
    }


@pytest.fixture
def r(names):
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.delete(names["ORCHESTRATOR_REQUESTS_CHANNEL"], names["ORCHESTRATOR_RESPONSES_CHANNEL"])
    client.close()


@pytest.fixture
def listeners(worker_env, tmp_path, names):
    started: list[Listener] = []

    def make(*args: str) -> Listener:
        listener = Listener(worker_env, tmp_path, names, *args)
        started.append(listener)
        return listener

    yield make
    for listener in started:
        if listener.proc is not None and listener.proc.poll() is None:
            listener.stop(signal.SIGKILL)


def request(cid: str, template: str = "greet", **variables) -> str:
    return json.dumps({"correlation_id": cid, "workflow_template": template, "variables": variables})


def collect_pubsub(pubsub, count: int, timeout: float = 30.0) -> list[dict]:
    messages, deadline = [], time.time() + timeout
    while len(messages) < count and time.time() < deadline:
        message = pubsub.get_message(timeout=0.2)
        if message and message["type"] == "message":
            messages.append(json.loads(message["data"]))
    return messages


def test_pubsub_one_run_per_correlation_id_response_and_errors(acme_templates, listeners, r, names):
    from runs.models import Run

    requests_channel, responses_channel = (
        names["ORCHESTRATOR_REQUESTS_CHANNEL"],
        names["ORCHESTRATOR_RESPONSES_CHANNEL"],
    )
    responses = r.pubsub(ignore_subscribe_messages=True)
    responses.subscribe(responses_channel)
    listener = listeners().start()
    deadline = time.time() + 10
    while r.pubsub_numsub(requests_channel)[0][1] < 1:
        assert time.time() < deadline, listener.text()
        time.sleep(0.05)
    # When: a request is published twice, with a bad one and garbage between
    r.publish(requests_channel, request("order-1", who="ada"))
    r.publish(requests_channel, request("order-1", who="ada"))
    r.publish(requests_channel, request("order-2", template="no-such-template"))
    r.publish(requests_channel, '{"correlation_id": "order-3", "workflow_template": "greet", "variables": 7}')
    r.publish(requests_channel, "not json at all")
    r.publish(requests_channel, request("order-1", who="someone else"))
    # Then: one error response per bad request with an id, one result for order-1
    got = collect_pubsub(responses, 3)
    by_id = {m["correlation_id"]: m for m in got}
    assert set(by_id) == {"order-1", "order-2", "order-3"}, got
    assert by_id["order-2"]["status"] == "error" and "no-such-template" in by_id["order-2"]["error"]
    assert by_id["order-3"] == {
        "correlation_id": "order-3",
        "status": "error",
        "error": "variables: expected an object",
    }
    result = by_id["order-1"]
    run = Run.objects.get(tenant_id="acme", idempotency_key="request:order-1")
    assert result["execution_id"] == str(run.pk)
    assert result["status"] == "succeeded" and result["outputs"] == {"text": "hello ada"}
    assert result["workflow_template"] == "greet" and result["error"] is None
    assert Run.objects.filter(correlation_id="order-1").count() == 1
    assert collect_pubsub(responses, 1, timeout=1.0) == []  # nothing more: the repeats started nothing
    # the listener lives on and says what it did, one line each; SIGTERM stops it cleanly
    text = listener.text()
    assert "refused (no correlation_id): message: not valid JSON" in text
    assert text.count("started run") == 1 and text.count("repeat order-1") == 2
    assert listener.stop() == 0
    assert "stopped; 0 run(s) still awaiting a response" in listener.text()
    responses.close()


def read_stream(r, stream: str, count: int, timeout: float = 30.0) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        entries = r.xrange(stream)
        if len(entries) >= count:
            return [json.loads(fields[b"message"]) for _id, fields in entries]
        time.sleep(0.1)
    return [json.loads(fields[b"message"]) for _id, fields in r.xrange(stream)]


def test_stream_survives_a_restart_and_claims_a_dead_consumers_entries(acme_templates, listeners, r, names):
    from runs.models import Run

    stream, out, group = (
        names["ORCHESTRATOR_REQUESTS_CHANNEL"],
        names["ORCHESTRATOR_RESPONSES_CHANNEL"],
        names["ORCHESTRATOR_REQUESTS_GROUP"],
    )
    listener = listeners("--stream", "--consumer", "one")
    listener.start()
    # Given: a slow run started from the stream, and the listener stopped before it finished
    r.xadd(stream, {"message": request("s-1", template="slow-greet")})
    deadline = time.time() + 15
    while not Run.objects.filter(idempotency_key="request:s-1").exists():
        assert time.time() < deadline, listener.text()
        time.sleep(0.05)
    assert listener.stop() == 0
    assert Run.objects.get(idempotency_key="request:s-1").status != "succeeded"
    # and, while no listener runs: a new request, and one a dead consumer took and never acknowledged
    r.xadd(stream, {"correlation_id": "s-2", "workflow_template": "greet", "variables": '{"who": "bob"}'})
    r.xadd(stream, {"message": request("s-3", who="eve")})
    r.xadd(stream, {"message": request("s-1", template="slow-greet")})  # a repeat
    taken = r.xreadgroup(group, "dead", {stream: ">"}, count=1)  # s-2, never acknowledged
    assert taken[0][1][0][1][b"correlation_id"] == b"s-2"
    # When: the listener starts again (another consumer name)
    listener.args = ("--stream", "--consumer", "two")
    listener.start()
    assert "1 run(s) awaiting a response" in listener.text()
    # Then: every request is answered once, the run of s-1 by the restarted listener
    got = read_stream(r, out, 3)
    by_id = {m["correlation_id"]: m for m in got}
    assert len(got) == 3 and set(by_id) == {"s-1", "s-2", "s-3"}, got
    assert by_id["s-1"]["status"] == "succeeded" and by_id["s-1"]["outputs"] == {"slept": 1.5}
    assert by_id["s-2"]["outputs"] == {"text": "hello bob"}
    assert by_id["s-3"]["outputs"] == {"text": "hello eve"}
    assert Run.objects.filter(idempotency_key__in=["request:s-1", "request:s-2", "request:s-3"]).count() == 3
    # every entry acknowledged, the dead consumer's included (after the claim idle time)
    deadline = time.time() + 10
    while r.xpending(stream, group)["pending"]:
        assert time.time() < deadline, (r.xpending(stream, group), listener.text())
        time.sleep(0.1)
    assert listener.stop(signal.SIGINT) == 0
    assert read_stream(r, out, 3, timeout=0.5) == got  # no duplicate response
    r.delete(out)
