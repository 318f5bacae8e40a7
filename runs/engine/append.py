"""Steps appended while a run runs (Temporal-style): a handler's ``StepContinuation``.

An agent task (``tasks_app``) does not know its steps in advance: after each step the model
decides what comes next. The handler of such a step returns an
:class:`agents.registry.StepContinuation` (its output, the step specs to append, an
``on_success`` callback); :func:`continue_run` carries it out inside the completion's
transaction, which already holds the run's lock (runs/engine/state.py's lock order), so:

- the new rows exist before the cascade looks for unfinished steps: the run cannot finish in
  between;
- a completion that is refused (lease taken over) appends nothing, and a retried attempt whose
  predecessor crashed before committing appends exactly once (the commit is all or nothing);
- ``on_success`` (the task's own bookkeeping) commits with the step's success or not at all.

:func:`check` validates the specs before the transaction (a bad continuation is a failed
attempt with a clear message, never a rolled-back completion).
"""

from __future__ import annotations

import re
from typing import Any

from ..models import Step
from . import cascade, state

#: Step ids an appended step may have (the loader's pattern: letters, digits, ``_``, ``-``).
_STEP_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,99}$")
#: Steps one continuation may append at most.
MAX_APPENDED = 20
_KEYS = frozenset({"id", "type", "params", "depends_on", "retry", "timeout", "name"})


def check(run_id: Any, continuation: Any) -> None:
    """Raise ValueError (one line, naming the step) when the continuation's specs are unusable:
    unknown keys or step type, a bad or taken id, a dependency outside the appended steps."""
    from agents.registry import canonical_type

    specs = continuation.steps or []
    if not isinstance(specs, list) or len(specs) > MAX_APPENDED:
        raise ValueError(f"a continuation appends a list of at most {MAX_APPENDED} steps")
    ids: list[str] = []
    for index, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ValueError(f"appended step {index} must be a mapping")
        step_id = spec.get("id")
        if not isinstance(step_id, str) or not _STEP_ID.match(step_id):
            raise ValueError(f"appended step {index}: id must match {_STEP_ID.pattern}")
        unknown = set(spec) - _KEYS
        if unknown:
            raise ValueError(f"appended step '{step_id}': unknown key {sorted(unknown)[0]!r}")
        try:
            canonical_type(spec.get("type", ""), internal=True)
        except KeyError as exc:
            raise ValueError(f"appended step '{step_id}': {exc.args[0]}") from None
        for dep in spec.get("depends_on", []):
            if dep not in ids:
                raise ValueError(f"appended step '{step_id}': depends_on '{dep}' is not an earlier appended step")
        ids.append(step_id)
    if len(set(ids)) != len(ids):
        raise ValueError("appended steps repeat an id")
    taken = set(Step.objects.filter(run_id=run_id, step_id__in=ids).values_list("step_id", flat=True))
    if taken:
        raise ValueError(f"appended step '{sorted(taken)[0]}' already exists in the run")


def continue_run(step: Step, continuation: Any, batch: state.Batch) -> None:
    """Inside the completion's transaction (the run locked): insert the appended steps, call
    ``on_success``, decide the new roots (queued, sent after commit with the batch)."""
    specs = list(continuation.steps or [])
    rows = []
    for spec in specs:
        deps = list(spec.get("depends_on", []))
        rows.append(
            {
                "step_id": spec["id"],
                "type": spec["type"],
                "spec": {**spec, "depends_on": deps},
                "depends_on": deps,
                "dependents": [s["id"] for s in specs if spec["id"] in s.get("depends_on", [])],
                "pending_deps": len(deps),
                "max_attempts": max(1, int((spec.get("retry") or {}).get("max_attempts", 1))),
            }
        )
    new = state.append_steps(step.run_id, rows) if rows else []
    if continuation.on_success is not None:
        continuation.on_success()
    if new:
        batch.trace(
            step.run_id,
            "decision",
            f"step '{step.step_id}' appended {', '.join(s.step_id for s in new)}",
            step_pk=step.pk,
            attempt=step.attempts,
        )
        cascade.Cascade(step.run, batch).decide([s for s in new if s.pending_deps == 0])
