"""``manage.py create_tenant SLUG [--name NAME]``: create (or rename) a tenant. Idempotent."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.utils.text import slugify

from runs.models import Tenant


class Command(BaseCommand):
    help = "Create a tenant (a workspace owning templates and runs); an existing one is updated."

    def add_arguments(self, parser) -> None:
        parser.add_argument("slug", help="short id used in X-Tenant and on every row, e.g. acme")
        parser.add_argument("--name", default="", help="display name")

    def create(self, slug: str, name: str = "") -> tuple[Tenant, bool]:
        """Create or update the tenant. Raises CommandError on a bad slug."""
        if not slug or slugify(slug) != slug or len(slug) > 100:
            raise CommandError(f"tenant slug {slug!r}: use lowercase letters, digits, '-' and '_' (at most 100)")
        tenant, created = Tenant.objects.get_or_create(slug=slug, defaults={"name": name or slug})
        if not created and name and tenant.name != name:
            tenant.name = name
            tenant.save(update_fields=["name"])
        return tenant, created

    def handle(self, *args, **options) -> None:
        tenant, created = self.create(options["slug"], options["name"])
        self.stdout.write(f"{'created' if created else 'exists '} tenant {tenant.slug} ({tenant.name})")
