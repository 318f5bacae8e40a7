"""Admin of schedules (validated and synced to beat through ``scheduler.services``) and events."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from runs import tenancy
from runs.admin import TenantFilter, TenantScopedAdmin, pretty_json
from runs.services import ServiceError

from . import services
from .models import IntentEvent, Schedule, ScheduleSource

#: Fields a template schedule takes from its template's trigger (edit the template instead).
TEMPLATE_MANAGED = ("name", "template_key", "cron", "interval", "timezone", "variables", "source")


class ScheduleForm(forms.ModelForm):
    """Runs ``services.validate_schedule`` on the edited instance: one-line errors on the form."""

    class Meta:
        model = Schedule
        fields = [
            "tenant_id",
            "name",
            "template_key",
            "cron",
            "interval",
            "timezone",
            "variables",
            "priority",
            "user_id",
            "enabled",
            "description",
        ]

    def _post_clean(self) -> None:
        super()._post_clean()
        if self.errors:
            return
        try:
            services.validate_schedule(self.instance)
        except services.ScheduleError as exc:
            self.add_error(None, str(exc))


@admin.register(Schedule)
class ScheduleAdmin(TenantScopedAdmin):
    form = ScheduleForm
    list_display = ["name", "tenant_id", "template_key", "when", "enabled", "source", "last_tick", "last_run_link"]
    list_filter = [TenantFilter, "enabled", "source"]
    search_fields = ["name", "template_key"]
    readonly_fields = ["source", "last_tick", "last_run_link", "last_error", "periodic_task", "created_at"]
    actions = ["enable", "disable", "run_now"]

    def get_readonly_fields(self, request: HttpRequest, obj: Schedule | None = None) -> list[str]:
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None and obj.source == ScheduleSource.TEMPLATE:
            fields += [f for f in TEMPLATE_MANAGED if f not in fields]
        return fields

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        form = super().get_form(request, obj, change=change, **kwargs)
        slugs = tenancy.writable_tenant_slugs(request.user)  # owners and members, as in the API

        class ScopedForm(form):
            def clean_tenant_id(self) -> str:
                slug = self.cleaned_data["tenant_id"]
                if slugs is not None and slug not in slugs:
                    raise forms.ValidationError("Not a tenant where you are owner or member.")
                return slug

        return ScopedForm

    def save_model(self, request: HttpRequest, obj: Schedule, form: Any, change: bool) -> None:
        services.save_schedule(obj)

    def delete_model(self, request: HttpRequest, obj: Schedule) -> None:
        services.delete_schedule(obj)

    @admin.display(description="last run")
    def last_run_link(self, schedule: Schedule) -> str:
        if not schedule.last_run_id:
            return "-"
        url = reverse("admin:runs_run_change", args=[schedule.last_run_id])
        return format_html('<a href="{}">{}</a>', url, schedule.last_run_id)

    @admin.action(description="Enable the selected schedules", permissions=["change"])
    def enable(self, request: HttpRequest, queryset: QuerySet) -> None:
        queryset = self.writable_only(request, queryset)
        enabled = 0
        for schedule in queryset:
            try:
                services.set_enabled(schedule, True)
            except services.ScheduleError as exc:
                self.message_user(request, f"{schedule.name}: {exc}", messages.ERROR)
            else:
                enabled += 1
        self.message_user(request, f"{enabled} schedule(s) enabled", messages.SUCCESS)

    @admin.action(description="Disable the selected schedules", permissions=["change"])
    def disable(self, request: HttpRequest, queryset: QuerySet) -> None:
        queryset = self.writable_only(request, queryset)
        for schedule in queryset:
            services.set_enabled(schedule, False)
        self.message_user(request, f"{queryset.count()} schedule(s) disabled", messages.SUCCESS)

    @admin.action(description="Run the selected schedules now (outside their ticks)", permissions=["change"])
    def run_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        queryset = self.writable_only(request, queryset)
        for schedule in queryset:
            try:
                run = services.run_schedule_now(schedule)
            except ServiceError as exc:
                self.message_user(request, f"{schedule.name}: {exc}", messages.ERROR)
            else:
                self.message_user(request, f"{schedule.name}: run {run.pk} started", messages.SUCCESS)


@admin.register(IntentEvent)
class IntentEventAdmin(TenantScopedAdmin):
    list_display = ["event_id", "type", "tenant_id", "user_id", "intent_id", "created_at"]
    list_filter = [TenantFilter]
    search_fields = ["=event_id", "=intent_id", "=type"]
    fields = ["tenant_id", "event_id", "type", "user_id", "intent_id", "payload_display", "runs_display", "errors"]
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # events come in through the API and dispatch_event

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return obj is None and super().has_change_permission(request)

    @admin.display(description="payload")
    def payload_display(self, event: IntentEvent) -> str:
        return pretty_json(event.payload)

    @admin.display(description="runs started")
    def runs_display(self, event: IntentEvent) -> str:
        rows = event.runs.only("id", "template_key", "status").order_by("created_at")
        if not rows:
            return "-"
        return format_html_join(
            ", ",
            '<a href="{}">{} ({})</a>',
            ((reverse("admin:runs_run_change", args=[r.pk]), r.template_key, r.status) for r in rows),
        )
