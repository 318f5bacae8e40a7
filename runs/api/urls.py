"""URLs of ``/api/v1/`` (namespace ``api``). A trailing slash is optional everywhere."""

from __future__ import annotations

from django.urls import path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from . import executors, views

app_name = "api"

router = SimpleRouter()
router.trailing_slash = "/?"  # `/runs` and `/runs/` both (seed 002 prints no slash)
router.register("runs", views.RunViewSet, basename="run")
router.register("templates", views.TemplateViewSet, basename="template")

RUN = rf"runs/(?P<run_id>{views.UUID_PATTERN})"
EXEC_STEP = r"executors/steps/(?P<step_pk>\d+)"

urlpatterns = [
    path("", views.ApiRootView.as_view(), name="root"),
    re_path(r"^schema/?$", SpectacularAPIView.as_view(), name="schema"),
    re_path(r"^docs/?$", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
    re_path(r"^auth/login/?$", views.LoginView.as_view(), name="login"),
    re_path(r"^auth/logout/?$", views.LogoutView.as_view(), name="logout"),
    re_path(r"^auth/logoutall/?$", views.LogoutAllView.as_view(), name="logoutall"),
    re_path(r"^me/?$", views.MeView.as_view(), name="me"),
    re_path(rf"^{RUN}/steps/?$", views.StepListView.as_view(), name="run-steps"),
    re_path(rf"^{RUN}/steps/(?P<step_id>[^/]+?)/?$", views.StepDetailView.as_view(), name="run-step-detail"),
    re_path(rf"^{RUN}/attempts/?$", views.AttemptListView.as_view(), name="run-attempts"),
    re_path(rf"^{RUN}/traces/?$", views.TraceListView.as_view(), name="run-traces"),
    # seed 002 / 004 endpoints, as printed there
    re_path(r"^workflows/?$", views.WorkflowCreateView.as_view(), name="workflows"),
    re_path(
        rf"^workflows/(?P<run_id>{views.UUID_PATTERN})/status/?$",
        views.WorkflowStatusView.as_view(),
        name="workflow-status",
    ),
    re_path(r"^dispatch/?$", views.DispatchView.as_view(), name="dispatch"),
    # external executors (seed 001): poll, heartbeat, task_done, task_failed
    re_path(r"^executors/poll/?$", executors.PollView.as_view(), name="executor-poll"),
    re_path(
        r"^executors/steps/(?P<step_pk>\d+)/heartbeat/?$", executors.HeartbeatView.as_view(), name="executor-heartbeat"
    ),
    re_path(
        r"^executors/steps/(?P<step_pk>\d+)/complete/?$", executors.CompleteView.as_view(), name="executor-complete"
    ),
    re_path(r"^executors/steps/(?P<step_pk>\d+)/fail/?$", executors.FailView.as_view(), name="executor-fail"),
    *router.urls,
]
