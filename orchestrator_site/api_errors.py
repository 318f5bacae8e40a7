"""JSON answers for errors Django raises before (or outside) a REST view, on ``/api/`` paths.

DRF turns errors inside its views into ``{"detail": ...}`` (runs/api/errors.py). A path that no
view matches, or an exception that escapes a view or a middleware, is Django's to answer: under
``/api/`` these handlers give the same JSON shape instead of an HTML page; elsewhere (the admin)
Django's own pages stay.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from django.views.csrf import csrf_failure as django_csrf_failure
from django.views.decorators.csrf import csrf_exempt

from . import logging as logctx

API_PREFIX = "/api/"


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith(API_PREFIX)


@csrf_exempt  # it changes nothing; a POST with a session cookie is a 404 too, not a CSRF page
def api_not_found(request: HttpRequest, path: str = "") -> JsonResponse:
    """The catch-all of ``/api/``: ``404 {"detail": "not found: <path>"}`` for any method."""
    return JsonResponse({"detail": f"not found: {request.path}"}, status=404)


def handler404(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """``handler404``: JSON under ``/api/`` (e.g. an Http404 raised outside DRF), else Django's page."""
    if _is_api(request):
        return api_not_found(request)
    return defaults.page_not_found(request, exception)


def handler500(request: HttpRequest) -> HttpResponse:
    """``handler500``: ``500 {"detail": "internal error (request id ...)"}`` under ``/api/``."""
    if _is_api(request):
        request_id = logctx.current().get("request_id", "")
        return JsonResponse({"detail": f"internal error (request id {request_id})"}, status=500)
    return defaults.server_error(request)


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """``CSRF_FAILURE_VIEW``: ``403 {"detail": "CSRF failed: ..."}`` under ``/api/``."""
    if _is_api(request):
        return JsonResponse({"detail": f"CSRF failed: {reason}"}, status=403)
    return django_csrf_failure(request, reason)
