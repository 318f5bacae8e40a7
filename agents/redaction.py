"""Keep secrets out of traces, errors and outputs.

Two tools: :func:`redact_headers` masks headers by name (``Authorization``, anything named like a
token, key, secret, cookie or password), and :func:`redact` masks known secret values wherever
they appear in nested data (a token echoed back in a response body, a key in a URL).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from django.conf import settings

#: What a redacted value is replaced with.
REDACTED = "***"

#: Secrets shorter than this are not searched for (too likely to match innocent text).
MIN_SECRET_LENGTH = 4

_SENSITIVE_HEADER = re.compile(r"auth|token|key|secret|cookie|password|passwd|session|signature|credential", re.I)
#: Named like a key but not a secret: an idempotency key identifies a request and helps debugging.
_NOT_SENSITIVE = frozenset({"x-idempotency-key", "idempotency-key"})


def is_sensitive_header(name: str) -> bool:
    """True when a header's value must not be shown (see the module docstring for the rule)."""
    lowered = name.strip().lower()
    return lowered not in _NOT_SENSITIVE and bool(_SENSITIVE_HEADER.search(lowered))


def redact_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``headers`` whose sensitive values are replaced by ``"***"``.

    Sensitive: ``Authorization``, ``Proxy-Authorization``, ``Cookie``/``Set-Cookie`` and any
    name containing auth, token, key, secret, password, session, signature or credential, except
    ``X-Idempotency-Key``. Non-sensitive values are also passed through :func:`redact` with the
    known secrets, for a token smuggled into another header.
    """
    secrets = known_secrets()
    return {
        str(name): REDACTED if is_sensitive_header(str(name)) else redact(value, secrets)
        for name, value in (headers or {}).items()
    }


def redact(value: Any, secrets: Iterable[str]) -> Any:
    """Return ``value`` with every occurrence of each secret replaced by ``"***"``.

    Walks dicts (keys and values), lists and tuples (returned as lists); other scalars are
    returned unchanged. Secrets shorter than 4 characters are ignored. Longer secrets are
    replaced first so a secret containing another is masked whole.
    """
    needles = sorted(
        {s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_LENGTH},
        key=len,
        reverse=True,
    )
    if not needles:
        return value
    pattern = re.compile("|".join(re.escape(s) for s in needles))
    return _redact(value, pattern)


def _redact(value: Any, pattern: re.Pattern[str]) -> Any:
    if isinstance(value, str):
        return pattern.sub(REDACTED, value)
    if isinstance(value, Mapping):
        return {_redact(k, pattern): _redact(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v, pattern) for v in value]
    return value


def known_secrets() -> list[str]:
    """The configured secrets: ``ORCHESTRATOR_SERVICE_TOKEN`` and ``ORCHESTRATOR_LLM_API_KEY``
    when set (empty ones are left out)."""
    names = ("ORCHESTRATOR_SERVICE_TOKEN", "ORCHESTRATOR_LLM_API_KEY")
    return [value for name in names if (value := getattr(settings, name, "") or "")]
