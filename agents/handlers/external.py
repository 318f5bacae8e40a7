"""``external`` steps: work done by an executor outside Celery, in any language, over HTTP.

Declared with a ``queue``; the engine never sends such a step to Celery. An executor polls
``POST /api/v1/executors/poll`` for its queues, gets the step with a lease token and its resolved
params, and reports ``.../complete`` or ``.../fail`` (seed 001's task_done / task_failed).
Params: anything the executor understands. This handler only runs if a misconfigured step
reached a Celery worker, and then fails it permanently rather than pretend to do the work.
"""

from __future__ import annotations

from typing import Any

from ..registry import StepContext, StepError, StepHandler, register


@register
class ExternalHandler(StepHandler):
    """Refuses to run inside Celery: an external step belongs to its executors."""

    type_name = "external"

    def run(self, ctx: StepContext) -> Any:
        raise StepError(
            f"step {ctx.step_id!r} is external: it runs on an executor polling its queue, not on a Celery worker",
            permanent=True,
        )
