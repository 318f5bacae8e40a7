"""Seed 003's endpoints: POST /chat, POST/GET /chat/orchestrate, pause/resume/cancel; tenancy,
roles, idempotency and one-line errors as for runs."""

from __future__ import annotations

import pytest

from agents.models import LLMProvider
from tasks_app.models import AgentEndpoint, AgentTask
from tests.conftest import api_client_for
from tests.test_agent_tasks import PLAN, verdict, wait_for_task


@pytest.fixture
def acme_llm(llm_server, tenants):
    LLMProvider.objects.create(tenant_id="acme", name="scripted", base_url=llm_server.url, model="tiny")
    for name in ("fetch_issues", "store_report"):
        AgentEndpoint.objects.create(tenant_id="acme", name=name, call=f"/tools/{name}")
    return llm_server


def test_orchestrate_201_then_status_in_seed_003_shape_and_other_tenant_404(
    worker, acme_llm, owner_api, outsider_api, settings, agent_server
):
    settings.ORCHESTRATOR_TASK_PLAN_WAIT = 20.0
    acme_llm.script(PLAN, schema="decompose_goal")
    acme_llm.script(verdict(33), verdict(66), verdict(100, "finish", True), schema="evaluate_progress")
    body = {
        "goal": "Migrate all TODO comments to GitHub issues",
        "threadId": "thread-123",
        "chatModel": {"provider": "openai", "model": "tiny"},
        "tools": ["fetch_issues", "store_report"],
    }

    response = owner_api.post("/api/v1/chat/orchestrate", body, format="json", HTTP_IDEMPOTENCY_KEY="k-1")

    assert response.status_code == 201, response.json()
    data = response.json()
    assert set(data) == {"taskId", "status", "strategy", "estimatedDuration"}
    assert data["status"] == "queued" and data["estimatedDuration"] == 30
    assert data["strategy"]["totalSteps"] == 3
    assert [s["tool"] for s in data["strategy"]["steps"] if "tool" in s] == ["fetch_issues", "store_report"]
    # the same key returns the same task
    again = owner_api.post("/api/v1/chat/orchestrate", body, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert again.json()["taskId"] == data["taskId"] and AgentTask.objects.count() == 1

    wait_for_task(data["taskId"])
    status = owner_api.get(f"/api/v1/chat/orchestrate?taskId={data['taskId']}").json()
    assert status["status"] == "completed" and status["progress"] == 100
    assert (status["currentStep"], status["totalSteps"]) == (3, 3)
    assert status["goal"] == body["goal"]
    assert [(s["index"], s["status"]) for s in status["steps"]] == [(i, "completed") for i in range(3)]
    assert {"type", "message", "timestamp"} <= set(status["latestTraces"][0])
    assert AgentTask.objects.get(pk=data["taskId"]).chat_model == {"provider": "openai", "model": "tiny"}

    # another tenant sees nothing: 404 for the status and for every action
    assert outsider_api.get(f"/api/v1/chat/orchestrate?taskId={data['taskId']}").status_code == 404
    assert outsider_api.post(f"/api/v1/chat/orchestrate/{data['taskId']}/cancel").status_code == 404
    # a finished task cannot be paused or cancelled: 409 with one line
    conflict = owner_api.post(f"/api/v1/chat/orchestrate/{data['taskId']}/pause")
    assert conflict.status_code == 409 and "completed" in conflict.json()["detail"]


def test_pause_resume_cancel_endpoints(acme_llm, owner_api, viewer):
    # no worker: the task stays at its first step, which is enough to drive the verbs
    task = owner_api.post("/api/v1/chat/orchestrate", {"goal": "Long job", "tools": []}, format="json").json()
    path = f"/api/v1/chat/orchestrate/{task['taskId']}"

    assert api_client_for(viewer).post(f"{path}/pause").status_code == 403  # read-only role
    paused = owner_api.post(f"{path}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert owner_api.post(f"{path}/resume").json()["status"] == "running"
    cancelled = owner_api.post(f"{path}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert AgentTask.objects.get(pk=task["taskId"]).run.status == "cancelled"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "goal"),
        ({"goal": ""}, "goal"),
        ({"goal": "x", "tools": ["nope"]}, "no workflow template or agent endpoint named 'nope'"),
        ({"goal": "x", "maxSteps": 100000}, "max_steps"),
        ({"goal": "x" * 5000}, "goal: at most"),
    ],
)
def test_orchestrate_refuses_bad_input_naming_the_field(acme_llm, owner_api, body, message):
    response = owner_api.post("/api/v1/chat/orchestrate", body, format="json")
    assert response.status_code == 400
    assert message in response.json()["detail"]
    assert AgentTask.objects.count() == 0


def test_status_of_an_unknown_or_malformed_task_is_404_or_400(owner_api, tenants):
    assert owner_api.get("/api/v1/chat/orchestrate?taskId=not-a-uuid").status_code == 404
    assert owner_api.get("/api/v1/chat/orchestrate").status_code == 400


def chat(text: str) -> dict:
    return {
        "id": "thread-123",
        "message": {"id": "msg-456", "role": "user", "parts": [{"type": "text", "text": text}]},
        "chatModel": {"provider": "openai", "model": "tiny"},
    }


def test_chat_answers_a_simple_message_with_one_llm_call(acme_llm, owner_api):
    acme_llm.script("Hello! How can I help?")

    response = owner_api.post("/api/v1/chat", chat("Hi there"), format="json")

    assert response.status_code == 200, response.json()
    data = response.json()
    assert data["orchestrated"] is False and data["content"] == "Hello! How can I help?"
    assert data["id"] == "msg-456" and data["role"] == "assistant"
    assert len(acme_llm.calls()) == 1 and AgentTask.objects.count() == 0


def test_chat_turns_a_complex_message_into_a_task(acme_llm, owner_api):
    text = "Analyze all issues in my GitHub repo, then group every issue by theme and finally create a summary report"

    response = owner_api.post("/api/v1/chat", chat(text), format="json")

    data = response.json()
    assert response.status_code == 200, data
    assert data["orchestrated"] is True and data["taskId"]
    task = AgentTask.objects.get(pk=data["taskId"])
    assert (task.goal, task.thread_id, task.tenant_id) == (text, "thread-123", "acme")
    assert acme_llm.calls() == []  # the heuristics were sure: no LLM call to decide


def test_chat_asks_the_model_when_the_heuristics_are_unsure(acme_llm, owner_api):
    acme_llm.script({"orchestrate": False, "reason": "one question"}, schema="should_orchestrate")
    acme_llm.script("42")
    text = "Could you tell me what the answer to the ultimate question is? " * 4

    data = owner_api.post("/api/v1/chat", chat(text), format="json").json()

    assert data["orchestrated"] is False and data["content"] == "42"
    assert len(acme_llm.calls("should_orchestrate")) == 1


def test_admin_task_page_and_actions_check_roles(acme_llm, owner, viewer, client):
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    from tasks_app import services

    task = services.start_task("acme", "Long job", [])
    User = get_user_model()
    for user in (owner, viewer):
        User.objects.filter(pk=user.pk).update(is_staff=True)
        user.user_permissions.add(*Permission.objects.filter(content_type__app_label="tasks_app"))
    # the change page shows the goal, the progress bar and the run
    client.force_login(owner)
    page = client.get(f"/admin/tasks_app/agenttask/{task.pk}/change/")
    assert page.status_code == 200
    assert b"Long job" in page.content and b"<progress" in page.content
    # a viewer's pause is refused; the owner's goes through the service
    client.force_login(viewer)
    client.post("/admin/tasks_app/agenttask/", {"action": "pause_tasks", "_selected_action": [str(task.pk)]})
    assert AgentTask.objects.get(pk=task.pk).status == "running"
    client.force_login(owner)
    client.post("/admin/tasks_app/agenttask/", {"action": "pause_tasks", "_selected_action": [str(task.pk)]})
    assert AgentTask.objects.get(pk=task.pk).status == "paused"
    client.post("/admin/tasks_app/agenttask/", {"action": "cancel_tasks", "_selected_action": [str(task.pk)]})
    assert AgentTask.objects.get(pk=task.pk).status == "cancelled"
