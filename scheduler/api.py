"""REST endpoints of the scheduler: ``/api/v1/events`` and ``/api/v1/schedules``.

Included under ``/api/v1/`` by orchestrator_site/urls.py (``urlpatterns`` below; a trailing slash is optional).
Authentication, tenancy and errors are the API's (``runs.api``): every view acts in the request's
tenant (``X-Tenant`` or the caller's default), another tenant's row is a 404, writes need the
member or owner role, errors are ``{"detail": "<one line>"}``.

- ``POST /events`` ``{"type", "event_id"?, "user_id"?, "intent_id"?, "payload"?, "priority"?}``:
  201 with the runs started, or 200 for a repeated ``event_id`` (same runs, nothing new).
  ``GET /events``, ``GET /events/<event_id>``: stored events with their runs.
- ``/schedules``: list, create, read, change, delete; ``POST /schedules/<id>/run`` starts a run
  now. Schedules made from a template's trigger are read-only here except ``enabled``.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.routers import SimpleRouter

from runs.api.fields import StrictCharField, StrictStringsMixin
from runs.api.pagination import NamePagination, NewestFirstPagination
from runs.api.parsers import StrictJSONParser
from runs.api.permissions import TENANT_PARAMETER, TenantScopedMixin, TenantWritePermission

from . import services
from .models import IntentEvent, Schedule, ScheduleSource

# --- serializers ------------------------------------------------------------------------------------


class EventInSerializer(serializers.Serializer):
    type = StrictCharField(max_length=200, help_text="Event type; templates whose trigger lists it start.")
    event_id = StrictCharField(
        max_length=200, required=False, allow_blank=True, help_text="Your id; a repeat is a no-op (default: new)."
    )
    user_id = StrictCharField(max_length=200, required=False, allow_blank=True, default="")
    intent_id = StrictCharField(max_length=200, required=False, allow_blank=True, default="")
    payload = serializers.DictField(required=False, default=dict, help_text="Any JSON object.")
    priority = serializers.IntegerField(min_value=0, max_value=9, required=False, default=5)


class EventRunSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    template_key = serializers.CharField()
    status = serializers.CharField()


class EventSerializer(serializers.ModelSerializer):
    runs = serializers.SerializerMethodField()

    class Meta:
        model = IntentEvent
        fields = ["event_id", "type", "user_id", "intent_id", "payload", "runs", "errors", "created_at"]
        read_only_fields = fields

    def get_runs(self, event: IntentEvent) -> list[dict[str, Any]]:
        rows = event.runs.only("id", "template_key", "status").order_by("created_at")
        return [{"id": str(r.pk), "template_key": r.template_key, "status": r.status} for r in rows]


class EventDispatchResultSerializer(serializers.Serializer):
    created = serializers.BooleanField(help_text="False for a repeated event_id (nothing new started).")
    event = EventSerializer()


class ScheduleSerializer(StrictStringsMixin, serializers.ModelSerializer):
    """A cron or interval schedule starting runs of a template (exactly one of cron and interval)."""

    when = serializers.CharField(read_only=True)
    variables = serializers.DictField(required=False, help_text="Variables of every run it starts.")

    class Meta:
        model = Schedule
        fields = [
            "id",
            "name",
            "template_key",
            "cron",
            "interval",
            "timezone",
            "variables",
            "priority",
            "user_id",
            "enabled",
            "description",
            "source",
            "when",
            "last_tick",
            "last_run",
            "last_error",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "source", "when", "last_tick", "last_run", "last_error", "created_at", "updated_at"]
        extra_kwargs = {"cron": {"required": False}, "interval": {"required": False}}


# --- views ------------------------------------------------------------------------------------------


class _Base(TenantScopedMixin):
    permission_classes = [IsAuthenticated, TenantWritePermission]
    parser_classes = [StrictJSONParser]


@extend_schema_view(
    list=extend_schema(summary="List events, newest first", parameters=[TENANT_PARAMETER]),
    retrieve=extend_schema(summary="One event and the runs it started", parameters=[TENANT_PARAMETER]),
)
class EventViewSet(_Base, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = EventSerializer
    pagination_class = NewestFirstPagination
    lookup_field = "event_id"
    lookup_value_regex = r"[^/]+"

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # drf-spectacular reads the model only
            return IntentEvent.objects.none()
        return self.scoped(IntentEvent.objects.all())

    @extend_schema(
        summary="Dispatch an event: start every template whose trigger lists its type",
        request=EventInSerializer,
        parameters=[TENANT_PARAMETER],
        responses={
            201: EventDispatchResultSerializer,
            200: OpenApiResponse(EventDispatchResultSerializer, description="A repeated event_id: the same runs."),
            409: OpenApiResponse(description="event_id already used for another type."),
        },
    )
    def create(self, request: Request) -> Response:
        body = EventInSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        result = services.dispatch_event(
            data["type"],
            data["payload"],
            event_id=data.get("event_id") or None,
            tenant_id=self.tenant.slug,
            user_id=data["user_id"],
            intent_id=data["intent_id"],
            priority=data["priority"],
        )
        return Response(
            {"created": result.created, "event": EventSerializer(result.event).data},
            status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK,
        )


@extend_schema_view(
    list=extend_schema(summary="List schedules", parameters=[TENANT_PARAMETER]),
    retrieve=extend_schema(summary="One schedule", parameters=[TENANT_PARAMETER]),
    create=extend_schema(summary="Create a schedule (cron or interval) for a template", parameters=[TENANT_PARAMETER]),
    update=extend_schema(summary="Change a schedule", parameters=[TENANT_PARAMETER]),
    partial_update=extend_schema(summary="Change some fields of a schedule", parameters=[TENANT_PARAMETER]),
    destroy=extend_schema(summary="Delete a schedule and its beat entry", parameters=[TENANT_PARAMETER]),
)
class ScheduleViewSet(_Base, viewsets.ModelViewSet):
    serializer_class = ScheduleSerializer
    pagination_class = NamePagination  # `{"next", "previous", "results"}` like every list

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # drf-spectacular reads the model only
            return Schedule.objects.none()
        return self.scoped(Schedule.objects.all())

    def perform_create(self, serializer: ScheduleSerializer) -> None:
        schedule = Schedule(tenant_id=self.tenant.slug, source=ScheduleSource.USER, **serializer.validated_data)
        services.save_schedule(schedule)
        serializer.instance = schedule

    def perform_update(self, serializer: ScheduleSerializer) -> None:
        schedule: Schedule = serializer.instance
        changes = dict(serializer.validated_data)
        if schedule.source == ScheduleSource.TEMPLATE and set(changes) - {"enabled", "priority", "user_id"}:
            raise services.ScheduleError(
                "this schedule follows its template's trigger: change the template "
                "(only enabled, priority and user_id can be changed here)"
            )
        for name, value in changes.items():
            setattr(schedule, name, value)
        if "cron" in changes and changes["cron"]:
            schedule.interval = None if "interval" not in changes else schedule.interval
        if "interval" in changes and changes["interval"]:
            schedule.cron = "" if "cron" not in changes else schedule.cron
        services.save_schedule(schedule)

    def perform_destroy(self, instance: Schedule) -> None:
        services.delete_schedule(instance)

    @extend_schema(summary="Start a run of this schedule now", request=None, parameters=[TENANT_PARAMETER])
    @action(detail=True, methods=["post"])
    def run(self, request: Request, pk: str | None = None) -> Response:
        schedule = self.get_object()
        run = services.run_schedule_now(schedule)
        return Response({"run_id": str(run.pk), "status": run.status}, status=status.HTTP_201_CREATED)


router = SimpleRouter()
router.trailing_slash = "/?"  # `/events` and `/events/` both (as runs.api.urls)
router.register("events", EventViewSet, basename="event")
router.register("schedules", ScheduleViewSet, basename="schedule")

#: Included under /api/v1/ by orchestrator_site/urls.py.
urlpatterns = [*router.urls]
