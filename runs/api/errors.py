"""One error shape for the whole API: ``{"detail": "<one line>"}`` (+ ``"errors"`` per field).

A 400 always says what is wrong in ``detail``, so a ``curl`` user sees it at once; field errors
keep DRF's mapping in ``errors`` for programs. Service errors carry their own status (400, 404,
409); a tenant that is not the caller's is a 404. An unexpected exception is logged with the
request's context and answered as a JSON 500 that quotes the request id.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import InterfaceError, OperationalError
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from orchestrator_site import logging as logctx
from templates_app.errors import TemplateNotFound, WorkflowError, one_line

from ..services import ServiceError
from ..tenancy import NoTenant, TenantNotFound

log = logging.getLogger("orchestrator.api")


def _first_message(data: Any, path: str = "") -> str:
    """``"field: message"`` for the first error in DRF's nested error structure."""
    if isinstance(data, dict):
        for key, value in data.items():
            name = "" if key in ("non_field_errors", "detail") else str(key)
            return _first_message(value, f"{path}.{name}" if path and name else (name or path))
        return path or "invalid request"
    if isinstance(data, list) and data:
        return _first_message(data[0], path)
    return f"{path}: {data}" if path else str(data)


def _is_uniqueness_conflict(exc: DjangoValidationError) -> bool:
    """True when every error of a model's ``full_clean()`` is a unique (together) violation."""
    errors = [e for errs in exc.error_dict.values() for e in errs] if hasattr(exc, "error_dict") else exc.error_list
    return bool(errors) and all(e.code in ("unique", "unique_together") for e in errors)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's ``EXCEPTION_HANDLER``: maps every error to ``{"detail": ...}`` with the right status."""
    if isinstance(exc, RequestDataTooBig):
        # a body over DATA_UPLOAD_MAX_MEMORY_SIZE: the client's mistake, not a server error
        return Response({"detail": one_line(str(exc))}, status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
    if isinstance(exc, SuspiciousOperation):
        return Response({"detail": "bad request"}, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, (OperationalError, InterfaceError)):
        # the database is unreachable (restart, failover): temporary, so 503 + Retry-After, not a 500
        log.warning("database unavailable in %s: %s", type(context.get("view")).__name__, one_line(str(exc)))
        return Response(
            {"detail": "service unavailable: the database cannot be reached; retry shortly"},
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, ServiceError):
        return Response({"detail": str(exc)}, status=exc.status_code)
    if isinstance(exc, TemplateNotFound):  # like any object not in the caller's tenant
        return Response({"detail": str(exc)}, status=status.HTTP_404_NOT_FOUND)
    if isinstance(exc, WorkflowError):
        return Response({"detail": str(exc)}, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, TenantNotFound):
        return Response({"detail": str(exc)}, status=status.HTTP_404_NOT_FOUND)
    if isinstance(exc, NoTenant):
        return Response({"detail": str(exc)}, status=status.HTTP_403_FORBIDDEN)
    if isinstance(exc, DjangoValidationError):
        if _is_uniqueness_conflict(exc):  # e.g. an alias or name already taken in the tenant
            return Response({"detail": one_line("; ".join(exc.messages))}, status=status.HTTP_409_CONFLICT)
        return Response({"detail": one_line("; ".join(exc.messages))}, status=status.HTTP_400_BAD_REQUEST)
    response = drf_exception_handler(exc, context)
    if response is None:
        log.exception("unhandled error in %s", type(context.get("view")).__name__)
        request_id = logctx.current().get("request_id", "")
        return Response(
            {"detail": f"internal error (request id {request_id})"}, status=status.HTTP_500_INTERNAL_SERVER_ERROR
        )
    data = response.data
    if isinstance(data, dict) and set(data) == {"detail"}:
        response.data = {"detail": one_line(data["detail"])}
    elif isinstance(data, (dict, list)):
        response.data = {"detail": one_line(_first_message(data)), "errors": data}
    return response
