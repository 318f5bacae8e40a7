"""URL configuration: the REST API, the admin (with its operations dashboard), probes and metrics."""

from django.contrib import admin
from django.urls import include, path, re_path

from runs.admin_views import dashboard

from . import api_errors, health

urlpatterns = [
    path("admin/dashboard/", admin.site.admin_view(dashboard), name="ops-dashboard"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("runs.api.urls", namespace="api")),
    # events and schedules (scheduler), credentials (agents): same auth, tenancy and errors as runs.api
    path("api/v1/", include("scheduler.api")),
    path("api/v1/", include("agents.api")),
    # anything else under /api/ is a JSON 404, never Django's HTML page
    re_path(r"^api/(?P<path>.*)$", api_errors.api_not_found, name="api-not-found"),
    re_path(r"^health/?$", health.health, name="health"),
    re_path(r"^ready/?$", health.ready, name="ready"),
    re_path(r"^metrics/?$", health.metrics, name="metrics"),
]

# Errors Django answers itself (outside a DRF view) are JSON under /api/ as well.
handler404 = api_errors.handler404
handler500 = api_errors.handler500
