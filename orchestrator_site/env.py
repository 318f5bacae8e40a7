"""Typed readers for settings taken from the environment.

Each raises ``ImproperlyConfigured`` naming the variable when its value cannot be read, so a bad
deployment fails at start-up with one clear line instead of later with a traceback.
"""

from __future__ import annotations

import os

from django.core.exceptions import ImproperlyConfigured


def env_str(name: str, default: str = "") -> str:
    """Return the variable as a string, ``default`` when unset or empty."""
    value = os.environ.get(name, "")
    return value if value != "" else default


def env_int(name: str, default: int) -> int:
    """Return the variable as an integer; raises ImproperlyConfigured on a non-integer."""
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}: expected an integer, got {raw!r}") from None


def env_float(name: str, default: float) -> float:
    """Return the variable as a float; raises ImproperlyConfigured on a non-number."""
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}: expected a number, got {raw!r}") from None


def env_bool(name: str, default: bool) -> bool:
    """Return the variable as a boolean (1/0, true/false, yes/no, on/off)."""
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name}: expected a boolean, got {raw!r}")


def env_list(name: str, default: list[str] | None = None) -> list[str]:
    """Return a comma-separated variable as a list of stripped, non-empty strings."""
    raw = os.environ.get(name, "")
    if raw.strip() == "":
        return list(default or [])
    return [part.strip() for part in raw.split(",") if part.strip()]
