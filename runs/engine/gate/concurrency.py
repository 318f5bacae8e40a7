"""Concurrency limits: concurrent steps per key, concurrent runs per template and per tenant.

Steps. A step declaring ``concurrency: {key, limit}`` holds a :class:`~agents.models.ConcurrencySlot`
of its key while it runs. The slot is tied to the step's lease: it is taken in the transaction
that claims the step (same ``lease_token``, ``expires_at`` = the lease's expiry) and deleted in
the transaction that records the attempt's end (completion, failure, cancellation, or the
sweeper's "lease expired"). A slot whose lease expired does not count even before anyone deletes
it, so a killed worker can never keep a slot longer than its lease. A step that finds the key
full goes back to ``retry_wait`` (no attempt spent) as a :class:`~agents.models.SlotWaiter`; a
release wakes the most urgent waiter (run priority, then age) at once, and every waiter also looks
again after ``ORCHESTRATOR_CONCURRENCY_POLL`` seconds or when the earliest holder's lease ends.

Runs. Limits on running runs: ``template:<tenant>:<key>`` (the workflow's ``max_active_runs`` or an
admin row) and ``tenant:<slug>`` (an admin row, else ``ORCHESTRATOR_MAX_CONCURRENT_RUNS``, seed
002's MAX_CONCURRENT_WORKFLOWS). A run over a limit is created ``pending`` with a
:class:`~agents.models.QueuedRun` row; it is admitted (``runs.engine.activate_run``) by priority
then age when a run of its template or tenant finishes, or by the sweeper. Running runs are
counted from the runs table itself, so nothing can leak.

Counting and taking happen under a PostgreSQL transaction-level advisory lock per key
(``pg_advisory_xact_lock``), released at commit; SQLite serializes writers anyway.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from agents.models import ConcurrencyLimit, ConcurrencySlot, ManagedBy, QueuedRun, SlotWaiter
from orchestrator_site.conf import conf

#: Shortest wait (seconds) before a waiting step looks again.
MIN_WAIT = 0.05


class ConcurrencyNotConfigured(Exception):
    """A step names a concurrency key without a limit, and the admin defines none."""


def lock(key: str) -> None:
    """Take the transaction-level advisory lock of ``key`` (PostgreSQL; a no-op elsewhere)."""
    if connection.vendor != "postgresql":
        return
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    number = int.from_bytes(digest, "big", signed=True)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [number])


def limit_for(key: str, declared: int | None) -> int | None:
    """The limit of ``key``: the admin's row, else the declared one (kept as a row for the admin).

    Returns None when neither exists (no limit).
    """
    row = ConcurrencyLimit.objects.filter(key=key).first()
    if row is not None:
        if row.managed_by == ManagedBy.WORKFLOW and declared is not None and row.limit != declared:
            ConcurrencyLimit.objects.filter(pk=row.pk, managed_by=ManagedBy.WORKFLOW).update(limit=declared)
            return declared
        return row.limit
    if declared is None:
        return None
    try:
        with transaction.atomic():
            ConcurrencyLimit.objects.create(key=key, limit=declared, managed_by=ManagedBy.WORKFLOW)
    except IntegrityError:
        pass  # created meanwhile by another process
    return declared


# --- steps ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotWait:
    """No slot: wait ``seconds``; ``first`` is True when the step just started waiting (trace it)."""

    seconds: float
    held: int
    limit: int
    first: bool


def check_slot(key: str, limit: int, step: Any, priority: int, now: datetime) -> SlotWait | None:
    """Inside the claim transaction: None when ``key`` has a free slot for ``step``, else a SlotWait.

    Takes the key's lock (held to commit), drops holders whose lease expired and any stale slot of
    this very step (an earlier lease of it), and registers the step as a waiter when full. Call
    :func:`take_slot` afterwards to hold the slot once every other gate passed.
    """
    lock(f"slot:{key}")
    ConcurrencySlot.objects.filter(step_id=step.pk).delete()
    ConcurrencySlot.objects.filter(key=key, expires_at__lte=now).delete()
    holders = list(ConcurrencySlot.objects.filter(key=key).values_list("expires_at", flat=True))
    if len(holders) < limit:
        return None
    created = False
    if not SlotWaiter.objects.filter(step_id=step.pk).update(key=key, priority=priority):
        SlotWaiter.objects.create(key=key, step_id=step.pk, priority=priority, since=now)
        created = True
    poll = conf.concurrency_poll
    wait = poll
    if holders:
        wait = min(poll, (min(holders) - now).total_seconds())
    return SlotWait(seconds=max(MIN_WAIT, wait), held=len(holders), limit=limit, first=created)


def take_slot(key: str, step: Any, token: Any, expires_at: datetime, now: datetime) -> None:
    """Hold a slot of ``key`` for ``step`` under lease ``token`` until ``expires_at`` (after :func:`check_slot`)."""
    SlotWaiter.objects.filter(step_id=step.pk).delete()
    ConcurrencySlot.objects.create(key=key, step_id=step.pk, lease_token=token, expires_at=expires_at, acquired_at=now)


def release_slot(step_pk: int) -> list[tuple[int, int]]:
    """Inside the transaction ending an attempt: free the step's slot, pick the waiter to wake.

    Returns ``[(step pk, priority)]`` of the waiters to wake after commit (at most one per freed
    slot), already removed from the waiting list.
    """
    slot = ConcurrencySlot.objects.filter(step_id=step_pk).only("key").first()
    if slot is None:
        return []
    lock(f"slot:{slot.key}")
    ConcurrencySlot.objects.filter(step_id=step_pk).delete()
    return _pick_waiters(slot.key, 1)


def _pick_waiters(key: str, count: int) -> list[tuple[int, int]]:
    if count <= 0:
        return []
    picked = list(
        SlotWaiter.objects.filter(key=key)
        .order_by("priority", "since")
        .values_list("pk", "step_id", "priority")[:count]
    )
    if picked:
        SlotWaiter.objects.filter(pk__in=[pk for pk, _s, _p in picked]).delete()
    return [(step_pk, priority) for _pk, step_pk, priority in picked]


def release_run(run_id: Any) -> list[tuple[int, int]]:
    """A run stopped (cancelled, timed out): free its steps' slots and forget its waiters.

    Returns the waiters (of other runs) to wake after commit.
    """
    keys = sorted(set(ConcurrencySlot.objects.filter(step__run_id=run_id).values_list("key", flat=True)))
    SlotWaiter.objects.filter(step__run_id=run_id).delete()
    woken: list[tuple[int, int]] = []
    for key in keys:
        lock(f"slot:{key}")
        freed, _ = ConcurrencySlot.objects.filter(key=key, step__run_id=run_id).delete()
        woken += _pick_waiters(key, freed)
    return woken


def expire_slots(now: datetime | None = None) -> tuple[int, list[tuple[int, int]]]:
    """Sweeper: delete slots whose lease expired, wake one waiter per freed slot; drop stale waiters.

    Returns ``(freed slots, waiters to wake)``; wake them after commit.
    """
    from ...choices import STEP_TERMINAL

    now = now or timezone.now()
    woken: list[tuple[int, int]] = []
    freed_total = 0
    keys = sorted(set(ConcurrencySlot.objects.filter(expires_at__lte=now).values_list("key", flat=True)[:1000]))
    for key in keys:
        lock(f"slot:{key}")
        freed, _ = ConcurrencySlot.objects.filter(key=key, expires_at__lte=now).delete()
        freed_total += freed
        woken += _pick_waiters(key, freed)
    # a waiter whose step finished meanwhile (cancelled, failed elsewhere) waits no more
    SlotWaiter.objects.filter(step__status__in=sorted(STEP_TERMINAL)).delete()
    return freed_total, woken


# --- runs -------------------------------------------------------------------------------------------


def template_key(tenant_id: str, key: str) -> str:
    """The concurrency key of a template's runs: ``template:<tenant>:<key>``."""
    return f"template:{tenant_id}:{key}"


def tenant_key(tenant_id: str) -> str:
    """The concurrency key of a tenant's runs: ``tenant:<slug>``."""
    return f"tenant:{tenant_id}"


def run_limits(tenant_id: str, key: str, declared: int | None) -> list[tuple[str, int]]:
    """``[(limit key, limit)]`` that apply to a run of template ``key`` in ``tenant_id`` (sorted by key)."""
    tkey, nkey = template_key(tenant_id, key), tenant_key(tenant_id)
    rows = {row.key: row.limit for row in ConcurrencyLimit.objects.filter(key__in=[tkey, nkey])}
    limits: dict[str, int] = {}
    if tkey in rows:
        limits[tkey] = rows[tkey]
    elif declared:
        limits[tkey] = declared
    if nkey in rows:
        limits[nkey] = rows[nkey]
    elif conf.max_concurrent_runs > 0:
        limits[nkey] = conf.max_concurrent_runs
    return sorted(limits.items())


def _running(limit_key: str, tenant_id: str, key: str, exclude: Any = None) -> int:
    from ...choices import RunStatus
    from ...models import Run

    qs = Run.objects.filter(tenant_id=tenant_id, status=RunStatus.RUNNING)
    if limit_key.startswith("template:"):
        qs = qs.filter(template_key=key)
    if exclude is not None:
        qs = qs.exclude(pk=exclude)
    return qs.order_by().count()


def _blocker(limits: list[tuple[str, int]], tenant_id: str, key: str, exclude: Any = None) -> str | None:
    for limit_key, limit in limits:
        running = _running(limit_key, tenant_id, key, exclude)
        if running >= limit:
            return f"{limit_key} has {running} of {limit} runs running"
    return None


def admit_run(run: Any) -> str | None:
    """Inside ``start_run``'s transaction: None when ``run`` may start, else why it must wait.

    A run that must wait gets a QueuedRun row (the caller leaves it ``pending``). A run also waits
    when others already wait for the same limits, so admission keeps priority order.
    """
    limits = run_limits(run.tenant_id, run.template_key, (run.spec or {}).get("max_active_runs"))
    if not limits:
        return None
    for limit_key, _limit in limits:
        lock(f"runs:{limit_key}")
    reason = _blocker(limits, run.tenant_id, run.template_key, exclude=run.pk)
    if reason is None:
        # runs already waiting for the same limits go first (promote() admits by priority)
        waiting = QueuedRun.objects.filter(tenant_id=run.tenant_id)
        if tenant_key(run.tenant_id) not in dict(limits):
            waiting = waiting.filter(template_key=run.template_key)
        if waiting.exists():
            reason = "other runs are waiting for a slot"
    if reason is None:
        return None
    QueuedRun.objects.create(
        run_id=run.pk,
        tenant_id=run.tenant_id,
        template_key=run.template_key,
        priority=run.priority,
        reason=reason[:300],
    )
    return reason


def promote(tenant_id: str | None, activate: Callable[[Any], bool], limit: int = 200) -> int:
    """Admit waiting runs whose limits have room, most urgent first. Returns how many started.

    ``tenant_id`` None: every tenant with waiting runs (the sweeper). Each admission is its own
    transaction holding the limits' locks, and calls ``activate(run_id)`` (the engine's
    ``activate_run``) under them, so two promoters never admit past a limit.
    """
    from ...choices import RunStatus

    started = 0
    tenants = [tenant_id] if tenant_id else sorted(set(QueuedRun.objects.values_list("tenant_id", flat=True)))
    for tenant in tenants:
        full_templates: set[str] = set()
        for queued in list(
            QueuedRun.objects.filter(tenant_id=tenant).select_related("run").order_by("priority", "created_at")[:limit]
        ):
            if queued.template_key in full_templates:
                continue
            with transaction.atomic():
                run = queued.run
                if run.status != RunStatus.PENDING:  # cancelled while waiting
                    QueuedRun.objects.filter(pk=queued.pk).delete()
                    continue
                limits = run_limits(tenant, queued.template_key, (run.spec or {}).get("max_active_runs"))
                for limit_key, _limit in limits:
                    lock(f"runs:{limit_key}")
                reason = _blocker(limits, tenant, queued.template_key)
                if reason is not None:
                    if reason.startswith("tenant:"):
                        break  # nothing else of this tenant fits either
                    full_templates.add(queued.template_key)
                    continue
                if not QueuedRun.objects.filter(pk=queued.pk).delete()[0]:
                    continue  # admitted meanwhile by another process
                if activate(run.pk):
                    started += 1
    return started


def limit_changed(key: str) -> tuple[str | None, list[tuple[int, int]]]:
    """An operator changed the limit of ``key``: which waiters now fit.

    Returns ``(tenant whose waiting runs to promote or None, [(step pk, priority)] to wake)``;
    the waiters are already off the waiting list. Call inside a transaction; wake after commit.
    """
    if key.startswith(("template:", "tenant:")):
        return key.split(":", 2)[1], []
    row = ConcurrencyLimit.objects.filter(key=key).first()
    if row is None:
        return None, []
    lock(f"slot:{key}")
    held = ConcurrencySlot.objects.filter(key=key, expires_at__gt=timezone.now()).count()
    return None, _pick_waiters(key, row.limit - held)
