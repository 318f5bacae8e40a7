"""Durations in workflow files: ``30``, ``1.5``, ``"250ms"``, ``"30s"``, ``"5m"``, ``"1h30m"``, ``"2d"``."""

from __future__ import annotations

import math
import re

__all__ = ["parse_duration"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# One or more "<number><unit>" parts, optionally separated by spaces: "1h30m", "1h 30m", "1.5s".
_PART = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)", re.IGNORECASE)
_PLAIN = re.compile(r"\s*[+]?(\d+(?:\.\d+)?|\.\d+)\s*")


def parse_duration(value: object) -> float:
    """Return ``value`` as a number of seconds (float, >= 0).

    Accepted: an int or float (seconds); a string holding a plain number (seconds, ``"30"``); or
    one or more ``<number><unit>`` parts with units ``ms``, ``s``, ``m``, ``h``, ``d``
    (``"250ms"``, ``"1.5s"``, ``"5m"``, ``"1h30m"``, ``"2d"``; Go's ``time.ParseDuration`` style).

    Raises:
        ValueError: a bool, a negative or non-finite number, an empty string or anything else,
            with a one-line message quoting the value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"invalid duration {value!r}: expected seconds or a string like '30s', '5m', '1h30m'")
    if isinstance(value, (int, float)):
        seconds = float(value)
        if math.isnan(seconds) or math.isinf(seconds):
            raise ValueError(f"invalid duration {value!r}: must be a finite number")
        if seconds < 0:
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        return seconds

    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    plain = _PLAIN.fullmatch(text)
    if plain:
        return float(plain.group(1))
    total = 0.0
    pos = 0
    while pos < len(text):
        match = _PART.match(text, pos)
        if match is None:
            break
        total += float(match.group(1)) * _UNITS[match.group(2).lower()]
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(
            f"invalid duration {value!r}: expected seconds or a string like '250ms', '30s', '5m', '1h30m', '2d'"
        )
    if math.isinf(total):
        raise ValueError(f"invalid duration {value!r}: too large")
    return total
