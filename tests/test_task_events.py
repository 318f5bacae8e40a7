"""Live progress of agent tasks (issue 9): ``GET /api/v1/chat/orchestrate/{id}/events`` against a
real worker and the scripted LLM server: ordered step events ending at 100 %, tenancy, roles,
``Last-Event-ID`` resuming without repeats, 204 after ``end``, and append-only snapshot keys (what
keeps a cursor valid) through a replan that shortens the plan.
"""

from __future__ import annotations

import json
import time

from tasks_app import services
from tasks_app.events import task_snapshot
from tests.conftest import api_client_for
from tests.llm_server import Reply
from tests.test_agent_tasks import PLAN, scripted, verdict, wait_for_task  # noqa: F401
from tests.test_agent_tasks_api import acme_llm  # noqa: F401
from tests.test_run_events import parse_sse, sse_settings  # noqa: F401


def slow(value: dict, seconds: float = 0.3) -> Reply:
    """A scripted JSON answer that takes ``seconds``: longer than the poll, so `running` is seen."""
    return Reply(content=json.dumps(value), delay=seconds)


def test_task_stream_shows_steps_in_order_then_end_at_100_and_resumes_without_repeats(
    worker,
    acme_llm,  # noqa: F811
    viewer,
    outsider_api,
    sse_settings,  # noqa: F811
):
    # Given: a 3-step task of tenant acme whose reasoning step and evaluations take 0.3 s each
    acme_llm.script(PLAN, schema="decompose_goal")
    acme_llm.script(
        slow(verdict(33)), slow(verdict(66)), slow(verdict(100, "finish", True)), schema="evaluate_progress"
    )
    acme_llm.script(Reply(content="Two themes: bugs and docs.", delay=0.3))
    task = services.start_task("acme", "Summarize the open issues", ["fetch_issues", "store_report"])
    url = f"/api/v1/chat/orchestrate/{task.pk}/events"

    # another tenant's task is a 404, with the JSON error shape even for an EventSource's Accept
    refused = outsider_api.get(url, HTTP_ACCEPT="text/event-stream")
    assert refused.status_code == 404 and refused.json() == {"detail": "task not found"}

    # When: a viewer of the tenant (read only) reads the stream to its end
    client = api_client_for(viewer)
    response = client.get(url, HTTP_ACCEPT="text/event-stream")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    assert response["Cache-Control"] == "no-cache"
    events = parse_sse(response.streaming_content)

    # Then: the planned steps completed one after the other; the later ones were pending first (the
    # first one is queued by the commit that saves the plan) and the slow one was seen running
    steps = [(e["data"]["index"], e["data"]["status"]) for e in events if e["event"] == "step"]
    assert [s for s in steps if s[1] == "completed"] == [(0, "completed"), (1, "completed"), (2, "completed")]
    assert [status for i, status in steps if i == 1] == ["pending", "running", "completed"]
    assert [status for i, status in steps if i == 2][0] == "pending"
    assert steps.index((0, "completed")) < steps.index((1, "completed")) < steps.index((2, "completed"))
    last_step = [e["data"] for e in events if e["event"] == "step" and e["data"]["index"] == 2][-1]
    assert last_step == {
        "index": 2,
        "description": "Store the report",
        "status": "completed",
        "tool": "store_report",
        "attempts": 1,
    }
    # the run's rows in creation order, each last seen succeeded; evaluations seen running
    executions = [(e["data"]["step_id"], e["data"]["status"]) for e in events if e["event"] == "execution"]
    finished = [step_id for step_id, status in executions if status == "succeeded"]
    assert finished == ["decompose", "step_1", "evaluate_1", "step_2", "evaluate_2", "step_3", "evaluate_3"]
    assert ("evaluate_2", "running") in executions
    # progress only grows and ends at 100 with the task's last word: end
    progress = [e["data"]["progress"] for e in events if e["event"] == "task"]
    assert progress == sorted(progress) and progress[-1] == 100
    assert set(events[0]["data"]) == {"taskId", "status", "progress", "currentStep", "totalSteps"}
    assert events[-1]["event"] == "end"
    end = events[-1]["data"]
    assert (end["taskId"], end["status"], end["progress"], end["error"]) == (str(task.pk), "completed", 100, None)
    assert end["result"]["answer"].startswith("Result of tool store_report")
    assert len({e["id"] for e in events}) == len(events)

    # And: resuming from any event sends each later change once (its last state), then end
    for middle in (len(events) // 3, len(events) // 2, len(events) - 2):
        again = client.get(url, HTTP_LAST_EVENT_ID=events[middle]["id"])
        rest = parse_sse(again.streaming_content)
        later: dict = {}
        for event in events[middle + 1 : -1]:
            later[(event["event"], event["data"].get("index"), event["data"].get("step_id"))] = event["data"]
        got = {(e["event"], e["data"].get("index"), e["data"].get("step_id")): e["data"] for e in rest[:-1]}
        assert got == later and len(rest) - 1 == len(later), middle
        assert rest[-1]["event"] == "end"
    # after end: 204, nothing more
    assert client.get(url, HTTP_LAST_EVENT_ID=events[-1]["id"]).status_code == 204
    # an id this server did not make starts over from the whole state, saying why
    restart = client.get(url, HTTP_LAST_EVENT_ID="not-an-id")
    text = b"".join(restart.streaming_content).decode()
    assert ": Last-Event-ID: not an event id of this stream" in text
    assert parse_sse([text.encode()])[-1]["event"] == "end"


def test_snapshot_keys_are_append_only_through_a_replan_that_shortens_the_plan(scripted, agent_server):  # noqa: F811
    # Given: a 3-step plan replanned after step 1 into 2 steps (the third planned step is dropped)
    scripted.script(PLAN, schema="decompose_goal")
    scripted.script(
        {
            "steps": [{"id": "count", "description": "Count rows instead", "tool": "count_rows", "arguments": {}}],
            "estimated_duration_s": 5,
        },
        schema="decompose_goal",
    )
    scripted.script(
        slow(verdict(30, "replan"), 0.2), slow(verdict(100, "finish", True), 0.2), schema="evaluate_progress"
    )
    task = services.start_task("default", "Report", ["fetch_issues", "store_report", "count_rows"])

    # When: the snapshot is read over and over while the task runs
    seen: list[list[str]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        snapshot = task_snapshot(task.pk)
        if not seen or list(snapshot.items) != seen[-1]:
            seen.append(list(snapshot.items))
        if snapshot.done:
            break
        time.sleep(0.02)
    assert snapshot.done, seen[-1]

    # Then: every key list is a prefix of the next (a cursor made earlier stays valid)
    for before, after in zip(seen, seen[1:], strict=False):
        assert after[: len(before)] == before, (before, after)
    assert seen[-1] == [
        "task",
        "execution:decompose",
        "step:0",
        "step:1",
        "step:2",
        "execution:step_1",
        "execution:evaluate_1",
        "execution:replan_1",
        "execution:step_2",
        "execution:evaluate_2",
    ]
    final = {key: item.data for key, item in snapshot.items.items()}
    assert final["step:1"]["description"] == "Count rows instead" and final["step:1"]["status"] == "completed"
    assert final["step:2"]["status"] == "dropped"
    assert snapshot.end["status"] == "completed" and snapshot.end["progress"] == 100
    assert wait_for_task(task.pk).status == "completed"


def test_admin_task_page_follows_the_feed_with_the_session_of_a_member(acme_llm, owner, tenants, client):  # noqa: F811
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    from runs.models import Membership

    # Given: a staff user whose default tenant is globex, member (viewer) of acme too, and a task
    # of acme (no worker: it stays at its first step)
    User = get_user_model()
    User.objects.filter(pk=owner.pk).update(is_staff=True)
    owner.user_permissions.add(*Permission.objects.filter(content_type__app_label="tasks_app"))
    Membership.objects.filter(user=owner).update(is_default=False)
    Membership.objects.create(user=owner, tenant=tenants["globex"], role="owner", is_default=True)
    task = services.start_task("acme", "Long job", [])
    client.force_login(owner)

    # When: the admin opens the task page
    page = client.get(f"/admin/tasks_app/agenttask/{task.pk}/change/")

    # Then: it loads the script and names the feed with the task's tenant (an EventSource sends no X-Tenant)
    assert page.status_code == 200
    url = f"/api/v1/chat/orchestrate/{task.pk}/events?tenant=acme"
    assert f'data-events-url="{url}"'.encode() in page.content or f"data-events-url='{url}'".encode() in page.content
    assert b"tasks_app/task_page.js" in page.content and b"id='task-steps'" in page.content
    # and the session authenticates the stream (a GET: no CSRF token); without ?tenant it is the
    # default tenant's view, where the task does not exist
    services.cancel(task, "test")
    stream = client.get(url, HTTP_ACCEPT="text/event-stream")
    assert stream.status_code == 200
    events = parse_sse(stream.streaming_content)
    assert events[0]["event"] == "task" and events[-1]["data"]["status"] == "cancelled"
    assert client.get(url.split("?")[0], HTTP_ACCEPT="text/event-stream").status_code == 404
    # a tenant the user is not a member of is a 404 too; no session at all is a 401
    assert client.get(url.replace("=acme", "=initech")).status_code == 404
    client.logout()
    assert client.get(url).status_code in (401, 403)
