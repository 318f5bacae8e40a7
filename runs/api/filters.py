"""Query filters of the list endpoints (django-filter). Bad values are a 400 naming the parameter."""

from __future__ import annotations

import re
from typing import Any

import django_filters as df
from django import forms
from django_filters.fields import IsoDateTimeField
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import extend_schema_field
from rest_framework.exceptions import ValidationError

from ..choices import AttemptOutcome, RunStatus, StepStatus, TraceKind, TriggerKind
from ..models import Attempt, Run, Step, Trace

#: RFC 3339 date-time (the OpenAPI ``date-time`` format): a zone is required, so a time is never
#: read in the server's zone by accident.
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})")


class StrictFilterBackend(DjangoFilterBackend):
    """django-filter, but a filter given twice (``?status=a&status=b``), or an empty choice, number
    or time, is a 400 naming it, instead of the last value silently winning or the filter being
    ignored. (An empty text filter or list still means "no filter".)"""

    def get_filterset_kwargs(self, request: Any, queryset: Any, view: Any) -> dict[str, Any]:
        filterset_class = self.get_filterset_class(view, queryset)
        for name in getattr(filterset_class, "base_filters", {}):
            values = request.query_params.getlist(name)
            if len(values) > 1:
                raise ValidationError({name: "given more than once (use a comma-separated list where one is taken)"})
            filter_ = filterset_class.base_filters[name]
            may_be_empty = type(filter_) is df.CharFilter or isinstance(filter_, df.BaseInFilter)  # "", []
            if values and not values[0].strip() and not may_be_empty:  # "" is no number, time or boolean
                raise ValidationError({name: "empty value"})
        return super().get_filterset_kwargs(request, queryset, view)


class RFC3339Field(IsoDateTimeField):
    def to_python(self, value: Any) -> Any:
        if value not in self.empty_values and not _RFC3339.fullmatch(str(value).strip()):
            raise forms.ValidationError("expected an RFC 3339 date-time with a zone, e.g. 2026-11-30T08:00:00Z")
        return super().to_python(value)


class StrictBooleanField(forms.Field):
    def to_python(self, value: Any) -> bool | None:
        if value in self.empty_values:
            return None
        text = str(value).strip().lower()
        if text not in ("true", "false"):
            raise forms.ValidationError("expected true or false")
        return text == "true"


class BooleanFilter(df.BooleanFilter):
    """``true`` or ``false`` only (django-filter's reads anything else as "no filter")."""

    field_class = StrictBooleanField


class DateTimeFilter(df.IsoDateTimeFilter):
    """``created_after`` / ``created_before``: RFC 3339 date-times only (``2026-11-30T08:00:00Z``)."""

    field_class = RFC3339Field


class ChoiceInFilter(df.BaseInFilter, df.ChoiceFilter):
    """``?status=failed,dead``: one or more values, comma-separated, each a known choice."""


@extend_schema_field({"type": "integer", "minimum": 1, "maximum": 2**31 - 1})
class VersionFilter(df.NumberFilter):
    """A template version: a whole number from 1 (``1.5`` or ``0`` is a 400, as the schema says)."""

    field_class = forms.IntegerField


@extend_schema_field({"type": "integer", "minimum": 0, "maximum": 2**63 - 1})
class TraceIdFilter(df.NumberFilter):
    """A trace id (whole number)."""

    field_class = forms.IntegerField


class RunFilter(df.FilterSet):
    """``status`` (comma list), ``template`` (key), ``version``, ``correlation_id``, ``trigger``,
    ``created_after`` / ``created_before`` (ISO 8601; after is inclusive, before exclusive)."""

    status = ChoiceInFilter(choices=RunStatus.choices, help_text="One or more run statuses, comma-separated.")
    template = df.CharFilter(field_name="template_key", max_length=200, help_text="Template key.")
    version = VersionFilter(field_name="template_version", min_value=1, max_value=2**31 - 1)
    correlation_id = df.CharFilter(max_length=200)
    trigger = df.ChoiceFilter(choices=TriggerKind.choices)
    created_after = DateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = DateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = Run
        fields: list[str] = []


class StepFilter(df.FilterSet):
    """``status`` (comma list), ``type``, ``top_level`` (true: no map children), ``parent`` (step id)."""

    status = ChoiceInFilter(choices=StepStatus.choices, help_text="One or more step statuses, comma-separated.")
    type = df.CharFilter(max_length=32)
    top_level = BooleanFilter(field_name="parent", lookup_expr="isnull", help_text="Only steps of the spec.")
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
    step = df.CharFilter(field_name="step_row__step_id", max_length=255)
    after = TraceIdFilter(field_name="id", lookup_expr="gt", min_value=0, max_value=2**63 - 1)

    class Meta:
        model = Trace
        fields: list[str] = []
