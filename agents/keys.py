"""Credential encryption keys: MultiFernet over ``ORCHESTRATOR_FERNET_KEYS``, newest first.

Separate from ``agents.credentials`` (resolution, rotation, metrics) so that the Credential model
can encrypt a secret without importing the module that reads its rows. The keys never derive
from ``DJANGO_SECRET_KEY`` (issue 10); ``legacy_derived_key`` exists only to migrate secrets of
older versions.
"""

from __future__ import annotations

import base64
import functools

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.core.exceptions import ImproperlyConfigured

from orchestrator_site.conf import conf

#: HKDF ``info`` of the key older versions derived from SECRET_KEY (only read by the migration).
_DERIVED_KEY_INFO = b"orchestrator.credentials.fernet.v1"


class CredentialError(Exception):
    """A credential cannot be used; ``str()`` is one line naming the alias (never the secret)."""


# --- keys and encryption -------------------------------------------------------------------------


def legacy_derived_key(secret_key: str) -> bytes:
    """The key versions before issue 10 derived from ``SECRET_KEY`` (HKDF-SHA256, RFC 5869).

    Only for migrating secrets encrypted with it (``rotate_keys --from-secret-key``); it never
    encrypts or decrypts anything in normal operation, since a step that learns the secret key
    must not learn the credential key with it.
    """
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_DERIVED_KEY_INFO)
    return base64.urlsafe_b64encode(hkdf.derive(secret_key.encode()))


def configured_keys() -> list[bytes]:
    """The keys in use, newest first (``ORCHESTRATOR_FERNET_KEYS``).

    Raises CredentialError (one line) when none is configured: production must set the setting
    (system check agents.E003); the embedded default generates one into its data directory.
    """
    keys = [k.encode() for k in (conf.fernet_keys or []) if k]
    if not keys:
        raise CredentialError(
            "no credential encryption key: set ORCHESTRATOR_FERNET_KEYS (`manage.py rotate_keys --generate` prints one)"
        )
    return keys


@functools.lru_cache(maxsize=8)
def multi_fernet(keys: tuple[bytes, ...]) -> MultiFernet:
    """A ``MultiFernet`` of ``keys`` (cached). Raises ImproperlyConfigured naming a bad key."""
    fernets = []
    for index, key in enumerate(keys):
        try:
            fernets.append(Fernet(key))
        except (ValueError, TypeError):
            raise ImproperlyConfigured(
                f"ORCHESTRATOR_FERNET_KEYS: key #{index + 1} is not a urlsafe-base64 32-byte Fernet key"
            ) from None
    return MultiFernet(fernets)


def fernet() -> MultiFernet:
    """The ``MultiFernet`` of the configured keys (cached per key list; settings are read each call)."""
    return multi_fernet(tuple(configured_keys()))


def generate_key() -> str:
    """A new random Fernet key (text), for ``ORCHESTRATOR_FERNET_KEYS``."""
    return Fernet.generate_key().decode()


def encrypt(secret: str) -> str:
    """The Fernet token (text) of ``secret``, encrypted with the newest key."""
    if not isinstance(secret, str):
        raise TypeError("a secret must be a string")
    return fernet().encrypt(secret.encode()).decode()


def decrypt(token: str) -> str:
    """The secret of a Fernet token. Raises CredentialError when no configured key opens it."""
    try:
        return fernet().decrypt(token.encode()).decode()
    except (InvalidToken, ValueError, TypeError, AttributeError):
        raise CredentialError("cannot be decrypted with the keys in ORCHESTRATOR_FERNET_KEYS") from None
