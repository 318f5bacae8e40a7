"""Small pieces shared by the management commands."""

from __future__ import annotations

import sys

from django.conf import settings
from django.core.management import call_command


def fail_input(stderr, message: str) -> None:
    """Print a one-line reason and exit 2 (invalid input)."""
    stderr.write(f"error: {' '.join(str(message).split())}")
    sys.exit(2)


def ensure_embedded_database() -> None:
    """On the embedded SQLite default, apply migrations so a fresh clone just works."""
    if settings.DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
        call_command("migrate", verbosity=0, interactive=False)
