"""Admin of credentials (secrets write-only, masked), rate limits and concurrency limits.

Staff who are not superusers see the credentials of their tenants only (``runs.tenancy``).
Numbers edited here win over a workflow's declaration (``managed_by = admin``).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from runs import tenancy
from runs.admin import TenantFilter, TenantScopedAdmin
from runs.engine.gate.ratelimit import current_tokens

from . import credentials
from .models import (
    ConcurrencyLimit,
    ConcurrencySlot,
    Credential,
    CredentialKind,
    ManagedBy,
    QueuedRun,
    RateLimit,
    SlotWaiter,
)

#: What the admin shows instead of a secret.
MASK = "••••••••"


class CredentialForm(forms.ModelForm):
    """The secret is write-only: never rendered back; empty on change keeps the current one."""

    secret = forms.CharField(
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        required=False,
        strip=False,
        help_text="Write-only. Leave empty to keep the current secret.",
    )

    class Meta:
        model = Credential
        fields = ["tenant_id", "alias", "kind", "username", "name", "location", "allowed_hosts", "description"]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if not self.instance.pk and not data.get("secret"):
            self.add_error("secret", "A new credential needs its secret.")
        if data.get("kind") == CredentialKind.HEADER and not data.get("name"):
            self.add_error("name", "A header credential needs the header's name.")
        if data.get("kind") == CredentialKind.BASIC and not data.get("username"):
            self.add_error("username", "A basic credential needs the user name.")
        if data.get("secret"):
            try:
                credentials.configured_keys()
            except credentials.CredentialError as exc:  # a deployment without keys stores nothing
                self.add_error("secret", str(exc))
        hosts = data.get("allowed_hosts")
        if hosts is not None and (not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts)):
            self.add_error("allowed_hosts", 'A JSON list of host names, e.g. ["api.example.com", "*.example.org"].')
        return data

    def save(self, commit: bool = True) -> Credential:
        credential = super().save(commit=False)
        if self.cleaned_data.get("secret"):
            credential.set_secret(self.cleaned_data["secret"])
        if commit:
            credential.save()
        return credential


@admin.register(Credential)
class CredentialAdmin(TenantScopedAdmin):
    form = CredentialForm
    list_display = ["alias", "tenant_id", "kind", "secret_display", "hosts_display", "updated_at"]
    list_filter = [TenantFilter, "kind"]
    search_fields = ["alias"]
    readonly_fields = ["secret_display", "created_at", "updated_at"]
    fieldsets = [
        (None, {"fields": [("tenant_id", "alias"), "kind", "secret", "secret_display"]}),
        ("How it is sent", {"fields": ["username", ("name", "location"), "allowed_hosts"]}),
        (None, {"fields": ["description", ("created_at", "updated_at")]}),
    ]

    @admin.display(description="secret")
    def secret_display(self, credential: Credential) -> str:
        return MASK if credential.secret_encrypted else "-"

    @admin.display(description="allowed hosts")
    def hosts_display(self, credential: Credential) -> str:
        return ", ".join(credential.allowed_hosts or []) or "any"

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        form = super().get_form(request, obj, change=change, **kwargs)
        slugs = tenancy.writable_tenant_slugs(request.user)  # owners and members, as in the API

        class ScopedForm(form):  # staff may only put credentials in tenants where they write
            def clean_tenant_id(self) -> str:
                slug = self.cleaned_data["tenant_id"]
                if slugs is not None and slug not in slugs:
                    raise forms.ValidationError("Not a tenant where you are owner or member.")
                return slug

        return ScopedForm


class SuperuserOnlyAdmin(admin.ModelAdmin):
    """Rows shared by every tenant (limit keys): superusers only."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return request.user.is_active and request.user.is_superuser

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_active and request.user.is_superuser

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_active and request.user.is_superuser

    def has_add_permission(self, request: HttpRequest) -> bool:
        return request.user.is_active and request.user.is_superuser

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_active and request.user.is_superuser


@admin.register(RateLimit)
class RateLimitAdmin(SuperuserOnlyAdmin):
    list_display = ["key", "capacity", "refill_rate", "tokens_now", "managed_by", "updated_at"]
    list_filter = ["managed_by"]
    search_fields = ["key"]
    fields = ["key", "capacity", "refill_rate", "description", "managed_by", "tokens_now", "last_refill"]
    readonly_fields = ["managed_by", "tokens_now", "last_refill"]
    actions = ["refill"]

    @admin.display(description="tokens now")
    def tokens_now(self, bucket: RateLimit) -> str:
        if bucket.pk is None:
            return "-"
        return f"{current_tokens(bucket):.2f}"

    def save_model(self, request: HttpRequest, obj: RateLimit, form: Any, change: bool) -> None:
        now = timezone.now()
        if change:
            current = RateLimit.objects.get(pk=obj.pk)
            obj.tokens = min(float(obj.capacity), current_tokens(current, now))
        else:
            obj.tokens = float(obj.capacity)
        obj.last_refill = now
        obj.managed_by = ManagedBy.ADMIN  # the operator's numbers win from now on
        super().save_model(request, obj, form, change)

    @admin.action(description="Refill the selected buckets to capacity")
    def refill(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = 0
        for bucket in queryset:
            RateLimit.objects.filter(pk=bucket.pk).update(tokens=float(bucket.capacity), last_refill=timezone.now())
            count += 1
        self.message_user(request, f"{count} bucket(s) refilled", messages.SUCCESS)


@admin.register(ConcurrencyLimit)
class ConcurrencyLimitAdmin(SuperuserOnlyAdmin):
    list_display = ["key", "limit", "in_use", "waiting", "managed_by", "updated_at"]
    list_filter = ["managed_by"]
    search_fields = ["key"]
    fields = ["key", "limit", "description", "managed_by"]
    readonly_fields = ["managed_by"]

    @admin.display(description="held now")
    def in_use(self, row: ConcurrencyLimit) -> int:
        return ConcurrencySlot.objects.filter(key=row.key, expires_at__gt=timezone.now()).count()

    @admin.display(description="steps waiting")
    def waiting(self, row: ConcurrencyLimit) -> int:
        return SlotWaiter.objects.filter(key=row.key).count()

    def save_model(self, request: HttpRequest, obj: ConcurrencyLimit, form: Any, change: bool) -> None:
        obj.managed_by = ManagedBy.ADMIN
        super().save_model(request, obj, form, change)
        from runs import engine

        woken = engine.limit_changed(obj.key)
        if woken:
            self.message_user(request, f"{woken} waiting step(s) woken", messages.INFO)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Live flow-control state: shown for operators, changed only by the engine."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ConcurrencySlot)
class ConcurrencySlotAdmin(ReadOnlyAdmin, SuperuserOnlyAdmin):
    list_display = ["key", "step_link", "acquired_at", "expires_at"]
    search_fields = ["key"]
    raw_id_fields = ["step"]

    @admin.display(description="step")
    def step_link(self, slot: ConcurrencySlot) -> str:
        return format_html('<a href="{}">{}</a>', reverse("admin:runs_step_change", args=[slot.step_id]), slot.step_id)


@admin.register(QueuedRun)
class QueuedRunAdmin(ReadOnlyAdmin):
    list_display = ["run_link", "tenant_id", "template_key", "priority", "reason", "created_at"]
    list_filter = [TenantFilter]
    search_fields = ["template_key"]
    raw_id_fields = ["run"]
    actions = ["admit"]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return tenancy.scope_for_user(super().get_queryset(request), request.user)

    @admin.display(description="run")
    def run_link(self, queued: QueuedRun) -> str:
        return format_html('<a href="{}">{}</a>', reverse("admin:runs_run_change", args=[queued.run_id]), queued.run_id)

    def has_admit_permission(self, request: HttpRequest) -> bool:
        """Admitting starts runs: owners and members of some tenant (the API's rule), superusers."""
        return tenancy.writable_tenant_slugs(request.user) != set()

    @admin.action(description="Admit the selected runs that fit their limits now", permissions=["admit"])
    def admit(self, request: HttpRequest, queryset: QuerySet) -> None:
        slugs = tenancy.writable_tenant_slugs(request.user)
        if slugs is not None:
            queryset = queryset.filter(tenant_id__in=sorted(slugs))
        tenants = sorted(set(queryset.values_list("tenant_id", flat=True)))
        from runs import engine

        started = sum(engine.admit_waiting_runs(tenant) for tenant in tenants)
        self.message_user(request, f"{started} run(s) started", messages.SUCCESS)


# The LLM router's rows (issue 8): providers, token budgets, circuit breakers.
from .llm import admin as _llm_admin  # noqa: E402,F401 - registers its ModelAdmins
