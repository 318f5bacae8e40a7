"""System checks of the agents app (``manage.py check``; ids ``agents.E0xx`` / ``agents.W0xx``)."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register

from orchestrator_site.conf import conf


@register(Tags.security)
def check_fernet_keys(app_configs=None, **kwargs) -> list:
    """Credential keys (issue 10: never derived from SECRET_KEY).

    E001: a key in ORCHESTRATOR_FERNET_KEYS is not a Fernet key. W003: a configured key is the
    one older versions derived from SECRET_KEY (whoever learns the secret key learns it). A
    missing key is E003 of ``check --deploy`` (below).
    """
    from cryptography.fernet import Fernet

    from .credentials import legacy_derived_key

    problems = []
    keys = conf.fernet_keys or []
    for index, key in enumerate(keys):
        try:
            Fernet(key.encode())
        except (ValueError, TypeError):
            problems.append(
                Error(
                    f"ORCHESTRATOR_FERNET_KEYS: key #{index + 1} is not a urlsafe-base64 32-byte Fernet key",
                    hint="Generate one with `python manage.py rotate_keys --generate`.",
                    id="agents.E001",
                )
            )
    if keys and legacy_derived_key(settings.SECRET_KEY).decode() in keys:
        problems.append(
            Warning(
                "ORCHESTRATOR_FERNET_KEYS contains the key derived from SECRET_KEY.",
                hint="Put a new key first, run `python manage.py rotate_keys`, then remove the derived one.",
                id="agents.W003",
            )
        )
    return problems


@register(Tags.security, deploy=True)
def check_fernet_keys_deploy(app_configs=None, **kwargs) -> list:
    """E003 (``manage.py check --deploy`` only): no ORCHESTRATOR_FERNET_KEYS outside the embedded default.

    Credentials can then be neither stored nor used (the API and the admin refuse with a one-line
    error; an http step naming one fails). A deployment concern, like Django's own security
    checks: reported where the operator reviews the deployment, not on every ``migrate`` or
    ``create_token``, where the user cannot act on it.
    """
    keys = conf.fernet_keys or []
    if keys or settings.DEBUG or conf.embedded:
        return []
    return [
        Error(
            "ORCHESTRATOR_FERNET_KEYS is not set: credentials can be neither stored nor used.",
            hint="Set it to a key from `python manage.py rotate_keys --generate` (the same on every machine). "
            "Secrets stored by older versions: README, Credentials, migrating the key.",
            id="agents.E003",
        )
    ]


@register(Tags.security)
def check_service_jwt(app_configs=None, **kwargs) -> list:
    """E002: the service JWT algorithm is unknown, or an asymmetric one has no PEM private key."""
    key = conf.service_jwt_key
    if not key:
        return []
    algorithm = conf.service_jwt_algorithm
    import jwt

    if algorithm.lower() == "none" or algorithm not in jwt.algorithms.get_default_algorithms():
        return [Error(f"ORCHESTRATOR_SERVICE_JWT_ALGORITHM: unknown algorithm {algorithm!r}", id="agents.E002")]
    if not algorithm.startswith("HS") and "PRIVATE KEY" not in key:
        return [
            Error(
                f"ORCHESTRATOR_SERVICE_JWT_KEY: {algorithm} needs a PEM private key",
                hint="Or use HS256 with a shared secret.",
                id="agents.E002",
            )
        ]
    if algorithm.startswith("HS") and len(key) < 32:
        return [
            Warning(
                "ORCHESTRATOR_SERVICE_JWT_KEY is shorter than 32 characters (RFC 7518 section 3.2).",
                id="agents.W002",
            )
        ]
    return []
