"""URL configuration: the REST API, the admin (with its operations dashboard), probes and metrics."""

from __future__ import annotations

import math

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.urls import include, path, re_path
from django.views.decorators.cache import never_cache

from runs.admin_views import dashboard
from runs.api.throttling import LoginFailureThrottle, LoginRateThrottle

from . import api_errors, health


@never_cache
def admin_login(request: HttpRequest, extra_context: dict | None = None) -> HttpResponse:
    """The admin's login form behind the same throttles as ``POST /api/v1/auth/login``
    (runs/api/throttling.py): 429 with Retry-After past them, wrong passwords counted."""
    if request.method == "POST":
        for throttle in (LoginRateThrottle(), LoginFailureThrottle()):
            if not throttle.allow_request(request, None):
                response = HttpResponse("too many sign-in attempts; try again later\n", status=429)
                response["Content-Type"] = "text/plain"
                wait = throttle.wait()
                if wait:
                    response["Retry-After"] = str(math.ceil(wait))
                return response
    response = admin.site.login(request, extra_context)
    if request.method == "POST" and not request.user.is_authenticated:  # the form refused the password
        LoginFailureThrottle().record_failure(request)
    return response


urlpatterns = [
    path("admin/dashboard/", admin.site.admin_view(dashboard), name="ops-dashboard"),
    path("admin/login/", admin_login),
    path("admin/", admin.site.urls),
    path("api/v1/", include("runs.api.urls", namespace="api")),
    # events and schedules (scheduler), credentials (agents): same auth, tenancy and errors as runs.api
    path("api/v1/", include("scheduler.api")),
    path("api/v1/", include("agents.api")),
    # workflow generation from plain language (templates_app: issue 8 section 3)
    path("api/v1/", include("templates_app.api")),
    # agent tasks (seed 003): /chat, /chat/orchestrate (tasks_app)
    path("api/v1/", include("tasks_app.api")),
    # anything else under /api/ is a JSON 404, never Django's HTML page
    re_path(r"^api/(?P<path>.*)$", api_errors.api_not_found, name="api-not-found"),
    re_path(r"^health/?$", health.health, name="health"),
    re_path(r"^ready/?$", health.ready, name="ready"),
    re_path(r"^metrics/?$", health.metrics, name="metrics"),
]

# Errors Django answers itself (outside a DRF view) are JSON under /api/ as well.
handler404 = api_errors.handler404
handler500 = api_errors.handler500
