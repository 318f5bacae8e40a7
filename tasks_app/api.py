"""Seed 003's endpoints under ``/api/v1`` (included by orchestrator_site/urls.py).

================================================ ==========================================
``POST /chat``                                   a message: the answer (one LLM call), or a task
``POST /chat/orchestrate``                       start a task -> 201 ``{"taskId", "status",
                                                 "strategy": {"steps", "totalSteps"},
                                                 "estimatedDuration"}``
``GET /chat/orchestrate?taskId=``                seed 003's status shape
``POST /chat/orchestrate/{taskId}/pause``        pause / resume / cancel -> the status shape
``GET /chat/orchestrate/{taskId}/events``        live progress (Server-Sent Events, tasks_app/events.py)
================================================ ==========================================

Tenancy, token authentication, the ``Idempotency-Key`` header and the error shape are the runs
API's (``runs.api``): a request acts in its tenant, another tenant's task is a 404, writes need
the member or owner role, errors are ``{"detail": "<one line>"}``.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.urls import re_path
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import APIException, NotFound, ValidationError
from rest_framework.generics import GenericAPIView
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from orchestrator_site.conf import conf
from runs.api.fields import StrictCharField
from runs.api.parsers import StrictJSONParser
from runs.api.permissions import TENANT_PARAMETER, TENANT_QUERY_PARAMETER, TenantScopedMixin, TenantWritePermission
from runs.api.serializers import ErrorSerializer
from runs.api.views import (
    IDEMPOTENCY_PARAMETER,
    LAST_EVENT_ID_PARAMETER,
    UUID_PATTERN,
    EventStreamNegotiation,
    event_stream,
    idempotency_key,
    sse_event_schema,
)
from runs.choices import TriggerKind

from . import orchestrator, services
from .events import task_feed
from .models import AgentTask


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "conflict"


class LLMUnavailable(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "the LLM is unavailable"


ERRORS = {
    400: OpenApiResponse(ErrorSerializer, description="Invalid request (detail names the field)."),
    401: OpenApiResponse(ErrorSerializer, description="No or bad credentials."),
    403: OpenApiResponse(ErrorSerializer, description="Read-only role, or no tenant."),
    404: OpenApiResponse(ErrorSerializer, description="Not found in this tenant."),
}
CONFLICT = {409: OpenApiResponse(ErrorSerializer, description="The task is not in a state that allows this.")}


# --- serializers (request bodies and answers) ---------------------------------------------------


class ChatModelSerializer(serializers.Serializer):
    provider = StrictCharField(max_length=200, required=False)
    model = StrictCharField(max_length=200, required=False)


class PartSerializer(serializers.Serializer):
    type = StrictCharField(max_length=50)
    text = StrictCharField(max_length=100_000, required=False, allow_blank=True, trim_whitespace=False)


class MessageSerializer(serializers.Serializer):
    id = StrictCharField(max_length=200, required=False)
    role = serializers.ChoiceField(choices=["user"], required=False)
    parts = PartSerializer(many=True, max_length=100, min_length=1)


class ChatSerializer(serializers.Serializer):
    """Seed 003's chat body."""

    id = StrictCharField(max_length=200, required=False, help_text="The thread id.")
    message = MessageSerializer()
    chatModel = ChatModelSerializer(required=False)  # noqa: N815 - seed 003's name
    tools = serializers.ListField(child=StrictCharField(max_length=64), required=False, max_length=100)


class ChatAnswerSerializer(serializers.Serializer):
    id = serializers.CharField()
    role = serializers.CharField()
    content = serializers.CharField(allow_blank=True)
    orchestrated = serializers.BooleanField()
    taskId = serializers.UUIDField(required=False)  # noqa: N815
    reason = serializers.CharField(required=False)


class OrchestrateSerializer(serializers.Serializer):
    """Seed 003's orchestrate body, plus the task's own limits (deployment defaults when absent)."""

    goal = StrictCharField(max_length=100_000, trim_whitespace=False)
    threadId = StrictCharField(max_length=200, required=False, allow_blank=True)  # noqa: N815
    chatModel = ChatModelSerializer(required=False)  # noqa: N815
    tools = serializers.ListField(child=StrictCharField(max_length=64), required=False, max_length=100)
    maxSteps = serializers.IntegerField(required=False, min_value=1)  # noqa: N815
    contextWindowLimit = serializers.IntegerField(required=False, min_value=100, max_value=10_000_000)  # noqa: N815
    checkpointInterval = serializers.IntegerField(required=False, min_value=1)  # noqa: N815


class StrategySerializer(serializers.Serializer):
    steps = serializers.ListField(child=serializers.DictField())
    totalSteps = serializers.IntegerField()  # noqa: N815


class OrchestrateAnswerSerializer(serializers.Serializer):
    taskId = serializers.UUIDField()  # noqa: N815
    status = serializers.CharField()
    strategy = StrategySerializer()
    estimatedDuration = serializers.IntegerField(allow_null=True)  # noqa: N815


class TaskStepSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    id = serializers.CharField(allow_null=True)
    description = serializers.CharField(allow_null=True)
    tool = serializers.CharField(allow_null=True)
    status = serializers.CharField()
    attempts = serializers.IntegerField()


class TaskTraceSerializer(serializers.Serializer):
    type = serializers.CharField()
    message = serializers.CharField()
    timestamp = serializers.DateTimeField()


class TaskStatusSerializer(serializers.Serializer):
    """Seed 003's status shape."""

    taskId = serializers.UUIDField()  # noqa: N815
    status = serializers.CharField()
    goal = serializers.CharField()
    progress = serializers.IntegerField(min_value=0, max_value=100)
    currentStep = serializers.IntegerField()  # noqa: N815
    totalSteps = serializers.IntegerField()  # noqa: N815
    steps = TaskStepSerializer(many=True)
    latestTraces = TaskTraceSerializer(many=True)  # noqa: N815
    runId = serializers.UUIDField(allow_null=True)  # noqa: N815
    checkpoints = serializers.IntegerField()
    usage = serializers.DictField()
    result = serializers.JSONField(allow_null=True)
    error = serializers.CharField(allow_null=True)


# --- views --------------------------------------------------------------------------------------


class TaskAPIView(TenantScopedMixin, GenericAPIView):
    permission_classes = [IsAuthenticated, TenantWritePermission]
    parser_classes = [StrictJSONParser]

    def get_task(self, task_id: Any) -> AgentTask:
        try:
            task = self.scoped(AgentTask.objects.all()).filter(pk=task_id).first()
        except (DjangoValidationError, ValueError):
            task = None
        if task is None:
            raise NotFound("task not found")
        return task

    def start(self, request: Request, goal: str, body: dict[str, Any], key: str | None) -> AgentTask:
        try:
            return services.start_task(
                self.tenant.slug,
                goal,
                body.get("tools") or [],
                user_id=str(request.user.pk),
                idempotency_key=key,
                trigger=TriggerKind.API,
                thread_id=body.get("threadId") or body.get("id") or "",
                chat_model=dict(body.get("chatModel") or {}),
                max_steps=body.get("maxSteps"),
                context_window_limit=body.get("contextWindowLimit"),
                checkpoint_interval=body.get("checkpointInterval"),
            )
        except services.TaskInputError as exc:
            raise ValidationError({"detail": str(exc)}) from None


class ChatView(TaskAPIView):
    serializer_class = ChatSerializer

    @extend_schema(
        summary="Chat: a simple message is answered, a complex one becomes an agent task",
        description=(
            "Seed 003's detector: cheap heuristics first (several tools, large input, long work), the LLM "
            "(schema `should_orchestrate`) only when unsure. A simple message gets the assistant's answer "
            "(one LLM call); a complex one starts a task and returns its `taskId` with `orchestrated: true`."
        ),
        request=ChatSerializer,
        parameters=[TENANT_PARAMETER, IDEMPOTENCY_PARAMETER],
        responses={
            200: ChatAnswerSerializer,
            **ERRORS,
            503: OpenApiResponse(ErrorSerializer, description="No LLM answered."),
        },
    )
    def post(self, request: Request) -> Response:
        from agents import llm

        body = ChatSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        text = "\n".join(p.get("text") or "" for p in data["message"]["parts"] if p["type"] == "text").strip()
        if not text:
            raise ValidationError({"detail": "message.parts: no text part"})
        if len(text) > conf.task_max_goal_chars:
            raise ValidationError({"detail": f"message: at most {conf.task_max_goal_chars} characters of text"})
        message_id = data["message"].get("id") or ""
        model = (data.get("chatModel") or {}).get("model") or None
        try:
            decision = orchestrator.should_orchestrate(self.tenant.slug, text, data.get("tools"), model=model).value
            if decision["orchestrate"]:
                task = self.start(request, text, data, idempotency_key(request, None))
                content = f"I'll work on this as a long-running task ({task.pk}); follow it with taskId."
                answer = {"taskId": task.pk, "orchestrated": True, "content": content}
            else:
                result = llm.complete(
                    tenant_id=self.tenant.slug, messages=[{"role": "user", "content": text}], model=model
                )
                answer = {"orchestrated": False, "content": result.content}
        except llm.LLMError as exc:
            raise LLMUnavailable(f"LLM: {exc.message}") from None
        return Response({"id": message_id, "role": "assistant", "reason": decision["reason"], **answer})


class OrchestrateView(TaskAPIView):
    serializer_class = OrchestrateSerializer

    @extend_schema(
        summary="Start an agent task",
        description=(
            "The goal is decomposed by the LLM (schema `decompose_goal`) as the first step of the task's run; "
            "the answer waits up to ORCHESTRATOR_TASK_PLAN_WAIT seconds for the strategy (empty if not ready). "
            "With an Idempotency-Key, repeating the request returns the same task."
        ),
        request=OrchestrateSerializer,
        parameters=[TENANT_PARAMETER, IDEMPOTENCY_PARAMETER],
        responses={201: OrchestrateAnswerSerializer, **ERRORS},
    )
    def post(self, request: Request) -> Response:
        body = OrchestrateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        task = self.start(request, data["goal"], data, idempotency_key(request, None))
        task = services.wait_for_plan(task, conf.task_plan_wait)
        steps = (task.strategy or {}).get("steps") or []
        answer = {
            "taskId": task.pk,
            "status": "queued" if task.status in ("pending", "running") else task.status,
            "strategy": {"steps": steps, "totalSteps": len(steps)},
            "estimatedDuration": (task.strategy or {}).get("estimated_duration_s"),
        }
        return Response(OrchestrateAnswerSerializer(answer).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Status of an agent task (seed 003's shape)",
        parameters=[
            TENANT_PARAMETER,
            OpenApiParameter("taskId", OpenApiTypes.UUID, OpenApiParameter.QUERY, required=True),
        ],
        request=None,
        responses={200: TaskStatusSerializer, **ERRORS},
    )
    def get(self, request: Request) -> Response:
        task_id = request.query_params.get("taskId")
        if not task_id:
            raise ValidationError({"detail": "taskId: required"})
        return Response(TaskStatusSerializer(services.status_payload(self.get_task(task_id))).data)


class TaskActionView(TaskAPIView):
    """POST pause / resume / cancel."""

    serializer_class = TaskStatusSerializer
    verb = ""

    def post(self, request: Request, task_id: str) -> Response:
        task = self.get_task(task_id)
        try:
            if self.verb == "pause":
                services.pause(task)
            elif self.verb == "resume":
                services.resume(task)
            else:
                services.cancel(task, reason=f"cancelled by {request.user.get_username()}")
        except services.TaskStateError as exc:
            raise Conflict(str(exc)) from None
        return Response(TaskStatusSerializer(services.status_payload(self.get_task(task_id))).data)


def _action(verb: str, summary: str) -> type[TaskActionView]:
    view = type(f"Task{verb.title()}View", (TaskActionView,), {"verb": verb})
    view.post = extend_schema(
        summary=summary,
        request=None,
        parameters=[TENANT_PARAMETER],
        responses={200: TaskStatusSerializer, **ERRORS, **CONFLICT},
    )(view.post)
    return view


PauseView = _action("pause", "Pause a task: the step in flight finishes, the next waits for resume")
ResumeView = _action(
    "resume", "Resume a paused, failed or cancelled task (from its latest checkpoint; no completed step repeats)"
)
CancelView = _action("cancel", "Cancel a task and its run")


class TaskEventsView(EventStreamNegotiation, TaskAPIView):
    """GET the live progress of a task as Server-Sent Events (the feed of ``tasks_app.events``)."""

    serializer_class = TaskStatusSerializer

    @extend_schema(
        summary="Live progress of an agent task (Server-Sent Events)",
        description=(
            'A `text/event-stream` (WHATWG HTML, "Server-sent events"): first the current state, then each '
            "change as it happens. `event: task` with `{taskId, status, progress, currentStep, totalSteps}` "
            "(seed 003's status fields) when one of them changes; `event: step` with `{index, description, "
            "status, tool, attempts}` per planned step (`status` `dropped` when a replan removed it); "
            "`event: execution` with `{step_id, op, index, status, attempts, error}` per row of the task's "
            "run (decompose, args_k, step_k, evaluate_k, replan_k, summarize_k); finally `event: end` with "
            "`{taskId, status, progress, result, error, finished_at}` once the task is completed, failed or "
            "cancelled, and the stream closes. Every event has an `id`; reconnecting with it as "
            "`Last-Event-ID` resumes without repeats, and once `end` was received the answer is 204 "
            "(EventSource stops reconnecting). A `: heartbeat` comment comes after ORCHESTRATOR_SSE_HEARTBEAT "
            "seconds of silence; the stream closes after ORCHESTRATOR_SSE_MAX_SECONDS (reconnect to go on). "
            "`run_task` and the admin's task page read the same feed."
        ),
        parameters=[TENANT_PARAMETER, TENANT_QUERY_PARAMETER, LAST_EVENT_ID_PARAMETER],
        request=None,
        responses={
            (200, "text/event-stream"): OpenApiResponse(
                sse_event_schema(["task", "step", "execution", "end"]),
                description="The event stream (until `end` or the time cap).",
            ),
            204: OpenApiResponse(description="`Last-Event-ID` is the `end` event: nothing more will come."),
            **{code: response for code, response in ERRORS.items() if code != 400},
        },
    )
    def get(self, request: Request, task_id: str) -> Any:
        task = self.get_task(task_id)
        return event_stream(request, lambda last_event_id: task_feed(task.pk, last_event_id=last_event_id))


TASK = rf"chat/orchestrate/(?P<task_id>{UUID_PATTERN})"

urlpatterns = [
    re_path(r"^chat/?$", ChatView.as_view(), name="chat"),
    re_path(r"^chat/orchestrate/?$", OrchestrateView.as_view(), name="chat-orchestrate"),
    re_path(rf"^{TASK}/pause/?$", PauseView.as_view(), name="task-pause"),
    re_path(rf"^{TASK}/resume/?$", ResumeView.as_view(), name="task-resume"),
    re_path(rf"^{TASK}/cancel/?$", CancelView.as_view(), name="task-cancel"),
    re_path(rf"^{TASK}/events/?$", TaskEventsView.as_view(), name="task-events"),
]
