"""Views of ``/api/v1/``. Thin: scope the queryset to the tenant, validate the body, call a service.

Every view acts in the request's tenant (``X-Tenant`` or the caller's default, see
``runs.tenancy``); a row of another tenant is a 404. Writes need the member or owner role.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import Any

from django.db.models import F, OuterRef, Subquery
from django.db.models.fields.json import KT
from django.http import StreamingHttpResponse
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from knox import views as knox_views
from knox.views import LoginView as KnoxLoginView
from rest_framework import mixins, status, viewsets
from rest_framework.authentication import BasicAuthentication, SessionAuthentication
from rest_framework.decorators import action
from rest_framework.exceptions import AuthenticationFailed, NotFound, ValidationError
from rest_framework.generics import GenericAPIView, get_object_or_404
from rest_framework.permissions import IsAuthenticated
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from orchestrator_site import logging as logctx
from templates_app.models import WorkflowTemplate
from templates_app.services import save_template
from templates_app.spec import load_spec

from .. import services, tenancy
from ..events import EventFeed, InvalidCursor, run_feed
from ..models import Attempt, Run, Step, Trace
from . import serializers as s
from .filters import AttemptFilter, RunFilter, StepFilter, TraceFilter
from .pagination import IdPagination, NewestFirstPagination
from .parsers import StrictJSONParser, TextYAMLParser, YAMLTextParser
from .permissions import TENANT_PARAMETER, TENANT_QUERY_PARAMETER, TenantScopedMixin, TenantWritePermission
from .throttling import LoginFailureThrottle, LoginRateThrottle

IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_PARAMETER = OpenApiParameter(
    name=IDEMPOTENCY_HEADER,
    type={"type": "string", "pattern": "^[\\x21-\\x7e]{1,200}$", "minLength": 1, "maxLength": 200},
    location=OpenApiParameter.HEADER,
    required=False,
    description=(
        "Makes the request safe to repeat: the same key with the same body returns the same run (200); "
        "with a different body, 409. 1-200 printable characters."
    ),
)
_PRINTABLE_KEY = re.compile(r"[\x21-\x7e]{1,200}")
ERRORS = {
    400: OpenApiResponse(s.ErrorSerializer, description="Invalid request (detail says why)."),
    401: OpenApiResponse(s.ErrorSerializer, description="No or bad credentials."),
    403: OpenApiResponse(s.ErrorSerializer, description="Read-only role, or no tenant."),
    404: OpenApiResponse(s.ErrorSerializer, description="Not found in this tenant."),
}
READ_ERRORS = {k: v for k, v in ERRORS.items() if k != 400}
LAST_EVENT_ID_PARAMETER = OpenApiParameter(
    name="Last-Event-ID",
    type=OpenApiTypes.STR,
    location=OpenApiParameter.HEADER,
    required=False,
    description=(
        "The `id` of the last event received (EventSource sends it when it reconnects): the stream "
        "goes on from there, repeating nothing. An id this server did not make is ignored (the "
        "stream starts over with the whole state, after a comment line saying why)."
    ),
)


def sse_event_schema(names: list[str]) -> dict[str, Any]:
    """One event of a stream whose events are ``names``, as OpenAPI 3.0 describes an event
    stream's ``schema`` (each event)."""
    return {
        "type": "object",
        "properties": {
            "event": {"type": "string", "enum": names},
            "id": {"type": "string", "description": "Cursor to send back as Last-Event-ID."},
            "data": {"type": "string", "description": "JSON object (fields per event: see the description)."},
        },
        "required": ["event", "data"],
    }


SSE_EVENT_SCHEMA = sse_event_schema(["step", "run", "end"])
UUID_PATTERN = r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"


def idempotency_key(request: Request, body_key: str | None) -> str | None:
    """The key of ``Idempotency-Key`` or the body's ``idempotency_key`` (they must agree). 400 if malformed."""
    header = request.headers.get(IDEMPOTENCY_HEADER)
    if header is not None:
        header = header.strip()
        if not _PRINTABLE_KEY.fullmatch(header):
            raise ValidationError({"detail": f"{IDEMPOTENCY_HEADER}: 1-200 printable ASCII characters, no spaces"})
        if body_key and body_key != header:
            raise ValidationError({"detail": f"{IDEMPOTENCY_HEADER} header and idempotency_key field differ"})
    return header or body_key or None


def load_run_detail(run: Run) -> Run:
    """Attach what the detail shows (progress, top-level steps, current step, latest traces): 3 queries."""
    run.progress_info = services.progress(run)
    run.top_steps = list(
        Step.objects.filter(run_id=run.pk, parent__isnull=True)
        .annotate(step_name=KT("spec__name"))
        .defer("spec", "input", "output", "item")
        .order_by("id")
    )
    run.current = services.current_step(run.top_steps)
    run.recent_traces = services.latest_traces(run)
    return run


def event_stream(request: Request, feed_for: Callable[[str | None], EventFeed]) -> Response | StreamingHttpResponse:
    """The answer of an event-stream view: ``feed_for(last_event_id)`` as ``text/event-stream``
    (no caching, no proxy buffering), or 204 when the client's ``Last-Event-ID`` is the ``end``
    event and nothing changed since (per WHATWG an ``EventSource`` then stops reconnecting).

    ``feed_for`` builds the feed (``runs.events.run_feed``, ``tasks_app.events.task_feed``) and
    raises InvalidCursor for an id this server did not make; the stream then starts over from the
    whole state, after a comment line saying why. The view calling this must render its errors
    and the 204 as JSON whatever the Accept header says (see ``EventStreamNegotiation``).
    """
    last_event_id, refused = request.headers.get("Last-Event-ID") or None, None
    try:
        feed = feed_for(last_event_id)
    except InvalidCursor as exc:
        # The meaning of an id is the server's (WHATWG): one it did not make (another version,
        # a hand-made header) restarts the stream from the whole state, saying why in-band.
        feed, refused = feed_for(None), str(exc)
    if feed.finished():
        return Response(status=status.HTTP_204_NO_CONTENT)
    frames = feed.frames() if refused is None else itertools.chain([f": {refused}; starting over\n\n"], feed.frames())
    response = StreamingHttpResponse(frames, content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response


class EventStreamNegotiation:
    """For views that stream events (``streams()`` says whether this request is such a one): what
    DRF answers instead of the stream (an error, the 204) is JSON whatever the Accept header says
    (an EventSource accepts only text/event-stream, which would otherwise be a 406), and the tenant
    may be named by the ``tenant`` query parameter (an EventSource cannot send ``X-Tenant``; the
    header wins when both are sent). Put it before the TenantScopedMixin view in the bases."""

    request: Any

    def streams(self) -> bool:
        return True

    def requested_tenant(self) -> str | None:
        requested = super().requested_tenant()  # type: ignore[misc]
        if requested is None and self.streams():
            return self.request.GET.get("tenant") or None
        return requested

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        if self.streams():
            return JSONRenderer(), JSONRenderer.media_type
        return super().perform_content_negotiation(request, force)  # type: ignore[misc]


class BaseAPIView(TenantScopedMixin):
    permission_classes = [IsAuthenticated, TenantWritePermission]
    parser_classes = [StrictJSONParser]


# --- runs ---------------------------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(
        summary="List runs",
        description="Newest first, cursor-paginated; filter by status, template, created range, correlation id.",
        parameters=[TENANT_PARAMETER],
        responses={200: s.RunSerializer(many=True), **READ_ERRORS},
    ),
    retrieve=extend_schema(
        summary="Run detail: status, progress %, current step, steps with attempts and timings, latest traces",
        parameters=[TENANT_PARAMETER],
        responses={200: s.RunDetailSerializer, **READ_ERRORS},
    ),
)
class RunViewSet(
    EventStreamNegotiation, BaseAPIView, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    """Runs of the tenant: start one, list, read, cancel, retry, rerun."""

    serializer_class = s.RunSerializer
    filterset_class = RunFilter
    pagination_class = NewestFirstPagination
    lookup_value_regex = UUID_PATTERN

    def get_queryset(self):
        queryset = self.scoped(Run.objects.all())
        if self.action == "events":
            return queryset.only("id", "tenant_id", "correlation_id")
        if self.action == "list":
            return queryset.defer("spec", "inputs", "outputs", "metadata")
        return queryset.defer("spec")

    def get_serializer_class(self):
        return s.RunDetailSerializer if self.action == "retrieve" else s.RunSerializer

    def streams(self) -> bool:
        return self.action == "events"

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        run = self.get_object()
        logctx.bind(run_id=run.pk, correlation_id=run.correlation_id)
        return Response(s.RunDetailSerializer(load_run_detail(run)).data)

    def _detail(self, run: Run, code: int = status.HTTP_200_OK, serializer: type = s.RunDetailSerializer) -> Response:
        response = Response(serializer(load_run_detail(run)).data, status=code)
        if code == status.HTTP_201_CREATED:
            response["Location"] = reverse("api:run-detail", kwargs={"pk": run.pk})
        return response

    @extend_schema(
        summary="Start a run",
        description=(
            "Starts the template's latest active version (or `version`) with `variables`. With an "
            "Idempotency-Key (header or body), repeating the request returns the same run (200); the "
            "same key with a different body is a 409."
        ),
        request=s.RunCreateSerializer,
        parameters=[TENANT_PARAMETER, IDEMPOTENCY_PARAMETER],
        responses={
            201: s.RunDetailSerializer,
            200: OpenApiResponse(s.RunDetailSerializer, description="Replay of an earlier request with this key."),
            409: OpenApiResponse(s.ErrorSerializer, description="Idempotency key used with another body."),
            **ERRORS,
        },
    )
    def create(self, request: Request) -> Response:
        body = s.RunCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = dict(body.validated_data)
        key = idempotency_key(request, data.pop("idempotency_key", None))
        run, created = services.create_run(
            tenant=self.tenant.slug,
            template_key=data["template"],
            version=data.get("version"),
            variables=data["variables"],
            correlation_id=data["correlation_id"],
            priority=data["priority"],
            idempotency_key=key,
            fingerprint=services.request_fingerprint({"endpoint": "runs", **data}) if key else None,
            user_id=request.user.get_username(),
        )
        return self._detail(run, status.HTTP_201_CREATED if created else status.HTTP_200_OK)

    @extend_schema(
        summary="Start many runs of one template at once",
        description=(
            "Up to 1000 runs, each with its variables (and correlation id, priority, idempotency key), "
            "started in one transaction. One bad item is a 400 naming it, and nothing is started."
        ),
        request=s.BatchRunCreateSerializer,
        parameters=[TENANT_PARAMETER],
        responses={201: s.BatchRunResultSerializer, **ERRORS},
    )
    @action(detail=False, methods=["post"])
    def batch(self, request: Request) -> Response:
        body = s.BatchRunCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        runs = services.create_runs(
            tenant=self.tenant.slug,
            template_key=data["template"],
            version=data.get("version"),
            items=[dict(item) for item in data["runs"]],
            user_id=request.user.get_username(),
        )
        return Response(
            {"runs": [{"id": str(run.pk), "status": run.status} for run in runs]}, status=status.HTTP_201_CREATED
        )

    @extend_schema(
        summary="Cancel a run",
        description="Pending and queued steps are cancelled; the Celery tasks of running steps are revoked.",
        request=None,
        parameters=[TENANT_PARAMETER],
        responses={200: s.RunDetailSerializer, 409: OpenApiResponse(s.ErrorSerializer), **READ_ERRORS},
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        run = self.get_object()
        return self._detail(services.cancel(run, reason=f"cancelled by {request.user.get_username()}"))

    @extend_schema(
        summary="Retry failed steps",
        description=(
            "Failed, dead and cancelled steps (or the `steps` given) run again with fresh attempts, "
            "and so does everything downstream of them; succeeded steps keep their outputs."
        ),
        request=s.RetrySerializer,
        parameters=[TENANT_PARAMETER],
        responses={200: s.RetryResultSerializer, 409: OpenApiResponse(s.ErrorSerializer), **ERRORS},
    )
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, pk: str | None = None) -> Response:
        run = self.get_object()
        body = s.RetrySerializer(data=request.data)
        body.is_valid(raise_exception=True)
        result = services.retry(
            run, step_ids=body.validated_data.get("steps"), reason=f"retried by {request.user.get_username()}"
        )
        detail = load_run_detail(Run.objects.defer("spec").get(pk=run.pk))
        detail.retried, detail.downstream = result.steps, result.downstream
        return Response(s.RetryResultSerializer(detail).data)

    @extend_schema(
        summary="Rerun from scratch",
        description="A new run with the same spec, inputs and correlation id; `rerun_of` points at this one.",
        request=None,
        parameters=[TENANT_PARAMETER],
        responses={201: s.RunDetailSerializer, **READ_ERRORS},
    )
    @action(detail=True, methods=["post"])
    def rerun(self, request: Request, pk: str | None = None) -> Response:
        run = self.get_object()
        new = services.rerun(run, user_id=request.user.get_username())
        return self._detail(Run.objects.defer("spec").get(pk=new.pk), status.HTTP_201_CREATED)

    @extend_schema(
        summary="Live progress of a run (Server-Sent Events)",
        description=(
            'A `text/event-stream` (WHATWG HTML, "Server-sent events"): first the current state, then '
            "each change as it happens. `event: step` with `{step_id, index, type, status, attempts, "
            "max_attempts, started_at, finished_at, error}` per top-level step change; `event: run` with "
            "`{run_id, status, progress, done, total}` when the run's status or progress (per cent of its "
            "step rows finished) changes; finally `event: end` with `{run_id, status, progress, outputs, "
            "error, finished_at}`, and the stream closes. Every event has an `id`; reconnecting with it "
            "as `Last-Event-ID` resumes without repeats, and once `end` was received the answer is 204 "
            "(EventSource stops reconnecting). A `: heartbeat` comment comes after "
            "ORCHESTRATOR_SSE_HEARTBEAT seconds of silence; the stream closes after "
            "ORCHESTRATOR_SSE_MAX_SECONDS (reconnect to go on)."
        ),
        parameters=[TENANT_PARAMETER, TENANT_QUERY_PARAMETER, LAST_EVENT_ID_PARAMETER],
        responses={
            (200, "text/event-stream"): OpenApiResponse(
                SSE_EVENT_SCHEMA, description="The event stream (until `end` or the time cap)."
            ),
            204: OpenApiResponse(description="`Last-Event-ID` is the `end` event: nothing more will come."),
        },
    )
    @action(detail=True, methods=["get"])
    def events(self, request: Request, pk: str | None = None) -> Any:
        run = self.get_object()
        logctx.bind(run_id=run.pk, correlation_id=run.correlation_id)
        return event_stream(request, lambda last_event_id: run_feed(run.pk, last_event_id=last_event_id))


class RunChildView(BaseAPIView, GenericAPIView):
    """Base of the per-run lists: the run is looked up in the tenant first (404 otherwise)."""

    def get_run(self) -> Run:
        run = get_object_or_404(self.scoped(Run.objects.only("id", "tenant_id")), pk=self.kwargs["run_id"])
        logctx.bind(run_id=run.pk)
        return run

    def list_response(self, queryset) -> Response:
        queryset = self.filter_queryset(queryset)
        page = self.paginate_queryset(queryset)
        return self.get_paginated_response(self.get_serializer(page, many=True).data)


class StepListView(RunChildView):
    serializer_class = s.StepSerializer
    filterset_class = StepFilter
    pagination_class = IdPagination
    queryset = Step.objects.none()

    @extend_schema(
        summary="Steps of a run",
        description="All step rows in creation order, map items included (filter `top_level=true` to hide them).",
        parameters=[TENANT_PARAMETER],
        responses={200: s.StepSerializer(many=True), **READ_ERRORS},
    )
    def get(self, request: Request, run_id: str) -> Response:
        run = self.get_run()
        queryset = (
            Step.objects.filter(run_id=run.pk)
            .annotate(step_name=KT("spec__name"), parent_step_id=F("parent__step_id"))
            .defer("spec", "input", "output", "item")
        )
        return self.list_response(queryset)


class StepDetailView(RunChildView):
    serializer_class = s.StepDetailSerializer
    queryset = Step.objects.none()

    @extend_schema(
        summary="One step: input, output, attempts",
        parameters=[TENANT_PARAMETER],
        responses={200: s.StepDetailSerializer, **READ_ERRORS},
    )
    def get(self, request: Request, run_id: str, step_id: str) -> Response:
        run = self.get_run()
        step = get_object_or_404(
            Step.objects.filter(run_id=run.pk).annotate(parent_step_id=F("parent__step_id")), step_id=step_id
        )
        logctx.bind(step_id=step.step_id)
        step.attempt_rows_list = list(
            Attempt.objects.filter(step_id=step.pk).annotate(step_code=F("step__step_id")).order_by("number")
        )
        return Response(s.StepDetailSerializer(step).data)


class AttemptListView(RunChildView):
    serializer_class = s.AttemptSerializer
    filterset_class = AttemptFilter
    pagination_class = IdPagination
    queryset = Attempt.objects.none()

    @extend_schema(
        summary="Attempts of a run", parameters=[TENANT_PARAMETER], responses={200: s.AttemptSerializer(many=True)}
    )
    def get(self, request: Request, run_id: str) -> Response:
        run = self.get_run()
        return self.list_response(Attempt.objects.filter(run_id=run.pk).annotate(step_code=F("step__step_id")))


class TraceListView(RunChildView):
    serializer_class = s.TraceSerializer
    filterset_class = TraceFilter
    pagination_class = IdPagination
    queryset = Trace.objects.none()

    @extend_schema(
        summary="Traces of a run",
        description="Oldest first; `after=<id>` returns only newer ones (tail a running run).",
        parameters=[TENANT_PARAMETER],
        responses={200: s.TraceSerializer(many=True), **READ_ERRORS},
    )
    def get(self, request: Request, run_id: str) -> Response:
        run = self.get_run()
        return self.list_response(Trace.objects.filter(run_id=run.pk).annotate(step_code=F("step_row__step_id")))


# --- templates ------------------------------------------------------------------------------------


class TemplateViewSet(BaseAPIView, viewsets.GenericViewSet):
    """Workflow templates of the tenant, by key; each change of the YAML is a new version."""

    serializer_class = s.TemplateSerializer
    lookup_field = "key"
    lookup_value_regex = r"[a-z0-9][a-z0-9_.-]*"
    parser_classes = [StrictJSONParser, YAMLTextParser, TextYAMLParser]
    pagination_class = None

    def get_queryset(self):
        return self.scoped(WorkflowTemplate.objects.all())

    @extend_schema(
        summary="List templates (latest version of each key)",
        parameters=[TENANT_PARAMETER],
        responses={200: s.TemplateSerializer(many=True), **READ_ERRORS},
    )
    def list(self, request: Request) -> Response:
        queryset = self.get_queryset()
        latest = queryset.filter(tenant_id=OuterRef("tenant_id"), key=OuterRef("key")).order_by("-version")
        rows = queryset.filter(version=Subquery(latest.values("version")[:1])).defer("spec", "source").order_by("key")
        return Response(s.TemplateSerializer(rows, many=True).data)

    @extend_schema(
        summary="Template detail: the latest version and every version",
        parameters=[TENANT_PARAMETER],
        responses={200: s.TemplateDetailSerializer, **READ_ERRORS},
    )
    def retrieve(self, request: Request, key: str) -> Response:
        queryset = self.get_queryset().filter(key=key)
        template = queryset.order_by("-version").first()
        if template is None:
            raise NotFound(f"no template with key {key!r}")
        template.all_versions = list(queryset.defer("spec", "source").order_by("-version"))
        return Response(s.TemplateDetailSerializer(template).data)

    @extend_schema(
        summary="Create a template from YAML",
        description=(
            'JSON `{"source": "<yaml>"}` or the raw file with `Content-Type: application/yaml`. Validated '
            "like `load_templates`; an error is a 400 with the loader's one-line message. The same YAML "
            "again changes nothing (200); a changed file of an existing key is a new version (201)."
        ),
        request={
            "application/json": s.TemplateSourceSerializer,
            "application/yaml": {"type": "string"},
        },
        parameters=[TENANT_PARAMETER],
        responses={201: s.TemplateSavedSerializer, 200: s.TemplateSavedSerializer, **ERRORS},
    )
    def create(self, request: Request) -> Response:
        return self._save(request, None)

    @extend_schema(
        summary="Update a template from YAML (a new version)",
        description="As create; the file's `key` must be the one in the URL.",
        request={
            "application/json": s.TemplateSourceSerializer,
            "application/yaml": {"type": "string"},
        },
        parameters=[TENANT_PARAMETER],
        responses={201: s.TemplateSavedSerializer, 200: s.TemplateSavedSerializer, **ERRORS},
    )
    def update(self, request: Request, key: str) -> Response:
        return self._save(request, key)

    def _parse(self, request: Request) -> tuple[dict[str, Any], str, str]:
        body = s.TemplateSourceSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        source, filename = body.validated_data["source"], body.validated_data["filename"]
        return load_spec(source, source=filename), source, filename

    def _save(self, request: Request, key: str | None) -> Response:
        spec, source, filename = self._parse(request)
        if key is not None and spec["key"] != key:
            raise ValidationError({"detail": f"{filename}: key {spec['key']!r} does not match the URL's {key!r}"})
        result = save_template(
            spec, source, source_path="" if filename == "request" else filename, tenant_id=self.tenant.slug
        )
        template = result.template
        template.load_action = result.action
        code = status.HTTP_200_OK if result.action == "unchanged" else status.HTTP_201_CREATED
        return Response(s.TemplateSavedSerializer(template).data, status=code)

    @extend_schema(
        summary="Validate YAML without saving",
        request={
            "application/json": s.TemplateSourceSerializer,
            "application/yaml": {"type": "string"},
        },
        parameters=[TENANT_PARAMETER],
        responses={200: s.ValidationResultSerializer, **ERRORS},
    )
    @action(detail=False, methods=["post"], url_path="validate")
    def validate(self, request: Request) -> Response:
        spec, _source, _filename = self._parse(request)
        return Response(
            {
                "valid": True,
                "key": spec["key"],
                "name": spec["name"],
                "dialect": spec["dialect"],
                "steps": len(spec["steps"]),
                "variables": spec["variables"],
                "spec": spec,
            }
        )

    @extend_schema(
        summary="One version of a template, with its YAML and spec",
        parameters=[TENANT_PARAMETER],
        responses={200: s.TemplateVersionDetailSerializer, **READ_ERRORS},
    )
    @action(detail=True, methods=["get"], url_path=r"versions/(?P<version>[0-9]{1,9})")
    def version(self, request: Request, key: str, version: str) -> Response:
        template = get_object_or_404(self.get_queryset(), key=key, version=int(version))
        return Response(s.TemplateVersionDetailSerializer(template).data)


# --- seed-compatible endpoints ----------------------------------------------------------------------


def seed003_status(run: Run) -> dict[str, Any]:
    """Seed 003's status response for ``run`` (camelCase keys as printed in the seed)."""
    load_run_detail(run)
    index_of = {step.pk: i for i, step in enumerate(run.top_steps)}
    return {
        "taskId": str(run.pk),
        "executionId": str(run.pk),
        "workflowTemplate": run.template_key,
        "status": run.status,
        "goal": (run.template.name if run.template_id and run.template else "") or run.template_key,
        "progress": run.progress_info["percent"],
        "currentStep": index_of.get(run.current.pk) if run.current is not None else None,
        "totalSteps": len(run.top_steps),
        "steps": [
            {
                "index": str(i),
                "id": step.step_id,
                "description": step.step_name or step.step_id,
                "status": step.status,
                "attempts": step.attempts,
                "startedAt": step.started_at,
                "finishedAt": step.finished_at,
            }
            for i, step in enumerate(run.top_steps)
        ],
        "latestTraces": [
            {"type": trace.kind, "message": trace.message, "timestamp": trace.created_at} for trace in run.recent_traces
        ],
        "correlationId": run.correlation_id,
        "error": run.error,
    }


class WorkflowCreateView(BaseAPIView, GenericAPIView):
    serializer_class = s.WorkflowCreateSerializer

    @extend_schema(
        summary="Seed 002: execute a workflow from a template",
        request=s.WorkflowCreateSerializer,
        parameters=[TENANT_PARAMETER, IDEMPOTENCY_PARAMETER],
        responses={
            201: s.WorkflowCreatedSerializer,
            200: s.WorkflowCreatedSerializer,
            409: OpenApiResponse(s.ErrorSerializer),
            **ERRORS,
        },
    )
    def post(self, request: Request) -> Response:
        body = s.WorkflowCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = dict(body.validated_data)
        key = idempotency_key(request, data.pop("idempotency_key", None))
        run, created = services.create_run(
            tenant=self.tenant.slug,
            template_key=data["workflow_template"],
            version=data.get("version"),
            variables=data["variables"],
            correlation_id=data["correlation_id"],
            priority=data["priority"],
            idempotency_key=key,
            fingerprint=services.request_fingerprint({"endpoint": "workflows", **data}) if key else None,
            user_id=request.user.get_username(),
        )
        return Response(
            {
                "execution_id": str(run.pk),
                "status": run.status,
                "workflow_template": run.template_key,
                "version": run.template_version,
                "correlation_id": run.correlation_id,
                "status_url": reverse("api:workflow-status", kwargs={"run_id": run.pk}),
            },
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )


class WorkflowStatusView(BaseAPIView, GenericAPIView):
    serializer_class = s.WorkflowStatusSerializer
    queryset = Run.objects.none()

    @extend_schema(
        summary="Seed 002/003: status of a workflow execution",
        parameters=[TENANT_PARAMETER],
        responses={200: s.WorkflowStatusSerializer, **READ_ERRORS},
    )
    def get(self, request: Request, run_id: str) -> Response:
        run = get_object_or_404(self.scoped(Run.objects.defer("spec").select_related("template")), pk=run_id)
        return Response(s.WorkflowStatusSerializer(seed003_status(run)).data)


class DispatchView(BaseAPIView, GenericAPIView):
    serializer_class = s.DispatchSerializer

    @extend_schema(
        summary="Seed 004: dispatch a workflow for an intent event",
        request=s.DispatchSerializer,
        parameters=[TENANT_PARAMETER, IDEMPOTENCY_PARAMETER],
        responses={
            201: s.DispatchResultSerializer,
            200: s.DispatchResultSerializer,
            409: OpenApiResponse(s.ErrorSerializer),
            **ERRORS,
        },
    )
    def post(self, request: Request) -> Response:
        body = s.DispatchSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = dict(body.validated_data)
        key = idempotency_key(request, data.pop("idempotency_key", None))
        run, created = services.dispatch(
            tenant=self.tenant.slug,
            workflow_key=data["workflow_key"],
            user_id=data["user_id"],
            intent_id=data.get("intent_id") or "",
            payload=data["payload"],
            idempotency_key=key,
            fingerprint=services.request_fingerprint({"endpoint": "dispatch", **data}) if key else None,
        )
        return Response(
            {
                "ok": True,
                "workflow_run_id": str(run.pk),
                "workflow_key": run.template_key,
                "status": run.status,
                "created": created,
            },
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )


# --- who am I, tokens ------------------------------------------------------------------------------


class MeView(BaseAPIView, GenericAPIView):
    serializer_class = s.MeSerializer

    @extend_schema(summary="Who am I: user, current tenant, role, tenants", parameters=[TENANT_PARAMETER])
    def get(self, request: Request) -> Response:
        tenant = self.tenant
        return Response(
            {
                "username": request.user.get_username(),
                "is_superuser": request.user.is_superuser,
                "tenant": tenant.slug,
                "role": tenancy.role_label(tenant.role).lower(),
                "tenants": [
                    {"slug": m.tenant.slug, "name": m.tenant.name, "role": m.role, "is_default": m.is_default}
                    for m in tenancy.memberships(request.user)
                ],
            }
        )


class LoginView(KnoxLoginView):
    """``POST /api/v1/auth/login`` with HTTP Basic (or a session): a new API token ``{"token", "expiry"}``.

    The token is shown once; only its hash is stored. It expires after ORCHESTRATOR_TOKEN_TTL_DAYS.
    """

    authentication_classes = [BasicAuthentication, SessionAuthentication]
    #: runs/api/throttling.py: attempts per address, wrong passwords per user name (429 past them)
    throttle_classes = [LoginRateThrottle, LoginFailureThrottle]

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        # Throttles first: a wrong Basic password fails inside authentication, which DRF runs
        # before its throttles, so in DRF's order a guesser would never be counted.
        self.check_throttles(request)
        request._login_throttled = True  # type: ignore[attr-defined]
        try:
            super().initial(request, *args, **kwargs)
        except AuthenticationFailed:
            LoginFailureThrottle().record_failure(request, self)
            raise

    def check_throttles(self, request: Request) -> None:
        if not getattr(request, "_login_throttled", False):  # once per request, before authentication
            super().check_throttles(request)

    @extend_schema(
        summary="Create an API token (HTTP Basic auth)",
        request=None,
        responses={200: OpenApiTypes.OBJECT, 429: OpenApiResponse(description="too many sign-in attempts")},
    )
    def post(self, request: Request, format: Any = None) -> Response:
        return super().post(request, format=format)


@extend_schema_view(post=extend_schema(summary="Revoke the token of this request", request=None, responses={204: None}))
class LogoutView(knox_views.LogoutView):
    pass


@extend_schema_view(post=extend_schema(summary="Revoke all your tokens", request=None, responses={204: None}))
class LogoutAllView(knox_views.LogoutAllView):
    pass


class ApiRootView(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(exclude=True)
    def get(self, request: Request) -> Response:
        return Response(
            {
                "runs": request.build_absolute_uri(reverse("api:run-list")),
                "templates": request.build_absolute_uri(reverse("api:template-list")),
                "me": request.build_absolute_uri(reverse("api:me")),
                "schema": request.build_absolute_uri(reverse("api:schema")),
                "docs": request.build_absolute_uri(reverse("api:docs")),
            }
        )
