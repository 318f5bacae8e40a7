"""The orchestrator's four functions (seed 003's TaskOrchestrator), each one LLM call through the
router (``agents.llm.complete``) with a named JSON Schema, validated with jsonschema there and
checked again here (everything a model answers is hostile: tools only from the granted list).

================== =====================================================================
json_schema name   answer
================== =====================================================================
should_orchestrate ``{"orchestrate": bool, "reason": str}`` (heuristics first)
decompose_goal     ``{"steps": [{"id", "description", "tool"?, "arguments"?}], "estimated_duration_s"}``
evaluate_progress  ``{"progress": 0-100, "done": bool, "next": "continue"|"replan"|"finish", "reason"}``
summarize_context  ``{"summary": str}``
================== =====================================================================

Errors: the router's (``agents.llm.LLMError`` and its kinds, ``BudgetWait``, ``BudgetExceeded``);
:class:`PlanError` when a decomposition still names unknown tools after the repair rounds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from agents import llm

from .tools import Tool, ToolError

#: Repair rounds of decompose_goal: an answer naming an unknown tool (or bad arguments) goes back
#: to the model with the problem, at most this many times.
REPAIR_ROUNDS = 2
#: Characters of one tool result kept in the context.
RESULT_CHARS = 4000

SHOULD_ORCHESTRATE = {
    "type": "object",
    "properties": {"orchestrate": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 500}},
    "required": ["orchestrate", "reason"],
    "additionalProperties": False,
}


def decompose_schema(max_steps: int, tool_names: list[str] | None = None) -> dict[str, Any]:
    """The decompose_goal schema: at most ``max_steps`` steps, ``tool`` one of ``tool_names`` (or
    null; None: any name), so schema-constrained decoding cannot even name another tool."""
    tool: dict[str, Any] = {"type": ["string", "null"], "maxLength": 64}
    if tool_names is not None:
        tool = {"enum": [*sorted(tool_names), None]} if tool_names else {"type": "null"}
    return {
        "type": "object",
        "properties": {
            "steps": {
                "type": "array",
                "minItems": 1,
                "maxItems": max_steps,
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "maxLength": 100},
                        "description": {"type": "string", "minLength": 1, "maxLength": 1000},
                        "tool": tool,
                        "arguments": {"type": ["object", "null"]},
                    },
                    "required": ["id", "description"],
                    "additionalProperties": False,
                },
            },
            "estimated_duration_s": {"type": "integer", "minimum": 0, "maximum": 604800},
        },
        "required": ["steps", "estimated_duration_s"],
        "additionalProperties": False,
    }


EVALUATE_PROGRESS = {
    "type": "object",
    "properties": {
        "progress": {"type": "integer", "minimum": 0, "maximum": 100},
        "done": {"type": "boolean"},
        "next": {"type": "string", "enum": ["continue", "replan", "finish"]},
        "reason": {"type": "string", "maxLength": 1000},
    },
    "required": ["progress", "done", "next", "reason"],
    "additionalProperties": False,
}

SUMMARIZE_CONTEXT = {
    "type": "object",
    "properties": {"summary": {"type": "string", "minLength": 1, "maxLength": 20000}},
    "required": ["summary"],
    "additionalProperties": False,
}


class PlanError(ValueError):
    """The model's plan stayed unusable after the repair rounds (one line)."""


@dataclass
class Answer:
    """What one orchestrator function returns: the validated value and the LLM results (one per
    call, repair rounds included) for usage and traces."""

    value: Any
    calls: list[Any] = field(default_factory=list)

    @property
    def usage(self) -> dict[str, int]:
        """Tokens of all the calls: ``{"prompt_tokens", "completion_tokens", "total_tokens", "llm_calls"}``."""
        total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "llm_calls": len(self.calls)}
        for call in self.calls:
            for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                total[key] += int(call.usage.get(key) or 0)
        return total


def estimate_tokens(messages: Any) -> int:
    """Tokens of ``messages``, estimated as 4 characters a token (the router's own estimate)."""
    return (len(json.dumps(messages, ensure_ascii=False, default=str)) + 3) // 4


def _ask(tenant_id: str, messages: list[dict[str, Any]], schema: dict[str, Any], name: str, **kw: Any) -> Any:
    from orchestrator_site.conf import conf

    return llm.complete(
        tenant_id=tenant_id,
        messages=messages,
        schema=schema,
        schema_name=name,
        max_tokens=int(kw.get("max_tokens") or conf.task_max_tokens),
        model=kw.get("model") or None,
        timeout=kw.get("timeout"),
        tag="planning",
    )


# --- should_orchestrate -------------------------------------------------------------------------

_LONG_WORK = re.compile(
    r"\b(all|every|each|entire|whole|migrate|analy[sz]e|report|batch|crawl|scan|hundreds?|thousands?)\b", re.I
)
_STEPS = re.compile(r"\b(then|after that|and then|finally|step \d|first\b.*\bthen)\b", re.I)


def heuristics(message: str, tools: list[str] | None = None) -> tuple[bool | None, str]:
    """Cheap signals first (seed 003: several tools, large data, long work). Returns (True/False,
    reason) when they are sure, (None, reason) when the model should decide."""
    text = message or ""
    named = [t for t in (tools or []) if t and t in text]
    if len(named) >= 2:
        return True, f"names {len(named)} tools ({', '.join(named[:5])})"
    if len(text) > 4000:
        return True, f"large input ({len(text)} characters)"
    signals = len(_LONG_WORK.findall(text)) + 2 * len(_STEPS.findall(text))
    if signals >= 3:
        return True, "several sequential or bulk operations"
    if len(text) < 200 and signals == 0:
        return False, "short request without multi-step signals"
    return None, "unsure"


def should_orchestrate(tenant_id: str, message: str, tools: list[str] | None = None, **kw: Any) -> Answer:
    """Whether ``message`` needs a long-running task: ``{"orchestrate": bool, "reason": str}``;
    one LLM call (schema ``should_orchestrate``) only when the heuristics are unsure."""
    sure, reason = heuristics(message, tools)
    if sure is not None:
        return Answer({"orchestrate": sure, "reason": f"heuristic: {reason}"})
    messages = [
        {
            "role": "system",
            "content": "Decide whether the user's request needs a long-running, multi-step task "
            "(several tool calls, large data, long work) or a single direct answer.",
        },
        {"role": "user", "content": json.dumps({"message": message[:8000], "tools": tools or []})},
    ]
    result = _ask(tenant_id, messages, SHOULD_ORCHESTRATE, "should_orchestrate", **kw)
    return Answer(dict(result.parsed), [result])


# --- decompose_goal -----------------------------------------------------------------------------


def _plan_messages(goal: str, tools: dict[str, Tool], done: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    listing = [{"name": t.name, "description": t.description[:500], "arguments": t.parameters} for t in tools.values()]
    system = (
        "Break the goal into concrete, ordered steps. A step either calls one of the tools (its name in "
        "`tool`, its `arguments` matching the tool's schema; omit `arguments` to let a later call pick them) "
        "or is reasoning by the model (no `tool`). Use only the tools listed. Answer with JSON only."
    )
    user: dict[str, Any] = {"goal": goal, "tools": listing}
    if done is not None:
        user["completed_steps"] = done
        user["instruction"] = "Plan only the REMAINING work."
    return [{"role": "system", "content": system}, {"role": "user", "content": json.dumps(user, default=str)}]


def check_plan(value: dict[str, Any], tools: dict[str, Tool]) -> list[dict[str, Any]]:
    """The plan's steps normalized (ids ``s1``.. when missing or repeated, ``tool``/``arguments``
    only when given). Raises ToolError for a tool not granted or arguments its schema refuses."""
    steps: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, raw in enumerate(value["steps"], start=1):
        step: dict[str, Any] = {"id": str(raw.get("id") or f"s{index}")[:100], "description": raw["description"]}
        if step["id"] in seen:
            step["id"] = f"s{index}"
        seen.add(step["id"])
        tool = raw.get("tool")
        if tool:
            if tool not in tools:
                known = ", ".join(sorted(tools)) or "none"
                raise ToolError(f"steps[{index - 1}].tool: '{tool}' is not a granted tool (granted: {known})")
            step["tool"] = tool
            if raw.get("arguments") is not None:
                tools[tool].check_arguments(raw["arguments"])
                step["arguments"] = raw["arguments"]
        steps.append(step)
    return steps


def decompose_goal(
    tenant_id: str,
    goal: str,
    tools: dict[str, Tool],
    *,
    max_steps: int,
    done: list[dict[str, Any]] | None = None,
    **kw: Any,
) -> Answer:
    """Plan ``goal`` with the granted ``tools`` (schema ``decompose_goal``); ``done``: the steps
    completed so far (a replan plans only the remaining work). Returns ``{"steps": [...],
    "estimated_duration_s": int}``. An unknown tool or refused arguments go back to the model
    (at most REPAIR_ROUNDS times), as does an answer the schema refuses; then PlanError."""
    messages = _plan_messages(goal, tools, done)
    schema = decompose_schema(max_steps, sorted(tools))
    calls = []
    for _round in range(REPAIR_ROUNDS + 1):
        try:
            result = _ask(tenant_id, messages, schema, "decompose_goal", **kw)
            calls.append(result)
            steps = check_plan(result.parsed, tools)
        except (ToolError, llm.LLMSchemaError) as exc:
            if isinstance(exc, llm.LLMSchemaError):
                if exc.result is None:
                    raise
                result = exc.result
                calls.append(result)
            problem = getattr(exc, "message", None) or str(exc)
            messages = [
                *messages,
                {"role": "assistant", "content": result.content},
                {"role": "user", "content": f"That plan is not valid: {problem}. Answer again with a corrected plan."},
            ]
            continue
        return Answer({"steps": steps, "estimated_duration_s": int(result.parsed["estimated_duration_s"])}, calls)
    raise PlanError(f"decompose_goal: the plan is still invalid after {REPAIR_ROUNDS} repair rounds: {problem}")


# --- evaluate_progress --------------------------------------------------------------------------


def evaluate_progress(
    tenant_id: str, goal: str, context: list[dict[str, Any]], remaining: list[dict[str, Any]], **kw: Any
) -> Answer:
    """After a step: how far the goal is (0-100), whether it is done, and whether to continue,
    replan the remaining steps or finish (schema ``evaluate_progress``)."""
    messages = [
        {
            "role": "system",
            "content": "You supervise a multi-step task. Given the goal, the work so far and the remaining "
            "planned steps, estimate progress in per cent and choose next: continue, replan or finish.",
        },
        *context,
        {"role": "user", "content": json.dumps({"goal": goal, "remaining_steps": remaining}, default=str)},
    ]
    result = _ask(tenant_id, messages, EVALUATE_PROGRESS, "evaluate_progress", **kw)
    return Answer(dict(result.parsed), [result])


# --- summarize_context --------------------------------------------------------------------------


def summarize_context(tenant_id: str, messages: list[dict[str, Any]], **kw: Any) -> Answer:
    """Compress ``messages`` into one summary (schema ``summarize_context``): ``{"summary": str}``."""
    prompt = [
        {
            "role": "system",
            "content": "Summarize the conversation so far for the agent continuing the task: the facts found, "
            "the results of tool calls and what is left. Be complete but short.",
        },
        {"role": "user", "content": json.dumps(messages, default=str)[:400_000]},
    ]
    result = _ask(tenant_id, prompt, SUMMARIZE_CONTEXT, "summarize_context", **kw)
    return Answer(dict(result.parsed), [result])
