"""Keep secrets out of traces, errors and outputs.

Two tools: :func:`redact_headers` masks headers by name (``Authorization``, anything named like a
token, key, secret, cookie or password), and :func:`redact` masks known secret values wherever
they appear in nested data (a token echoed back in a response body, a key in a URL).
"""

from __future__ import annotations

import functools
import re
import threading
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
    return _redact(value, _pattern(tuple(needles)))


@functools.lru_cache(maxsize=32)
def _pattern(needles: tuple[str, ...]) -> re.Pattern[str]:
    """One compiled alternation per set of secrets (traces are redacted on a hot path)."""
    return re.compile("|".join(re.escape(s) for s in needles))


def _redact(value: Any, pattern: re.Pattern[str]) -> Any:
    if isinstance(value, str):
        return pattern.sub(REDACTED, value)
    if isinstance(value, Mapping):
        return {_redact(k, pattern): _redact(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v, pattern) for v in value]
    return value


#: Settings whose values are secrets.
SECRET_SETTINGS = (
    "ORCHESTRATOR_SERVICE_TOKEN",
    "ORCHESTRATOR_LLM_API_KEY",
    "ORCHESTRATOR_SERVICE_JWT_KEY",
    "GEMINI_API_KEY",  # the LLM router's Gemini fallback
)

#: Most secrets :func:`register_secret` remembers per process (the oldest are forgotten first).
MAX_REGISTERED_SECRETS = 256

# Secrets met at run time in this process (credential values resolved for steps), kept in
# insertion order so the oldest can be dropped.
_registered: dict[str, None] = {}
_registered_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Remember ``value`` as a secret of this process: :func:`known_secrets` returns it from now on.

    Called when a credential is decrypted for a step (``agents.credentials.resolve``), so the
    traces, errors, outputs and log lines that this process writes afterwards are masked. Values
    shorter than ``MIN_SECRET_LENGTH`` are ignored.
    """
    if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH:
        return
    with _registered_lock:
        _registered.pop(value, None)
        _registered[value] = None
        while len(_registered) > MAX_REGISTERED_SECRETS:
            _registered.pop(next(iter(_registered)))


def forget_registered_secrets() -> None:
    """Forget what :func:`register_secret` remembered (tests)."""
    with _registered_lock:
        _registered.clear()


def known_secrets() -> list[str]:
    """The secrets to mask: the configured ones (``SECRET_SETTINGS`` that are set) and those
    registered at run time in this process (:func:`register_secret`)."""
    configured = [value for name in SECRET_SETTINGS if (value := getattr(settings, name, "") or "")]
    with _registered_lock:
        return configured + list(_registered)
