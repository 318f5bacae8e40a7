"""Credentials: tenant secrets encrypted at rest, resolved by alias when an ``http`` step runs.

Encryption is Fernet (cryptography.io "Fernet (symmetric encryption)": AES-128-CBC with an
HMAC-SHA256 tag and a timestamp) through ``MultiFernet`` so keys can be rotated:
``ORCHESTRATOR_FERNET_KEYS`` lists urlsafe-base64 32-byte keys, the NEWEST FIRST; the first
encrypts, all decrypt. Rotation (``manage.py rotate_keys``): put a new key first, run the command
(every secret is re-encrypted with it, ``MultiFernet.rotate``), then drop the old key. Without
the setting the embedded default generates one key into its data directory (``fernet_keys``,
0600) and every other deployment refuses to store or read credentials (system check
``agents.E003``). Keys are never derived from ``SECRET_KEY``: ``rotate_keys --from-secret-key``
migrates secrets encrypted by versions that did.

A resolved secret is registered with ``agents.redaction.register_secret`` before it is used, so
everything this process writes afterwards (traces, errors, outputs, log lines) masks it.
Every resolution counts in ``credential_resolution_total{alias,status}`` (seed 000); statuses:
``ok``, ``not_found``, ``host_denied``, ``decrypt_error``.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cryptography.fernet import InvalidToken

from .keys import CredentialError as CredentialError
from .keys import configured_keys as configured_keys
from .keys import decrypt as decrypt
from .keys import encrypt as encrypt
from .keys import fernet as fernet
from .keys import generate_key as generate_key
from .keys import legacy_derived_key as legacy_derived_key
from .keys import multi_fernet
from .redaction import register_secret

log = logging.getLogger("orchestrator.credentials")

# resolution statuses (metric label): ok, not_found, host_denied, decrypt_error


# --- metric -------------------------------------------------------------------------------------


def _counter():
    """``credential_resolution_total{tenant,status}``, created once per process.

    No alias label: aliases are a tenant's names and ``/metrics`` is the operator's. ``tenant``
    is the tenant slug when ``ORCHESTRATOR_METRICS_TENANT_LABEL`` is on, else empty (Prometheus
    treats an empty label as absent).

    Reuses a collector of that name when another module registered it first (prometheus_client
    refuses duplicates), so import order between modules never matters.
    """
    from prometheus_client import REGISTRY, Counter

    existing = getattr(REGISTRY, "_names_to_collectors", {}).get("credential_resolution_total")
    if existing is not None:
        return existing
    return Counter(
        "credential_resolution",
        "Credential lookups by http steps, by status (and tenant if enabled).",
        ["tenant", "status"],
    )


_RESOLUTIONS = _counter()


def _count(tenant_id: str, status: str) -> None:
    from runs.metrics import tenant_label

    try:
        _RESOLUTIONS.labels(tenant=tenant_label(tenant_id), status=status).inc()
    except Exception:  # pragma: no cover - a metric must never fail a step
        log.debug("credential metric failed", exc_info=True)


def rotate_all(batch_size: int = 500, old_keys: list[bytes] | None = None) -> tuple[int, int]:
    """Re-encrypt every credential with the newest key. Returns ``(rotated, failed)``.

    ``old_keys`` may open secrets too without being configured (the migration from the key
    derived from SECRET_KEY). A secret none of the keys can open is left as it is and counted
    as failed (the operator removed a key too early); the command reports the aliases.
    """
    from django.db import transaction

    from .models import Credential

    keys = configured_keys()
    multi = multi_fernet(tuple(keys + [k for k in (old_keys or []) if k not in keys]))
    rotated = failed = 0
    last_pk = 0
    while True:
        with transaction.atomic():
            rows = list(Credential.objects.select_for_update().filter(pk__gt=last_pk).order_by("pk")[:batch_size])
            if not rows:
                return rotated, failed
            for row in rows:
                last_pk = row.pk
                try:
                    token = multi.rotate(row.secret_encrypted.encode()).decode()
                except InvalidToken:
                    failed += 1
                    log.warning("credential %s of tenant %s cannot be decrypted: not rotated", row.alias, row.tenant_id)
                    continue
                Credential.objects.filter(pk=row.pk).update(secret_encrypted=token)
                rotated += 1


def undecryptable() -> list[str]:
    """``tenant/alias`` of the credentials that no configured key opens (empty when all are fine)."""
    from .models import Credential

    multi = fernet()
    bad = []
    for row in Credential.objects.only("tenant_id", "alias", "secret_encrypted").iterator():
        try:
            multi.decrypt(row.secret_encrypted.encode())
        except InvalidToken:
            bad.append(f"{row.tenant_id}/{row.alias}")
    return bad


# --- resolution at run time ----------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedCredential:
    """What to add to a request: ``headers`` and ``query`` parameters (their values are secret)."""

    alias: str
    kind: str
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    query: dict[str, str] = field(default_factory=dict, repr=False)


def host_allowed(allowed: list[str] | None, url: str) -> bool:
    """True when ``allowed`` is empty or names ``url``'s host (``*.example.com`` matches subdomains)."""
    if not allowed:
        return True
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    for entry in allowed:
        entry = str(entry).lower().strip().rstrip(".")
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif host == entry:
            return True
    return False


def resolve(tenant_id: str, alias: str, url: str) -> ResolvedCredential:
    """Load, check and decrypt credential ``alias`` of ``tenant_id`` for a request to ``url``.

    Registers the secret (and the derived Basic value) for redaction first. Raises
    CredentialError (one line naming the alias): not found in the tenant, host not in its
    ``allowed_hosts``, or not decryptable with the configured keys.
    """
    from .models import ApiKeyLocation, Credential, CredentialKind

    row = Credential.objects.filter(tenant_id=tenant_id, alias=alias).first()
    if row is None:
        _count(tenant_id, "not_found")
        raise CredentialError(f"credential {alias!r} not found in tenant {tenant_id!r}")
    if not host_allowed(row.allowed_hosts, url):
        _count(tenant_id, "host_denied")
        host = urlsplit(url).hostname or "?"
        raise CredentialError(f"credential {alias!r} may not be sent to host {host!r} (see its allowed_hosts)")
    try:
        secret = decrypt(row.secret_encrypted)
    except CredentialError as exc:
        _count(tenant_id, "decrypt_error")
        raise CredentialError(f"credential {alias!r} {exc}") from None
    register_secret(secret)
    headers: dict[str, str] = {}
    query: dict[str, str] = {}
    if row.kind == CredentialKind.BEARER:
        headers["Authorization"] = f"Bearer {secret}"
    elif row.kind == CredentialKind.BASIC:
        encoded = base64.b64encode(f"{row.username}:{secret}".encode()).decode()
        register_secret(encoded)
        headers["Authorization"] = f"Basic {encoded}"
    elif row.kind == CredentialKind.HEADER:
        headers[row.name] = secret
    else:  # api_key
        name = row.name or "X-API-Key"
        if row.location == ApiKeyLocation.QUERY:
            query[name] = secret
        else:
            headers[name] = secret
    _count(tenant_id, "ok")
    return ResolvedCredential(alias=alias, kind=row.kind, headers=headers, query=query)
