"""The expression context of a step: what ``${...}`` may read."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..models import Run, Step


def build_context(run: Run, refs: Iterable[str], step: Step | None = None) -> dict[str, Any]:
    """The expression context for a step: variables, referenced steps' outputs, loop item, run.

    Shape: {"vars": {...}, "steps": {id: {"output", "status"}}, "item", "index", "run": {...}}.
    Only the steps in ``refs`` are read (one query).
    """
    refs = list(refs)
    steps: dict[str, Any] = {}
    if refs:
        for row in Step.objects.filter(run_id=run.pk, parent__isnull=True, step_id__in=refs).values(
            "step_id", "status", "output"
        ):
            steps[row["step_id"]] = {"output": row["output"], "status": row["status"]}
    ctx: dict[str, Any] = {
        "vars": dict(run.inputs or {}),
        "steps": steps,
        "run": {"id": str(run.pk), "correlation_id": run.correlation_id, "tenant_id": run.tenant_id},
    }
    if step is not None:
        ctx["run"]["attempt"] = step.attempts
        if step.parent_id is not None:
            ctx["item"] = step.item
            ctx["index"] = step.map_index
            alias = step.spec.get("as") or "item"
            if alias != "item":
                ctx["vars"][alias] = step.item
    return ctx
