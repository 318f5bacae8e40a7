"""Signed service JWTs for agent calls (PyJWT), the alternative to the static service token.

When ``ORCHESTRATOR_SERVICE_JWT_KEY`` is set, an ``http`` step calling a trusted origin (the
agents base URL, the data service) sends ``Authorization: Bearer <jwt>`` minted for that attempt
instead of ``ORCHESTRATOR_SERVICE_TOKEN``. The token lives ``ORCHESTRATOR_SERVICE_JWT_TTL``
seconds (default 60) and names what is calling:

=========== ====================================================================
``iss``     ``ORCHESTRATOR_SERVICE_JWT_ISSUER`` (default ``orchestrator``)
``sub``     ``orchestrator:step``
``aud``     ``ORCHESTRATOR_SERVICE_JWT_AUDIENCE`` when set
``iat``     issued at, ``nbf`` = ``iat``, ``exp`` = ``iat`` + TTL (seconds since the epoch)
``jti``     a random id (receivers may refuse a replay)
``tenant``  the run's tenant
``run``     the run id
``step``    the step id
``attempt`` the attempt number
``idem``    the step's idempotency key (also sent as ``X-Idempotency-Key``)
=========== ====================================================================

HS256 (the default) signs with the shared secret; RS256/ES256 sign with a PEM private key and
receivers verify with its public key (:func:`public_key_pem`). :func:`verify` is what a Python
receiver calls. The token travels in ``Authorization``, which traces mask by name; the signing key
is masked wherever it appears (``agents.redaction.SECRET_SETTINGS``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from orchestrator_site.conf import conf

SUBJECT = "orchestrator:step"
REQUIRED_CLAIMS = ("exp", "iat", "iss", "sub", "tenant", "run", "step")


def enabled() -> bool:
    """True when a signing key is configured."""
    return bool(conf.service_jwt_key)


def _algorithm() -> str:
    return conf.service_jwt_algorithm or "HS256"


def _signing_key() -> Any:
    key = conf.service_jwt_key
    if not key:
        raise ImproperlyConfigured("ORCHESTRATOR_SERVICE_JWT_KEY is not set")
    return key


def public_key_pem() -> str:
    """The PEM public key matching an RS*/ES*/PS* private signing key (for receivers)."""
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(_signing_key().encode(), password=None)
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def mint(
    *,
    tenant_id: str,
    run_id: str,
    step_id: str,
    attempt: int = 1,
    idempotency_key: str = "",
    ttl: int | None = None,
    now: float | None = None,
) -> str:
    """A signed token for one attempt of one step (claims: see the module docstring).

    ``ttl`` seconds (default ``ORCHESTRATOR_SERVICE_JWT_TTL``); ``now`` (epoch seconds) is for
    tests. Raises ImproperlyConfigured without a key.
    """
    issued = int(now if now is not None else time.time())
    lifetime = int(ttl if ttl is not None else conf.service_jwt_ttl)
    claims: dict[str, Any] = {
        "iss": conf.service_jwt_issuer or "orchestrator",
        "sub": SUBJECT,
        "iat": issued,
        "nbf": issued,
        "exp": issued + max(1, lifetime),
        "jti": uuid.uuid4().hex,
        "tenant": tenant_id,
        "run": run_id,
        "step": step_id,
        "attempt": attempt,
    }
    if idempotency_key:
        claims["idem"] = idempotency_key
    audience = conf.service_jwt_audience
    if audience:
        claims["aud"] = audience
    headers = {"kid": settings.ORCHESTRATOR_SERVICE_JWT_KID} if conf.service_jwt_kid else None
    return jwt.encode(claims, _signing_key(), algorithm=_algorithm(), headers=headers)


def verify(token: str, *, key: Any = None, audience: str | None = None, leeway: float = 5.0) -> dict[str, Any]:
    """Check a service JWT and return its claims.

    ``key``: the verification key (default: the configured secret, or the public half of the
    configured private key). Checks signature, algorithm (only the configured one), ``exp``,
    ``nbf``, ``iat``, issuer, audience (when configured or given) and the required claims.

    Raises:
        jwt.InvalidTokenError: (or a subclass: ExpiredSignatureError, InvalidAudienceError...).
    """
    algorithm = _algorithm()
    if key is None:
        key = _signing_key() if algorithm.startswith("HS") else public_key_pem()
    audience = audience if audience is not None else (conf.service_jwt_audience or None)
    return jwt.decode(
        token,
        key,
        algorithms=[algorithm],
        audience=audience,
        issuer=conf.service_jwt_issuer or "orchestrator",
        leeway=leeway,
        options={"require": list(REQUIRED_CLAIMS), "verify_aud": audience is not None},
    )
