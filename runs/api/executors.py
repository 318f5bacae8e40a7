"""``/api/v1/executors/...``: external executors take steps over HTTP (seed 001).

An executor authenticates with ``Authorization: Bearer <executor token>`` (``manage.py
create_executor``), acts in its own tenant only and on its own queues only. The verbs are the
engine's (runs/engine/executors.py): poll, heartbeat, complete (task_done), fail (task_failed);
a report after the lease has passed is refused with 409, like a Celery worker's late result.
"""

from __future__ import annotations

import hmac
from typing import Any

from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed, MethodNotAllowed, PermissionDenied
from rest_framework.permissions import BasePermission
from rest_framework.response import Response
from rest_framework.views import APIView

from ..engine import executors
from ..models import Executor
from .parsers import StrictJSONParser


class ExecutorPrincipal:
    """The authenticated executor (``request.user`` of these views)."""

    is_authenticated = True

    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    @property
    def username(self) -> str:
        return f"executor:{self.executor.name}"


class ExecutorTokenAuthentication(BaseAuthentication):
    """``Authorization: Bearer exe_...``: the sha256 of the token names an active executor."""

    keyword = b"bearer"

    def authenticate(self, request: Any) -> tuple[ExecutorPrincipal, None] | None:
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != self.keyword:
            return None
        if len(parts) != 2:
            raise AuthenticationFailed("Authorization: expected 'Bearer <executor token>'")
        token = parts[1].decode(errors="replace")
        digest = Executor.hash_token(token)
        executor = Executor.objects.select_related("tenant").filter(token_hash=digest, is_active=True).first()
        if executor is None or not hmac.compare_digest(executor.token_hash, digest):
            raise AuthenticationFailed("unknown or revoked executor token")
        Executor.objects.filter(pk=executor.pk).update(last_seen=timezone.now())
        return ExecutorPrincipal(executor), None

    def authenticate_header(self, request: Any) -> str:
        return 'Bearer realm="executors"'


class IsExecutor(BasePermission):
    def has_permission(self, request: Any, view: Any) -> bool:
        return isinstance(request.user, ExecutorPrincipal)


class _ExecutorView(APIView):
    authentication_classes = [ExecutorTokenAuthentication]
    permission_classes = [IsExecutor]
    parser_classes = [StrictJSONParser]

    def initial(self, request: Any, *args: Any, **kwargs: Any) -> None:
        # an undeclared method is a 405 before anything else (not a 401 for a missing token)
        if request.method.lower() not in self.http_method_names or not hasattr(self, request.method.lower()):
            raise MethodNotAllowed(request.method)
        super().initial(request, *args, **kwargs)

    @property
    def executor(self) -> Executor:
        return self.request.user.executor


class PollSerializer(serializers.Serializer):
    queues = serializers.ListField(child=serializers.CharField(max_length=100), min_length=1, max_length=50)
    executor_id = serializers.CharField(max_length=100, required=False, default="")
    max_tasks = serializers.IntegerField(min_value=1, max_value=executors.MAX_TASKS, default=1)
    lease_seconds = serializers.FloatField(
        min_value=executors.MIN_LEASE_SECONDS, max_value=executors.MAX_LEASE_SECONDS, default=60.0
    )


class LeaseSerializer(serializers.Serializer):
    lease_token = serializers.UUIDField()


class HeartbeatSerializer(LeaseSerializer):
    lease_seconds = serializers.FloatField(
        min_value=executors.MIN_LEASE_SECONDS, max_value=executors.MAX_LEASE_SECONDS, default=60.0
    )


class CompleteSerializer(LeaseSerializer):
    output = serializers.JSONField(required=False, allow_null=True, default=None)
    duration_ms = serializers.IntegerField(min_value=0, max_value=86_400_000, required=False, default=0)


class FailSerializer(LeaseSerializer):
    error = serializers.CharField(max_length=10_000, allow_blank=True, default="failed")
    retryable = serializers.BooleanField(default=True)
    duration_ms = serializers.IntegerField(min_value=0, max_value=86_400_000, required=False, default=0)


TASK_FIELDS = {
    "step": serializers.IntegerField(help_text="The step's primary key: the id of the calls below."),
    "lease_token": serializers.UUIDField(),
    "lease_expires_at": serializers.DateTimeField(),
    "run_id": serializers.UUIDField(),
    "step_id": serializers.CharField(),
    "type": serializers.CharField(),
    "queue": serializers.CharField(),
    "params": serializers.JSONField(),
    "attempt": serializers.IntegerField(),
    "max_attempts": serializers.IntegerField(),
    "idempotency_key": serializers.CharField(),
    "timeout": serializers.FloatField(),
}
LEASE_LOST = OpenApiResponse(description="The lease has passed or the run was cancelled: the report is refused.")


def _task_json(task: executors.Task) -> dict[str, Any]:
    return {
        "step": task.step_pk,
        "lease_token": str(task.lease_token),
        "lease_expires_at": task.lease_expires_at.isoformat(),
        "run_id": str(task.run_id),
        "step_id": task.step_id,
        "type": task.type,
        "queue": task.queue,
        "params": task.params,
        "attempt": task.attempt,
        "max_attempts": task.max_attempts,
        "idempotency_key": task.idempotency_key,
        "timeout": task.timeout,
    }


class PollView(_ExecutorView):
    @extend_schema(
        summary="Take up to max_tasks steps of your queues, each under a lease",
        request=PollSerializer,
        responses={
            200: inline_serializer("ExecutorPoll", {"tasks": inline_serializer("ExecutorTask", TASK_FIELDS, many=True)})
        },
    )
    def post(self, request: Any) -> Response:
        data = PollSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        queues = list(dict.fromkeys(data.validated_data["queues"]))
        denied = [q for q in queues if q not in self.executor.queues]
        if denied:
            raise PermissionDenied(f"queues: this executor may not take steps of {denied[0]!r}")
        tasks = executors.poll(
            tenant_id=self.executor.tenant.slug,
            queues=queues,
            executor_id=data.validated_data["executor_id"] or self.executor.name,
            max_tasks=data.validated_data["max_tasks"],
            lease_seconds=data.validated_data["lease_seconds"],
        )
        return Response({"tasks": [_task_json(t) for t in tasks]})


class _StepReport(_ExecutorView):
    serializer_class: type[serializers.Serializer] = LeaseSerializer

    def post(self, request: Any, step_pk: int) -> Response:
        data = self.serializer_class(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            body = self.report(int(step_pk), data.validated_data)
        except executors.LeaseLost as exc:
            return Response({"detail": str(exc)}, status=409)
        return Response(body)

    def report(self, step_pk: int, values: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError


class HeartbeatView(_StepReport):
    serializer_class = HeartbeatSerializer

    @extend_schema(
        summary="Extend the lease of a step you hold",
        request=HeartbeatSerializer,
        responses={
            200: inline_serializer("ExecutorLease", {"lease_expires_at": serializers.DateTimeField()}),
            409: LEASE_LOST,
        },
    )
    def post(self, request: Any, step_pk: int) -> Response:
        return super().post(request, step_pk)

    def report(self, step_pk: int, values: dict[str, Any]) -> dict[str, Any]:
        until = executors.heartbeat(
            tenant_id=self.executor.tenant.slug,
            step_pk=step_pk,
            token=values["lease_token"],
            lease_seconds=values["lease_seconds"],
        )
        return {"lease_expires_at": until.isoformat()}


class CompleteView(_StepReport):
    serializer_class = CompleteSerializer

    @extend_schema(
        summary="task_done: the step succeeded with this output",
        request=CompleteSerializer,
        responses={200: inline_serializer("ExecutorResult", {"result": serializers.CharField()}), 409: LEASE_LOST},
    )
    def post(self, request: Any, step_pk: int) -> Response:
        return super().post(request, step_pk)

    def report(self, step_pk: int, values: dict[str, Any]) -> dict[str, Any]:
        result = executors.complete(
            tenant_id=self.executor.tenant.slug,
            step_pk=step_pk,
            token=values["lease_token"],
            output=values["output"],
            duration_ms=values["duration_ms"],
        )
        return {"result": result}


class FailView(_StepReport):
    serializer_class = FailSerializer

    @extend_schema(
        summary="task_failed: the attempt failed (retryable or not)",
        request=FailSerializer,
        responses={200: inline_serializer("ExecutorFailure", {"result": serializers.CharField()}), 409: LEASE_LOST},
    )
    def post(self, request: Any, step_pk: int) -> Response:
        return super().post(request, step_pk)

    def report(self, step_pk: int, values: dict[str, Any]) -> dict[str, Any]:
        result = executors.fail(
            tenant_id=self.executor.tenant.slug,
            step_pk=step_pk,
            token=values["lease_token"],
            error=values["error"],
            retryable=values["retryable"],
            duration_ms=values["duration_ms"],
        )
        return {"result": result}
