"""Query filters of the list endpoints (django-filter). Bad values are a 400 naming the parameter."""

from __future__ import annotations

import django_filters as df

from ..choices import AttemptOutcome, RunStatus, StepStatus, TraceKind, TriggerKind
from ..models import Attempt, Run, Step, Trace


class ChoiceInFilter(df.BaseInFilter, df.ChoiceFilter):
    """``?status=failed,dead``: one or more values, comma-separated, each a known choice."""


class RunFilter(df.FilterSet):
    """``status`` (comma list), ``template`` (key), ``version``, ``correlation_id``, ``trigger``,
    ``created_after`` / ``created_before`` (ISO 8601; after is inclusive, before exclusive)."""

    status = ChoiceInFilter(choices=RunStatus.choices, help_text="One or more run statuses, comma-separated.")
    template = df.CharFilter(field_name="template_key", max_length=200, help_text="Template key.")
    version = df.NumberFilter(field_name="template_version", min_value=1, max_value=2**31 - 1)
    correlation_id = df.CharFilter(max_length=200)
    trigger = df.ChoiceFilter(choices=TriggerKind.choices)
    created_after = df.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = df.IsoDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = Run
        fields: list[str] = []


class StepFilter(df.FilterSet):
    """``status`` (comma list), ``type``, ``top_level`` (true: no map children), ``parent`` (step id)."""

    status = ChoiceInFilter(choices=StepStatus.choices, help_text="One or more step statuses, comma-separated.")
    type = df.CharFilter(max_length=32)
    top_level = df.BooleanFilter(field_name="parent", lookup_expr="isnull", help_text="Only steps of the spec.")
    parent = df.CharFilter(field_name="parent__step_id", max_length=255, help_text="Children of this map step.")

    class Meta:
        model = Step
        fields: list[str] = []


class AttemptFilter(df.FilterSet):
    """``step`` (step id), ``outcome`` (comma list)."""

    step = df.CharFilter(field_name="step__step_id", max_length=255)
    outcome = ChoiceInFilter(choices=AttemptOutcome.choices)

    class Meta:
        model = Attempt
        fields: list[str] = []


class TraceFilter(df.FilterSet):
    """``kind`` (comma list), ``step`` (step id), ``after`` (trace id: only newer ones, for tailing)."""

    kind = ChoiceInFilter(choices=TraceKind.choices)
    step = df.CharFilter(field_name="step__step_id", max_length=255)
    after = df.NumberFilter(field_name="id", lookup_expr="gt", min_value=0, max_value=2**63 - 1)

    class Meta:
        model = Trace
        fields: list[str] = []
