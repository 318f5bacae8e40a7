"""REST endpoints of credentials: ``/api/v1/credentials`` (included by orchestrator_site/urls.py).

The secret is write-only: required on create, optional on change (absent = unchanged), never
returned (``has_secret`` says one is stored). Tenancy, authentication and errors are the API's
(``runs.api``): a request acts in its tenant; another tenant's credential is a 404; writes need
the member or owner role.
"""

from __future__ import annotations

from typing import Any

from django.core.validators import RegexValidator
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import serializers, viewsets
from rest_framework.permissions import IsAuthenticated
from rest_framework.routers import SimpleRouter

from runs.api.fields import StrictCharField, StrictStringsMixin
from runs.api.parsers import StrictJSONParser
from runs.api.permissions import TENANT_PARAMETER, TenantScopedMixin, TenantWritePermission

from . import credentials
from .models import Credential, CredentialKind


class CredentialSerializer(StrictStringsMixin, serializers.ModelSerializer):
    """A credential of the tenant: alias, kind and where it may be sent; the secret is write-only."""

    secret = StrictCharField(
        write_only=True, required=False, trim_whitespace=False, max_length=10_000, help_text="Write-only."
    )
    has_secret = serializers.SerializerMethodField()
    allowed_hosts = serializers.ListField(
        child=StrictCharField(max_length=253, validators=[RegexValidator(r"\S")]),
        required=False,
        max_length=100,
        help_text='Hosts the secret may be sent to, e.g. ["api.example.com", "*.example.org"].',
    )

    class Meta:
        model = Credential
        fields = [
            "id",
            "alias",
            "kind",
            "username",
            "name",
            "location",
            "allowed_hosts",
            "description",
            "secret",
            "has_secret",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "has_secret", "created_at", "updated_at"]

    def get_has_secret(self, credential: Credential) -> bool:
        return bool(credential.secret_encrypted)

    def validate_allowed_hosts(self, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(h, str) and h.strip() for h in value):
            raise serializers.ValidationError('a list of host names, e.g. ["api.example.com", "*.example.org"]')
        return [h.strip().lower() for h in value]

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        kind = data.get("kind", getattr(self.instance, "kind", CredentialKind.BEARER))
        name = data.get("name", getattr(self.instance, "name", ""))
        username = data.get("username", getattr(self.instance, "username", ""))
        if self.instance is None and not data.get("secret"):
            raise serializers.ValidationError({"secret": "required when creating a credential"})
        if data.get("secret"):
            try:
                credentials.configured_keys()
            except credentials.CredentialError as exc:  # a deployment without keys stores nothing
                raise serializers.ValidationError({"secret": str(exc)}) from None
        if kind == CredentialKind.HEADER and not name:
            raise serializers.ValidationError({"name": "a header credential needs the header's name"})
        if kind == CredentialKind.BASIC and not username:
            raise serializers.ValidationError({"username": "a basic credential needs the user name"})
        return data

    def _save(self, credential: Credential, data: dict[str, Any]) -> Credential:
        secret = data.pop("secret", None)
        for name, value in data.items():
            setattr(credential, name, value)
        if secret:
            credential.set_secret(secret)
        credential.full_clean()  # a duplicate alias in the tenant is a 400
        credential.save()
        return credential

    def create(self, validated_data: dict[str, Any]) -> Credential:
        return self._save(Credential(tenant_id=self.context["tenant"]), dict(validated_data))

    def update(self, instance: Credential, validated_data: dict[str, Any]) -> Credential:
        return self._save(instance, dict(validated_data))


class CredentialCreateSerializer(CredentialSerializer):
    """The body of a create (schema only): the secret is required there."""

    secret = StrictCharField(write_only=True, trim_whitespace=False, max_length=10_000, help_text="Write-only.")


@extend_schema_view(
    list=extend_schema(summary="List credentials (never their secrets)", parameters=[TENANT_PARAMETER]),
    retrieve=extend_schema(summary="One credential (never its secret)", parameters=[TENANT_PARAMETER]),
    create=extend_schema(
        summary="Store a credential; the secret is encrypted at rest",
        parameters=[TENANT_PARAMETER],
        request=CredentialCreateSerializer,
    ),
    update=extend_schema(summary="Change a credential (send secret to replace it)", parameters=[TENANT_PARAMETER]),
    partial_update=extend_schema(summary="Change some fields of a credential", parameters=[TENANT_PARAMETER]),
    destroy=extend_schema(summary="Delete a credential", parameters=[TENANT_PARAMETER]),
)
class CredentialViewSet(TenantScopedMixin, viewsets.ModelViewSet):
    serializer_class = CredentialSerializer
    permission_classes = [IsAuthenticated, TenantWritePermission]
    parser_classes = [StrictJSONParser]
    pagination_class = None

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # drf-spectacular reads the model only
            return Credential.objects.none()
        return self.scoped(Credential.objects.all()).order_by("alias")

    def get_serializer_context(self) -> dict[str, Any]:
        return {**super().get_serializer_context(), "tenant": self.tenant.slug}


router = SimpleRouter()
router.trailing_slash = "/?"  # `/credentials` and `/credentials/` both (as runs.api.urls)
router.register("credentials", CredentialViewSet, basename="credential")

#: Included under /api/v1/ by orchestrator_site/urls.py (with the LLM router's providers and budgets).
from .llm.api import urlpatterns as _llm_urlpatterns  # noqa: E402 - the LLM router's endpoints (issue 8)

urlpatterns = [*router.urls, *_llm_urlpatterns]
