"""The verbs of agent tasks: start, pause, resume, cancel, and the status other apps read.

Lock order, as in the engine (runs/engine/state.py): the task's run row first
(``FOR NO KEY UPDATE``), then the task row. Step handlers write the task inside the completion's
transaction, which holds the run first too, so a pause racing a step's completion cannot deadlock.
"""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from orchestrator_site.conf import conf
from runs.choices import RUN_TERMINAL, RunStatus, StepStatus, TriggerKind
from runs.models import Run, Step, Trace

from .choices import TASK_ACTIVE, TASK_TERMINAL, TaskStatus
from .handler import fingerprint, step_input, step_spec
from .models import AgentTask
from .tools import ToolError, resolve_tools

#: The run spec's key of every task run (``Run.template_key``).
TASK_RUN_KEY = "agent-task"


class TaskInputError(ValueError):
    """Bad input to :func:`start_task` (one line naming the field). Nothing was saved."""


class TaskStateError(Exception):
    """The task is not in a state that allows the verb (one line; HTTP 409)."""


class TaskReplayError(TaskStateError):
    """A resume found a completed step whose input changed since it ran (its fingerprint differs)."""


def _int_field(name: str, value: Any, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise TaskInputError(f"{name}: expected an integer from {low} to {high}, got {str(value)[:40]!r}")
    return value


def check_input(
    tenant_id: str,
    goal: Any,
    tools: Any,
    *,
    thread_id: Any = "",
    chat_model: Any = None,
    max_steps: Any = None,
    context_window_limit: Any = None,
    checkpoint_interval: Any = None,
) -> dict[str, Any]:
    """Validate a task's input; returns the AgentTask field values. Raises TaskInputError naming
    the field (goal length, tool names of the tenant, every cap a caller may choose)."""
    if not isinstance(goal, str) or not goal.strip():
        raise TaskInputError("goal: required, a non-empty string")
    if len(goal) > conf.task_max_goal_chars:
        raise TaskInputError(f"goal: at most {conf.task_max_goal_chars} characters, got {len(goal)}")
    tools = list(tools or [])
    if len(tools) > conf.task_max_tools:
        raise TaskInputError(f"tools: at most {conf.task_max_tools} tools, got {len(tools)}")
    try:
        resolve_tools(tenant_id, tools)
    except ToolError as exc:
        raise TaskInputError(str(exc)) from None
    if not isinstance(thread_id, str) or len(thread_id) > 200:
        raise TaskInputError("threadId: a string of at most 200 characters")
    chat_model = chat_model or {}
    if not isinstance(chat_model, dict) or any(
        k not in ("provider", "model") or not isinstance(v, str) or len(v) > 200 for k, v in chat_model.items()
    ):
        raise TaskInputError("chatModel: expected {provider, model} strings of at most 200 characters")
    cap = conf.task_max_steps_cap
    return {
        "goal": goal.strip(),
        "tools": sorted(set(tools), key=tools.index),
        "thread_id": thread_id,
        "chat_model": chat_model,
        "max_steps": _int_field("max_steps", max_steps, min(conf.task_max_steps, cap), 1, cap),
        "context_window_limit": _int_field(
            "context_window_limit", context_window_limit, conf.task_context_window_limit, 100, 10_000_000
        ),
        "checkpoint_interval": _int_field(
            "checkpoint_interval", checkpoint_interval, conf.task_checkpoint_interval, 1, cap
        ),
    }


def start_task(
    tenant_id: str,
    goal: str,
    tools: list[str] | None = None,
    *,
    user_id: str = "",
    idempotency_key: str | None = None,
    trigger: str = TriggerKind.API,
    **options: Any,
) -> AgentTask:
    """Create a task and start its run (first step ``decompose``, queued after commit).

    ``options``: thread_id, chat_model, max_steps, context_window_limit, checkpoint_interval (None:
    the deployment defaults ``ORCHESTRATOR_TASK_*``). With an ``idempotency_key`` already used in
    the tenant, the existing task is returned. Raises TaskInputError; nothing is saved then.
    """
    from runs import engine

    fields = check_input(tenant_id, goal, tools, **options)
    if idempotency_key:
        existing = AgentTask.objects.filter(tenant_id=tenant_id, idempotency_key=idempotency_key).first()
        if existing is not None:
            return existing
    try:
        with transaction.atomic():
            task = AgentTask.objects.create(
                tenant_id=tenant_id, user_id=user_id, idempotency_key=idempotency_key or None, **fields
            )
            spec = {
                "key": TASK_RUN_KEY,
                "name": f"agent task {task.pk}",
                "variables": {},
                "steps": [step_spec(task, "decompose", 0)],
            }
            run = engine.start_run(
                spec,
                {},
                trigger=trigger,
                tenant_id=tenant_id,
                user_id=user_id,
                correlation_id=str(task.pk),
                metadata={"agent_task": str(task.pk), "task_run": True},
            )
            task.run = run
            task.status = TaskStatus.RUNNING
            task.save(update_fields=["run", "status", "updated_at"])
    except IntegrityError:
        if idempotency_key:
            return AgentTask.objects.get(tenant_id=tenant_id, idempotency_key=idempotency_key)
        raise
    return task


def _lock(task: AgentTask) -> AgentTask:
    """Lock the task's run, then the task (the engine's order); returns the fresh task row."""
    if task.run_id:
        Run.objects.select_for_update(no_key=True).filter(pk=task.run_id).values_list("pk").first()
    return AgentTask.objects.select_for_update().get(pk=task.pk)


def sync(task: AgentTask) -> AgentTask:
    """Bring an active task's status in line with its finished run (a failed or cancelled step
    ends the run; the task then says why). Returns the task (refreshed when changed)."""
    if task.status not in TASK_ACTIVE or task.run_id is None:
        return task
    run = Run.objects.only("status", "error", "finished_at").filter(pk=task.run_id).first()
    if run is None or run.status not in RUN_TERMINAL:
        return task
    status = {
        RunStatus.SUCCEEDED: TaskStatus.COMPLETED,
        RunStatus.CANCELLED: TaskStatus.CANCELLED,
    }.get(run.status, TaskStatus.FAILED)
    changes: dict[str, Any] = {"status": status, "finished_at": run.finished_at or timezone.now()}
    if status != TaskStatus.COMPLETED:
        changes["error"] = run.error
    else:
        changes["progress"] = 100
    AgentTask.objects.filter(pk=task.pk, status__in=TASK_ACTIVE).update(**changes, updated_at=timezone.now())
    task.refresh_from_db()
    return task


def run_finished_receiver(sender: Any, *, run_id: Any, status: str, metadata: dict[str, Any], **kwargs: Any) -> None:
    """``runs.signals.run_finished``: the run that executes a task ended, so the task ends with it
    (completed, failed or cancelled, with the run's error) at once, not when someone next reads
    it. Child runs of tool calls (``parent_step`` in their metadata) are the tool step's business."""
    if not metadata.get("task_run"):
        return
    task = AgentTask.objects.filter(run_id=run_id).first()
    if task is not None:
        sync(task)


def pause(task: AgentTask) -> AgentTask:
    """Pause a pending or running task: the step in flight finishes; the next one waits (no
    worker held) until :func:`resume`. Raises TaskStateError."""
    sync(task)
    with transaction.atomic():
        locked = _lock(task)
        if locked.status not in (TaskStatus.PENDING, TaskStatus.RUNNING):
            raise TaskStateError(f"task {task.pk} is {locked.status}: only a pending or running task pauses")
        locked.status = TaskStatus.PAUSED
        locked.save(update_fields=["status", "updated_at"])
        if locked.run_id:
            Trace.objects.create(run_id=locked.run_id, kind="state", message="task paused")
    return locked


def check_replay(task: AgentTask) -> None:
    """Raise TaskReplayError when a completed step's recomputed fingerprint differs from the one it
    ran with (its goal, planned step or tool definition changed since)."""
    if task.run_id is None:
        return
    try:
        tools = resolve_tools(task.tenant_id, list(task.tools or []))
    except ToolError as exc:
        raise TaskReplayError(f"task {task.pk} cannot resume: {exc}") from None
    done = Step.objects.filter(run_id=task.run_id, type="agent", status=StepStatus.SUCCEEDED).order_by("id")
    for step in done:
        params = (step.spec or {}).get("params") or {}
        expected = fingerprint(step_input(task, params.get("op", ""), int(params.get("index") or 0), tools))
        if params.get("fingerprint") != expected:
            raise TaskReplayError(
                f"task {task.pk} cannot resume: the input of completed step '{step.step_id}' changed since it ran "
                f"(fingerprint {str(params.get('fingerprint'))[:12]} != {expected[:12]}); its recorded answer would "
                "be stale. Start a new task instead."
            )


def restore_from_checkpoint(task: AgentTask) -> dict[str, Any] | None:
    """Set the task's context and summary to its latest checkpoint plus the messages of the steps
    completed after it (their recorded outputs: no step is called again). Returns the checkpoint
    used, or None (no checkpoint: the context is kept as the completed steps left it)."""
    if not task.checkpoints:
        return None
    checkpoint = task.checkpoints[-1]
    context = list(checkpoint.get("context") or [])
    summary = checkpoint.get("summary") or ""
    rows = Step.objects.filter(run_id=task.run_id, type="agent", status=StepStatus.SUCCEEDED).order_by("id")
    for row in rows:
        params = (row.spec or {}).get("params") or {}
        index = int(params.get("index") or 0)
        after = checkpoint["after_step"]
        # steps up to the checkpoint's are in it; a summary appended by that evaluation came after it
        if index < after or (index == after and params.get("op") != "summarize"):
            continue
        output = row.output or {}
        if params.get("op") == "summarize":
            context, summary = list(output.get("context") or context), output.get("summary") or summary
        else:
            context += list(output.get("messages") or [])
    task.context, task.summary = context, summary
    return checkpoint


def resume(task: AgentTask) -> AgentTask:
    """Resume a paused, failed or cancelled task from where it stopped.

    Paused: the waiting step is woken. Failed or cancelled: the context is restored from the latest
    checkpoint (plus the recorded outputs of the steps completed after it), and the run's failed or
    cancelled steps run again (``runs.engine.reset_for_retry``); completed steps are never called
    again. Raises TaskReplayError when a completed step's input changed, TaskStateError when the
    task is completed or running.
    """
    from runs import engine

    task = sync(task)
    check_replay(task)
    with transaction.atomic():
        locked = _lock(task)
        if locked.status == TaskStatus.PAUSED:
            locked.status = TaskStatus.RUNNING
            locked.save(update_fields=["status", "updated_at"])
            Trace.objects.create(run_id=locked.run_id, kind="state", message="task resumed")
            waiting = list(
                Step.objects.filter(run_id=locked.run_id, status=StepStatus.RETRY_WAIT).values_list("pk", flat=True)
            )
            transaction.on_commit(lambda: engine.wake_steps(waiting))
            return locked
        if locked.status not in (TaskStatus.FAILED, TaskStatus.CANCELLED):
            raise TaskStateError(f"task {task.pk} is {locked.status}: only a paused, failed or cancelled task resumes")
        checkpoint = restore_from_checkpoint(locked)
        locked.status, locked.error, locked.finished_at = TaskStatus.RUNNING, "", None
        locked.retry_count += 1
        locked.save()
        reason = f"resumed from checkpoint {checkpoint['number']}" if checkpoint else "resumed"
        engine.reset_for_retry(locked.run_id, None, reason)
    return locked


def cancel(task: AgentTask, reason: str = "cancelled by user") -> AgentTask:
    """Cancel an active task, its run and the child runs of its tool calls (``runs.engine.cancel_run``:
    the step in flight is cancelled, its late completion refused). Raises TaskStateError when it
    already ended."""
    from runs import engine

    task = sync(task)
    with transaction.atomic():
        locked = _lock(task)
        if locked.status in TASK_TERMINAL:
            raise TaskStateError(f"task {task.pk} is {locked.status}: nothing to cancel")
        locked.status, locked.finished_at, locked.error = TaskStatus.CANCELLED, timezone.now(), reason
        locked.save(update_fields=["status", "finished_at", "error", "updated_at"])
        if locked.run_id:
            engine.cancel_run(locked.run_id, reason)
        # child runs its tool calls started (templates) stop with it
        children = Run.objects.filter(
            tenant_id=locked.tenant_id,
            correlation_id=str(locked.pk),
            metadata__agent_task=str(locked.pk),
            status__in=[RunStatus.PENDING, RunStatus.RUNNING],
        ).values_list("pk", flat=True)
        for child in list(children):
            engine.cancel_run(child, f"{reason} (its agent task {locked.pk})")
    return locked


# --- reading -----------------------------------------------------------------------------------

_STEP_STATUS = {
    StepStatus.SUCCEEDED: "completed",
    StepStatus.RUNNING: "running",
    StepStatus.QUEUED: "running",
    StepStatus.RETRY_WAIT: "running",
    StepStatus.PENDING: "pending",
    StepStatus.FAILED: "failed",
    StepStatus.DEAD: "failed",
    StepStatus.CANCELLED: "cancelled",
    StepStatus.SKIPPED: "skipped",
}


def planned_steps(task: AgentTask) -> list[dict[str, Any]]:
    """The strategy's steps with their execution state: ``[{"index", "id", "description", "tool",
    "status", "attempts"}]`` (index 0-based as in seed 003; status from the ``step_<k>`` row, with
    ``args_<k>`` counting as running)."""
    rows: dict[str, dict[str, Any]] = {}
    if task.run_id:
        for row in Step.objects.filter(run_id=task.run_id, type="agent").values("step_id", "status", "attempts"):
            rows[row["step_id"]] = row
    result = []
    for index, step in enumerate((task.strategy or {}).get("steps") or [], start=1):
        row = rows.get(f"step_{index}") or rows.get(f"args_{index}")
        status = _STEP_STATUS.get(row["status"], row["status"]) if row else "pending"
        if row and row["step_id"].startswith("args_") and status == "completed":
            status = "running"
        result.append(
            {
                "index": index - 1,
                "id": step.get("id"),
                "description": step.get("description"),
                "tool": step.get("tool"),
                "status": status,
                "attempts": sum(r["attempts"] for k, r in rows.items() if k in (f"step_{index}", f"args_{index}")),
            }
        )
    return result


def _trace_type(trace: Trace) -> str:
    if trace.kind == "http" or trace.message.startswith("Called tool"):
        return "tool-call"
    return {"llm": "llm", "checkpoint": "checkpoint", "error": "error", "decision": "decision"}.get(trace.kind, "state")


def status_payload(task: AgentTask, traces: int = 10) -> dict[str, Any]:
    """Seed 003's status shape: ``{"taskId", "status", "goal", "progress", "currentStep",
    "totalSteps", "steps", "latestTraces", ...}`` plus the run id, checkpoints count, usage,
    result and error."""
    task = sync(task)
    latest = []
    if task.run_id:
        for trace in Trace.objects.filter(run_id=task.run_id).order_by("-id")[:traces]:
            latest.append({"type": _trace_type(trace), "message": trace.message, "timestamp": trace.created_at})
    return {
        "taskId": str(task.pk),
        "status": task.status,
        "goal": task.goal,
        "progress": task.progress,
        "currentStep": task.current_step,
        "totalSteps": task.total_steps,
        "steps": planned_steps(task),
        "latestTraces": latest,
        "runId": str(task.run_id) if task.run_id else None,
        "checkpoints": len(task.checkpoints or []),
        "usage": task.usage or {},
        "result": task.result,
        "error": task.error or None,
    }


def wait_for_plan(task: AgentTask, seconds: float) -> AgentTask:
    """Poll until the task has a strategy or ended, at most ``seconds``; returns the fresh row."""
    import time

    deadline = time.monotonic() + max(0.0, seconds)
    while True:
        task.refresh_from_db()
        if (task.strategy or {}).get("steps") or task.status in TASK_TERMINAL or time.monotonic() >= deadline:
            return sync(task)
        time.sleep(0.1)
