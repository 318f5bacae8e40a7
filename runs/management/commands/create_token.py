"""``manage.py create_token USERNAME [--days N]``: a new API token, printed once (only its hash is kept)."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from knox.models import AuthToken


class Command(BaseCommand):
    help = (
        "Create an API token for a user and print it (it cannot be shown again: only its hash is "
        "stored). Use it as `Authorization: Token <token>`."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("username")
        parser.add_argument(
            "--days",
            type=int,
            default=None,
            help="days until it expires (default ORCHESTRATOR_TOKEN_TTL_DAYS; 0 = never)",
        )

    def create(self, username: str, days: int | None = None) -> tuple[AuthToken, str]:
        """(token row, token text). Raises CommandError for an unknown or inactive user, bad days."""
        User = get_user_model()
        user = User.objects.filter(**{User.USERNAME_FIELD: username}).first()
        if user is None or not user.is_active:
            raise CommandError(f"no active user {username!r}")
        days = settings.ORCHESTRATOR_TOKEN_TTL_DAYS if days is None else days
        if days < 0:
            raise CommandError("--days: must be 0 (never expires) or more")
        expiry = timedelta(days=days) if days else None
        return AuthToken.objects.create(user=user, expiry=expiry, prefix="orch_")

    def handle(self, *args, **options) -> None:
        instance, token = self.create(options["username"], options["days"])
        when = instance.expiry.isoformat(timespec="seconds") if instance.expiry else "never"
        # both on stdout: `create_token alice | tail -1` is the token, and stderr stays for errors
        self.stdout.write(f"token for {instance.user} (expires {when}); shown only now:")
        self.stdout.write(token)
