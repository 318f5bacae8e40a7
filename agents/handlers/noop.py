"""``noop`` steps: do nothing and return a value (tests, benchmarks, fixed branch outputs).

Params: ``output`` (any JSON value), optional. Output: ``output`` when given, else the params
themselves (``{}`` for a step without params).
"""

from __future__ import annotations

from typing import Any

from ..registry import StepContext, StepHandler, register


@register
class NoopHandler(StepHandler):
    """Echo ``params.output`` (or the params); returns at once, so it runs inline."""

    type_name = "noop"
    enforces_timeout = True

    def run(self, ctx: StepContext) -> Any:
        """Return ``params["output"]`` if present, else a copy of the params."""
        if "output" in ctx.params:
            return ctx.params["output"]
        return dict(ctx.params)
