"""The ``agent`` step type: one step of an agent task (one LLM call or one tool call).

A task's run starts with ``decompose``; each step's handler returns a
:class:`agents.registry.StepContinuation`: its output, the next step(s) to append and the task's
bookkeeping (``on_success``), all committed with the step's success (runs/engine/append.py)::

    decompose -> [args_1] -> step_1 -> evaluate_1 -> [summarize_1] -> [args_2] -> step_2 -> ...
                                                 \\-> replan_1 -> ...

Ops (``params.op``):

- ``decompose``: ``decompose_goal`` (LLM, schema ``decompose_goal``); the strategy.
- ``args``: the model picks the arguments of the planned step's tool (OpenAI ``tools`` /
  ``tool_calls``), validated against the tool's schema.
- ``step``: the planned step: a tool call (a child run of a template, or an agent endpoint's http
  call, both with the idempotency key ``<task>:<step>``) or LLM reasoning (one plain call).
- ``evaluate``: ``evaluate_progress``; progress (never down), checkpoint every N steps and before
  an expensive step, then continue, replan or finish.
- ``replan``: ``decompose_goal`` for the remaining work; rewrites the strategy after the cursor.
- ``summarize``: ``summarize_context`` when the context passed the limit; the context becomes the
  summary plus the messages of the last K steps.

Replay safety: every step's params carry ``fingerprint``, the sha256 of the canonical JSON of its
input (goal, op, planned step, tool definition), computed when it was appended. A step whose
recomputed fingerprint differs fails permanently with a message naming it instead of running on a
stale plan; ``services.resume`` checks the completed steps the same way. A completed step is
never called again: its row stays ``succeeded`` and its output (with the messages it added) is
what a resume replays.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from django.utils import timezone

from agents import llm
from agents.llm.usage import record_attempt_usage
from agents.registry import StepContext, StepContinuation, StepDeferred, StepError, StepHandler, register
from orchestrator_site.conf import conf

from . import orchestrator
from .choices import TaskStatus
from .models import AgentTask
from .tools import Tool, ToolError, resolve_tools

#: Steps whose messages are kept after a summary (the "last K steps"; one step adds two messages).
KEEP_STEPS = 1
#: Checkpoints kept on a task (older ones are dropped).
MAX_CHECKPOINTS = 20
#: Retry policy of the appended steps (LLM and tool calls are transient-failure prone).
RETRY = {"max_attempts": 3, "initial_delay": 1.0, "max_delay": 30.0}


def fingerprint(value: Any) -> str:
    """sha256 hex of the canonical JSON of ``value`` (sorted keys, no spaces, UTF-8)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def planned(task: AgentTask, index: int) -> dict[str, Any] | None:
    """The ``index``-th planned step (1-based) of the strategy, or None."""
    steps = (task.strategy or {}).get("steps") or []
    return steps[index - 1] if 0 < index <= len(steps) else None


def step_input(task: AgentTask, op: str, index: int, tools: dict[str, Tool] | None = None) -> dict[str, Any]:
    """The input a step's fingerprint covers: the goal, the op, and for ``args``/``step`` the
    planned step with the definition version of its tool."""
    value: dict[str, Any] = {"goal": task.goal, "op": op, "index": index}
    if op == "decompose":
        value["tools"] = sorted(task.tools or [])
    if op in ("args", "step"):
        step = planned(task, index)
        # an args step runs before the arguments are known: its input is the step without them
        value["step"] = {k: v for k, v in step.items() if k != "arguments"} if op == "args" and step else step
        if step and step.get("tool"):
            tools = tools if tools is not None else _tools(task)
            tool = tools.get(step["tool"])
            value["tool_version"] = tool.version if tool else None
    return value


def step_spec(task: AgentTask, op: str, index: int, tools: dict[str, Tool] | None = None) -> dict[str, Any]:
    """The spec of an appended step (``<op>_<index>``; ``decompose`` has no index)."""
    step_id = "decompose" if op == "decompose" else f"{op}_{index}"
    return {
        "id": step_id,
        "type": "agent",
        "params": {
            "task": str(task.pk),
            "op": op,
            "index": index,
            "fingerprint": fingerprint(step_input(task, op, index, tools)),
        },
        "retry": dict(RETRY),
    }


def _tools(task: AgentTask) -> dict[str, Tool]:
    try:
        return resolve_tools(task.tenant_id, list(task.tools or []))
    except ToolError as exc:
        raise StepError(f"task tools: {exc}", permanent=True) from None


def _kw(task: AgentTask, ctx: StepContext) -> dict[str, Any]:
    return {"model": (task.chat_model or {}).get("model") or None, "timeout": ctx.remaining()}


def _usage_sum(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, int]:
    total = {
        k: int((old or {}).get(k) or 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens", "llm_calls")
    }
    for key in total:
        total[key] += int(new.get(key) or 0)
    return total


@register
class AgentTaskHandler(StepHandler):
    """Runs one step of an agent task; see the module docstring."""

    type_name = "agent"
    internal = True  # written by tasks_app only: a workflow file may not name it
    enforces_timeout = True  # LLM calls get ctx.remaining(); the http handler bounds itself

    def validate_params(self, params: dict[str, Any]) -> None:
        """``task`` (uuid string), ``op`` (one of the ops), ``index`` (int), ``fingerprint``."""
        super().validate_params(params)
        if params.get("op") not in ("decompose", "args", "step", "evaluate", "replan", "summarize"):
            raise ValueError("op must be decompose, args, step, evaluate, replan or summarize")

    def run(self, ctx: StepContext) -> Any:
        """Load the task (the run's tenant only), refuse a stale input, run the op."""
        p = ctx.params
        # the task this run executes, and no other (not another run's task, not another tenant's)
        task = AgentTask.objects.filter(pk=p.get("task"), tenant_id=ctx.tenant_id, run_id=ctx.run_id).first()
        if task is None:
            raise StepError(f"agent task {p.get('task')} is not the task of run {ctx.run_id}", permanent=True)
        if task.status == TaskStatus.PAUSED:
            raise StepDeferred(conf.task_pause_recheck, f"task {task.pk} is paused")
        if task.status in (TaskStatus.CANCELLED, TaskStatus.COMPLETED):
            raise StepError(f"task {task.pk} is {task.status}", permanent=True)
        op, index = p["op"], int(p.get("index") or 0)
        tools = _tools(task)
        expected = fingerprint(step_input(task, op, index, tools))
        if p.get("fingerprint") != expected:
            raise StepError(
                f"step '{ctx.step_id}' of task {task.pk}: its input changed since it was planned "
                f"(fingerprint {str(p.get('fingerprint'))[:12]} != {expected[:12]}); refusing to replay it on a "
                "stale plan",
                permanent=True,
            )
        runner = getattr(self, f"_op_{op}")
        return runner(ctx, task, index, tools)

    # --- helpers -----------------------------------------------------------------------------
    def _record(self, ctx: StepContext, answer: orchestrator.Answer, name: str) -> None:
        """Attempt.usage and one ``llm`` trace per call of an orchestrator function."""
        for call in answer.calls:
            record_attempt_usage(
                ctx.step_pk, ctx.attempt, {**call.usage, "provider": call.provider, "model": call.model}
            )
            self.trace(
                ctx,
                "llm",
                f"{name}: LLM {call.model} at {call.provider} in {call.latency_ms} ms",
                {"schema": name, "usage": call.usage, "answer": (call.content or "")[:500]},
            )

    def _call(self, ctx: StepContext, fn: Any, name: str, *args: Any, **kwargs: Any) -> orchestrator.Answer:
        """One orchestrator function, its router errors mapped: a ``wait`` budget defers the step."""
        try:
            answer = fn(*args, **kwargs)
        except llm.BudgetWait as exc:
            raise StepDeferred(exc.seconds, exc.message) from None
        except llm.LLMSchemaError as exc:
            raise StepError(f"{name}: {exc.message}") from None
        except orchestrator.PlanError as exc:  # the repair rounds were the retries
            raise StepError(str(exc), permanent=True) from None
        except ValueError as exc:  # arguments the router refuses (a prompt too large...)
            raise StepError(f"{name}: {exc}", permanent=True) from None
        self._record(ctx, answer, name)
        return answer

    def _continue(
        self,
        ctx: StepContext,
        task: AgentTask,
        output: dict[str, Any],
        steps: list[dict[str, Any]],
        change: Any,
    ) -> StepContinuation:
        """The continuation: ``change(task)`` applied to the locked task row, with the step's
        success (``steps`` appended in the same transaction)."""
        task_pk = task.pk

        def on_success() -> None:
            locked = AgentTask.objects.select_for_update().get(pk=task_pk)  # after the run's lock
            change(locked)
            locked.usage = _usage_sum(locked.usage, output.get("usage") or {})
            locked.save()

        return StepContinuation(output=output, steps=steps, on_success=on_success)

    def _next(self, task: AgentTask, index: int, tools: dict[str, Tool]) -> list[dict[str, Any]]:
        """The spec that starts planned step ``index``: ``args_<index>`` when its tool has no
        arguments yet, else ``step_<index>``."""
        step = planned(task, index)
        if step and step.get("tool") and step.get("arguments") is None:
            return [step_spec(task, "args", index, tools)]
        return [step_spec(task, "step", index, tools)]

    # --- the ops -----------------------------------------------------------------------------
    def _op_decompose(self, ctx: StepContext, task: AgentTask, index: int, tools: dict[str, Tool]) -> Any:
        answer = self._call(
            ctx, orchestrator.decompose_goal, "decompose_goal", task.tenant_id, task.goal, tools,
            max_steps=task.max_steps, **_kw(task, ctx),
        )  # fmt: skip
        strategy = answer.value
        plan_text = "\n".join(f"{i}. {s['description']}" for i, s in enumerate(strategy["steps"], start=1))
        messages = [
            {"role": "user", "content": f"Goal: {task.goal}"},
            {"role": "assistant", "content": f"Plan:\n{plan_text}"},
        ]
        output = {"strategy": strategy, "messages": messages, "usage": answer.usage}
        self.trace(ctx, "decision", f"planned {len(strategy['steps'])} steps", {"strategy": strategy})
        task.strategy = strategy  # the next spec's fingerprint covers the new plan
        next_steps = self._next(task, 1, tools)

        def change(t: AgentTask) -> None:
            t.strategy, t.total_steps = strategy, len(strategy["steps"])
            t.context = [*(t.context or []), *messages]
            if t.status == TaskStatus.PENDING:
                t.status = TaskStatus.RUNNING

        return self._continue(ctx, task, output, next_steps, change)

    def _op_args(self, ctx: StepContext, task: AgentTask, index: int, tools: dict[str, Tool]) -> Any:
        step = planned(task, index) or {}
        tool = tools[step["tool"]]
        messages = [
            *(task.context or []),
            {"role": "user", "content": f"Step {index}: {step['description']}. Call the tool {tool.name}."},
        ]
        try:
            result = llm.complete(
                tenant_id=task.tenant_id, messages=messages, tools=[tool.openai()],
                max_tokens=conf.task_max_tokens, **_kw(task, ctx),
            )  # fmt: skip
        except llm.BudgetWait as exc:
            raise StepDeferred(exc.seconds, exc.message) from None
        answer = orchestrator.Answer(None, [result])
        self._record(ctx, answer, "tool_arguments")
        calls = [c for c in result.tool_calls if (c.get("function") or {}).get("name") == tool.name]
        if not calls:
            names = [(c.get("function") or {}).get("name") for c in result.tool_calls]
            raise StepError(f"step {index}: the model did not call tool '{tool.name}' (called {names or 'none'})")
        try:
            arguments = json.loads(calls[0]["function"].get("arguments") or "{}")
            tool.check_arguments(arguments)
        except (ValueError, ToolError) as exc:
            raise StepError(f"step {index}: the model's arguments for '{tool.name}' are refused: {exc}") from None
        output = {"tool": tool.name, "arguments": arguments, "usage": answer.usage, "messages": []}
        task.strategy = _with_arguments(task.strategy, index, arguments)
        next_steps = [step_spec(task, "step", index, tools)]

        def change(t: AgentTask) -> None:
            t.strategy = _with_arguments(t.strategy, index, arguments)

        return self._continue(ctx, task, output, next_steps, change)

    def _op_step(self, ctx: StepContext, task: AgentTask, index: int, tools: dict[str, Tool]) -> Any:
        step = planned(task, index) or {}
        if step.get("tool"):
            tool = tools[step["tool"]]
            arguments = step.get("arguments") or {}
            try:
                tool.check_arguments(arguments)
            except ToolError as exc:
                raise StepError(str(exc), permanent=True) from None
            result = self._tool_call(ctx, task, tool, arguments)
            text = json.dumps(result, default=str)[: orchestrator.RESULT_CHARS]
            messages = [
                {"role": "assistant", "content": f"Step {index}: {step['description']} (tool {tool.name})"},
                {"role": "user", "content": f"Result of tool {tool.name}: {text}"},
            ]
            output: dict[str, Any] = {"tool": tool.name, "result": result, "messages": messages, "usage": {}}
        else:
            prompt = [*(task.context or []), {"role": "user", "content": f"Step {index}: {step.get('description')}"}]
            try:
                result = llm.complete(
                    tenant_id=task.tenant_id, messages=prompt, max_tokens=conf.task_max_tokens, **_kw(task, ctx)
                )
            except llm.BudgetWait as exc:
                raise StepDeferred(exc.seconds, exc.message) from None
            answer = orchestrator.Answer(None, [result])
            self._record(ctx, answer, "reasoning")
            messages = [
                {"role": "user", "content": f"Step {index}: {step.get('description')}"},
                {"role": "assistant", "content": result.content},
            ]
            output = {"content": result.content, "messages": messages, "usage": answer.usage}
        next_steps = [step_spec(task, "evaluate", index, tools)]

        def change(t: AgentTask) -> None:
            t.current_step = max(t.current_step, index)
            t.context = [*(t.context or []), *messages]

        return self._continue(ctx, task, output, next_steps, change)

    def _tool_call(self, ctx: StepContext, task: AgentTask, tool: Tool, arguments: dict[str, Any]) -> Any:
        """Call ``tool`` with the idempotency key ``<task>:<step>``: a child run (the step waits
        for it without a worker: StepDeferred, woken by the child's finish) or an http call."""
        key = f"{task.pk}:{ctx.step_id}"
        if tool.kind == "endpoint":
            from agents.registry import get_handler

            from .models import AgentEndpoint

            endpoint = AgentEndpoint.objects.get(pk=tool.ref, tenant_id=task.tenant_id)
            self.trace(ctx, "decision", f"Called tool: {tool.name}", {"tool": tool.name, "idempotency_key": key})
            sub = StepContext(
                run_id=ctx.run_id, step_id=ctx.step_id, step_pk=ctx.step_pk, attempt=ctx.attempt,
                params={
                    "call": endpoint.call, "method": endpoint.method, "json": arguments,
                    "headers": {"Idempotency-Key": key}, "timeout": endpoint.timeout,
                },
                timeout=ctx.remaining(), idempotency_key=key, tenant_id=ctx.tenant_id,
                correlation_id=ctx.correlation_id, trace=ctx.trace, deadline=ctx.deadline,
            )  # fmt: skip
            answer = get_handler("http").run(sub)
            return {"kind": "endpoint", "status": answer.get("status"), "body": answer.get("body")}
        from runs import engine
        from runs.choices import RUN_TERMINAL, RunStatus, TriggerKind
        from templates_app.errors import WorkflowError
        from templates_app.models import WorkflowTemplate

        template = WorkflowTemplate.objects.get(pk=tool.ref, tenant_id=task.tenant_id)
        try:
            child = engine.start_run(
                template.spec, arguments, template=template, trigger=TriggerKind.API, tenant_id=task.tenant_id,
                correlation_id=str(task.pk), idempotency_key=key,
                metadata={"parent_step": ctx.step_pk, "agent_task": str(task.pk)},
            )  # fmt: skip
        except WorkflowError as exc:
            raise StepError(f"tool '{tool.name}': {exc}", permanent=True) from None
        if child.status not in RUN_TERMINAL:
            self.trace(
                ctx, "decision", f"Called tool: {tool.name} (child run {child.pk})", {"child_run": str(child.pk)}
            )
            raise StepDeferred(conf.task_child_recheck, f"waiting for child run {child.pk} of tool '{tool.name}'")
        if child.status != RunStatus.SUCCEEDED:
            raise StepError(
                f"tool '{tool.name}': child run {child.pk} {child.status}: {child.error}"[:1000], permanent=True
            )
        return {"kind": "template", "child_run": str(child.pk), "outputs": child.outputs}

    def _op_evaluate(self, ctx: StepContext, task: AgentTask, index: int, tools: dict[str, Tool]) -> Any:
        remaining = ((task.strategy or {}).get("steps") or [])[index:]
        answer = self._call(
            ctx, orchestrator.evaluate_progress, "evaluate_progress", task.tenant_id, task.goal,
            list(task.context or []), remaining, **_kw(task, ctx),
        )  # fmt: skip
        verdict = answer.value
        finish = verdict["done"] or verdict["next"] == "finish" or (verdict["next"] == "continue" and not remaining)
        output = {"evaluation": verdict, "messages": [], "usage": answer.usage}
        self.trace(
            ctx,
            "decision",
            f"evaluate_progress after step {index}: {verdict['next']} ({verdict['progress']}%)",
            verdict,
        )
        if finish:
            next_steps: list[dict[str, Any]] = []
        elif index >= task.max_steps:
            raise StepError(
                f"task {task.pk}: max_steps ({task.max_steps}) reached before the goal was done", permanent=True
            )
        elif verdict["next"] == "replan":
            next_steps = [step_spec(task, "replan", index, tools)]
        elif orchestrator.estimate_tokens(task.context) > task.context_window_limit:
            next_steps = [step_spec(task, "summarize", index, tools)]
        else:
            next_steps = self._next(task, index + 1, tools)
        upcoming = planned(task, index + 1) if next_steps and next_steps[0]["id"].startswith(("args", "step")) else None
        expensive = bool(upcoming and upcoming.get("tool") and tools[upcoming["tool"]].expensive)
        last_content = _last_answer(task.context)

        def change(t: AgentTask) -> None:
            t.progress = max(t.progress, 100 if finish else min(99, int(verdict["progress"])))
            if index % t.checkpoint_interval == 0:
                _checkpoint(t, index, f"every {t.checkpoint_interval} steps")
            if expensive:
                _checkpoint(t, index, f"before expensive step {index + 1} ({upcoming['tool']})")
            if finish:
                t.status, t.finished_at = TaskStatus.COMPLETED, timezone.now()
                t.result = {"answer": last_content, "reason": verdict["reason"]}

        return self._continue(ctx, task, output, next_steps, change)

    def _op_replan(self, ctx: StepContext, task: AgentTask, index: int, tools: dict[str, Tool]) -> Any:
        done = ((task.strategy or {}).get("steps") or [])[:index]
        room = max(1, task.max_steps - index)
        answer = self._call(
            ctx, orchestrator.decompose_goal, "decompose_goal", task.tenant_id, task.goal, tools,
            max_steps=room, done=done, **_kw(task, ctx),
        )  # fmt: skip
        new_steps = answer.value["steps"]
        for offset, step in enumerate(new_steps, start=index + 1):
            step["id"] = f"r{index}-{offset}"  # unique across replans
        strategy = {"steps": [*done, *new_steps], "estimated_duration_s": answer.value["estimated_duration_s"]}
        output = {"strategy": strategy, "replanned_after": index, "messages": [], "usage": answer.usage}
        self.trace(
            ctx, "decision", f"replanned after step {index}: {len(new_steps)} steps remain", {"steps": new_steps}
        )
        task.strategy = strategy
        next_steps = self._next(task, index + 1, tools)

        def change(t: AgentTask) -> None:
            t.strategy, t.total_steps = strategy, len(strategy["steps"])

        return self._continue(ctx, task, output, next_steps, change)

    def _op_summarize(self, ctx: StepContext, task: AgentTask, index: int, tools: dict[str, Tool]) -> Any:
        before = list(task.context or [])
        answer = self._call(
            ctx, orchestrator.summarize_context, "summarize_context", task.tenant_id, before, **_kw(task, ctx)
        )
        summary = answer.value["summary"]
        context = [{"role": "system", "content": f"Summary of the work so far: {summary}"}, *before[-2 * KEEP_STEPS :]]
        counts = {
            "tokens_before": orchestrator.estimate_tokens(before),
            "tokens_after": orchestrator.estimate_tokens(context),
        }
        self.trace(
            ctx, "decision",
            f"context summarized: {counts['tokens_before']} -> {counts['tokens_after']} tokens", counts,
        )  # fmt: skip
        output = {"summary": summary, **counts, "context": context, "messages": [], "usage": answer.usage}
        next_steps = self._next(task, index + 1, tools)

        def change(t: AgentTask) -> None:
            t.summary, t.context = summary, context

        return self._continue(ctx, task, output, next_steps, change)


def _with_arguments(strategy: dict[str, Any], index: int, arguments: dict[str, Any]) -> dict[str, Any]:
    steps = [dict(s) for s in (strategy or {}).get("steps") or []]
    steps[index - 1]["arguments"] = arguments
    return {**(strategy or {}), "steps": steps}


def _last_answer(context: list[dict[str, Any]] | None) -> str:
    for message in reversed(context or []):
        if message.get("role") in ("assistant", "user") and message.get("content"):
            return str(message["content"])[:4000]
    return ""


def _checkpoint(task: AgentTask, index: int, reason: str) -> None:
    """Append a checkpoint (snapshot of context, summary, progress and the step cursor) to the
    locked task, and its ``checkpoint`` trace to the run."""
    from runs.models import Trace

    number = (task.checkpoints[-1]["number"] + 1) if task.checkpoints else 1
    snapshot = {
        "number": number,
        "after_step": index,
        "cursor": index + 1,
        "progress": task.progress,
        "summary": task.summary,
        "context": list(task.context or []),
        "reason": reason,
        "at": timezone.now().isoformat(),
    }
    task.checkpoints = [*(task.checkpoints or []), snapshot][-MAX_CHECKPOINTS:]
    if task.run_id:
        Trace.objects.create(
            run_id=task.run_id,
            kind="checkpoint",
            message=f"checkpoint {number} after step {index}: {reason}",
            data={"number": number, "after_step": index, "progress": task.progress},
        )


__all__ = ["AgentTaskHandler", "fingerprint", "step_input", "step_spec"]
