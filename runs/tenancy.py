"""Tenancy: which tenant a request acts in, and the one place querysets are scoped to it.

Every template, run (and with it its steps, attempts and traces) carries a tenant slug
(``tenant_id``). A user belongs to tenants through :class:`~runs.models.Membership`.

- API: a request acts in ONE tenant: the ``X-Tenant`` header when given, else the user's default
  membership (``is_default``, else the oldest). Every queryset of the API goes through
  :func:`scope`, so another tenant's object is simply not found (404), never forbidden (403),
  which would confirm that it exists. A header naming a tenant the user is not in is a 404 too.
  Superusers may act in any existing tenant (``X-Tenant``; without it their default, else ``default``).
- Admin: staff see the tenants they belong to (all of them for a superuser):
  :func:`tenant_slugs` gives the set, None meaning "all".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from django.db.models import QuerySet

from .choices import WRITE_ROLES, MembershipRole
from .models import DEFAULT_TENANT, Membership, Tenant

TENANT_HEADER = "X-Tenant"
_SLUG = re.compile(r"[-a-zA-Z0-9_]{1,100}")


class TenantNotFound(Exception):
    """The named tenant does not exist for this user (answered as 404)."""


class NoTenant(Exception):
    """The user belongs to no tenant (answered as 403)."""


@dataclass(frozen=True)
class TenantContext:
    """The tenant a request acts in and the caller's role there (None: superuser, not a member)."""

    slug: str
    role: str | None

    @property
    def can_write(self) -> bool:
        """May start, cancel and retry runs and load templates."""
        return self.role is None or self.role in WRITE_ROLES


def memberships(user: Any) -> list[Membership]:
    """The user's memberships, default first (cached on the user object for the request)."""
    cached = getattr(user, "_orchestrator_memberships", None)
    if cached is None:
        if not getattr(user, "is_authenticated", False):
            cached = []
        else:
            cached = list(
                Membership.objects.filter(user_id=user.pk, tenant__is_active=True)
                .select_related("tenant")
                .order_by("-is_default", "created_at", "id")
            )
        user._orchestrator_memberships = cached
    return cached


def tenant_slugs(user: Any) -> set[str] | None:
    """Slugs of the tenants ``user`` may see; None for a superuser (all tenants)."""
    if getattr(user, "is_superuser", False):
        return None
    return {m.tenant.slug for m in memberships(user)}


def writable_tenant_slugs(user: Any) -> set[str] | None:
    """Slugs of the tenants where ``user`` may change things (start, cancel, retry, rerun, requeue,
    schedules, credentials): the tenants where their role is in ``WRITE_ROLES``, the rule the API
    applies through :attr:`TenantContext.can_write`. None for a superuser (every tenant)."""
    if getattr(user, "is_superuser", False):
        return None
    return {m.tenant.slug for m in memberships(user) if m.role in WRITE_ROLES}


def role_in(user: Any, slug: str) -> str | None:
    """``user``'s role in tenant ``slug`` (``"owner"``, ``"member"``, ``"viewer"``), or None when not a member."""
    for m in memberships(user):
        if m.tenant.slug == slug:
            return m.role
    return None


def resolve(user: Any, requested: str | None) -> TenantContext:
    """The tenant a request of ``user`` acts in; ``requested`` is the ``X-Tenant`` header or None.

    Raises TenantNotFound (unknown, inactive or foreign tenant) or NoTenant (no membership at all).
    """
    mine = memberships(user)
    superuser = getattr(user, "is_superuser", False)
    if requested:
        if not _SLUG.fullmatch(requested):
            raise TenantNotFound(f"tenant {requested[:100]!r} not found")
        for m in mine:
            if m.tenant.slug == requested:
                return TenantContext(requested, m.role)
        if superuser and (
            requested == DEFAULT_TENANT or Tenant.objects.filter(slug=requested, is_active=True).exists()
        ):
            return TenantContext(requested, None)
        raise TenantNotFound(f"tenant {requested!r} not found")
    if mine:
        return TenantContext(mine[0].tenant.slug, mine[0].role)
    if superuser:
        return TenantContext(DEFAULT_TENANT, None)
    raise NoTenant("you are not a member of any tenant; ask an administrator to add you")


def scope(queryset: QuerySet, tenant: str, field: str = "tenant_id") -> QuerySet:
    """``queryset`` restricted to rows of ``tenant`` (``field`` is the path to the tenant slug)."""
    return queryset.filter(**{field: tenant})


def scope_for_user(queryset: QuerySet, user: Any, field: str = "tenant_id") -> QuerySet:
    """``queryset`` restricted to the tenants ``user`` belongs to (unrestricted for a superuser)."""
    slugs = tenant_slugs(user)
    if slugs is None:
        return queryset
    return queryset.filter(**{f"{field}__in": sorted(slugs)})


def role_label(role: str | None) -> str:
    return MembershipRole(role).label if role else "superuser"
