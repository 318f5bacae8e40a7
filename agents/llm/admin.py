"""Admin of the LLM router: tenant providers, token budgets, circuit breakers.

Registered from ``agents/admin.py``. Providers and budgets are tenant rows (staff see their tenants
only); circuit breakers are shared state: superusers only, with an action to close them.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from runs import tenancy
from runs.admin import TenantFilter, TenantScopedAdmin

from ..models import Credential, LLMCircuit, LLMProvider, TokenBudget
from . import breaker, budgets


def _tenant_form(form: type[forms.ModelForm], request: HttpRequest) -> type[forms.ModelForm]:
    """``form`` refusing a tenant that is not one of the user's."""
    slugs = tenancy.tenant_slugs(request.user)

    class ScopedForm(form):  # type: ignore[misc, valid-type]
        def clean_tenant_id(self) -> str:
            slug = self.cleaned_data["tenant_id"]
            if slugs is not None and slug not in slugs:
                raise forms.ValidationError("Not one of your tenants.")
            return slug

    return ScopedForm


class LLMProviderForm(forms.ModelForm):
    base_url = forms.URLField(
        max_length=500, assume_scheme="https", help_text="The API root, e.g. https://api.openai.com/v1."
    )

    class Meta:
        model = LLMProvider
        fields = [
            "tenant_id",
            "name",
            "base_url",
            "model",
            "credential_alias",
            "kind",
            "priority",
            "tags",
            "enabled",
            "description",
        ]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        tags = data.get("tags")
        if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags)):
            self.add_error("tags", 'A JSON list of tags, e.g. ["planning"].')
        alias, tenant = data.get("credential_alias"), data.get("tenant_id")
        if alias and tenant and not Credential.objects.filter(tenant_id=tenant, alias=alias).exists():
            self.add_error("credential_alias", f"No credential {alias!r} in tenant {tenant!r}.")
        return data


@admin.register(LLMProvider)
class LLMProviderAdmin(TenantScopedAdmin):
    form = LLMProviderForm
    list_display = ["name", "tenant_id", "model", "base_url", "kind", "priority", "tags", "enabled", "circuit"]
    list_filter = [TenantFilter, "kind", "enabled"]
    search_fields = ["name", "model", "base_url"]
    readonly_fields = ["circuit", "created_at", "updated_at"]
    actions = ["enable", "disable", "close_circuit"]

    @admin.display(description="circuit")
    def circuit(self, row: LLMProvider) -> str:
        if row.pk is None:
            return "-"
        key = f"tenant:{row.tenant_id}:{row.name}"
        seconds = breaker.blocked_for(key)
        return f"open for {seconds:.0f} s" if seconds else "closed"

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        return _tenant_form(super().get_form(request, obj, change=change, **kwargs), request)

    @admin.action(description="Enable the selected providers")
    def enable(self, request: HttpRequest, queryset: QuerySet) -> None:
        self.message_user(request, f"{queryset.update(enabled=True)} provider(s) enabled", messages.SUCCESS)

    @admin.action(description="Disable the selected providers")
    def disable(self, request: HttpRequest, queryset: QuerySet) -> None:
        self.message_user(request, f"{queryset.update(enabled=False)} provider(s) disabled", messages.SUCCESS)

    @admin.action(description="Close the circuit breaker of the selected providers")
    def close_circuit(self, request: HttpRequest, queryset: QuerySet) -> None:
        for row in queryset:
            breaker.reset(f"tenant:{row.tenant_id}:{row.name}")
        self.message_user(request, f"{queryset.count()} circuit(s) closed", messages.SUCCESS)


class TokenBudgetForm(forms.ModelForm):
    class Meta:
        model = TokenBudget
        fields = ["tenant_id", "period", "limit", "policy", "description"]


@admin.register(TokenBudget)
class TokenBudgetAdmin(TenantScopedAdmin):
    form = TokenBudgetForm
    list_display = ["tenant_id", "period", "limit", "used", "reserved", "remaining", "policy", "resets_at"]
    list_filter = [TenantFilter, "period", "policy"]
    readonly_fields = ["used", "reserved", "window_start", "resets_at", "created_at", "updated_at"]
    actions = ["reset_used"]

    @admin.display(description="remaining")
    def remaining(self, row: TokenBudget) -> int:
        return max(0, row.limit - row.used - row.reserved)

    @admin.display(description="window resets at")
    def resets_at(self, row: TokenBudget) -> Any:
        return budgets.window(row.period)[1] if row.period else "-"

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        return _tenant_form(super().get_form(request, obj, change=change, **kwargs), request)

    @admin.action(description="Forget the tokens used in the current window")
    def reset_used(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = queryset.update(used=0, window_start=timezone.now())
        self.message_user(request, f"{count} budget(s) reset", messages.SUCCESS)


@admin.register(LLMCircuit)
class LLMCircuitAdmin(admin.ModelAdmin):
    """Breaker rows are shared by every tenant's workers: superusers only, changed by actions."""

    list_display = ["key", "failures", "open_until", "last_error", "updated_at"]
    search_fields = ["key"]
    readonly_fields = ["key", "failures", "open_until", "last_error", "updated_at"]
    actions = ["close"]

    def has_module_permission(self, request: HttpRequest) -> bool:
        return request.user.is_active and request.user.is_superuser

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_active and request.user.is_superuser

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_active and request.user.is_superuser

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_active and request.user.is_superuser

    @admin.action(description="Close the selected circuits (forget their failures)")
    def close(self, request: HttpRequest, queryset: QuerySet) -> None:
        for key in queryset.values_list("key", flat=True):
            breaker.reset(key)
        self.message_user(request, f"{queryset.count()} circuit(s) closed", messages.SUCCESS)
