"""REST endpoints of the LLM router: ``/api/v1/llm-providers`` and ``/api/v1/token-budgets``.

Included by ``agents/api.py``. Tenancy, authentication and errors are the API's (``runs.api``): a
request acts in its tenant; another tenant's row is a 404; writes need the member or owner role.
A provider's key is never sent or shown: ``credential_alias`` names a credential of the tenant
(``/api/v1/credentials``). A budget's ``used``, ``reserved`` and ``window_start`` are read-only.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import extend_schema, extend_schema_field, extend_schema_view
from rest_framework import serializers, viewsets
from rest_framework.permissions import IsAuthenticated
from rest_framework.routers import SimpleRouter

from runs.api.fields import StrictStringsMixin
from runs.api.parsers import StrictJSONParser
from runs.api.permissions import TENANT_PARAMETER, TenantScopedMixin, TenantWritePermission

from ..models import Credential, LLMProvider, TokenBudget
from . import breaker, budgets

#: Tags a provider may carry at most, and their length.
MAX_TAGS = 20
MAX_TAG_CHARS = 50
#: Largest token budget a tenant may set (per period).
MAX_BUDGET_TOKENS = 10**12


def _save(serializer: serializers.ModelSerializer, row: Any, data: dict[str, Any]) -> Any:
    for name, value in data.items():
        setattr(row, name, value)
    try:
        row.full_clean()  # a duplicate name/period in the tenant is a 400, not a 500
    except DjangoValidationError as exc:
        raise serializers.ValidationError(exc.message_dict) from None
    row.save()
    return row


class LLMProviderSerializer(StrictStringsMixin, serializers.ModelSerializer):
    circuit = serializers.SerializerMethodField(help_text="closed, or open for N s (skipped by every worker).")

    class Meta:
        model = LLMProvider
        fields = [
            "id",
            "name",
            "base_url",
            "model",
            "credential_alias",
            "kind",
            "priority",
            "tags",
            "enabled",
            "description",
            "circuit",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "circuit", "created_at", "updated_at"]
        extra_kwargs = {"priority": {"max_value": 1000}}

    @extend_schema_field(serializers.CharField())
    def get_circuit(self, row: LLMProvider) -> str:
        seconds = breaker.blocked_for(f"tenant:{row.tenant_id}:{row.name}")
        return f"open for {seconds:.0f} s" if seconds else "closed"

    def validate_base_url(self, value: str) -> str:
        if urlsplit(value).scheme not in ("http", "https"):
            raise serializers.ValidationError("an http:// or https:// URL (the API root, e.g. https://host/v1)")
        return value.strip()

    def validate_tags(self, value: Any) -> list[str]:
        if not isinstance(value, list) or len(value) > MAX_TAGS:
            raise serializers.ValidationError(f'a list of at most {MAX_TAGS} tags, e.g. ["planning"]')
        if not all(isinstance(t, str) and 0 < len(t.strip()) <= MAX_TAG_CHARS for t in value):
            raise serializers.ValidationError(f"each tag a non-empty string of at most {MAX_TAG_CHARS} characters")
        return [t.strip() for t in value]

    def validate_credential_alias(self, value: str) -> str:
        if value and not Credential.objects.filter(tenant_id=self.context["tenant"], alias=value).exists():
            raise serializers.ValidationError(f"no credential {value!r} in this tenant (create it under /credentials)")
        return value

    def create(self, validated_data: dict[str, Any]) -> LLMProvider:
        return _save(self, LLMProvider(tenant_id=self.context["tenant"]), validated_data)

    def update(self, instance: LLMProvider, validated_data: dict[str, Any]) -> LLMProvider:
        return _save(self, instance, validated_data)


class TokenBudgetSerializer(StrictStringsMixin, serializers.ModelSerializer):
    remaining = serializers.SerializerMethodField(help_text="limit - used - reserved, tokens (never negative).")
    resets_at = serializers.SerializerMethodField(help_text="When the current window ends.")

    class Meta:
        model = TokenBudget
        fields = [
            "id",
            "period",
            "limit",
            "policy",
            "used",
            "reserved",
            "remaining",
            "window_start",
            "resets_at",
            "description",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [
            "id",
            "used",
            "reserved",
            "remaining",
            "window_start",
            "resets_at",
            "created_at",
            "updated_at",
        ]
        extra_kwargs = {"limit": {"min_value": 1, "max_value": MAX_BUDGET_TOKENS}}

    @extend_schema_field(serializers.IntegerField())
    def get_remaining(self, row: TokenBudget) -> int:
        return max(0, row.limit - row.used - row.reserved)

    @extend_schema_field(serializers.DateTimeField())
    def get_resets_at(self, row: TokenBudget) -> str:
        return budgets.window(row.period)[1].isoformat()

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        period = data.get("period", getattr(self.instance, "period", None))
        clash = TokenBudget.objects.filter(tenant_id=self.context["tenant"], period=period)
        if self.instance is not None:
            clash = clash.exclude(pk=self.instance.pk)
        if clash.exists():
            raise serializers.ValidationError({"period": f"this tenant already has a {period} budget"})
        return data

    def create(self, validated_data: dict[str, Any]) -> TokenBudget:
        return _save(self, TokenBudget(tenant_id=self.context["tenant"]), validated_data)

    def update(self, instance: TokenBudget, validated_data: dict[str, Any]) -> TokenBudget:
        return _save(self, instance, validated_data)


class _TenantRows(TenantScopedMixin, viewsets.ModelViewSet):
    permission_classes = [IsAuthenticated, TenantWritePermission]
    parser_classes = [StrictJSONParser]
    pagination_class = None
    model: Any = None
    order: tuple[str, ...] = ("pk",)

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # drf-spectacular reads the model only
            return self.model.objects.none()
        return self.scoped(self.model.objects.all()).order_by(*self.order)

    def get_serializer_context(self) -> dict[str, Any]:
        return {**super().get_serializer_context(), "tenant": self.tenant.slug}


@extend_schema_view(
    list=extend_schema(summary="List the tenant's LLM providers", parameters=[TENANT_PARAMETER]),
    retrieve=extend_schema(summary="One LLM provider", parameters=[TENANT_PARAMETER]),
    create=extend_schema(
        summary="Add an OpenAI-compatible provider (its key: a credential alias)", parameters=[TENANT_PARAMETER]
    ),
    update=extend_schema(summary="Change an LLM provider", parameters=[TENANT_PARAMETER]),
    partial_update=extend_schema(summary="Change some fields of an LLM provider", parameters=[TENANT_PARAMETER]),
    destroy=extend_schema(summary="Delete an LLM provider", parameters=[TENANT_PARAMETER]),
)
class LLMProviderViewSet(_TenantRows):
    serializer_class = LLMProviderSerializer
    model = LLMProvider
    order = ("priority", "name")


@extend_schema_view(
    list=extend_schema(summary="List the tenant's token budgets", parameters=[TENANT_PARAMETER]),
    retrieve=extend_schema(summary="One token budget", parameters=[TENANT_PARAMETER]),
    create=extend_schema(summary="Set a day or month token budget", parameters=[TENANT_PARAMETER]),
    update=extend_schema(summary="Change a token budget", parameters=[TENANT_PARAMETER]),
    partial_update=extend_schema(summary="Change some fields of a token budget", parameters=[TENANT_PARAMETER]),
    destroy=extend_schema(summary="Delete a token budget", parameters=[TENANT_PARAMETER]),
)
class TokenBudgetViewSet(_TenantRows):
    serializer_class = TokenBudgetSerializer
    model = TokenBudget
    order = ("period",)


router = SimpleRouter()
router.trailing_slash = "/?"
router.register("llm-providers", LLMProviderViewSet, basename="llm-provider")
router.register("token-budgets", TokenBudgetViewSet, basename="token-budget")

urlpatterns = [*router.urls]
