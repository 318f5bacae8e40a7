"""Rates in Celery's notation (``"10/s"``, ``"100/m"``, ``"1000/h"``): no Django needed, so the
workflow loader can check ``rate_limit.rate`` without the database."""

from __future__ import annotations

import math
import re

#: Celery's rate notation: ``"10/s"``, ``"100/m"``, ``"1000/h"`` (a bare number is per second).
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?\s*$")
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_rate(value: object) -> float:
    """Tokens per second from ``"10/s"``, ``"30/m"``, ``"100/h"`` or a number. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"expected a rate such as '10/s' or '30/m', got {value!r}")
    if isinstance(value, (int, float)):
        rate = float(value)
    else:
        match = _RATE.match(str(value))
        if not match:
            raise ValueError(f"expected a rate such as '10/s', '30/m' or '100/h', got {value!r}")
        rate = float(match.group(1)) / _PER[match.group(2)]
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"the rate must be greater than zero, got {value!r}")
    return rate
