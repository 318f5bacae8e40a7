"""The admin as the operations console: runs, steps (the dead letters), attempts, traces, tenants.

Built for big tables (healthchecks' ``hc/api/admin.py`` is the model): no full ``COUNT(*)`` (a
capped count instead), no ``SELECT DISTINCT`` filters over the runs or steps tables (filter
choices come from small tables or fixed lists), no JSON columns loaded for change lists, search
by exact keys that have an index, and links instead of joins. Staff who are not superusers see
only the rows of the tenants they belong to (``runs.tenancy``). Actions call ``runs.services``
and report with ``message_user``.
"""

from __future__ import annotations

import json
import uuid
from functools import cached_property
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404
from django.urls import path, reverse, reverse_lazy
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.views.decorators.http import require_POST

from . import admin_graph, services, tenancy
from .admin_views import STATUS_COLORS, read_only_message
from .choices import StepStatus, TriggerKind
from .models import Attempt, Membership, Run, Step, Tenant, Trace

admin.site.site_header = "Orchestrator operations"
admin.site.site_title = "Orchestrator"
admin.site.index_title = "Operations"
admin.site.index_template = "admin/orchestrator/index.html"
# "View site": the operations dashboard (the project has no public site; "/" is a 404).
admin.site.site_url = reverse_lazy("ops-dashboard")

#: A change list counts at most this many rows (beyond it shows "10000+" pages' worth).
COUNT_CAP = 10_000


#: Bar colours of the attempt timeline, by outcome.
OUTCOME_COLORS = {
    "running": STATUS_COLORS["running"],
    "succeeded": STATUS_COLORS["succeeded"],
    "failed": STATUS_COLORS["failed"],
    "timed_out": STATUS_COLORS["timed_out"],
    "lost": "#8250df",
    "refused": "#999",
}

#: How often the run page polls its live JSON while the run is active (ms).
LIVE_POLL_MS = 2000

#: How the admin names trigger kinds. ``retry`` is what ``services.rerun`` stored before the
#: ``rerun`` kind existed (a retry in place creates no run), so an old run's "retry" is a rerun.
TRIGGER_LABELS = {"retry": "Rerun", "rerun": "Rerun", "api": "API", "cli": "CLI"}


def trigger_label(value: str) -> str:
    """The label an operator reads for a stored trigger kind ("retry" -> "Rerun")."""
    if value in TRIGGER_LABELS:
        return TRIGGER_LABELS[value]
    return TriggerKind(value).label if value in TriggerKind.values else value


def compact_time(moment: Any) -> str:
    """``"Nov 30 20:45:01"`` in the current time zone (the year when it is not this year): list
    columns stay narrow enough for a 1400 px screen."""
    if moment is None:
        return "-"
    local = timezone.localtime(moment)
    fmt = "%b %d %H:%M:%S" if local.year == timezone.localtime().year else "%Y %b %d %H:%M"
    return local.strftime(fmt)


def short_text(text: str, limit: int = 90) -> str:
    return (text[:limit] + "…") if len(text) > limit else text


def status_badge(status: str) -> str:
    return format_html(
        '<span class="status-badge" style="color:#fff;background:{};padding:1px 6px;border-radius:8px;'
        'font-size:11px;white-space:nowrap">{}</span>',
        STATUS_COLORS.get(status, "#888"),
        status,
    )


def pretty_json(value: Any) -> str:
    if value in (None, "", {}, []):
        return "-"
    text = json.dumps(value, indent=2, sort_keys=True, default=str)
    if len(text) > 20_000:
        text = text[:20_000] + "\n… (cut)"
    return format_html('<pre style="white-space:pre-wrap;max-height:30em;overflow:auto">{}</pre>', text)


class CappedCountPaginator(Paginator):
    """A paginator that counts at most COUNT_CAP + 1 rows: cheap on a table of millions."""

    @cached_property
    def count(self) -> int:
        try:
            return self.object_list[: COUNT_CAP + 1].count()
        except (AttributeError, TypeError):
            return len(self.object_list)


class TenantScopedAdmin(admin.ModelAdmin):
    """Staff who are not superusers see only their tenants' rows, and change only those of the
    tenants where they are owner or member (viewers read only: the API's rule)."""

    class Media:
        css = {"all": ["runs/ops.css"]}

    tenant_field = "tenant_id"
    paginator = CappedCountPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # "Show counts" would COUNT every filter choice over the whole table
    list_per_page = 100

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return tenancy.scope_for_user(super().get_queryset(request), request.user, self.tenant_field)

    def may_see_tenant(self, request: HttpRequest, slug: str) -> bool:
        slugs = tenancy.tenant_slugs(request.user)
        return slugs is None or slug in slugs

    # --- roles: the API's rule (owners and members write, viewers read), per tenant ----------------
    def tenant_of(self, obj: Any) -> str:
        """The tenant slug of ``obj``, following ``tenant_field`` (``"run__tenant_id"`` -> obj.run.tenant_id)."""
        value = obj
        for part in self.tenant_field.split("__"):
            value = getattr(value, part)
        return value

    def may_write(self, request: HttpRequest, obj: Any = None) -> bool:
        """May the user change ``obj`` (its tenant is one where they are owner or member)? With no
        ``obj``: may they change anything at all (some tenant where they write)?"""
        slugs = tenancy.writable_tenant_slugs(request.user)
        if slugs is None:
            return True
        if obj is None:
            return bool(slugs)
        return self.tenant_of(obj) in slugs

    def writable_only(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        """``queryset`` limited to the tenants where the user writes; a warning names the others."""
        slugs = tenancy.writable_tenant_slugs(request.user)
        if slugs is None:
            return queryset
        read_only = queryset.exclude(**{f"{self.tenant_field}__in": sorted(slugs)})
        foreign = sorted(set(read_only.values_list(self.tenant_field, flat=True)[:1000]))
        if foreign:
            self.message_user(request, read_only_message(request, foreign), messages.ERROR)
        return queryset.filter(**{f"{self.tenant_field}__in": sorted(slugs)})

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_change_permission(request, obj) and self.may_write(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_delete_permission(request, obj) and self.may_write(request, obj)

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return super().has_add_permission(request, *args) and self.may_write(request)

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None):
        """A POSTed action the user's roles do not allow is refused with a message (Django alone
        would only say "No action selected")."""
        action = request.POST.get("action") if request.method == "POST" else None
        if action and action in (self.actions or []) and action not in self.get_actions(request):
            self.message_user(request, read_only_message(request), messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())
        return super().changelist_view(request, extra_context)


class EngineRowsAdmin(TenantScopedAdmin):
    """Rows the engine owns: never added or edited by hand (a form save would overwrite the row
    with what the page showed, racing the engine). The "change" permission only unlocks the
    operator actions (retry, cancel, requeue), which go through ``runs.services``."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return obj is None and super().has_change_permission(request)

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        raise PermissionDenied("engine rows are read-only")


# --- list filters that do not scan the big tables ---------------------------------------------------


class TenantFilter(admin.SimpleListFilter):
    title = "tenant"
    parameter_name = "tenant"
    field = "tenant_id"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        slugs = tenancy.tenant_slugs(request.user)
        tenants = Tenant.objects.order_by("slug")
        if slugs is not None:
            tenants = tenants.filter(slug__in=slugs)
        return [(t.slug, t.slug) for t in tenants[:200]]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset.filter(**{self.field: self.value()}) if self.value() else queryset


class RunTenantFilter(TenantFilter):
    field = "run__tenant_id"


class TemplateKeyFilter(admin.SimpleListFilter):
    """Template keys from the (small) templates table, not ``SELECT DISTINCT`` over runs."""

    title = "template"
    parameter_name = "template"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        from templates_app.models import WorkflowTemplate

        keys = tenancy.scope_for_user(WorkflowTemplate.objects.all(), request.user)
        return [(k, k) for k in keys.order_by("key").values_list("key", flat=True).distinct()[:200]]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset.filter(template_key=self.value()) if self.value() else queryset


class StepTypeFilter(admin.SimpleListFilter):
    """Step types from the handler registry, not ``SELECT DISTINCT`` over steps."""

    title = "type"
    parameter_name = "type"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        from agents.registry import handler_types

        return [(t, t) for t in sorted(set(handler_types()) | {"condition", "parallel"})]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset.filter(type=self.value()) if self.value() else queryset


class TriggerFilter(admin.SimpleListFilter):
    """Trigger kinds under the admin's names (a stored "retry" is a rerun)."""

    title = "trigger"
    parameter_name = "trigger__exact"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(value, trigger_label(value)) for value in TriggerKind.values]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset.filter(trigger=self.value()) if self.value() else queryset


def _uuid(term: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(term.strip())
    except ValueError:
        return None


# --- runs -------------------------------------------------------------------------------------------


class StepInline(admin.TabularInline):
    """The run's top-level steps, read-only; each links to its step page (attempts, traces)."""

    model = Step
    fk_name = "run"
    extra = 0
    can_delete = False
    show_change_link = True
    fields = ["step_link", "type", "status_badge", "attempts_display", "started_at", "finished_at", "error_short"]
    readonly_fields = fields
    verbose_name_plural = "steps (top level; map items on the step pages)"

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).filter(parent__isnull=True).defer("spec", "input", "output", "item")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="step")
    def step_link(self, step: Step) -> str:
        return format_html('<a href="{}">{}</a>', reverse("admin:runs_step_change", args=[step.pk]), step.step_id)

    @admin.display(description="status")
    def status_badge(self, step: Step) -> str:
        return status_badge(step.status)

    @admin.display(description="attempts")
    def attempts_display(self, step: Step) -> str:
        url = reverse("admin:runs_attempt_changelist") + f"?step={step.pk}"
        return format_html('<a href="{}">{} / {}</a>', url, step.attempts, step.max_attempts)

    @admin.display(description="error")
    def error_short(self, step: Step) -> str:
        return (step.error[:120] + "…") if len(step.error) > 120 else step.error


@admin.register(Run)
class RunAdmin(EngineRowsAdmin):
    list_display = [
        "short_id",
        "template_display",
        "status_badge",
        "tenant_id",
        "correlation_id",
        "trigger_display",
        "created_display",
        "duration",
        "error_short",
    ]
    list_filter = ["status", TemplateKeyFilter, TenantFilter, TriggerFilter, ("created_at", admin.DateFieldListFilter)]
    search_fields = ["correlation_id"]  # see get_search_results: run id, correlation id, idempotency key
    search_help_text = "Run id, correlation id or idempotency key (exact)."
    ordering = ["-created_at"]
    actions = ["retry_runs", "cancel_runs", "rerun_runs", "trigger_runs"]
    inlines = [StepInline]
    readonly_fields = [
        "id",
        "template_link",
        "template_version",
        "status_badge",
        "tenant_id",
        "user_id",
        "correlation_id",
        "idempotency_key",
        "priority",
        "trigger_display",
        "rerun_of_link",
        "progress_display",
        "related_links",
        "created_at",
        "started_at",
        "finished_at",
        "deadline",
        "error",
        "inputs_display",
        "outputs_display",
        "metadata_display",
        "latest_traces",
    ]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "id",
                    ("template_link", "template_version"),
                    ("status_badge", "progress_display"),
                    "related_links",
                    "error",
                ]
            },
        ),
        (
            "Identity",
            {
                "fields": [
                    ("tenant_id", "user_id"),
                    ("correlation_id", "idempotency_key"),
                    ("priority", "trigger_display"),
                ]
            },
        ),
        ("Times", {"fields": [("created_at", "started_at", "finished_at", "deadline")]}),
        ("Data", {"fields": ["inputs_display", "outputs_display", "metadata_display", "rerun_of_link"]}),
        ("Latest traces", {"fields": ["latest_traces"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        queryset = super().get_queryset(request).defer("spec")
        match = getattr(request, "resolver_match", None)
        if match is not None and match.url_name == "runs_run_changelist":
            queryset = queryset.defer("spec", "inputs", "outputs", "metadata")  # the list shows none of them
        return queryset

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        """Exact, indexed lookups only: a UUID is a run id, anything else a correlation id or idempotency key."""
        term = search_term.strip()
        if not term:
            return queryset, False
        run_id = _uuid(term)
        if run_id is not None:
            return queryset.filter(pk=run_id), False
        return queryset.filter(correlation_id=term) | queryset.filter(idempotency_key=term), False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # runs start from a template's "Run now", the API or the CLI

    # columns ---------------------------------------------------------------------------------
    @admin.display(description="run", ordering="id")
    def short_id(self, run: Run) -> str:
        return str(run.pk)[:8]

    @admin.display(description="status", ordering="status")
    def status_badge(self, run: Run) -> str:
        return status_badge(run.status)

    @admin.display(description="duration")
    def duration(self, run: Run) -> str:
        if not run.started_at:
            return "-"
        end = run.finished_at or timezone.now()
        seconds = (end - run.started_at).total_seconds()
        return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"

    @admin.display(description="error")
    def error_short(self, run: Run) -> str:
        return (run.error[:80] + "…") if len(run.error) > 80 else run.error

    @admin.display(description="trigger", ordering="trigger")
    def trigger_display(self, run: Run) -> str:
        return trigger_label(run.trigger)

    @admin.display(description="template", ordering="template_key")
    def template_display(self, run: Run) -> str:
        return f"{run.template_key} v{run.template_version}" if run.template_version else run.template_key

    @admin.display(description="created", ordering="created_at")
    def created_display(self, run: Run) -> str:
        return compact_time(run.created_at)

    @admin.display(description="template")
    def template_link(self, run: Run) -> str:
        if run.template_id:
            url = reverse("admin:templates_app_workflowtemplate_change", args=[run.template_id])
            return format_html('<a href="{}">{}</a>', url, run.template_key)
        return run.template_key

    @admin.display(description="rerun of")
    def rerun_of_link(self, run: Run) -> str:
        if not run.rerun_of_id:
            return "-"
        return format_html(
            '<a href="{}">{}</a>', reverse("admin:runs_run_change", args=[run.rerun_of_id]), run.rerun_of_id
        )

    @admin.display(description="progress")
    def progress_display(self, run: Run) -> str:
        info = services.progress(run)
        counts = ", ".join(f"{n} {status}" for status, n in sorted(info["counts"].items()))
        return f"{info['percent']}% ({info['done']}/{info['total']} steps: {counts or 'none'})"

    @admin.display(description="details")
    def related_links(self, run: Run) -> str:
        links = [
            ("all steps", reverse("admin:runs_step_changelist") + f"?run={run.pk}"),
            ("attempts", reverse("admin:runs_attempt_changelist") + f"?run={run.pk}"),
            ("traces", reverse("admin:runs_trace_changelist") + f"?run={run.pk}"),
            ("API", reverse("api:run-detail", kwargs={"pk": run.pk})),
        ]
        return format_html_join(" · ", '<a href="{}">{}</a>', ((url, label) for label, url in links))

    @admin.display(description="inputs")
    def inputs_display(self, run: Run) -> str:
        return pretty_json(run.inputs)

    @admin.display(description="outputs")
    def outputs_display(self, run: Run) -> str:
        return pretty_json(run.outputs)

    @admin.display(description="metadata")
    def metadata_display(self, run: Run) -> str:
        return pretty_json(run.metadata)

    @admin.display(description="latest traces")
    def latest_traces(self, run: Run) -> str:
        rows = services.latest_traces(run, limit=20)
        if not rows:
            return "-"
        return format_html(
            "<table><tr><th>time</th><th>kind</th><th>step</th><th>message</th></tr>{}</table>",
            format_html_join(
                "",
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                ((t.created_at.strftime("%H:%M:%S.%f")[:-3], t.kind, t.step_code or "", t.message[:300]) for t in rows),
            ),
        )

    # actions ---------------------------------------------------------------------------------
    def _each(self, request: HttpRequest, queryset: QuerySet, verb: str, func) -> None:
        done, refused = 0, []
        for run in self.writable_only(request, queryset).defer("inputs", "outputs", "metadata")[:500]:
            try:
                func(run)
                done += 1
            except services.ServiceError as exc:
                refused.append(f"{str(run.pk)[:8]}: {exc}")
        if done:
            self.message_user(request, f"{verb} {done} run(s).", messages.SUCCESS)
        for line in refused[:20]:
            self.message_user(request, line, messages.WARNING)

    @admin.action(description="Retry failed steps of the selected runs", permissions=["change"])
    def retry_runs(self, request: HttpRequest, queryset: QuerySet) -> None:
        user = request.user.get_username()
        self._each(request, queryset, "Retried", lambda run: services.retry(run, reason=f"retried by {user}"))

    @admin.action(description="Cancel the selected runs", permissions=["change"])
    def cancel_runs(self, request: HttpRequest, queryset: QuerySet) -> None:
        user = request.user.get_username()
        self._each(request, queryset, "Cancelled", lambda run: services.cancel(run, reason=f"cancelled by {user}"))

    @admin.action(description="Rerun the selected runs from scratch", permissions=["change"])
    def rerun_runs(self, request: HttpRequest, queryset: QuerySet) -> None:
        user = request.user.get_username()
        self._each(request, queryset, "Started a rerun of", lambda run: services.rerun(run, user_id=user))

    @admin.action(description="Trigger a new run of the latest template version, same inputs", permissions=["change"])
    def trigger_runs(self, request: HttpRequest, queryset: QuerySet) -> None:
        user = request.user.get_username()
        self._each(request, queryset, "Triggered a new run like", lambda run: services.trigger_again(run, user_id=user))

    # one-run buttons on the change page ---------------------------------------------------------
    def get_urls(self):
        urls = [
            path(
                "<uuid:object_id>/operate/<str:verb>/",
                self.admin_site.admin_view(require_POST(self.operate_view)),
                name="runs_run_operate",
            ),
            path("<uuid:object_id>/live/", self.admin_site.admin_view(self.live_view), name="runs_run_live"),
        ]
        return urls + super().get_urls()

    def live_view(self, request: HttpRequest, object_id: uuid.UUID) -> JsonResponse:
        """GET: the run's step states and attempts as JSON, polled by the run page while the run is
        active (``runs.admin_graph.live_payload``). Another tenant's run is a 404."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        run = get_object_or_404(self.get_queryset(request), pk=object_id)
        response = JsonResponse(admin_graph.live_payload(run))
        response["Cache-Control"] = "no-store"
        return response

    def operate_view(self, request: HttpRequest, object_id: uuid.UUID, verb: str) -> HttpResponseRedirect:
        """POST target of the Retry / Cancel / Rerun buttons of a run's page."""
        run = get_object_or_404(self.get_queryset(request), pk=object_id)
        if not self.may_write(request, run):  # the role first: a viewer gets a message, not a 403 page
            self.message_user(request, read_only_message(request, [run.tenant_id]), messages.ERROR)
            return HttpResponseRedirect(reverse("admin:runs_run_change", args=[run.pk]))
        if not self.has_change_permission(request):
            raise PermissionDenied
        user = request.user.get_username()
        target = run.pk
        try:
            if verb == "retry":
                result = services.retry(run, reason=f"retried by {user}")
                self.message_user(request, f"Retrying: {', '.join(result.steps)}.", messages.SUCCESS)
            elif verb == "cancel":
                services.cancel(run, reason=f"cancelled by {user}")
                self.message_user(request, "Run cancelled.", messages.SUCCESS)
            elif verb == "rerun":
                target = services.rerun(run, user_id=user).pk
                self.message_user(request, "Started a new run from scratch.", messages.SUCCESS)
            elif verb == "trigger":
                target = services.trigger_again(run, user_id=user).pk
                self.message_user(request, "Triggered a new run of the latest template version.", messages.SUCCESS)
            else:
                raise PermissionDenied
        except services.ServiceError as exc:
            self.message_user(request, str(exc), messages.WARNING)
        return HttpResponseRedirect(reverse("admin:runs_run_change", args=[target]))

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context=None):
        run = self.get_object(request, object_id)
        writable = run is not None and self.has_change_permission(request) and self.may_write(request, run)
        extra_context = {
            **(extra_context or {}),
            "operate_verbs": ["retry", "cancel", "rerun", "trigger"] if writable else [],
            "read_only_role": None if writable or run is None else tenancy.role_in(request.user, run.tenant_id),
        }
        if run is not None:
            live = admin_graph.live_payload(run)
            extra_context |= {
                "graph": admin_graph.graph(run, live),
                "live": live,
                "status_colors": STATUS_COLORS,
                "outcome_colors": OUTCOME_COLORS,
                "poll_ms": LIVE_POLL_MS,
            }
        return super().change_view(request, object_id, form_url, extra_context)


# --- steps: the dead-letter queue -----------------------------------------------------------------


class AttemptInline(admin.TabularInline):
    model = Attempt
    fk_name = "step"
    extra = 0
    can_delete = False
    fields = ["number", "outcome", "worker", "started_at", "duration_ms", "http_status", "error"]
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Step)
class StepAdmin(EngineRowsAdmin):
    tenant_field = "run__tenant_id"
    list_display = [
        "step_id",
        "run_link",
        "type",
        "status_badge",
        "attempts_display",
        "worker",
        "finished_display",
        "error_short",
    ]
    list_filter = ["status", StepTypeFilter, RunTenantFilter]
    search_fields = ["step_id"]
    search_help_text = "Run id (shows its steps) or step id (exact)."
    ordering = ["-id"]
    raw_id_fields = ["run", "parent"]
    actions = ["requeue_dead"]
    inlines = [AttemptInline]
    readonly_fields = [
        "run_link",
        "step_id",
        "parent",
        "map_index",
        "type",
        "status_badge",
        "attempts_display",
        "next_attempt_at",
        "lease_expires_at",
        "worker",
        "queued_at",
        "started_at",
        "finished_at",
        "error",
        "depends_on",
        "dependents",
        "pending_deps",
        "pending_children",
        "traces_link",
        "input_display",
        "output_display",
        "step_traces",
        "item_display",
        "spec_display",
    ]
    fieldsets = [
        (None, {"fields": ["run_link", "step_id", ("type", "status_badge", "attempts_display"), "error"]}),
        ("Input and output", {"fields": ["input_display", "output_display", "item_display"]}),
        ("Latest traces", {"fields": ["step_traces", "traces_link"]}),
        (
            "Scheduling",
            {
                "classes": ["collapse"],
                "fields": [
                    ("parent", "map_index"),
                    ("depends_on", "dependents"),
                    ("pending_deps", "pending_children"),
                    ("queued_at", "started_at", "finished_at"),
                    ("next_attempt_at", "lease_expires_at"),
                    "worker",
                ],
            },
        ),
        ("Spec", {"classes": ["collapse"], "fields": ["spec_display"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).defer("spec", "input", "output", "item", "dependents")

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        run_id = _uuid(term)
        if run_id is not None:
            return queryset.filter(run_id=run_id), False
        return queryset.filter(step_id=term), False

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        return lookup in ("run", "parent") or super().lookup_allowed(lookup, value, request)

    @admin.display(description="run")
    def run_link(self, step: Step) -> str:
        return format_html(
            '<a href="{}">{}</a>', reverse("admin:runs_run_change", args=[step.run_id]), str(step.run_id)[:8]
        )

    @admin.display(description="status", ordering="status")
    def status_badge(self, step: Step) -> str:
        return status_badge(step.status)

    @admin.display(description="attempts")
    def attempts_display(self, step: Step) -> str:
        return f"{step.attempts} / {step.max_attempts}"

    @admin.display(description="finished", ordering="finished_at")
    def finished_display(self, step: Step) -> str:
        return compact_time(step.finished_at)

    @admin.display(description="error")
    def error_short(self, step: Step) -> str:
        return short_text(step.error)

    @admin.display(description="traces")
    def traces_link(self, step: Step) -> str:
        url = reverse("admin:runs_trace_changelist") + f"?step_row={step.pk}"
        return format_html('<a href="{}">traces of this step</a>', url)

    @admin.display(description="input")
    def input_display(self, step: Step) -> str:
        return pretty_json(step.input)

    @admin.display(description="output")
    def output_display(self, step: Step) -> str:
        return pretty_json(step.output)

    @admin.display(description="item")
    def item_display(self, step: Step) -> str:
        return pretty_json(step.item)

    @admin.display(description="spec")
    def spec_display(self, step: Step) -> str:
        return pretty_json(step.spec)

    @admin.display(description="latest traces")
    def step_traces(self, step: Step) -> str:
        rows = list(step.traces.order_by("-id")[:30])  # the FK's index
        if not rows:
            return "-"
        return format_html(
            '<table id="step-traces"><tr><th>time</th><th>attempt</th><th>kind</th><th>message</th></tr>{}</table>',
            format_html_join(
                "",
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                ((t.created_at.strftime("%H:%M:%S.%f")[:-3], t.attempt or "", t.kind, t.message[:300]) for t in rows),
            ),
        )

    # the step page: "rerun this step with edited input" -------------------------------------------
    def get_urls(self):
        urls = [
            path(
                "<int:object_id>/rerun/",
                self.admin_site.admin_view(require_POST(self.rerun_view)),
                name="runs_step_rerun",
            )
        ]
        return urls + super().get_urls()

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context=None):
        from .admin_views import step_input_for_editing

        step = self.get_object(request, object_id)
        extra_context = dict(extra_context or {})
        if step is not None:
            writable = self.has_change_permission(request) and self.may_write(request, step)
            extra_context["rerun_form"] = {
                "allowed": writable,
                "role": None if writable else tenancy.role_in(request.user, step.run.tenant_id),
                "text": json.dumps(step_input_for_editing(step), indent=2, sort_keys=True, default=str),
                "retryable": step.status in services.RETRYABLE,
            }
        return super().change_view(request, object_id, form_url, extra_context)

    def rerun_view(self, request: HttpRequest, object_id: int) -> HttpResponseRedirect:
        """POST target of the step page's "Rerun with edited input" form (``input``: JSON object)."""
        from .admin_views import parse_edited_input, rerun_step_with_input

        step = get_object_or_404(self.get_queryset(request).select_related("run"), pk=object_id)
        back = HttpResponseRedirect(reverse("admin:runs_step_change", args=[step.pk]))
        if not self.may_write(request, step):  # the role first: a viewer gets a message, not a 403 page
            self.message_user(request, read_only_message(request, [step.run.tenant_id]), messages.ERROR)
            return back
        if not self.has_change_permission(request):
            raise PermissionDenied
        try:
            edited = parse_edited_input(step, request.POST.get("input", ""))
            run, message = rerun_step_with_input(step, edited, user=request.user.get_username())
        except services.ServiceError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return back
        self.message_user(request, message, messages.SUCCESS)
        return HttpResponseRedirect(reverse("admin:runs_run_change", args=[run.pk]))

    @admin.action(description="Requeue the selected dead steps (and what depends on them)", permissions=["change"])
    def requeue_dead(self, request: HttpRequest, queryset: QuerySet) -> None:
        pks = list(
            self.writable_only(request, queryset).filter(status=StepStatus.DEAD).values_list("pk", flat=True)[:1000]
        )
        count = services.requeue_dead(pks)
        if count:
            self.message_user(request, f"Requeued {count} dead step(s).", messages.SUCCESS)
        else:
            self.message_user(request, "No dead step among the selection.", messages.WARNING)


@admin.register(Attempt)
class AttemptAdmin(EngineRowsAdmin):
    tenant_field = "run__tenant_id"
    list_display = [
        "id",
        "step_link",
        "run_link",
        "number",
        "outcome",
        "http_status",
        "duration_ms",
        "started_display",
        "error_short",
    ]
    list_filter = ["outcome", RunTenantFilter]
    search_fields = ["task_id"]
    search_help_text = "Run id, or Celery task id (exact)."
    ordering = ["-id"]
    raw_id_fields = ["step", "run"]
    readonly_fields = [
        "step_link",
        "run_link",
        "number",
        "outcome",
        "worker",
        "task_id",
        "started_at",
        "finished_at",
        "duration_ms",
        "http_status",
        "error",
    ]
    fields = readonly_fields

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        run_id = _uuid(term)
        if run_id is not None:
            return queryset.filter(run_id=run_id) | queryset.filter(task_id=term), False
        return queryset.filter(task_id=term), False

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        return lookup in ("run", "step") or super().lookup_allowed(lookup, value, request)

    @admin.display(description="step")
    def step_link(self, attempt: Attempt) -> str:
        return format_html(
            '<a href="{}">step #{}</a>', reverse("admin:runs_step_change", args=[attempt.step_id]), attempt.step_id
        )

    @admin.display(description="started", ordering="started_at")
    def started_display(self, attempt: Attempt) -> str:
        return compact_time(attempt.started_at)

    @admin.display(description="error")
    def error_short(self, attempt: Attempt) -> str:
        return short_text(attempt.error)

    @admin.display(description="run")
    def run_link(self, attempt: Attempt) -> str:
        return format_html(
            '<a href="{}">{}</a>', reverse("admin:runs_run_change", args=[attempt.run_id]), str(attempt.run_id)[:8]
        )


@admin.register(Trace)
class TraceAdmin(EngineRowsAdmin):
    tenant_field = "run__tenant_id"
    list_display = ["id", "created_at", "run_link", "step_code", "attempt", "kind", "message_short"]
    list_select_related = ["step_row"]
    list_filter = ["kind", RunTenantFilter]
    search_fields = ["message"]
    search_help_text = "Run id (exact)."
    ordering = ["-id"]
    raw_id_fields = ["run", "step_row"]
    readonly_fields = ["run_link", "step_row", "attempt", "kind", "message", "data_display", "created_at"]
    fields = readonly_fields

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        run_id = _uuid(search_term)
        if run_id is not None:
            return queryset.filter(run_id=run_id), False
        return (queryset.none() if search_term.strip() else queryset), False

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        return lookup in ("run", "step_row") or super().lookup_allowed(lookup, value, request)

    @admin.display(description="step")
    def step_code(self, trace: Trace) -> str:
        return trace.step_row.step_id if trace.step_row_id else "-"

    @admin.display(description="run")
    def run_link(self, trace: Trace) -> str:
        return format_html(
            '<a href="{}">{}</a>', reverse("admin:runs_run_change", args=[trace.run_id]), str(trace.run_id)[:8]
        )

    @admin.display(description="message")
    def message_short(self, trace: Trace) -> str:
        return (trace.message[:160] + "…") if len(trace.message) > 160 else trace.message

    @admin.display(description="data")
    def data_display(self, trace: Trace) -> str:
        return pretty_json(trace.data)


# --- tenants --------------------------------------------------------------------------------------


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 1
    raw_id_fields = ["user"]
    fields = ["user", "role", "is_default"]


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "is_active", "created_at"]
    search_fields = ["slug", "name"]
    inlines = [MembershipInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return tenancy.scope_for_user(super().get_queryset(request), request.user, "slug")


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "tenant", "role", "is_default", "created_at"]
    list_filter = ["role"]
    list_select_related = ["user", "tenant"]
    raw_id_fields = ["user", "tenant"]
    search_fields = ["user__username", "tenant__slug"]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return tenancy.scope_for_user(super().get_queryset(request), request.user, "tenant__slug")
