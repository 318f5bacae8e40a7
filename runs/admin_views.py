"""The operations dashboard at ``/admin/dashboard/`` (staff only, scoped to the user's tenants).

One page with what an operator looks at first: runs by status (active ones, and finished ones of
the last 24 hours), unfinished steps by status (the queue), the dead-letter list with a requeue
button, recent failed attempts with their errors, recently failed runs, and the Celery workers
that answered a ping within ``ORCHESTRATOR_PING_TIMEOUT`` seconds.

Every query is bounded: counts go through the partial index of unfinished steps or a 24-hour
window of runs, lists are LIMITed on indexed orderings.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, F, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone

from . import services, tenancy
from .choices import RUN_ACTIVE, AttemptOutcome, RunStatus, StepStatus
from .metrics import QUEUE_STATUSES
from .models import Attempt, Run, Step

log = logging.getLogger("orchestrator.admin")

DEAD_LETTER_LIMIT = 50
FAILURES_LIMIT = 20
FAILED_OUTCOMES = (AttemptOutcome.FAILED, AttemptOutcome.TIMED_OUT, AttemptOutcome.LOST)


def workers_online(timeout: float | None = None) -> dict[str, Any]:
    """``{"workers": [names], "error": str | None}`` from a Celery ping (``control.ping``)."""
    from orchestrator_site.celery import app

    if settings.ORCHESTRATOR_EMBEDDED:
        return {"workers": [], "error": "embedded mode: workers run inside the commands that need them"}
    try:
        replies = app.control.ping(timeout=timeout if timeout is not None else settings.ORCHESTRATOR_PING_TIMEOUT)
    except Exception as exc:  # broker down: say so on the page instead of failing it
        return {"workers": [], "error": " ".join(f"{type(exc).__name__}: {exc}".split())[:200]}
    return {"workers": sorted(name for reply in replies for name in reply), "error": None}


def _scoped(queryset: QuerySet, request: HttpRequest, field: str) -> QuerySet:
    return tenancy.scope_for_user(queryset, request.user, field)


def dashboard_context(request: HttpRequest) -> dict[str, Any]:
    """Everything the dashboard shows, for ``request.user``'s tenants."""
    now = timezone.now()
    since = now - timedelta(hours=24)
    runs = _scoped(Run.objects.all(), request, "tenant_id")
    run_counts = {status: 0 for status in RunStatus.values}
    for row in runs.filter(status__in=RUN_ACTIVE).values("status").annotate(n=Count("id")).order_by():
        run_counts[row["status"]] = row["n"]
    finished_window = (
        runs.filter(created_at__gte=since).exclude(status__in=RUN_ACTIVE).values("status").annotate(n=Count("id"))
    )
    for row in finished_window.order_by():
        run_counts[row["status"]] = row["n"]

    steps = _scoped(Step.objects.all(), request, "run__tenant_id")
    step_counts = {str(status): 0 for status in QUEUE_STATUSES}
    for row in steps.filter(status__in=QUEUE_STATUSES).values("status").annotate(n=Count("id")).order_by():
        step_counts[row["status"]] = row["n"]

    dead = list(
        steps.filter(status=StepStatus.DEAD)
        .annotate(template_key=F("run__template_key"), tenant=F("run__tenant_id"))
        .only("id", "run_id", "step_id", "type", "attempts", "max_attempts", "error", "finished_at")
        .order_by("-finished_at")[:DEAD_LETTER_LIMIT]
    )
    attempts = _scoped(Attempt.objects.all(), request, "run__tenant_id")
    failures: list[Attempt] = []
    for outcome in FAILED_OUTCOMES:  # one indexed (outcome, -started_at) scan each, merged here
        failures += list(
            attempts.filter(outcome=outcome)
            .annotate(step_code=F("step__step_id"), template_key=F("run__template_key"))
            .order_by("-started_at")[:FAILURES_LIMIT]
        )
    failures = sorted(failures, key=lambda a: a.started_at, reverse=True)[:FAILURES_LIMIT]
    failed_runs = list(
        runs.filter(status=RunStatus.FAILED)
        .only("id", "template_key", "tenant_id", "error", "created_at", "finished_at")
        .order_by("-created_at")[:10]
    )
    return {
        "run_counts": run_counts,
        "run_active": sorted(RUN_ACTIVE),
        "step_counts": step_counts,
        "dead_steps": dead,
        "dead_limit": DEAD_LETTER_LIMIT,
        "failures": failures,
        "failed_runs": failed_runs,
        "workers": workers_online(),
        "since": since,
        "now": now,
    }


def dashboard(request: HttpRequest) -> HttpResponse:
    """GET: the dashboard. POST ``requeue`` with ``step`` ids: requeue those dead steps."""
    if not request.user.has_perm("runs.view_run"):
        raise PermissionDenied
    if request.method == "POST":
        if not request.user.has_perm("runs.change_step"):
            raise PermissionDenied
        pks = [int(pk) for pk in request.POST.getlist("step") if pk.isdigit()][:DEAD_LETTER_LIMIT]
        allowed = list(_scoped(Step.objects.filter(pk__in=pks), request, "run__tenant_id").values_list("pk", flat=True))
        count = services.requeue_dead(allowed)
        if count:
            messages.success(request, f"Requeued {count} dead step(s).")
        else:
            messages.warning(request, "Nothing requeued: select dead steps first.")
        return HttpResponseRedirect(reverse("ops-dashboard"))
    context = {
        **admin.site.each_context(request),
        "title": "Operations dashboard",
        **dashboard_context(request),
    }
    return TemplateResponse(request, "admin/orchestrator/dashboard.html", context)
