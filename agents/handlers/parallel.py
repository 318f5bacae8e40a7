"""``parallel`` steps: registered for validation only; the engine expands them into step rows.

Params: ``tasks``, a non-empty list of ``{"type", "params"}`` (seed 002 spells it
``parameters``; ``id``, ``retry``, ``timeout`` and ``name`` are the engine's). Each task's type
must be known and its params must pass that type's ``validate_params``.
"""

from __future__ import annotations

from typing import Any

from ..registry import (
    StepContext,
    StepError,
    StepHandler,
    canonical_type,
    get_handler,
    is_expression,
    register,
)


@register
class ParallelHandler(StepHandler):
    """Validate the branches; ``run`` is never meant to be called."""

    type_name = "parallel"
    enforces_timeout = True

    def validate_params(self, params: dict[str, Any]) -> None:
        """Check every task's type and params. Raises ValueError naming ``tasks[i]``."""
        super().validate_params(params)
        tasks = params.get("tasks")
        if is_expression(tasks):
            return
        if not isinstance(tasks, list) or not tasks:
            raise ValueError("tasks must be a non-empty list")
        for index, task in enumerate(tasks):
            where = f"tasks[{index}]"
            if not isinstance(task, dict):
                raise ValueError(f"{where} must be a mapping with a type")
            type_name = task.get("type")
            if not isinstance(type_name, str):
                raise ValueError(f"{where}.type is required")
            try:
                canonical = canonical_type(type_name)
            except KeyError:
                raise ValueError(f"{where}.type: unknown step type {type_name!r}") from None
            task_params = task.get("params", task.get("parameters"))
            if task_params is None:
                task_params = {}
            if not isinstance(task_params, dict):
                raise ValueError(f"{where}.params must be a mapping")
            try:
                get_handler(canonical).validate_params(task_params)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None

    def run(self, ctx: StepContext) -> Any:
        """Always raises: a parallel step reaching a worker is an engine bug."""
        raise StepError("parallel steps are expanded by the engine", permanent=True)
