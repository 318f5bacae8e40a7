"""URL configuration: the REST API, the admin (with its operations dashboard), probes and metrics."""

from django.contrib import admin
from django.urls import include, path, re_path

from runs.admin_views import dashboard

from . import health

urlpatterns = [
    path("admin/dashboard/", admin.site.admin_view(dashboard), name="ops-dashboard"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("runs.api.urls", namespace="api")),
    # events and schedules (scheduler), credentials (agents): same auth, tenancy and errors as runs.api
    path("api/v1/", include("scheduler.api")),
    path("api/v1/", include("agents.api")),
    # workflow generation from plain language (templates_app: issue 8 section 3)
    path("api/v1/", include("templates_app.api")),
    re_path(r"^health/?$", health.health, name="health"),
    re_path(r"^ready/?$", health.ready, name="ready"),
    re_path(r"^metrics/?$", health.metrics, name="metrics"),
]
