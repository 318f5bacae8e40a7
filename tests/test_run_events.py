"""Live progress as Server-Sent Events (issue 9): the generic feed (runs/events.py) and
``GET /api/v1/runs/{id}/events`` against a real worker: ordered step events, the final ``end``,
tenancy, and ``Last-Event-ID`` resuming without repeats.
"""

from __future__ import annotations

import base64
import json
import zlib

import pytest

from runs.events import Cursor, Event, EventFeed, InvalidCursor, Item, Snapshot
from tests.conftest import api_client_for

# --- the generic feed, on scripted snapshots -----------------------------------------------------


class Script:
    """Snapshots returned one per call (the last one repeats), and a fake clock that sleeps."""

    def __init__(self, *states: tuple[dict[str, str], bool]) -> None:
        self.states = list(states)
        self.calls = 0
        self.now = 0.0

    def snapshot(self) -> Snapshot:
        tokens, done = self.states[min(self.calls, len(self.states) - 1)]
        self.calls += 1
        items = {"run": Item("run", tokens.get("run", "r"), {"run": tokens.get("run", "r")})}
        items.update({k: Item("step", t, {"step": k, "state": t}) for k, t in tokens.items() if k != "run"})
        return Snapshot(items=items, done=done, end={"final": True}, last=frozenset({"run"}))

    def feed(self, **options) -> EventFeed:
        options = {"poll": 1.0, "heartbeat": 100.0, "max_seconds": 1000.0, **options}
        return EventFeed(self.snapshot, clock=lambda: self.now, sleep=self.advance, **options)

    def advance(self, seconds: float) -> None:
        self.now += seconds


def names(events) -> list[tuple[str, object]]:
    return [(e.name, e.data.get("step", e.data.get("run", e.data.get("final")))) for e in events if e is not None]


def test_feed_sends_the_state_then_each_change_in_order_and_ends():
    script = Script(
        ({"run": "p0", "a": "queued"}, False),
        ({"run": "p0", "a": "queued"}, False),  # nothing changed: nothing sent
        ({"run": "p50", "a": "succeeded", "b": "running"}, False),  # b appended; run's change last
        ({"run": "done", "a": "succeeded", "b": "succeeded"}, True),
    )
    events = list(script.feed().events())
    assert names(events) == [
        ("step", "a"),
        ("run", "p0"),
        ("step", "a"),
        ("step", "b"),
        ("run", "p50"),
        ("step", "b"),
        ("run", "done"),
        ("end", True),
    ]
    assert [e.data["state"] for e in events if e.name == "step"] == ["queued", "succeeded", "running", "succeeded"]
    assert len({e.id for e in events}) == len(events)  # every event its own id


def test_resuming_from_any_event_repeats_nothing_and_loses_nothing():
    states = (
        ({"run": "p0", "a": "queued", "b": "pending"}, False),
        ({"run": "p50", "a": "succeeded", "b": "running"}, False),
        ({"run": "done", "a": "succeeded", "b": "succeeded", "c": "skipped"}, True),
    )
    full = list(Script(*states).feed().events())
    for index, seen in enumerate(full[:-1]):
        # Given: a client that got events up to `seen`, then lost the connection while the run went on
        script = Script(states[-1])
        # When: it reconnects with that id
        rest = list(script.feed(last_event_id=seen.id).events())
        # Then: it gets exactly the state it has not seen, then end
        expected = {}
        for event in full[index + 1 : -1]:
            expected[(event.name, event.data.get("step"))] = event.data
        got = {(e.name, e.data.get("step")): e.data for e in rest[:-1]}
        assert got == expected, (index, names(rest))
        assert rest[-1].name == "end"


def test_after_end_the_feed_is_finished_and_an_old_id_is_not():
    script = Script(({"run": "done", "a": "succeeded"}, True))
    events = list(script.feed().events())
    assert script.feed(last_event_id=events[-1].id).finished()
    assert not script.feed(last_event_id=events[0].id).finished()
    assert not script.feed().finished()


def test_heartbeat_and_time_cap():
    script = Script(({"run": "p0", "a": "running"}, False))
    feed = script.feed(heartbeat=2.0, max_seconds=5.0)
    events = list(feed.events())
    assert names(events) == [("step", "a"), ("run", "p0")]
    assert events.count(None) == 2  # silent at t=2 and t=4, closed at t=5
    assert feed.stopped == "max_seconds"
    frames = "".join(script.feed(heartbeat=2.0, max_seconds=5.0).frames())
    assert frames.startswith("retry: 2000\n\n")
    assert ": heartbeat\n\n" in frames
    assert frames.endswith("reconnect with Last-Event-ID\n\n")


def test_frame_format_follows_the_sse_standard():
    frame = Event("step", {"text": "two\nlines", "n": 1}, "c1.abc").frame()
    assert frame == 'id: c1.abc\nevent: step\ndata: {"text":"two\\nlines","n":1}\n\n'


@pytest.mark.parametrize(
    "bad",
    [
        "42",
        "c1.!!!",
        "c1." + base64.urlsafe_b64encode(b"not zlib").decode(),
        "c1." + base64.urlsafe_b64encode(zlib.compress(b'{"k": 1, "t": [2], "e": 0}')).decode(),
        "c1." + base64.urlsafe_b64encode(zlib.compress(b"[" * 10 + b"0" * 2_000_000)).decode(),
        "c1." + "A" * 9000,
    ],
)
def test_a_bad_cursor_is_one_line_naming_the_header(bad):
    with pytest.raises(InvalidCursor) as caught:
        Cursor.decode(bad)
    assert str(caught.value).startswith("Last-Event-ID: ")
    assert "\n" not in str(caught.value)


def test_cursor_of_a_large_run_stays_small():
    keys = ["run"] + [f"step:fetch-{i}" for i in range(5000)]
    cursor = Cursor.of(keys, dict.fromkeys(keys, "succeeded:1"))
    assert len(cursor.encode()) < 500
    assert Cursor.decode(cursor.encode()).tokens_for(keys) == dict.fromkeys(keys, "succeeded:1")


# --- the endpoint, with the real worker -----------------------------------------------------------

STEPS_YAML = """\
key: three
steps:
  - {id: a, type: sleep, params: {seconds: 0.6}}
  - {id: b, type: sleep, depends_on: [a], params: {seconds: 0.6}}
  - {id: c, type: noop, depends_on: [b], params: {output: {done: true}}}
outputs:
  done: "${steps.c.output.done}"
"""


def parse_sse(chunks) -> list[dict]:
    """Events of a text/event-stream (comments and retry lines dropped): [{"id", "event", "data"}]."""
    text = b"".join(chunks).decode()
    events = []
    for block in text.split("\n\n"):
        fields: dict = {}
        for line in block.splitlines():
            if line.startswith(":") or ":" not in line:
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if "event" in fields:
            events.append({"id": fields.get("id"), "event": fields["event"], "data": json.loads(fields["data"])})
    return events


@pytest.fixture
def sse_settings(settings):
    settings.ORCHESTRATOR_SSE_POLL = 0.05
    settings.ORCHESTRATOR_SSE_MAX_SECONDS = 60
    return settings


def start_three(client) -> str:
    from templates_app.services import save_template
    from templates_app.spec import load_spec

    save_template(load_spec(STEPS_YAML, source="three.yaml"), STEPS_YAML, tenant_id="acme")
    response = client.post("/api/v1/runs", {"template": "three"}, format="json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def test_stream_shows_each_step_change_in_order_then_end(worker, owner, sse_settings):
    client = api_client_for(owner)
    run_id = start_three(client)
    # When: the stream is read to its end
    response = client.get(f"/api/v1/runs/{run_id}/events", HTTP_ACCEPT="text/event-stream")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    assert response["Cache-Control"] == "no-cache"
    events = parse_sse(response.streaming_content)
    # Then: every step went through running (the sleeps are longer than the poll) to succeeded, in order
    step_events = [(e["data"]["step_id"], e["data"]["status"]) for e in events if e["event"] == "step"]
    assert [s for s in step_events if s[1] == "succeeded"] == [
        ("a", "succeeded"),
        ("b", "succeeded"),
        ("c", "succeeded"),
    ]
    for step in ("a", "b"):
        statuses = [status for step_id, status in step_events if step_id == step]
        assert "running" in statuses and statuses[-1] == "succeeded", statuses
        assert statuses.index("running") < statuses.index("succeeded")
    assert step_events.index(("a", "succeeded")) < step_events.index(("b", "running"))
    # progress only grows, and the run's last word is the end event
    progress = [e["data"]["progress"] for e in events if e["event"] == "run"]
    assert progress == sorted(progress) and progress[-1] == 100
    assert events[-1]["event"] == "end"
    assert events[-1]["data"]["status"] == "succeeded"
    assert events[-1]["data"]["outputs"] == {"done": True}
    assert all(e["id"] for e in events) and len({e["id"] for e in events}) == len(events)

    # And: resuming from the middle repeats nothing; resuming after end is a 204
    middle = events[len(events) // 2]
    again = client.get(f"/api/v1/runs/{run_id}/events", HTTP_LAST_EVENT_ID=middle["id"])
    rest = parse_sse(again.streaming_content)
    later: dict = {}  # what changed after `middle`: the last state of each, once
    for event in events[len(events) // 2 + 1 : -1]:
        later[(event["event"], event["data"].get("step_id"))] = event["data"]
    assert {(e["event"], e["data"].get("step_id")): e["data"] for e in rest[:-1]} == later
    assert len(rest) - 1 == len(later) and rest[-1]["event"] == "end"
    assert client.get(f"/api/v1/runs/{run_id}/events", HTTP_LAST_EVENT_ID=events[-1]["id"]).status_code == 204


def test_resume_while_running_sends_only_what_changed(worker, owner, sse_settings):
    from tests.conftest import wait_for_run

    client = api_client_for(owner)
    run_id = start_three(client)
    # Given: a client that read the first events, then went away
    response = client.get(f"/api/v1/runs/{run_id}/events")
    stream = iter(response.streaming_content)
    first: list[bytes] = []
    while not any(b'"step_id":"a"' in chunk and b'"status":"succeeded"' in chunk for chunk in first):
        first.append(next(stream))  # up to step a's success (b still has 0.6 s of sleep ahead)
    response.close()
    seen = parse_sse(first)
    wait_for_run(run_id, timeout=60)
    # When: it comes back with its last id after the run finished
    rest = parse_sse(client.get(f"/api/v1/runs/{run_id}/events", HTTP_LAST_EVENT_ID=seen[-1]["id"]).streaming_content)
    # Then: the final state of each step it saw earlier in another state, once each, and end
    seen_state = {e["data"]["step_id"]: e["data"]["status"] for e in seen if e["event"] == "step"}
    steps = [e["data"] for e in rest if e["event"] == "step"]
    assert len({s["step_id"] for s in steps}) == len(steps)
    assert all(s["status"] == "succeeded" for s in steps)
    assert seen_state["a"] == "succeeded"
    assert {s["step_id"] for s in steps} == {step for step in "abc" if seen_state.get(step) != "succeeded"}
    assert "a" not in {s["step_id"] for s in steps}
    assert rest[-1]["event"] == "end" and rest[-1]["data"]["status"] == "succeeded"


def test_another_tenants_run_is_a_404_and_a_foreign_id_starts_over(owner, outsider, chain_template, settings):
    from runs import engine

    run = engine.start_run(chain_template.spec, {"n": 1}, template=chain_template, tenant_id="acme")
    outsider_response = api_client_for(outsider).get(f"/api/v1/runs/{run.pk}/events")
    assert outsider_response.status_code == 404
    assert outsider_response["Content-Type"] == "application/json"
    assert api_client_for(None).get(f"/api/v1/runs/{run.pk}/events").status_code == 401
    # an id this server did not make: the whole state again, after a comment naming the header
    settings.ORCHESTRATOR_SSE_MAX_SECONDS = 0.2
    foreign = api_client_for(owner).get(
        f"/api/v1/runs/{run.pk}/events", HTTP_LAST_EVENT_ID="12", HTTP_ACCEPT="text/event-stream"
    )
    assert foreign.status_code == 200
    text = b"".join(foreign.streaming_content).decode()
    assert text.startswith(": Last-Event-ID: not an event id of this stream (expected c1.<...>); starting over\n\n")
    assert [e["event"] for e in parse_sse([text.encode()])] == ["step", "step", "run"]


def test_a_pending_run_streams_until_the_time_cap(owner, chain_template, settings):
    from runs import engine

    settings.ORCHESTRATOR_SSE_MAX_SECONDS = 0.3
    settings.ORCHESTRATOR_SSE_POLL = 0.05
    run = engine.start_run(chain_template.spec, {"n": 1}, template=chain_template, tenant_id="acme")
    response = api_client_for(owner).get(f"/api/v1/runs/{run.pk}/events")
    text = b"".join(response.streaming_content).decode()
    events = parse_sse([text.encode()])
    assert [e["event"] for e in events] == ["step", "step", "run"]
    assert text.endswith("reconnect with Last-Event-ID\n\n")
