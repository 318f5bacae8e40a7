"""``manage.py add_member TENANT USERNAME [--role member] [--default] [--create-user] [--staff]``."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from runs.choices import MembershipRole
from runs.models import Membership, Tenant


class Command(BaseCommand):
    help = (
        "Give a user a role in a tenant (owner, member or viewer). With --create-user the user is "
        "created without a password (API tokens only; set one with `changepassword` for the admin)."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("tenant", help="tenant slug")
        parser.add_argument("username")
        parser.add_argument("--role", default=MembershipRole.MEMBER, choices=MembershipRole.values)
        parser.add_argument("--default", action="store_true", help="make this the user's default tenant")
        parser.add_argument("--create-user", action="store_true", help="create the user if missing")
        parser.add_argument("--staff", action="store_true", help="let the user into the admin (staff, view/operate)")

    @transaction.atomic
    def add(
        self,
        tenant_slug: str,
        username: str,
        role: str = MembershipRole.MEMBER,
        default: bool = False,
        create_user: bool = False,
        staff: bool = False,
    ) -> Membership:
        """Create or update the membership. Raises CommandError for an unknown tenant or user."""
        tenant = Tenant.objects.filter(slug=tenant_slug).first()
        if tenant is None:
            raise CommandError(f"no tenant {tenant_slug!r} (create it with `manage.py create_tenant {tenant_slug}`)")
        User = get_user_model()
        user = User.objects.filter(**{User.USERNAME_FIELD: username}).first()
        if user is None:
            if not create_user:
                raise CommandError(f"no user {username!r} (pass --create-user to create one)")
            user = User.objects.create_user(username=username)
            user.set_unusable_password()
            user.save()
        if staff:
            self.grant_staff(user)
        existing = Membership.objects.filter(user=user)
        make_default = default or not existing.exists()
        if make_default:
            existing.exclude(tenant=tenant).update(is_default=False)
        membership, _ = Membership.objects.update_or_create(
            tenant=tenant, user=user, defaults={"role": role, **({"is_default": True} if make_default else {})}
        )
        return membership

    def grant_staff(self, user) -> None:
        """Staff with the permissions the operations console needs (view everything, operate runs)."""
        from django.contrib.auth.models import Permission

        user.is_staff = True
        user.save(update_fields=["is_staff"])
        codenames = [
            "view_run",
            "change_run",
            "add_run",
            "view_step",
            "change_step",
            "view_attempt",
            "view_trace",
            "view_workflowtemplate",
            "view_tenant",
        ]
        user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))

    def handle(self, *args, **options) -> None:
        membership = self.add(
            options["tenant"],
            options["username"],
            role=options["role"],
            default=options["default"],
            create_user=options["create_user"],
            staff=options["staff"],
        )
        default = " (default tenant)" if membership.is_default else ""
        self.stdout.write(f"{membership.user} is {membership.role} of {membership.tenant.slug}{default}")
