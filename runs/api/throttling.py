"""Throttles of the sign-in endpoints (``POST /api/v1/auth/login`` and the admin's login form).

Two DRF throttles (``rest_framework.throttling.SimpleRateThrottle``: a sliding window of request
times per key in Django's cache, so the cache must be shared by every web process: Redis in
production, see ``CACHES`` in settings):

- :class:`LoginRateThrottle` (scope ``login``, ``ORCHESTRATOR_LOGIN_RATE``, default ``30/min``):
  every sign-in attempt per client address, right or wrong, so one address cannot spray
  passwords over many user names.
- :class:`LoginFailureThrottle` (scope ``login_failures``, ``ORCHESTRATOR_LOGIN_FAILURE_RATE``,
  default ``10/hour``): WRONG passwords per user name, from any address, so a guesser spread over
  many addresses still gets only that many tries per account. A successful sign-in does not
  count; once the limit is reached even the right password is refused (429 with Retry-After)
  until the window has room again. This is the usual account-lockout trade-off: someone who
  knows a user name can keep that user from signing in with a password for the window (API
  tokens keep working).

Both run BEFORE authentication: DRF checks throttles after authenticating, and HTTP Basic
fails inside authentication, so DRF's own order would never see a wrong password.

The client address is DRF's ``get_ident``: ``REMOTE_ADDR``, or the ``X-Forwarded-For`` entry
added by the last of ``ORCHESTRATOR_NUM_PROXIES`` trusted proxies (default 0: the header, which a
client can forge, is ignored).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any

from rest_framework.settings import api_settings
from rest_framework.throttling import SimpleRateThrottle

__all__ = ["LoginFailureThrottle", "LoginRateThrottle", "basic_auth_username"]


def basic_auth_username(request: Any) -> str | None:
    """The user name of an ``Authorization: Basic`` header (not verified), or None."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return None
    username, sep, _ = decoded.partition(":")
    return username if sep else None


class _SettingsRateThrottle(SimpleRateThrottle):
    """Reads its rate from ``REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]`` at request time (DRF binds
    the dict at import, so an override in tests or a reload would otherwise go unseen)."""

    def get_rate(self) -> str | None:
        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)


class LoginRateThrottle(_SettingsRateThrottle):
    """Sign-in attempts per client address (scope ``login``); see the module docstring."""

    scope = "login"

    def get_cache_key(self, request: Any, view: Any) -> str | None:
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


class LoginFailureThrottle(_SettingsRateThrottle):
    """Failed sign-ins per user name (scope ``login_failures``): checked before authentication,
    counted by :meth:`record_failure` only when the password was wrong."""

    scope = "login_failures"

    @staticmethod
    def username(request: Any) -> str | None:
        """The user name a request signs in as: HTTP Basic, or the admin form's ``username`` field."""
        name = basic_auth_username(request)
        # a plain Django request (the admin's form); a DRF Request (``_request``) signs in with Basic
        if name is None and request.method == "POST" and not hasattr(request, "_request"):
            name = request.POST.get("username")
        return name if name else None

    def get_cache_key(self, request: Any, view: Any) -> str | None:
        name = self.username(request)
        if name is None:
            return None
        # hashed: user names are not written to the cache in clear; case-folded like most logins
        ident = hashlib.sha256(name.strip().casefold().encode()).hexdigest()[:32]
        return self.cache_format % {"scope": self.scope, "ident": ident}

    def throttle_success(self) -> bool:
        return True  # checking does not count; only record_failure does

    def record_failure(self, request: Any, view: Any = None) -> None:
        """Count one wrong password for the request's user name (no-op without a rate or name)."""
        if self.rate is None:
            return
        key = self.get_cache_key(request, view)
        if key is None:
            return
        now = self.timer()
        history = [t for t in self.cache.get(key, []) if t > now - self.duration]
        history.insert(0, now)
        self.cache.set(key, history, self.duration)
