"""Dry run: the real engine runs a workflow with every side effect stubbed, then everything is rolled back.

How (in the caller's process, no worker, no broker):

1. ``agents.registry.dry_run`` is set to :func:`stub_for`, so ``get_handler`` hands the engine a
   stub for every step type with a side effect (http, llm, exec, python, sleep, and any type
   registered later); ``noop`` runs for real, ``condition``, ``parallel`` and ``for_each`` are the
   engine's own and really evaluate. ``templates_app.expressions.open_placeholders`` lets the
   parts of a stub's output whose shape nobody declared answer any key.
2. In one ``transaction.atomic()`` block: ``engine.start_run`` then ``engine.execute_step`` on
   each queued step of the run until the run is terminal (a step in a for_each or parallel
   fan-out is one more queued row). Then an exception rolls the block back: the run, its steps,
   attempts and traces disappear, and the ``transaction.on_commit`` sends the engine registered
   (step messages, the deadline timer) are discarded with it, so nothing reaches the broker.

Stub outputs keep each handler's documented envelope: http ``{"status": 200, "body", "headers"}``,
exec ``{"exit_code": 0, "stdout", "stderr": ""}``, llm ``{"content", "model", "provider", "usage",
"finish_reason"}`` plus ``json`` shaped by the step's ``schema`` (:func:`example_of`), python the
callable's ``dry_run_output`` attribute when it declares one, after binding the step's arguments
to the callable's signature without calling it (``agents.handlers.python.check_call``: a missing
required argument or an unknown keyword fails here). So ``${steps.fetch.output.status}``
passes, ``${steps.fetch.output.bdy}`` fails, ``${steps.fetch.output.body.anything}`` passes (the
body is unknown), and a reference to a step a condition skipped fails as it would in production.

What a dry run cannot know, it assumes: a ``for_each`` over an undeclared value maps over one
placeholder item; an ordering comparison with a placeholder is false (so a condition on an
unknown value takes its ``on_failure`` branch) and arithmetic on one gives the placeholder back.
Dry-run attempts are counted in the ``orchestrator_tasks_*`` metrics (the engine records them
before the rollback).
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction

from agents import registry
from agents.handlers.python import check_call
from agents.registry import StepContext, StepHandler

from .. import expressions
from ..expressions import placeholder

#: Step executions one dry run may make at most (a for_each over a declared list of 10,000 items
#: would otherwise run 10,000 stubs).
MAX_EXECUTIONS = 2000
#: Types that run for real in a dry run: no side effect.
REAL_TYPES = frozenset({"noop"})


@dataclass
class DryRunReport:
    """``status``: the run's final status (``succeeded``, ``failed``...) or ``error`` when it could
    not start; ``steps``: ``[{"id", "type", "status", "error"}]`` in creation order (fan-out rows
    included, ``inspect[0]``); ``errors``: one line per failed step (``step 'b': ...``)."""

    status: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "steps": self.steps}


class _Rollback(Exception):
    """Raised at the end of the atomic block to undo everything the dry run wrote."""


def example_of(schema: Any, where: str, depth: int = 0) -> Any:
    """A value shaped by JSON Schema ``schema`` (first enum/const, one array item, every property).

    Parts the schema leaves open are placeholders (``{"$placeholder": where}``).
    """
    if not isinstance(schema, dict) or depth > 20:
        return placeholder(where)
    if "const" in schema:
        return copy.deepcopy(schema["const"])
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return copy.deepcopy(schema["enum"][0])
    for combinator in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(combinator), list) and schema[combinator]:
            return example_of(schema[combinator][0], where, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object" or (kind is None and isinstance(schema.get("properties"), dict)):
        props = schema.get("properties") or {}
        if not props:
            return placeholder(where)
        return {name: example_of(sub, f"{where}.{name}", depth + 1) for name, sub in props.items()}
    if kind == "array":
        return [example_of(schema.get("items"), f"{where}[0]", depth + 1)]
    return {"string": "dry-run", "integer": 1, "number": 1.0, "boolean": True, "null": None}.get(
        kind, placeholder(where)
    )


class StubHandler(StepHandler):
    """A side-effect-free stand-in for a real handler: validates like it, returns a placeholder output."""

    enforces_timeout = True  # returns at once: runs in the engine's thread (and its context)

    def __init__(self, real: StepHandler) -> None:
        self.real = real
        self.type_name = real.type_name

    def validate_params(self, params: dict[str, Any]) -> None:
        self.real.validate_params(params)

    def run(self, ctx: StepContext) -> Any:
        where = f"steps.{ctx.step_id}.output"
        p = ctx.params
        kind = self.type_name
        if kind == "http":
            return {"status": 200, "body": placeholder(f"{where}.body"), "headers": {}}
        if kind == "exec":
            return {"exit_code": 0, "stdout": placeholder(f"{where}.stdout"), "stderr": ""}
        if kind == "llm":
            out: dict[str, Any] = {
                "content": "(dry run)",
                "model": "dry-run",
                "provider": "dry-run",
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "estimated": True},
                "finish_reason": "stop",
            }
            schema = p.get("schema")
            fmt = p.get("response_format")
            if schema is None and isinstance(fmt, dict) and isinstance(fmt.get("json_schema"), dict):
                schema = fmt["json_schema"].get("schema")
            if schema is not None:
                out["json"] = example_of(schema, f"{where}.json")
            elif fmt in ("json", "json_object") or (isinstance(fmt, dict) and fmt.get("type") == "json_object"):
                out["json"] = placeholder(f"{where}.json")
            if p.get("tools"):
                out["tool_calls"] = []
            return out
        if kind == "python":
            # a call that cannot bind (a required argument missing, an unknown keyword) would fail
            # the same way in production
            check_call(p)
            declared = _declared_output(p.get("callable"))
            return copy.deepcopy(declared) if declared is not None else placeholder(where)
        if kind == "sleep":
            seconds = p.get("seconds", 0)
            return {"slept": seconds if isinstance(seconds, (int, float)) else 0}
        return placeholder(where)


def _declared_output(path: Any) -> Any:
    """The ``dry_run_output`` attribute of an allow-listed callable (a JSON value), or None."""
    from agents.handlers.python import allowed_callables

    if not isinstance(path, str) or path not in allowed_callables() or "." not in path:
        return None
    module_name, _, name = path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return None
    return getattr(target, "dry_run_output", None)


def stub_for(type_name: str) -> StepHandler | None:
    """``agents.registry.dry_run`` hook: the stub of a type, None for the types that run for real."""
    if type_name in REAL_TYPES:
        return None
    try:
        registry.dry_run.set(None)  # the real handler, not our own stub (this context only)
        real = registry.get_handler(type_name)
    finally:
        registry.dry_run.set(stub_for)
    return StubHandler(real)


def placeholder_inputs(spec: dict[str, Any]) -> dict[str, Any]:
    """Values for the required variables without a default, shaped by their type."""
    values: dict[str, Any] = {}
    for name, decl in (spec.get("variables") or {}).items():
        if "expr" in decl or "default" in decl or not decl.get("required"):
            continue
        values[name] = {
            "string": "dry-run",
            "integer": 1,
            "number": 1.0,
            "boolean": True,
            "object": placeholder(f"vars.{name}"),
            "array": [placeholder(f"vars.{name}[0]")],
        }.get(decl.get("type", "any"), "dry-run")
    return values


def _dry_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy without what would make the dry run wait: one attempt per step, no flow control, no deadline."""
    dry = copy.deepcopy(spec)
    dry["timeout"] = None
    dry.pop("max_active_runs", None)
    for step in dry.get("steps", []):
        step.setdefault("retry", {})["max_attempts"] = 1
        step["for_each"] = _listed(step.get("for_each"))
        step.pop("rate_limit", None)
        step.pop("concurrency", None)
        for child in (step.get("params") or {}).get("tasks", []) if step.get("type") == "parallel" else []:
            if isinstance(child, dict):
                child.setdefault("retry", {})["max_attempts"] = 1
    return dry


def _listed(for_each: Any) -> Any:
    """A ``for_each`` expression that maps over ONE placeholder item when its value is a placeholder.

    ``${steps.a.output.body.items}`` (an undeclared shape) would give a dict, not a list; the dry
    run maps over ``[that placeholder]`` instead, so the loop's body is still checked.
    """
    if not isinstance(for_each, str):
        return for_each
    found = expressions.find_expressions(for_each)
    if len(found) != 1 or for_each.strip() != f"${{{found[0]}}}":
        return for_each
    inner = f"({found[0]})"
    return f"${{[{inner}] if {inner} is mapping and '{expressions.PLACEHOLDER_KEY}' in {inner} else {inner}}}"


def dry_run(spec: dict[str, Any], tenant_id: str, inputs: dict[str, Any] | None = None) -> DryRunReport:
    """Run the loaded ``spec`` through the real engine with side effects stubbed; keep nothing.

    ``inputs``: variable values (default: :func:`placeholder_inputs`). Returns a
    :class:`DryRunReport`; never raises for a problem of the workflow (a bad input is status
    ``error`` with its message).
    """
    from runs import engine
    from runs.choices import RUN_TERMINAL, StepStatus
    from runs.models import Run, Step

    from ..errors import WorkflowError

    report = DryRunReport(status="error")
    stubs = registry.dry_run.set(stub_for)
    opened = expressions.open_placeholders.set(True)
    try:
        with transaction.atomic():
            try:
                run = engine.start_run(
                    _dry_spec(spec), placeholder_inputs(spec) if inputs is None else inputs, tenant_id=tenant_id
                )
            except WorkflowError as exc:
                report.errors = [str(exc)]
                raise _Rollback from None
            executions = 0
            while executions < MAX_EXECUTIONS:
                status = Run.objects.filter(pk=run.pk).values_list("status", flat=True).first()
                if status in RUN_TERMINAL:
                    break
                queued = list(
                    Step.objects.filter(run_id=run.pk, status=StepStatus.QUEUED)
                    .order_by("id")
                    .values_list("pk", flat=True)
                )
                if not queued:
                    break  # nothing runnable (a step waits for a retry or a gate): reported below
                for pk in queued[: MAX_EXECUTIONS - executions]:
                    engine.execute_step(pk, worker="dry-run")
                    executions += 1
            run = Run.objects.get(pk=run.pk)
            report.status = run.status if run.status in RUN_TERMINAL else f"stuck ({run.status})"
            if executions >= MAX_EXECUTIONS and run.status not in RUN_TERMINAL:
                report.status = "error"
                report.errors.append(f"dry run stopped after {MAX_EXECUTIONS} step executions")
            for step_id, kind, status, error in (
                Step.objects.filter(run_id=run.pk).order_by("id").values_list("step_id", "type", "status", "error")
            ):
                report.steps.append({"id": step_id, "type": kind, "status": status, "error": error or None})
                if status not in (StepStatus.SUCCEEDED, StepStatus.SKIPPED):
                    if error or status != StepStatus.CANCELLED:
                        report.errors.append(f"step {step_id!r}: {status}: {error or 'did not finish'}")
            raise _Rollback
    except _Rollback:
        pass
    finally:
        expressions.open_placeholders.reset(opened)
        registry.dry_run.reset(stubs)
    if report.status != "succeeded" and not report.errors:
        report.errors.append(f"the dry run ended {report.status}")
    return report
