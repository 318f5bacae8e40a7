"""Cursor pagination: stable pages over tables that grow while you read them, and no COUNT(*).

The response is ``{"next": url | null, "previous": url | null, "results": [...]}``; follow
``next`` until it is null. ``page_size`` (query) chooses 1-500 rows, default 50.
"""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import ValidationError
from rest_framework.pagination import CursorPagination


class StrictPageSize:
    """``page_size`` must be an integer from 1 to ``max_page_size``: anything else is a 400 naming
    it (DRF's default silently falls back to the default size), and the schema says so."""

    page_size_query_param = "page_size"
    max_page_size = 500

    def get_page_size(self, request: Any) -> int:
        values = request.query_params.getlist(self.page_size_query_param)
        if not values:
            return self.page_size
        if len(values) > 1:
            raise ValidationError({"page_size": "given more than once"})
        raw = values[0]
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if not 1 <= value <= self.max_page_size:
            raise ValidationError({"page_size": f"an integer from 1 to {self.max_page_size}, got {raw[:40]!r}"})
        return value

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": self.max_page_size}
        return parameters


class NewestFirstPagination(StrictPageSize, CursorPagination):
    """Runs, newest first (index ``run_tenant_created_idx``)."""

    ordering = "-created_at"
    page_size = 50


class IdPagination(StrictPageSize, CursorPagination):
    """Steps, attempts and traces in the order they were written."""

    ordering = "id"
    page_size = 100


class NamePagination(StrictPageSize, CursorPagination):
    """Schedules by name (unique within a tenant: constraint ``schedule_tenant_name_uniq``)."""

    ordering = "name"
    page_size = 100
