"""``manage.py create_executor <tenant> <name> --queue Q [--queue Q ...]``: an external executor's token."""

from __future__ import annotations

import re

from django.core.management.base import BaseCommand, CommandError
from django.db import IntegrityError

from runs.models import Executor, Tenant

_QUEUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class Command(BaseCommand):
    help = "Create an external executor of a tenant for some queues and print its token (shown once)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("tenant", help="tenant slug")
        parser.add_argument("name", help="executor name (unique in the tenant)")
        parser.add_argument("--queue", action="append", required=True, help="a queue it may take steps of")

    def handle(self, *args, tenant: str, name: str, queue: list[str], **options) -> None:
        owner = Tenant.objects.filter(slug=tenant).first()
        if owner is None:
            raise CommandError(f"tenant {tenant!r} does not exist")
        bad = [q for q in queue if not _QUEUE.match(q)]
        if bad:
            raise CommandError(f"--queue: {bad[0]!r} is not a queue name (letters, digits, '.', '_', '-')")
        try:
            _executor, token = Executor.issue(owner, name, list(dict.fromkeys(queue)))
        except IntegrityError:
            raise CommandError(f"executor {name!r} already exists in tenant {tenant!r}") from None
        self.stdout.write(token)
