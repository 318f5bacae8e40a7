"""The operations dashboard at ``/admin/dashboard/`` (staff only, scoped to the user's tenants).

One page with what an operator looks at first: runs by status (active ones, and finished ones of
the last 24 hours), unfinished steps by status (the queue), the dead-letter list with a requeue
button, recent failed attempts with their errors, recently failed runs, and the Celery workers
that answered a ping within ``ORCHESTRATOR_PING_TIMEOUT`` seconds.

Every query is bounded: counts go through the partial index of unfinished steps or a 24-hour
window of runs, lists are LIMITed on indexed orderings.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, F, Q, QuerySet
from django.db.models.functions import TruncHour
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone

from templates_app.expressions import ExpressionError, analyze

from . import services, tenancy
from .choices import RUN_ACTIVE, AttemptOutcome, RunStatus, StepStatus
from .metrics import QUEUE_STATUSES
from .models import Attempt, Run, Step

log = logging.getLogger("orchestrator.admin")

DEAD_LETTER_LIMIT = 50
FAILURES_LIMIT = 20
FAILED_OUTCOMES = (AttemptOutcome.FAILED, AttemptOutcome.TIMED_OUT, AttemptOutcome.LOST)

#: Status colours of the graph, the timeline and the dashboard (runs, steps, attempts).
STATUS_COLORS = {
    "pending": "#888",
    "queued": "#6b7fa3",
    "running": "#1f6feb",
    "retry_wait": "#bf8700",
    "succeeded": "#1a7f37",
    "failed": "#cf222e",
    "dead": "#82071e",
    "skipped": "#999",
    "cancelled": "#57606a",
    "timed_out": "#bc4c00",
}


def read_only_message(request: HttpRequest, slugs: list[str] | None = None) -> str:
    """The one-line refusal an operator sees: which tenants, which role, nothing done."""
    user = request.user
    if not slugs:
        slugs = sorted(tenancy.tenant_slugs(user) or [])
    roles = ", ".join(f"{slug!r} is {tenancy.role_in(user, slug) or 'none'}" for slug in slugs[:5])
    return f"Refused: your role in tenant {roles}: read only (as in the API). Nothing was changed."


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


# --- charts -------------------------------------------------------------------------------------------

#: Successful attempts (newest first) the duration percentiles are computed over: a bounded sample
#: read backwards on ``attempt_outcome_started_idx``, so the chart costs the same at any table size.
DURATION_SAMPLE = 20_000
#: Percentiles of the step duration chart.
PERCENTILES = (50, 90, 99)
#: Attempt outcomes counted as a retry (the attempt failed; the step retried or died).
RETRY_OUTCOMES = (AttemptOutcome.FAILED, AttemptOutcome.TIMED_OUT, AttemptOutcome.LOST)
#: Outcomes of attempts that ended (the retry rate's denominator).
FINISHED_OUTCOMES = (AttemptOutcome.SUCCEEDED, AttemptOutcome.REFUSED, *RETRY_OUTCOMES)


def _hours(now: Any) -> list[Any]:
    """The 24 hour buckets ending with the current one, oldest first (aware datetimes)."""
    top = timezone.localtime(now).replace(minute=0, second=0, microsecond=0)  # TruncHour is local too
    return [top - timedelta(hours=23 - i) for i in range(24)]


def _bucket(moment: Any, hours: list[Any]) -> int | None:
    """Index of ``moment``'s hour in ``hours`` (None when outside the window)."""
    if moment is None:
        return None
    index = int((moment - hours[0]).total_seconds() // 3600)
    return index if 0 <= index < len(hours) else None


def percentile(sorted_values: list[float], p: float) -> float | None:
    """The ``p``-th percentile (0-100) of ascending ``sorted_values`` by the nearest-rank method
    (the smallest value with at least p % of the values at or below it); None when empty."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * p // 100))  # ceil(n * p / 100)
    return sorted_values[int(rank) - 1]


def runs_finished_per_hour(runs: QuerySet, hours: list[Any]) -> dict[str, list[int]]:
    """``{status: [count per hour]}`` of runs that finished in ``hours`` (24 buckets), terminal
    statuses only. One grouped query on ``finished_at`` (see the README: ``run_finished_idx``)."""
    series = {str(status): [0] * len(hours) for status in RunStatus.values if status not in RUN_ACTIVE}
    rows = (
        runs.filter(finished_at__gte=hours[0])
        .annotate(hour=TruncHour("finished_at"))
        .values("hour", "status")
        .annotate(n=Count("id"))
        .order_by()
    )
    for row in rows:
        index = _bucket(row["hour"], hours)
        if index is not None and row["status"] in series:
            series[row["status"]][index] += row["n"]
    return series


def step_duration_percentiles(attempts: QuerySet, since: Any) -> dict[str, Any]:
    """Duration percentiles (ms) of successful attempts since ``since``, per step type.

    Returns ``{"types": [type], "series": {"p50": [ms], "p90": [...], "p99": [...]}, "counts":
    [n], "sample": n, "capped": bool}`` over the newest :data:`DURATION_SAMPLE` successful
    attempts (index ``attempt_outcome_started_idx`` read backwards, then the step's type by
    primary key). Percentiles are computed here (nearest rank), so SQLite works too.
    """
    rows = list(
        attempts.filter(outcome=AttemptOutcome.SUCCEEDED, started_at__gte=since, duration_ms__isnull=False)
        .order_by("-started_at")
        .values_list("step__type", "duration_ms")[:DURATION_SAMPLE]
    )
    by_type: dict[str, list[int]] = {}
    for step_type, duration in rows:
        by_type.setdefault(step_type, []).append(duration)
    types = sorted(by_type)
    series: dict[str, list[float | None]] = {f"p{p}": [] for p in PERCENTILES}
    for step_type in types:
        values = sorted(by_type[step_type])
        for p in PERCENTILES:
            series[f"p{p}"].append(percentile(values, p))
    return {
        "types": types,
        "series": series,
        "counts": [len(by_type[t]) for t in types],
        "sample": len(rows),
        "capped": len(rows) == DURATION_SAMPLE,
    }


def retry_and_dead_rates(attempts: QuerySet, steps: QuerySet, hours: list[Any]) -> dict[str, Any]:
    """Per hour of ``hours``: failed attempts (retries) and steps that went dead, and over the
    window the share of attempts that failed.

    Returns ``{"retries": [n], "dead": [n], "attempts": int, "failed": int, "retry_rate": float
    (0-1) | None}``. Counts per outcome read ``attempt_outcome_started_idx`` (one range per
    outcome), dead steps ``step_dead_idx``.
    """
    retries = [0] * len(hours)
    dead = [0] * len(hours)
    total = 0
    failed = 0
    # Index ranges of (outcome, started_at), never the table: the many successes are counted
    # alone (an index-only scan), the few other outcomes together, per outcome and hour.
    total += attempts.filter(outcome=AttemptOutcome.SUCCEEDED, started_at__gte=hours[0]).count()
    rows = (
        attempts.filter(outcome__in=[o for o in FINISHED_OUTCOMES if o != AttemptOutcome.SUCCEEDED])
        .filter(started_at__gte=hours[0])
        .annotate(hour=TruncHour("started_at"))
        .values("hour", "outcome")
        .annotate(n=Count("started_at"))
        .order_by()
    )
    for row in rows:
        total += row["n"]
        if row["outcome"] in RETRY_OUTCOMES:
            failed += row["n"]
            index = _bucket(row["hour"], hours)
            if index is not None:
                retries[index] += row["n"]
    dead_rows = (
        steps.filter(status=StepStatus.DEAD, finished_at__gte=hours[0])
        .annotate(hour=TruncHour("finished_at"))
        .values("hour")
        .annotate(n=Count("id"))
        .order_by()
    )
    for row in dead_rows:
        index = _bucket(row["hour"], hours)
        if index is not None:
            dead[index] += row["n"]
    return {
        "retries": retries,
        "dead": dead,
        "attempts": total,
        "failed": failed,
        "retry_rate": (failed / total) if total else None,
    }


def token_usage_by_tenant(attempts: QuerySet, since: Any) -> dict[str, Any] | None:
    """Tokens of LLM calls per tenant since ``since``, from ``Attempt.usage`` (agents.llm):
    ``{"tenants": [slug], "prompt": [n], "completion": [n]}`` (most tokens first, at most 20
    tenants), or None when no attempt of the window recorded usage. Reads the attempts of the
    window through ``attempt_outcome_started_idx`` (one range per finished outcome)."""
    from django.db.models import IntegerField, Sum
    from django.db.models.fields.json import KeyTextTransform
    from django.db.models.functions import Cast, Coalesce

    def tokens(key: str) -> Any:
        return Coalesce(Sum(Cast(KeyTextTransform(key, "usage"), IntegerField())), 0)

    rows = list(
        attempts.filter(outcome__in=FINISHED_OUTCOMES, started_at__gte=since, usage__isnull=False)
        .values("run__tenant_id")
        .annotate(prompt=tokens("prompt_tokens"), completion=tokens("completion_tokens"))
        .order_by()
    )
    if not rows:
        return None
    rows.sort(key=lambda r: -(r["prompt"] + r["completion"]))
    rows = rows[:20]
    return {
        "tenants": [r["run__tenant_id"] for r in rows],
        "prompt": [r["prompt"] for r in rows],
        "completion": [r["completion"] for r in rows],
    }


def chart_data(request: HttpRequest, now: Any, step_counts: dict[str, int]) -> dict[str, Any]:
    """The dashboard's charts as one JSON-able dict (read by ``runs/static/runs/dashboard.js``)."""
    hours = _hours(now)
    runs = _scoped(Run.objects.all(), request, "tenant_id")
    attempts, steps = Attempt.objects.all(), Step.objects.all()
    if tenancy.tenant_slugs(request.user) is not None:
        # Staff see their tenants only. Attempts and steps carry no tenant: rather than join every
        # row of the window to its run (a hash of all the tenant's runs), keep those of the runs
        # that were alive in the window: active ones and those that finished since its start.
        alive = runs.filter(Q(status__in=RUN_ACTIVE) | Q(finished_at__gte=hours[0])).values("pk")
        attempts, steps = attempts.filter(run_id__in=alive), steps.filter(run_id__in=alive)
    return {
        "hours": [h.strftime("%H:00") for h in hours],
        "runs_finished": runs_finished_per_hour(runs, hours),
        "durations": step_duration_percentiles(attempts, hours[0]),
        "queue": {"statuses": list(step_counts), "counts": list(step_counts.values())},
        "rates": retry_and_dead_rates(attempts, steps, hours),
        "tokens": token_usage_by_tenant(attempts, hours[0]),
        "colors": STATUS_COLORS,
    }


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
    writable = tenancy.writable_tenant_slugs(request.user)
    for step in dead:
        step.can_requeue = writable is None or step.tenant in writable
    return {
        "can_requeue": any(step.can_requeue for step in dead),
        "charts": chart_data(request, now, step_counts),
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
        chosen = _scoped(Step.objects.filter(pk__in=pks), request, "run__tenant_id")
        writable = tenancy.writable_tenant_slugs(request.user)
        if writable is not None:  # viewers read only, as in the API
            read_only = chosen.exclude(run__tenant_id__in=sorted(writable))
            foreign = sorted(set(read_only.values_list("run__tenant_id", flat=True)))
            if foreign:
                messages.error(request, read_only_message(request, foreign))
            chosen = chosen.filter(run__tenant_id__in=sorted(writable))
        allowed = list(chosen.values_list("pk", flat=True))
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


# --- "rerun this step with edited input" -------------------------------------------------------------

#: Largest edited input the step page accepts (bytes of JSON).
EDITED_INPUT_MAX_BYTES = 64 * 1024


def step_input_for_editing(step: Step) -> Any:
    """What the rerun form starts from: the input the step's last attempt resolved, else its
    declared ``params`` (expressions unresolved)."""
    return step.input if step.input is not None else (step.spec or {}).get("params", {})


def parse_edited_input(step: Step, text: str) -> dict[str, Any]:
    """The edited input of ``step`` as a dict. Raises services.Invalid with a one-line message
    naming the step and the field: not JSON, not an object, too big, or an expression that
    refers to a step this one does not depend on."""
    where = f"step {step.step_id!r}, field input"
    if len(text.encode()) > EDITED_INPUT_MAX_BYTES:
        raise services.Invalid(f"{where}: {len(text.encode())} bytes, at most {EDITED_INPUT_MAX_BYTES}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise services.Invalid(f"{where}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")
    if not isinstance(value, dict):
        raise services.Invalid(f"{where}: must be a JSON object ({{...}}), got {type(value).__name__}")
    try:
        refs = analyze(value)
    except ExpressionError as exc:
        raise services.Invalid(f"{where}: {exc}")
    allowed = set((step.spec or {}).get("refs") or []) | set(step.depends_on or [])
    unknown = sorted(set(refs.step_ids) - allowed)
    if unknown:
        raise services.Invalid(f"{where}: refers to step {unknown[0]!r}, which this step does not depend on")
    return value


def rerun_step_with_input(step: Step, edited: dict[str, Any], *, user: str) -> tuple[Run, str]:
    """Run ``step`` again in its run with ``edited`` as its input; returns ``(run, message)``.

    A retry in place (``services.retry`` with ``params``): the step and everything downstream of
    it run again, the rest of the run is kept (Airflow's "clear"). The step must be finished; a
    map item's input comes from its step's ``for_each``, so only an unchanged item is retried.

    Raises services.ServiceError (Invalid, Conflict) with a one-line message.
    """
    run = Run.objects.get(pk=step.run_id)
    unchanged = edited == step_input_for_editing(step)
    if step.parent_id is not None:
        if not unchanged:
            top = Step.objects.get(pk=step.parent_id)
            raise services.Invalid(
                f"step {step.step_id!r}, field input: a map item's input comes from its step's for_each; "
                f"edit the input of step {top.step_id!r} instead"
            )
        services.retry(run, step_ids=[step.step_id], reason=f"retried by {user[:100]} from the step page")
        return run, f"Retrying step {step.step_id} in this run (same input)."
    services.retry(
        run,
        step_ids=[step.step_id],
        reason=f"retried by {user[:100]} from the step page" + ("" if unchanged else " with edited input"),
        params=None if unchanged else {step.step_id: edited},
    )
    verb = "the same" if unchanged else "edited"
    return run, f"Retrying step {step.step_id} in this run with {verb} input."
