"""``manage.py purge_runs [--older-than DAYS] [--dry-run]``: delete old finished runs."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = (
        "Delete finished runs (succeeded, failed, cancelled, timed out) with their steps, attempts and "
        "traces, finished more than --older-than days ago (default ORCHESTRATOR_RUN_RETENTION_DAYS)."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--older-than", type=float, default=None, metavar="DAYS", help="age in days")
        parser.add_argument("--batch-size", type=int, default=500, help="runs deleted per transaction")
        parser.add_argument("--dry-run", action="store_true", help="only count what would be deleted")

    def handle(self, *args, **options) -> None:
        from runs.management.commands._cli import ensure_embedded_database
        from scheduler.services import purge_runs

        days = options["older_than"]
        if days is None:
            days = settings.ORCHESTRATOR_RUN_RETENTION_DAYS
        if days <= 0:
            raise CommandError("--older-than must be greater than 0 (ORCHESTRATOR_RUN_RETENTION_DAYS=0 keeps runs)")
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1")
        ensure_embedded_database()
        count = purge_runs(days, batch_size=options["batch_size"], dry_run=options["dry_run"])
        verb = "would delete" if options["dry_run"] else "deleted"
        self.stdout.write(f"{verb} {count} run(s) finished more than {days:g} day(s) ago")
