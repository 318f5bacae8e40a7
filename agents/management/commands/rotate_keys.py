"""``manage.py rotate_keys``: re-encrypt every credential secret with the newest Fernet key."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = (
        "Key rotation for credential secrets. 1) put a new key FIRST in ORCHESTRATOR_FERNET_KEYS "
        "(--generate prints one), keeping the old ones after it; 2) run this command on one machine: every "
        "secret is re-encrypted with the new key; 3) remove the old keys. --check lists secrets the "
        "configured keys cannot open. --from-secret-key also opens secrets encrypted with the key older versions "
        "derived from SECRET_KEY (DJANGO_SECRET_KEY or the data directory's secret_key), to migrate them."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--generate", action="store_true", help="print a new random key and exit")
        parser.add_argument("--check", action="store_true", help="only check that every secret can be decrypted")
        parser.add_argument(
            "--from-secret-key",
            action="store_true",
            help="also open secrets encrypted with the key derived from SECRET_KEY (migration from older versions)",
        )

    def handle(self, *args, **options) -> None:
        from agents import credentials

        if options["generate"]:
            self.stdout.write(credentials.generate_key())
            return
        try:
            keys = credentials.configured_keys()
            credentials.fernet()
        except Exception as exc:
            raise CommandError(str(exc)) from None
        if options["check"]:
            bad = credentials.undecryptable()
            if bad:
                raise CommandError(f"{len(bad)} secret(s) cannot be decrypted: {', '.join(bad[:20])}")
            self.stdout.write(f"every secret opens with the {len(keys)} configured key(s)")
            return
        old_keys = None
        if options["from_secret_key"]:
            from django.conf import settings

            old_keys = [credentials.legacy_derived_key(settings.SECRET_KEY)]
        rotated, failed = credentials.rotate_all(old_keys=old_keys)
        self.stdout.write(f"{rotated} secret(s) re-encrypted with the newest key")
        if failed:
            bad = credentials.undecryptable()
            raise CommandError(
                f"{failed} secret(s) could not be decrypted with any configured key and were left as they were: "
                f"{', '.join(bad[:20])}"
            )
