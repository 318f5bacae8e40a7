"""The flow-control gate: what the engine asks before a step runs and tells when it ends.

The gate only decides; it never calls back into the engine. Its answers are decisions the
engine carries out: "wait this long", "wake these waiting steps" (``[(step pk, priority)]``),
"these runs may start". Engine hooks:

==================================== ============================================================
``admit_step(step, run, token, ...)`` in the claim transaction of ``execute_step``: None when the
                                      step may run (its concurrency slot is taken, its rate-limit
                                      token spent), else a :class:`Wait`: the engine puts the step
                                      back in ``retry_wait`` for ``Wait.seconds`` without spending
                                      an attempt. Raises :class:`GateError` for a permanent problem.
``release_step(step)``                in the transaction that ends an attempt: frees the slot;
                                      returns the waiters to wake.
``run_stopped(run_id)``               when a run is stopped: frees slots, leaves rate-limit lines;
                                      returns the waiters to wake.
``runs_waiting(tenant_id)``           when a run ends: whether runs wait for a run slot.
``admit_run(run)``                    in ``start_run``: None, or why the run stays ``pending``.
``run_limits_apply(tenant_id, spec)`` in ``start_runs``: whether admission has anything to do.
``promote(tenant_id, activate)``      admits waiting runs that fit, through ``activate``.
``expire_slots(now)``                 in the sweeper: expired slots; returns waiters to wake.
==================================== ============================================================

Keys (``rate_limit.key``, ``concurrency.key``) are expressions rendered per step with
``vars``, ``run`` (``id``, ``tenant_id``, ``user_id``, ``correlation_id``, ``template``,
``priority``), ``step`` (``id``, ``type``, ``host``: the host an http step calls) and, in a
for_each, ``item``/``index``. Default key: ``step:<template>:<step id>``.

Keys are scoped to the tenant that declares them (:func:`scoped_key`): ``acme/<key>``. A
workflow cannot name, create or reset another tenant's bucket or slot, nor the run limits
``tenant:<slug>`` and ``template:<tenant>:<key>``. Deployment-wide limits are keys starting with
``global:``, created by an admin only: a workflow may use one (it is not scoped) but never
creates or changes it, its declared numbers are ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from orchestrator_site.conf import conf

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


#: Prefix of the deployment-wide keys an admin creates; a workflow may use them, not make them.
GLOBAL_PREFIX = "global:"


def gated(spec: dict[str, Any]) -> bool:
    """True when a step spec declares a rate limit or a concurrency limit (else no gate, no query).

    A declaration counts when present and not null: the same test as the claim's SQL
    (runs/engine/sql.py ``claim_and_begin``). A map step's own claim (a large ``for_each``
    expanded by a worker, runs/engine/worker.py) is never gated: its declarations are for its
    children, whose specs carry them without the ``for_each``.
    """
    if spec.get("for_each") is not None:
        return False
    return spec.get("rate_limit") is not None or spec.get("concurrency") is not None


def scoped_key(tenant_id: str, key: str) -> str:
    """The stored key of a workflow's ``key`` in ``tenant_id``: ``<tenant>/<key>``, except the
    admin's deployment-wide ``global:...`` keys, which are shared."""
    return key if key.startswith(GLOBAL_PREFIX) else f"{tenant_id}/{key}"


def shown_key(tenant_id: str, key: str) -> str:
    """A stored key as its tenant declared it (messages, traces): without the tenant's prefix."""
    return key.removeprefix(f"{tenant_id}/")


def default_key(run: Any, step: Any) -> str:
    """``step:<template>:<step id>`` (scoped to the tenant later): a map child shares its parent's key."""
    return f"step:{run.template_key}:{step.spec.get('id') or step.step_id}"


def _host(step: Any, run: Any) -> str:
    params = step.spec.get("params") or {}
    url = params.get("url")
    if url is None and params.get("call") is not None:
        url = conf.agents_base_url
    if not isinstance(url, str):
        return ""
    if "${" in url:
        from templates_app.expressions import render

        from ..context import build_context

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
    """The stored key of a declaration (``what``: "rate_limit" or "concurrency"): rendered, then
    scoped to the run's tenant (:func:`scoped_key`). Raises GateError."""
    return scoped_key(run.tenant_id, _render_key(source, step, run, what))


def _render_key(source: str | None, step: Any, run: Any, what: str) -> str:
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
        shared = slot_key.startswith(GLOBAL_PREFIX)
        limit = concurrency.limit_for(slot_key, None if shared else declared.get("limit"))
        if limit is None:
            raise GateError(
                f"concurrency key {shown_key(run.tenant_id, slot_key)!r} has no limit: "
                "declare `limit` or set one in the admin"
            )
        full = concurrency.check_slot(slot_key, limit, step, run.priority, now)
        if full is not None:
            shown = shown_key(run.tenant_id, slot_key)
            return Wait(
                seconds=full.seconds,
                reason=f"concurrency {shown!r} is full ({full.held} of {full.limit} running)",
                trace=full.first,
            )
    bucket_decl = spec.get("rate_limit")
    if bucket_decl:
        key = render_key(bucket_decl.get("key"), step, run, "rate_limit")
        if key.startswith(GLOBAL_PREFIX):  # the admin's numbers only
            bucket = ratelimit.Bucket(key=key)
        else:
            bucket = ratelimit.Bucket(
                key=key, capacity=bucket_decl.get("capacity"), refill_rate=bucket_decl.get("refill_rate")
            )
        try:
            wait, joined = ratelimit.acquire_for_step(step.pk, bucket, now)
        except ratelimit.RateLimitNotConfigured as exc:
            raise GateError(exc.describe(shown_key(run.tenant_id, key))) from None
        if wait > 0:
            shown = shown_key(run.tenant_id, key)
            return Wait(seconds=wait, reason=f"rate limit {shown!r}: its token comes in {wait:.3f} s", trace=joined)
    if slot_key is not None:
        concurrency.take_slot(slot_key, step, token, lease_expires_at, now)
    return None


def release_step(step: Any) -> list[tuple[int, int]]:
    """In the transaction ending an attempt of ``step``: free its slot. Returns the waiters to wake."""
    if step.spec.get("concurrency"):
        return concurrency.release_slot(step.pk)
    return []


def run_stopped(run_id: Any) -> list[tuple[int, int]]:
    """In the transaction stopping a run: free its slots, leave the rate-limit lines, unqueue it.

    Returns the waiters (of other runs) to wake after commit.
    """
    from agents.models import QueuedRun

    woken = concurrency.release_run(run_id)
    ratelimit.drop_reservations({"step__run_id": run_id})
    QueuedRun.objects.filter(run_id=run_id).delete()
    return woken


def runs_waiting(tenant_id: str | None) -> bool:
    """True when runs of ``tenant_id`` (None: any tenant) wait for a run slot."""
    from agents.models import QueuedRun

    from .. import sql

    return sql.exists(QueuedRun, {} if tenant_id is None else {"tenant_id": tenant_id})


def run_limits_apply(tenant_id: str, spec: dict[str, Any]) -> bool:
    """Whether a concurrent-run limit (template's, tenant's, or the spec's ``max_active_runs``)
    applies to runs of ``spec`` in ``tenant_id``: when none does, :func:`admit_run` admits every
    such run without a lock or a count (the batch path skips it)."""
    return bool(concurrency.run_limits(tenant_id, spec["key"], spec.get("max_active_runs")))


def admit_run(run: Any) -> str | None:
    """In ``start_run``'s transaction: None when the run may start, else why it waits (queued).

    A run that waits is admitted by :func:`promote` (the caller asks for it after commit).
    """
    return concurrency.admit_run(run)


def promote(tenant_id: str | None, activate: Callable[[Any], bool]) -> int:
    """Admit waiting runs whose limits have room, most urgent first, each through ``activate``
    (the engine's "start this pending run", called under the limits' locks). Returns how many."""
    return concurrency.promote(tenant_id, activate)


def expire_slots(now: datetime) -> tuple[int, list[tuple[int, int]]]:
    """Sweeper: free slots whose lease expired. Returns ``(freed, waiters to wake)``."""
    return concurrency.expire_slots(now)


def limit_changed(key: str) -> tuple[str | None, list[tuple[int, int]]]:
    """An operator changed the limit of ``key``: ``(tenant whose waiting runs to admit or None,
    waiters to wake)``. Call inside a transaction; wake after commit."""
    return concurrency.limit_changed(key)
