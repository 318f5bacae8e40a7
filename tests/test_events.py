"""Events: stored once per event id, dispatched to every active template whose trigger lists the type
(latest version, own tenant), payload available to expressions; the API and `dispatch_event`."""

from __future__ import annotations

import json

import pytest
from django.core.management import call_command

from runs.models import Run
from runs.services import Conflict, Invalid
from scheduler.models import IntentEvent
from scheduler.services import dispatch_event
from templates_app.models import WorkflowTemplate
from templates_app.services import save_template
from templates_app.spec import load_spec
from tests.conftest import api_client_for, wait_for_run

API = "/api/v1"


def template(
    key: str, trigger: str, tenant: str = "default", variables: str = "{}", steps: str = ""
) -> WorkflowTemplate:
    text = f"key: {key}\nvariables: {variables}\ntrigger: {trigger}\nsteps:\n"
    text += steps or "  - {id: a, type: noop}\n"
    return save_template(load_spec(text, source=f"{key}.yaml"), text, tenant_id=tenant).template


@pytest.fixture
def catalogue(db):
    """Who listens to `ping`: a (twice saved: latest wins) and b; not c, not d (inactive), not e (other tenant)."""
    template("a", "{event_types: [ping]}")
    template("a", "{event_types: [ping]}", variables="{note: {default: v2}}")  # version 2
    template("b", '{type: cron_or_event, cron: "0 7 * * *", event_types: [other, ping]}')
    template("c", "{event_types: [other]}")
    WorkflowTemplate.objects.filter(pk=template("d", "{event_types: [ping]}").pk).update(is_active=False)
    template("e", "{event_types: [ping]}", tenant="acme")


def test_an_event_starts_every_matching_template_once(catalogue):
    first = dispatch_event("ping", {"x": 1}, event_id="evt-1", user_id="u1", intent_id="int-9")
    assert first.created and not first.errors
    assert sorted(r.template_key for r in first.runs) == ["a", "b"]
    run_a = next(r for r in first.runs if r.template_key == "a")
    assert run_a.template.version == 2 and run_a.trigger == "event" and run_a.user_id == "u1"
    assert run_a.correlation_id == "int-9" and run_a.idempotency_key == "event:evt-1:a"
    assert run_a.metadata == {"event_id": "evt-1", "event_type": "ping", "intent_id": "int-9", "payload": {"x": 1}}

    # the same event again: nothing new, the same runs
    again = dispatch_event("ping", {"x": 1}, event_id="evt-1")
    assert not again.created
    assert [r.pk for r in again.runs] == [r.pk for r in sorted(first.runs, key=lambda r: r.created_at)]
    assert Run.objects.count() == 2 and IntentEvent.objects.count() == 1

    # the same id for another type is a conflict, not a silent no-op
    with pytest.raises(Conflict, match="event_id 'evt-1' was already used for an event of type 'ping'"):
        dispatch_event("other", {}, event_id="evt-1")
    # other tenants have their own ids and their own templates
    acme = dispatch_event("ping", {}, event_id="evt-1", tenant_id="acme")
    assert acme.created and [r.template_key for r in acme.runs] == ["e"]
    # an event nobody listens to is stored all the same
    assert dispatch_event("nobody-listens", {}).runs == []


def test_payload_fills_variables_and_a_refusal_does_not_stop_the_others(db):
    template(
        "lesson",
        "{event_types: [started]}",
        variables="{lesson: {type: integer}, payload: {type: object}, event: {type: object}, user_id: {type: string}}",
    )
    template("strict", "{event_types: [started]}", variables="{needed: {type: string, required: true}}")
    result = dispatch_event("started", {"lesson": "7", "extra": True}, event_id="e-7", user_id="u2")
    assert [e["template"] for e in result.errors] == ["strict"]
    assert "variable 'needed': required" in result.errors[0]["error"]
    (run,) = result.runs
    assert run.inputs == {
        "lesson": 7,
        "payload": {"lesson": "7", "extra": True},
        "user_id": "u2",
        "event": {
            "id": "e-7",
            "type": "started",
            "user_id": "u2",
            "intent_id": "",
            "payload": {"lesson": "7", "extra": True},
        },
    }
    assert IntentEvent.objects.get(event_id="e-7").errors == result.errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", {}), "type: an event type of 1 to 200 characters is required"),
        (("ping", [1]), "payload: must be a JSON object"),
        (("ping", {}, {"priority": 10}), "priority: 0 (most urgent) to 9"),
        (("ping", {}, {"event_id": "x" * 201}), "event_id: at most 200 characters"),
    ],
)
def test_bad_events_are_refused(db, args, message):
    kwargs = args[2] if len(args) > 2 else {}
    with pytest.raises(Invalid, match=message.replace("(", r"\(").replace(")", r"\)")):
        dispatch_event(args[0], args[1], **kwargs)
    assert not IntentEvent.objects.exists()


PAYLOAD_FLOW = """\
key: greet
variables:
  payload: {type: object}
  event: {type: object}
trigger: {event_types: [hello]}
outputs:
  text: "${steps.say.output}"
steps:
  - id: say
    type: noop
    params: {output: "hi ${payload.name}, from ${event.type} ${event.id}"}
"""


def test_payload_is_available_to_expressions(worker):
    save_template(load_spec(PAYLOAD_FLOW), PAYLOAD_FLOW)
    result = dispatch_event("hello", {"name": "Ada"}, event_id="h-1")
    run = wait_for_run(result.runs[0].pk)
    assert run.status == "succeeded" and run.outputs == {"text": "hi Ada, from hello h-1"}


# --- the API and the command ------------------------------------------------------------------------


def test_events_api(owner_api, outsider_api, tenants):
    template("listener", "{event_types: [ping]}", tenant="acme")
    body = {"type": "ping", "event_id": "api-1", "payload": {"k": "v"}, "user_id": "u", "priority": 2}
    created = owner_api.post(f"{API}/events", body, format="json")
    assert created.status_code == 201, created.content
    event = created.json()["event"]
    assert created.json()["created"] is True and event["event_id"] == "api-1"
    assert [r["template_key"] for r in event["runs"]] == ["listener"]
    run = Run.objects.get(pk=event["runs"][0]["id"])
    assert (run.tenant_id, run.priority) == ("acme", 2)
    repeated = owner_api.post(f"{API}/events/", body, format="json")  # trailing slash optional
    assert repeated.status_code == 200 and repeated.json()["event"]["runs"] == event["runs"]
    assert owner_api.get(f"{API}/events").json()["results"][0]["event_id"] == "api-1"
    assert owner_api.get(f"{API}/events/api-1").json()["payload"] == {"k": "v"}
    # outsiders see nothing; bad bodies are one-line 400s
    assert outsider_api.get(f"{API}/events/api-1").status_code == 404
    assert outsider_api.get(f"{API}/events").json()["results"] == []
    for bad, message in (
        ({"payload": {}}, "type"),
        ({"type": "p", "payload": [1]}, "payload"),
        ({"type": "p", "priority": 12}, "priority"),
    ):
        response = owner_api.post(f"{API}/events", bad, format="json")
        assert response.status_code == 400 and response.json()["detail"].startswith(message)
    conflict = owner_api.post(f"{API}/events", {"type": "other", "event_id": "api-1"}, format="json")
    assert conflict.status_code == 409
    assert api_client_for(None).post(f"{API}/events", body, format="json").status_code == 401


def test_viewer_cannot_dispatch(viewer):
    assert api_client_for(viewer).post(f"{API}/events", {"type": "ping"}, format="json").status_code == 403


def test_dispatch_event_command(db, capsys):
    template("cli-listener", "{event_types: [tick]}")
    call_command("dispatch_event", "tick", "--payload", '{"n": 1}', "--event-id", "c-1", "--json")
    first = json.loads(capsys.readouterr().out)
    assert first["created"] is True and [r["template"] for r in first["runs"]] == ["cli-listener"]
    call_command("dispatch_event", "tick", "--event-id", "c-1")
    out = capsys.readouterr().out
    assert "already dispatched (repeat: nothing started): 1 run(s)" in out and first["runs"][0]["id"] in out
    with pytest.raises(SystemExit) as exit_info:
        call_command("dispatch_event", "tick", "--payload", "{not json")
    assert exit_info.value.code == 2
    assert "error: --payload: not JSON" in capsys.readouterr().err


def test_dispatch_event_command_suggests_a_misspelled_type(db, capsys):
    template("cli-listener", "{event_types: [streak_ping]}")
    call_command("dispatch_event", "streak_pnig", "--event-id", "typo-1")
    captured = capsys.readouterr()
    assert "0 run(s)" in captured.out
    assert captured.err.strip() == (
        "warning: no active template of tenant 'default' listens to 'streak_pnig' (did you mean 'streak_ping'?)"
    )
