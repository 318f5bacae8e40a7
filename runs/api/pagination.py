"""Cursor pagination: stable pages over tables that grow while you read them, and no COUNT(*).

The response is ``{"next": url | null, "previous": url | null, "results": [...]}``; follow
``next`` until it is null. ``page_size`` (query) chooses 1-500 rows, default 50.
"""

from __future__ import annotations

from rest_framework.pagination import CursorPagination


class NewestFirstPagination(CursorPagination):
    """Runs, newest first (index ``run_tenant_created_idx``)."""

    ordering = "-created_at"
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


class IdPagination(CursorPagination):
    """Steps, attempts and traces in the order they were written."""

    ordering = "id"
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 500
