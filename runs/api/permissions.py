"""Who may do what: authenticated users act in one tenant; viewers read, members and owners write.

:class:`TenantScopedMixin` is the one place API querysets are scoped (``scoped()``), so a row of
another tenant is never found: 404, not 403.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter
from rest_framework.exceptions import PermissionDenied
from rest_framework.permissions import SAFE_METHODS, BasePermission

from orchestrator_site import logging as logctx

from .. import tenancy

TENANT_PARAMETER = OpenApiParameter(
    name=tenancy.TENANT_HEADER,
    type=OpenApiTypes.STR,
    location=OpenApiParameter.HEADER,
    required=False,
    description="Slug of the tenant to act in (default: your default tenant).",
)
#: The event streams' way to name the tenant: a browser's EventSource cannot send headers.
TENANT_QUERY_PARAMETER = OpenApiParameter(
    name="tenant",
    type=OpenApiTypes.STR,
    location=OpenApiParameter.QUERY,
    required=False,
    description=f"As the {tenancy.TENANT_HEADER} header (which wins when both are sent), for an EventSource.",
)


class TenantScopedMixin:
    """For API views: ``self.tenant`` (a TenantContext) and ``scoped(queryset)``."""

    request: Any

    @cached_property
    def tenant(self) -> tenancy.TenantContext:
        """The tenant of this request. Raises TenantNotFound (404) or NoTenant (403)."""
        context = tenancy.resolve(self.request.user, self.requested_tenant())
        logctx.bind(tenant=context.slug, user=getattr(self.request.user, "username", None))
        return context

    def requested_tenant(self) -> str | None:
        """The slug the caller asks to act in: the ``X-Tenant`` header (None: the default tenant)."""
        return self.request.headers.get(tenancy.TENANT_HEADER)

    def scoped(self, queryset: QuerySet, field: str = "tenant_id") -> QuerySet:
        """``queryset`` limited to this request's tenant."""
        return tenancy.scope(queryset, self.tenant.slug, field)

    def require_write(self) -> None:
        """Raise PermissionDenied (403) when the caller may only read in this tenant."""
        if not self.tenant.can_write:
            raise PermissionDenied(f"your role in tenant {self.tenant.slug!r} is {self.tenant.role}: read only")


class TenantWritePermission(BasePermission):
    """Reads for every member of the tenant; writes (POST, PUT, ...) for owners and members."""

    message = "read only in this tenant"

    def has_permission(self, request: Any, view: Any) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        tenant = view.tenant  # resolves the tenant: 404/403 for strangers before anything else
        return request.method in SAFE_METHODS or tenant.can_write
