"""Live progress of an agent task as Server-Sent Events: the task's snapshot for ``runs.events.EventFeed``.

One feed, three consumers: ``GET /api/v1/chat/orchestrate/{id}/events`` (tasks_app/api.py), the
``run_task`` command (``EventFeed.events()`` in-process) and the admin's task page
(tasks_app/static/tasks_app/task_page.js, an ``EventSource`` on the same URL).

Items of :func:`task_snapshot`, in this order (new keys are only appended, so a ``Last-Event-ID``
cursor stays valid while the task goes on; see runs/events.py):

- ``task``: seed 003's status fields, sent first in each poll so that the changes after it are
  read against the progress of that moment (the CLI prints it on every line).
- one ``execution`` item per row of the task's run (seed 003's ``task_execution_step``:
  ``decompose``, ``args_<k>``, ``step_<k>``, ``evaluate_<k>``, ``replan_<k>``, ``summarize_<k>``),
  in creation order;
- one ``step`` item per planned step, placed right after the ``execution`` item of the row that
  planned it (``decompose``, or the ``replan_<k>`` that made the plan longer): every row after a
  planning row is created after the plan was saved, so the keys stay append-only. A replan that
  makes the plan shorter marks the steps it dropped with the status ``dropped``.
"""

from __future__ import annotations

import zlib
from typing import Any

from runs.events import ERROR_CHARS, EventFeed, Item, Snapshot

#: run rows that write the plan (``output.strategy.steps``)
PLANNERS = ("decompose", "replan_")


def _planned_by(rows: list[dict[str, Any]]) -> dict[str, int]:
    """``{step_id of a planning row: plan length after it}`` for the succeeded planning rows, in order."""
    lengths: dict[str, int] = {}
    for row in rows:
        if row["step_id"].startswith(PLANNERS) and row["status"] == "succeeded":
            lengths[row["step_id"]] = len(((row["plan"] or {}).get("strategy") or {}).get("steps") or [])
    return lengths


def task_snapshot(task_id: Any) -> Snapshot:
    """The snapshot of an agent task (``services.sync`` first, so a finished run is reflected).

    ``task`` data: ``{"taskId", "status", "progress" (0-100), "currentStep", "totalSteps"}``;
    token: all four values.
    ``step`` data (the per-step shape of ``run_task --json``): ``{"index" (0-based), "description",
    "status" (pending | running | completed | failed | cancelled | skipped | dropped), "tool",
    "attempts"}``; token: status, attempts and a checksum of description and tool (a replan that
    rewrites a step sends it again).
    ``execution`` data: ``{"step_id", "op", "index" (1-based planned step, 0 for decompose),
    "status" (a run step status), "attempts", "error"}`` (error cut at ERROR_CHARS); token: status
    and attempts.
    ``end`` data (when the task is completed, failed or cancelled): ``{"taskId", "status",
    "progress", "result", "error", "finished_at"}``.

    Two queries while running (the run's rows, each planning row read with its plan in the same
    statement, then the task: a row seen implies the plan it follows is seen too), plus
    ``planned_steps``' one. Raises LookupError
    (AgentTask.DoesNotExist) when the task is gone.
    """
    from django.db.models import Case, F, JSONField, Q, When

    from runs.models import Step

    from . import services
    from .choices import TASK_TERMINAL
    from .models import AgentTask

    run_id = AgentTask.objects.values_list("run_id", flat=True).get(pk=task_id)
    rows: list[dict[str, Any]] = []
    if run_id is not None:
        # one statement: a planning row's status and its plan are read together (two reads let a
        # row be seen succeeded with the plan of before it finished, and its steps placed late)
        planner = Q(*(Q(step_id__startswith=prefix) for prefix in PLANNERS), _connector=Q.OR)
        rows = list(
            Step.objects.filter(run_id=run_id, parent__isnull=True)
            .order_by("id")
            .values("step_id", "status", "attempts", "error", "spec__params__op", "spec__params__index")
            .annotate(plan=Case(When(planner, then=F("output")), default=None, output_field=JSONField()))
        )
    task = services.sync(AgentTask.objects.get(pk=task_id))
    done = task.status in TASK_TERMINAL
    state = {
        "taskId": str(task.pk),
        "status": task.status,
        "progress": task.progress,
        "currentStep": task.current_step,
        "totalSteps": task.total_steps,
    }
    items: dict[str, Item] = {"task": Item("task", ":".join(str(v) for v in list(state.values())[1:]), state)}

    planned = services.planned_steps(task)
    lengths = _planned_by(rows)
    shown = 0  # planned steps placed so far
    longest = max([len(planned), *lengths.values()])

    def place(upto: int) -> None:
        nonlocal shown
        for index in range(shown, upto):
            if index < len(planned):
                step = {k: planned[index][k] for k in ("index", "description", "status", "tool", "attempts")}
            else:
                step = {"index": index, "description": None, "status": "dropped", "tool": None, "attempts": 0}
            shape = zlib.crc32(f"{step['description']}\n{step['tool']}".encode())
            items[f"step:{index}"] = Item("step", f"{step['status']}:{step['attempts']}:{shape:x}", step)
        shown = max(shown, upto)

    for row in rows:
        items[f"execution:{row['step_id']}"] = Item(
            "execution",
            f"{row['status']}:{row['attempts']}",
            {
                "step_id": row["step_id"],
                "op": row["spec__params__op"],
                "index": int(row["spec__params__index"] or 0),
                "status": row["status"],
                "attempts": row["attempts"],
                "error": (row["error"] or "")[:ERROR_CHARS] or None,
            },
        )
        if row["step_id"] in lengths:
            place(lengths[row["step_id"]])
    place(longest)  # a plan whose planning row is not seen yet (read between the two queries)
    end = {}
    if done:
        end = {k: state[k] for k in ("taskId", "status", "progress")}
        end.update(result=task.result, error=task.error or None, finished_at=task.finished_at)
    return Snapshot(items=items, done=done, end=end)


def task_feed(task_id: Any, *, last_event_id: str | None = None, **options: Any) -> EventFeed:
    """An :class:`EventFeed` of an agent task with the deployment's settings (``ORCHESTRATOR_SSE_*``);
    ``options`` override them (``poll``, ``heartbeat``, ``max_seconds``, ``clock``, ``sleep``).
    Raises InvalidCursor for a bad ``last_event_id``."""
    from orchestrator_site.conf import conf

    settings = {"poll": conf.sse_poll, "heartbeat": conf.sse_heartbeat, "max_seconds": conf.sse_max_seconds}
    return EventFeed(lambda: task_snapshot(task_id), last_event_id=last_event_id, **{**settings, **options})
