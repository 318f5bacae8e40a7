"""The flow-control gate: what ``runs.engine`` asks before a step runs and tells when it ends.

Engine hooks (each a single call in ``runs/engine.py``):

==================================== ============================================================
``admit_step(step, run, token, ...)`` in the claim transaction of ``execute_step``: None when the
                                      step may run (its concurrency slot is taken, its rate-limit
                                      token spent), else a :class:`Wait`: the engine puts the step
                                      back in ``retry_wait`` for ``Wait.seconds`` without spending
                                      an attempt. Raises :class:`GateError` for a permanent problem.
``release_step(step)``                in the transaction that ends an attempt: frees the slot.
``run_stopped(run_id)``               in ``_stop_run``: frees slots, leaves rate-limit lines.
``run_finished(tenant_id)``           when a run ends: admits waiting runs after commit.
``admit_run(run)``                    in ``start_run``: None, or why the run stays ``pending``.
``sweep(now)``                        in ``engine.sweep``: expired slots, waiting runs.
==================================== ============================================================

Keys (``rate_limit.key``, ``concurrency.key``) are expressions rendered per step with
``vars``, ``run`` (``id``, ``tenant_id``, ``user_id``, ``correlation_id``, ``template``,
``priority``), ``step`` (``id``, ``type``, ``host``: the host an http step calls) and, in a
for_each, ``item``/``index``. Default key: ``step:<tenant>:<template>:<step id>``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from . import concurrency, ratelimit

#: Longest key (characters) a rendered expression may give.
MAX_KEY = 255


@dataclass(frozen=True)
class Wait:
    """The step may not run yet: try again in ``seconds``; ``trace``: record why (first wait only)."""

    seconds: float
    reason: str
    trace: bool = True


class GateError(Exception):
    """A permanent problem with a step's flow-control declaration (one line)."""


def gated(spec: dict[str, Any]) -> bool:
    """True when a step spec declares a rate limit or a concurrency limit (else no gate, no query)."""
    return bool(spec.get("rate_limit") or spec.get("concurrency"))


def default_key(run: Any, step: Any) -> str:
    """``step:<tenant>:<template>:<step id>``: a map child shares its parent's key."""
    return f"step:{run.tenant_id}:{run.template_key}:{step.spec.get('id') or step.step_id}"


def _host(step: Any, run: Any) -> str:
    params = step.spec.get("params") or {}
    url = params.get("url")
    if url is None and params.get("call") is not None:
        url = getattr(settings, "ORCHESTRATOR_AGENTS_BASE_URL", "") or ""
    if not isinstance(url, str):
        return ""
    if "${" in url:
        from runs.engine import build_context
        from templates_app.expressions import render

        url = render(url, build_context(run, step.spec.get("refs", []), step))
    return (urlsplit(str(url)).hostname or "").lower()


def key_context(step: Any, run: Any, with_host: bool) -> dict[str, Any]:
    """The expression context of flow-control keys (see the module docstring)."""
    ctx: dict[str, Any] = {
        "vars": dict(run.inputs or {}),
        "run": {
            "id": str(run.pk),
            "tenant_id": run.tenant_id,
            "user_id": run.user_id,
            "correlation_id": run.correlation_id,
            "template": run.template_key,
            "priority": run.priority,
        },
        "step": {"id": step.spec.get("id") or step.step_id, "type": step.type, "host": ""},
    }
    if with_host:
        ctx["step"]["host"] = _host(step, run)
    if step.parent_id is not None:
        ctx["item"], ctx["index"] = step.item, step.map_index
        alias = step.spec.get("as") or "item"
        if alias != "item":
            ctx["vars"][alias] = step.item
    return ctx


def render_key(source: str | None, step: Any, run: Any, what: str) -> str:
    """The key of a declaration (``what``: "rate_limit" or "concurrency"), rendered. Raises GateError."""
    if not source:
        return default_key(run, step)
    if "${" not in source:
        return source
    from templates_app.errors import ExpressionError
    from templates_app.expressions import render

    try:
        value = render(source, key_context(step, run, with_host="host" in source))
    except ExpressionError as exc:
        raise GateError(f"{what}.key: {exc}") from None
    if isinstance(value, (dict, list)) or value is None or value == "":
        raise GateError(f"{what}.key: {source!r} gave {value!r}, not a key")
    key = str(value)
    if len(key) > MAX_KEY:
        raise GateError(f"{what}.key: longer than {MAX_KEY} characters")
    return key


def admit_step(step: Any, run: Any, token: Any, lease_expires_at: datetime, now: datetime) -> Wait | None:
    """Inside the claim transaction: None when ``step`` may run now, else how long to wait.

    Order: the concurrency slot is checked first (a full key costs no token), then the rate-limit
    token is taken (or a place in the bucket's line), then the slot is held until the lease ends.

    Raises:
        GateError: a key does not render, or names a limit that nothing configures.
    """
    spec = step.spec
    slot_key = None
    declared = spec.get("concurrency")
    if declared:
        slot_key = render_key(declared.get("key"), step, run, "concurrency")
        limit = concurrency.limit_for(slot_key, declared.get("limit"))
        if limit is None:
            raise GateError(f"concurrency key {slot_key!r} has no limit: declare `limit` or set one in the admin")
        full = concurrency.check_slot(slot_key, limit, step, run.priority, now)
        if full is not None:
            return Wait(
                seconds=full.seconds,
                reason=f"concurrency {slot_key!r} is full ({full.held} of {full.limit} running)",
                trace=full.first,
            )
    bucket_decl = spec.get("rate_limit")
    if bucket_decl:
        key = render_key(bucket_decl.get("key"), step, run, "rate_limit")
        bucket = ratelimit.Bucket(
            key=key, capacity=bucket_decl.get("capacity"), refill_rate=bucket_decl.get("refill_rate")
        )
        try:
            wait, joined = ratelimit.acquire_for_step(step.pk, bucket, now)
        except ratelimit.RateLimitNotConfigured as exc:
            raise GateError(str(exc)) from None
        if wait > 0:
            return Wait(seconds=wait, reason=f"rate limit {key!r}: its token comes in {wait:.3f} s", trace=joined)
    if slot_key is not None:
        concurrency.take_slot(slot_key, step, token, lease_expires_at, now)
    return None


def wake_on_commit(woken: list[tuple[int, int]]) -> None:
    """After commit, make the ``(step pk, priority)`` waiters due and send them (``engine.wake_steps``)."""
    if not woken:
        return
    by_priority: dict[int, list[int]] = defaultdict(list)
    for step_pk, priority in woken:
        by_priority[priority].append(step_pk)

    def wake() -> None:
        from runs import engine

        for priority, pks in sorted(by_priority.items()):
            engine.wake_steps(pks, priority=priority)

    transaction.on_commit(wake)


def release_step(step: Any) -> None:
    """In the transaction ending an attempt of ``step``: free its slot, wake a waiter after commit."""
    if step.spec.get("concurrency"):
        wake_on_commit(concurrency.release_slot(step.pk))


def run_stopped(run_id: Any) -> None:
    """In the transaction stopping a run: free its slots, leave the rate-limit lines, unqueue it."""
    from .models import QueuedRun

    wake_on_commit(concurrency.release_run(run_id))
    ratelimit.drop_reservations({"step__run_id": run_id})
    QueuedRun.objects.filter(run_id=run_id).delete()
    run_finished(None)


def run_finished(tenant_id: str | None) -> None:
    """A run of ``tenant_id`` (None: unknown) ended: after commit, admit runs waiting for its slot."""
    from .models import QueuedRun

    def admit() -> None:
        waiting = QueuedRun.objects.all() if tenant_id is None else QueuedRun.objects.filter(tenant_id=tenant_id)
        if waiting.exists():
            concurrency.promote(tenant_id)

    transaction.on_commit(admit)


def admit_run(run: Any) -> str | None:
    """In ``start_run``'s transaction: None when the run may start, else why it waits (queued)."""
    reason = concurrency.admit_run(run)
    if reason is not None:
        tenant = run.tenant_id
        transaction.on_commit(lambda: concurrency.promote(tenant))
    return reason


def sweep(now: datetime | None = None) -> dict[str, int]:
    """Sweeper pass: free expired slots (waking waiters), admit waiting runs. Returns counts."""
    from .models import QueuedRun

    now = now or timezone.now()
    with transaction.atomic():
        freed, woken = concurrency.expire_slots(now)
        wake_on_commit(woken)
    admitted = concurrency.promote(None) if QueuedRun.objects.exists() else 0
    return {"expired_slots": freed, "admitted_runs": admitted}
