"""``condition`` steps: turn the value of the step's condition into a boolean result.

The engine evaluates the expression (``condition: ${...}`` on the step) and passes its value as
``params.expression`` (``condition`` and ``value`` are accepted too); this handler only coerces
it. Output: ``{"result": bool}``; the engine runs ``on_success`` targets when it is true and
``on_failure`` targets otherwise.

Coercion: Python truthiness, except that strings meaning false (``""``, ``false``, ``0``,
``no``, ``off``, ``none``, ``null``; any case) are false: an expression interpolated into a
longer string arrives as text.
"""

from __future__ import annotations

from typing import Any

from ..registry import StepContext, StepError, StepHandler, register

_FALSE_STRINGS = frozenset({"", "false", "0", "no", "off", "none", "null"})
_KEYS = ("expression", "condition", "value")


def truthy(value: Any) -> bool:
    """The boolean a condition value stands for (see the module docstring)."""
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE_STRINGS
    return bool(value)


@register
class ConditionHandler(StepHandler):
    """Coerce the resolved condition to ``{"result": bool}``; returns at once."""

    type_name = "condition"
    enforces_timeout = True

    def run(self, ctx: StepContext) -> Any:
        """Raises a permanent StepError when the engine passed no value."""
        for key in _KEYS:
            if key in ctx.params:
                return {"result": truthy(ctx.params[key])}
        raise StepError("condition step got no expression value", permanent=True)
