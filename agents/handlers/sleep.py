"""``sleep`` steps: wait a number of seconds (tests, benchmarks, deliberate delays).

Params: ``seconds`` (number >= 0, required). Output: ``{"slept": seconds}``.
The sleep never outlasts the attempt: it stops at ``ctx.deadline`` and raises ``StepTimeout``.
"""

from __future__ import annotations

import time
from typing import Any

from ..registry import StepContext, StepError, StepHandler, StepTimeout, is_expression, register


@register
class SleepHandler(StepHandler):
    """Sleep ``params.seconds``, cut short (StepTimeout) by the attempt's deadline."""

    type_name = "sleep"
    enforces_timeout = True

    def validate_params(self, params: dict[str, Any]) -> None:
        """``seconds`` is required and a number >= 0. Raises ValueError."""
        super().validate_params(params)
        if "seconds" not in params:
            raise ValueError("seconds is required")
        seconds = params["seconds"]
        if not is_expression(seconds) and not _non_negative_number(seconds):
            raise ValueError("seconds must be a number >= 0")

    def run(self, ctx: StepContext) -> Any:
        """Sleep, then return ``{"slept": seconds}``."""
        seconds = ctx.params.get("seconds")
        if isinstance(seconds, str):
            try:
                seconds = float(seconds)
            except ValueError:
                pass
        if not _non_negative_number(seconds):
            raise StepError("seconds must be a number >= 0", permanent=True)
        available = ctx.remaining()
        time.sleep(min(seconds, available))
        if seconds > available:
            raise StepTimeout(f"sleep of {seconds:g}s cut short by the step timeout after {available:.3g}s")
        return {"slept": seconds}


def _non_negative_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
