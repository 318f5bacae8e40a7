"""``manage.py recover_runs``: one sweeper pass (due retries, expired leases, lost messages, deadlines)."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from runs import engine


class Command(BaseCommand):
    help = "Run one recovery pass of the sweeper and print what it did."

    def handle(self, *args, **options) -> None:
        counts = engine.sweep()
        self.stdout.write(" ".join(f"{k}={v}" for k, v in counts.items()))
