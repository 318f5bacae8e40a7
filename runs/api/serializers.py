"""Serializers of the API. Status fields are read-only: they change only through the engine and
the service verbs (cancel, retry, rerun). Timestamps are ISO 8601 (UTC), durations milliseconds.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import serializers

from templates_app.models import WorkflowTemplate

from ..choices import RunStatus, StepStatus
from ..models import Attempt, Run, Step, Trace
from .fields import StrictCharField

_KEY = r"^[a-z0-9][a-z0-9_.-]*$"


def _duration_ms(started: Any, finished: Any) -> int | None:
    if started is None or finished is None:
        return None
    return max(0, int((finished - started).total_seconds() * 1000))


# --- requests -------------------------------------------------------------------------------------


class VariablesField(serializers.DictField):
    """A JSON object of workflow variables (values are checked against the template's types)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("child", serializers.JSONField())
        kwargs.setdefault("required", False)
        kwargs.setdefault("default", dict)
        super().__init__(**kwargs)


class RunCreateSerializer(serializers.Serializer):
    """``POST /api/v1/runs``: which template, its variables, and how to track the run."""

    template = serializers.RegexField(_KEY, max_length=200, help_text="Template key.")
    version = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=2**31 - 1, help_text="Default: latest active."
    )
    variables = VariablesField(help_text="Workflow variables by name.")
    correlation_id = StrictCharField(max_length=200, required=False, allow_blank=True, default="")
    priority = serializers.IntegerField(min_value=0, max_value=9, default=5, help_text="0 is the most urgent.")
    idempotency_key = StrictCharField(
        max_length=200,
        required=False,
        allow_blank=False,
        help_text="Same as the Idempotency-Key header: the same key and body return the same run.",
    )


class BatchRunItemSerializer(serializers.Serializer):
    """One run of ``POST /api/v1/runs/batch``."""

    variables = VariablesField(help_text="Workflow variables by name.")
    correlation_id = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    priority = serializers.IntegerField(min_value=0, max_value=9, default=5)
    idempotency_key = serializers.CharField(max_length=200, required=False, allow_blank=False)


class BatchRunCreateSerializer(serializers.Serializer):
    """``POST /api/v1/runs/batch``: many runs of one template, started in one transaction."""

    template = serializers.RegexField(_KEY, max_length=200, help_text="Template key.")
    version = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=2**31 - 1)
    runs = BatchRunItemSerializer(many=True, help_text="At most 1000.")

    def validate_runs(self, value: list) -> list:
        from ..services import MAX_BATCH_RUNS

        if not value:
            raise serializers.ValidationError("give at least one run")
        if len(value) > MAX_BATCH_RUNS:
            raise serializers.ValidationError(f"{len(value)} runs, at most {MAX_BATCH_RUNS} per batch")
        return value


class BatchRunResultSerializer(serializers.Serializer):
    runs = serializers.ListField(child=serializers.DictField(), help_text="[{id, status}] in request order")


class WorkflowCreateSerializer(serializers.Serializer):
    """Seed 002's ``POST /api/v1/workflows``."""

    workflow_template = serializers.RegexField(_KEY, max_length=200, help_text="Template key.")
    version = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=2**31 - 1)
    variables = VariablesField()
    correlation_id = StrictCharField(max_length=200, required=False, allow_blank=True, default="")
    priority = serializers.IntegerField(min_value=0, max_value=9, default=5)
    idempotency_key = StrictCharField(max_length=200, required=False, allow_blank=False)


class DispatchSerializer(serializers.Serializer):
    """Seed 004's ``POST /api/v1/dispatch``: start a workflow for an intent event."""

    user_id = StrictCharField(max_length=200, help_text="The user the workflow runs for.")
    workflow_key = serializers.RegexField(_KEY, max_length=200)
    intent_id = StrictCharField(max_length=200, required=False, allow_blank=True, allow_null=True, default="")
    payload = VariablesField(help_text="Event data; keys named like template variables fill them.")
    idempotency_key = StrictCharField(max_length=200, required=False, allow_blank=False)


class RetrySerializer(serializers.Serializer):
    """``POST /runs/{id}/retry``: no body retries every failed, dead and cancelled step."""

    steps = serializers.ListField(
        child=StrictCharField(max_length=255),
        required=False,
        allow_empty=False,
        max_length=10_000,
        help_text="Step ids to retry (map items as `step[3]`); default: all failed, dead and cancelled.",
    )


class TemplateSourceSerializer(serializers.Serializer):
    """A workflow file: YAML text (JSON body), or the raw file with Content-Type application/yaml."""

    source = StrictCharField(
        trim_whitespace=False,
        max_length=settings.ORCHESTRATOR_MAX_SPEC_BYTES,
        help_text="The workflow YAML (canonical, seed 002 or seed 004 dialect).",
    )
    filename = StrictCharField(
        max_length=200, required=False, default="request", help_text="Name used in error messages."
    )


# --- runs -----------------------------------------------------------------------------------------


class RunSerializer(serializers.ModelSerializer):
    """A run in lists: identity, status and timings (no inputs, outputs or spec)."""

    template = serializers.CharField(source="template_key", read_only=True)
    tenant = serializers.CharField(source="tenant_id", read_only=True)
    status = serializers.ChoiceField(choices=RunStatus.choices, read_only=True)
    duration_ms = serializers.SerializerMethodField()

    class Meta:
        model = Run
        fields = [
            "id",
            "template",
            "template_version",
            "status",
            "tenant",
            "correlation_id",
            "idempotency_key",
            "priority",
            "trigger",
            "user_id",
            "error",
            "steps_total",
            "rerun_of",
            "created_at",
            "started_at",
            "finished_at",
            "duration_ms",
        ]
        read_only_fields = fields

    def get_duration_ms(self, run: Run) -> int | None:
        return _duration_ms(run.started_at, run.finished_at)


class StepSerializer(serializers.ModelSerializer):
    """A step: status, attempts and timings. ``parent`` is the map step of a for_each item."""

    id = serializers.CharField(source="step_id", read_only=True)
    name = serializers.SerializerMethodField()
    status = serializers.ChoiceField(choices=StepStatus.choices, read_only=True)
    parent = serializers.SerializerMethodField()
    duration_ms = serializers.SerializerMethodField()

    class Meta:
        model = Step
        fields = [
            "id",
            "name",
            "type",
            "status",
            "attempts",
            "max_attempts",
            "depends_on",
            "parent",
            "map_index",
            "error",
            "worker",
            "queued_at",
            "started_at",
            "finished_at",
            "next_attempt_at",
            "duration_ms",
        ]
        read_only_fields = fields

    def get_name(self, step: Step) -> str:
        name = getattr(step, "step_name", None)
        if name is None and "spec" not in step.get_deferred_fields():
            name = (step.spec or {}).get("name")
        return name or step.step_id

    def get_parent(self, step: Step) -> str | None:
        return getattr(step, "parent_step_id", None)

    def get_duration_ms(self, step: Step) -> int | None:
        return _duration_ms(step.started_at, step.finished_at)


class AttemptSerializer(serializers.ModelSerializer):
    """One try of a step: who ran it, how it ended, how long it took (ms)."""

    step = serializers.CharField(source="step_code", read_only=True)

    class Meta:
        model = Attempt
        fields = [
            "id",
            "step",
            "number",
            "worker",
            "task_id",
            "outcome",
            "error",
            "http_status",
            "started_at",
            "finished_at",
            "duration_ms",
        ]
        read_only_fields = fields


class StepDetailSerializer(StepSerializer):
    """A step with its resolved input, output, loop item and attempts."""

    attempt_list = AttemptSerializer(many=True, read_only=True, source="attempt_rows_list")

    class Meta(StepSerializer.Meta):
        fields = [*StepSerializer.Meta.fields, "input", "output", "item", "attempt_list"]
        read_only_fields = fields


class TraceSerializer(serializers.ModelSerializer):
    """An audit event of a run (secrets redacted when written)."""

    step = serializers.CharField(source="step_code", read_only=True, allow_null=True)

    class Meta:
        model = Trace
        fields = ["id", "step", "attempt", "kind", "message", "data", "created_at"]
        read_only_fields = fields


class ProgressSerializer(serializers.Serializer):
    percent = serializers.IntegerField(help_text="0-100: finished step rows over all step rows.")
    done = serializers.IntegerField()
    total = serializers.IntegerField()
    counts = serializers.DictField(child=serializers.IntegerField(), help_text="Step rows by status.")


class RunDetailSerializer(RunSerializer):
    """A run with what seed 003's status response shows: progress, current step, steps, latest traces."""

    inputs = serializers.JSONField(read_only=True)
    outputs = serializers.JSONField(read_only=True)
    metadata = serializers.JSONField(read_only=True)
    progress = ProgressSerializer(source="progress_info", read_only=True)
    current_step = serializers.SerializerMethodField()
    steps = StepSerializer(many=True, read_only=True, source="top_steps")
    latest_traces = TraceSerializer(many=True, read_only=True, source="recent_traces")

    class Meta(RunSerializer.Meta):
        fields = [
            *RunSerializer.Meta.fields,
            "deadline",
            "inputs",
            "outputs",
            "metadata",
            "progress",
            "current_step",
            "steps",
            "latest_traces",
        ]
        read_only_fields = fields

    def get_current_step(self, run: Run) -> str | None:
        step = getattr(run, "current", None)
        return step.step_id if step is not None else None


class RetryResultSerializer(RunDetailSerializer):
    retried_steps = serializers.ListField(child=serializers.CharField(), source="retried", read_only=True)
    downstream_steps = serializers.ListField(child=serializers.CharField(), source="downstream", read_only=True)

    class Meta(RunDetailSerializer.Meta):
        fields = [*RunDetailSerializer.Meta.fields, "retried_steps", "downstream_steps"]
        read_only_fields = fields


# --- seed-shaped responses -------------------------------------------------------------------------


class SeedStepSerializer(serializers.Serializer):
    index = serializers.CharField()
    id = serializers.CharField()
    description = serializers.CharField()
    status = serializers.CharField()
    attempts = serializers.IntegerField()
    startedAt = serializers.DateTimeField(allow_null=True)  # noqa: N815 - seed 003's names
    finishedAt = serializers.DateTimeField(allow_null=True)  # noqa: N815


class SeedTraceSerializer(serializers.Serializer):
    type = serializers.CharField()
    message = serializers.CharField()
    timestamp = serializers.DateTimeField()


class WorkflowStatusSerializer(serializers.Serializer):
    """Seed 003's status response (camelCase, as printed there), for ``/workflows/{id}/status``."""

    taskId = serializers.CharField()  # noqa: N815
    executionId = serializers.CharField()  # noqa: N815
    workflowTemplate = serializers.CharField()  # noqa: N815
    status = serializers.CharField()
    goal = serializers.CharField()
    progress = serializers.IntegerField()
    currentStep = serializers.IntegerField(allow_null=True)  # noqa: N815
    totalSteps = serializers.IntegerField()  # noqa: N815
    steps = SeedStepSerializer(many=True)
    latestTraces = SeedTraceSerializer(many=True)  # noqa: N815
    correlationId = serializers.CharField()  # noqa: N815
    error = serializers.CharField()


class WorkflowCreatedSerializer(serializers.Serializer):
    execution_id = serializers.UUIDField()
    status = serializers.CharField()
    workflow_template = serializers.CharField()
    version = serializers.IntegerField(allow_null=True)
    correlation_id = serializers.CharField()
    status_url = serializers.CharField()


class DispatchResultSerializer(serializers.Serializer):
    ok = serializers.BooleanField()
    workflow_run_id = serializers.UUIDField()
    workflow_key = serializers.CharField()
    status = serializers.CharField()
    created = serializers.BooleanField()


# --- templates ----------------------------------------------------------------------------------


class TemplateSerializer(serializers.ModelSerializer):
    """The latest version of a template key."""

    tenant = serializers.CharField(source="tenant_id", read_only=True)

    class Meta:
        model = WorkflowTemplate
        fields = [
            "key",
            "version",
            "name",
            "description",
            "category",
            "variables",
            "trigger",
            "is_active",
            "tenant",
            "created_at",
        ]
        read_only_fields = fields


class TemplateVersionSerializer(serializers.ModelSerializer):
    label = serializers.SerializerMethodField()

    class Meta:
        model = WorkflowTemplate
        fields = ["version", "label", "name", "is_active", "content_hash", "source_path", "created_at"]
        read_only_fields = fields

    def get_label(self, template: WorkflowTemplate) -> str | None:
        label = (template.spec or {}).get("label") if "spec" not in template.get_deferred_fields() else None
        return None if label is None else str(label)


class TemplateVersionDetailSerializer(TemplateSerializer):
    """One version with its YAML source and normalized spec."""

    class Meta(TemplateSerializer.Meta):
        fields = [*TemplateSerializer.Meta.fields, "content_hash", "source_path", "source", "spec"]
        read_only_fields = fields


class TemplateDetailSerializer(TemplateVersionDetailSerializer):
    """The latest version (source, spec) and every version of the key, newest first."""

    versions = TemplateVersionSerializer(many=True, read_only=True, source="all_versions")

    class Meta(TemplateVersionDetailSerializer.Meta):
        fields = [*TemplateVersionDetailSerializer.Meta.fields, "versions"]
        read_only_fields = fields


class TemplateSavedSerializer(TemplateVersionDetailSerializer):
    action = serializers.CharField(source="load_action", help_text="created, updated (new version) or unchanged.")

    class Meta(TemplateVersionDetailSerializer.Meta):
        fields = [*TemplateVersionDetailSerializer.Meta.fields, "action"]
        read_only_fields = fields


class ValidationResultSerializer(serializers.Serializer):
    valid = serializers.BooleanField()
    key = serializers.CharField()
    name = serializers.CharField()
    dialect = serializers.CharField()
    steps = serializers.IntegerField(help_text="Number of steps.")
    variables = serializers.DictField()
    spec = serializers.DictField(help_text="The normalized spec (docs/spec-contract.md).")


class MembershipInfoSerializer(serializers.Serializer):
    slug = serializers.CharField()
    name = serializers.CharField()
    role = serializers.CharField()
    is_default = serializers.BooleanField()


class MeSerializer(serializers.Serializer):
    username = serializers.CharField()
    is_superuser = serializers.BooleanField()
    tenant = serializers.CharField(help_text="The tenant this request acts in.")
    role = serializers.CharField(help_text="Your role there: owner, member, viewer or superuser.")
    tenants = MembershipInfoSerializer(many=True)


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()
    errors = serializers.JSONField(required=False)
