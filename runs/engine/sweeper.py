"""Recovery: due retries, expired leases, dead workers, lost messages, deadlines, slots.

A run resumes after any crash from its rows alone. The sweeper runs every
``ORCHESTRATOR_SWEEP_INTERVAL`` seconds on the system queue (its own, so a long step backlog
does not delay it), and is safe to run concurrently and as often as wanted.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import Q

from orchestrator_site.conf import conf

from ..choices import AttemptOutcome, RunStatus, StepStatus, TraceKind
from ..models import Run, Step, Trace, WorkerHeartbeat
from . import broker, cascade, gate, lifecycle, state
from .attempts import fail


def sweep(now: datetime | None = None) -> dict[str, int]:
    """One pass of recovery. Returns counts by kind.

    - due retries (``retry_wait`` past ``next_attempt_at``) are queued and sent: at once when no
      countdown message carries them (``queued_at`` empty), else only once that message looks
      lost (``ORCHESTRATOR_REQUEUE_AFTER`` past due), so a retry is not sent twice;
    - workers whose heartbeat stopped (``ORCHESTRATOR_WORKER_LOST_AFTER``): the steps whose
      messages they held are sent again and their running attempts count as lost, in seconds
      rather than at lease expiry or the broker's visibility timeout (``lost_workers``);
    - running steps whose lease expired (worker killed or stalled) count as a lost attempt and
      retry or die like any failure; so do, without waiting for the lease, running steps whose
      worker process on this host is gone (``recover_dead_holders``);
    - steps ``queued`` for longer than ``ORCHESTRATOR_REQUEUE_AFTER`` seconds are sent again
      (the broker lost the message; a duplicate is harmless because claiming is conditional);
    - active runs past their deadline are timed out;
    - concurrency slots whose lease expired are freed and runs waiting for a run slot admitted.

    Two sweepers at once never both act on a step: each takes the rows it moves under a row
    lock (``SELECT ... FOR UPDATE SKIP LOCKED``) and re-checks the condition under it.

    Returns {"retries", "lost_workers", "resent", "expired_leases", "dead_workers", "requeued",
    "timed_out_runs", "expired_slots", "admitted_runs"}.
    """
    now = now or state.now()
    counts = {"retries": 0, "expired_leases": 0, "requeued": 0, "timed_out_runs": 0}

    stale = now - timedelta(seconds=conf.requeue_after)
    # due retries: those without a countdown message when due, those with one when it looks lost
    due_now = Q(queued_at__isnull=True) | Q(next_attempt_at__lt=stale)
    due = list(
        Step.objects.filter(due_now, status=StepStatus.RETRY_WAIT, next_attempt_at__lte=now).values_list(
            "pk", flat=True
        )[:5000]
    )
    if due:
        with transaction.atomic():
            moved = state.queue_due_retries(due, due_now, now)
            Trace.objects.bulk_create(
                Trace(run_id=run_id, step_row_id=pk, kind=TraceKind.STATE, message=f"step '{code}' queued (retry due)")
                for pk, run_id, code in moved
            )
            pks = [pk for pk, _r, _s in moved]
            transaction.on_commit(lambda: _enqueue_by_priority(pks))
        counts["retries"] = len(moved)

    counts.update(recover_lost_workers(now))

    expired = Step.objects.filter(status=StepStatus.RUNNING, lease_expires_at__lt=now).values_list("pk", flat=True)
    for pk in list(expired[:1000]):
        if recover_lost(pk, "lease expired: the worker was lost or stalled", lease_expired_before=now):
            counts["expired_leases"] += 1
    # running steps whose worker process on this host is gone: no need to wait for the lease
    counts["dead_workers"] = recover_dead_holders()

    lost = list(Step.objects.filter(status=StepStatus.QUEUED, queued_at__lt=stale).values_list("pk", flat=True)[:5000])
    if lost:
        with transaction.atomic():
            lost = state.mark_resent(lost, stale, now)
            transaction.on_commit(lambda: _enqueue_by_priority(lost))
        counts["requeued"] = len(lost)

    for run_id in Run.objects.filter(status__in=[RunStatus.PENDING, RunStatus.RUNNING], deadline__lt=now).values_list(
        "pk", flat=True
    )[:1000]:
        if lifecycle.expire_run(run_id):
            counts["timed_out_runs"] += 1
    with transaction.atomic():
        freed, woken = gate.expire_slots(now)
        lifecycle.wake_on_commit(woken)
    counts["expired_slots"] = freed
    counts["admitted_runs"] = cascade.admit_waiting_runs(None) if gate.runs_waiting(None) else 0
    return counts


def recover_lost_workers(now: datetime) -> dict[str, int]:
    """Workers whose heartbeat is older than ``ORCHESTRATOR_WORKER_LOST_AFTER`` seconds are gone:
    re-send the steps whose messages they had taken (still ``queued``), count their running
    attempts as lost, and forget them. Returns {"lost_workers", "resent"}.

    Each worker process writes a heartbeat row every ``ORCHESTRATOR_WORKER_HEARTBEAT`` seconds
    with the steps of the messages it holds (runs/workers.py). A killed worker's unacked
    messages would otherwise come back only after the broker's visibility timeout (Redis) or
    its connection's end (RabbitMQ), and its steps would wait for ``ORCHESTRATOR_REQUEUE_AFTER``.
    A re-sent step whose old message comes back later is claimed once: the claim is conditional.
    """
    lost_before = now - timedelta(seconds=conf.worker_lost_after)
    counts = {"lost_workers": 0, "resent": 0}
    for beat in WorkerHeartbeat.objects.filter(last_seen__lt=lost_before).order_by("last_seen")[:100]:
        with transaction.atomic():
            if not WorkerHeartbeat.objects.filter(pk=beat.pk, last_seen__lt=lost_before).delete()[0]:
                continue  # came back, or another sweeper took it
            resent = state.resend_queued(list(beat.step_ids or []), now)
            transaction.on_commit(lambda resent=resent: _enqueue_by_priority(resent))
        counts["lost_workers"] += 1
        counts["resent"] += len(resent)
        # its running attempts: held by one of its pool processes ("<node>:<pid>", see tasks.py)
        holders = {f"{beat.node}:{pid}" for pid in beat.pool_pids or []}
        for pk, holder in Step.objects.filter(pk__in=list(beat.step_ids or []), status=StepStatus.RUNNING).values_list(
            "pk", "worker"
        ):
            if holder in holders:
                recover_lost(pk, f"worker {beat.node} stopped sending heartbeats during the attempt", holder=holder)
    return counts


def recover_lost(pk: int, reason: str, *, lease_expired_before: datetime | None = None, holder: str = "") -> bool:
    """Count the running attempt of step ``pk`` as lost (retry or dead, like any failure).

    The run is locked first (the engine's lock order), then the step with SKIP LOCKED and the
    condition re-checked under it (the lease expired before ``lease_expired_before``, or the
    holder is still ``holder``), so a second sweeper or a worker completing at that moment cannot
    make it happen twice. Returns True when this call recorded the loss.
    """
    from agents.registry import StepError

    run_id = Step.objects.filter(pk=pk).values_list("run_id", flat=True).first()
    if run_id is None:
        return False
    with transaction.atomic():
        if state.lock_run(run_id) is None:
            return False
        rows = Step.objects.select_for_update(skip_locked=True, of=("self",)).select_related("run")
        rows = rows.filter(pk=pk, status=StepStatus.RUNNING)
        if lease_expired_before is not None:
            rows = rows.filter(lease_expires_at__lt=lease_expired_before)
        if holder:
            rows = rows.filter(worker=holder)
        step = rows.first()
        if step is None:
            return False
        result = fail(
            step, step.lease_token, StepError(reason), resolved=step.input, duration_ms=0, outcome=AttemptOutcome.LOST
        )
    return result != "refused"


def holder_is_dead(worker: str) -> bool:
    """True when ``worker`` ("<node>@<host>:<pid>", as written on a claim) names a process of this
    host that no longer runs (gone, or a zombie). Unknown shapes and other hosts: False.

    Process ids are only comparable on one host (one pid namespace): the host is the part of the
    Celery node name after "@" (``%h``, the machine's hostname). Setting
    ORCHESTRATOR_RECOVER_DEAD_WORKERS = False turns this off (hosts sharing a hostname across
    pid namespaces); heartbeats and leases still recover every lost step.
    """
    if not conf.recover_dead_workers:
        return False
    node, _, pid_text = worker.rpartition(":")
    host = node.rpartition("@")[2] if "@" in node else ""
    if not host or host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            status = handle.read().rpartition(b")")[2].split()[0]
        return status in (b"Z", b"X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def recover_dead_holders(step_pks: Iterable[int] | None = None) -> int:
    """Count as lost the running attempts held by processes of this host that died.

    A SIGKILLed pool process or worker leaves its steps ``running`` until their lease expires
    (the step's timeout plus ORCHESTRATOR_LEASE_GRACE); when the holder is known dead the step
    can be retried at once. ``step_pks`` limits the check (default: every running step).
    Returns how many attempts were recovered.
    """
    rows = Step.objects.filter(status=StepStatus.RUNNING).exclude(worker="")
    if step_pks is not None:
        rows = rows.filter(pk__in=list(step_pks))
    recovered = 0
    for pk, holder in rows.values_list("pk", "worker")[:5000]:
        if holder_is_dead(holder):
            pid = holder.rpartition(":")[2]
            if recover_lost(pk, f"worker process {pid} exited during the attempt", holder=holder):
                recovered += 1
    return recovered


def _enqueue_by_priority(step_pks: list[Any]) -> None:
    """Send steps re-queued by the sweeper, each with its run's priority (external steps are
    left for their executors' polls)."""
    if not step_pks:
        return
    by_priority: dict[int, list[int]] = {}
    for pk, priority, spec in Step.objects.filter(pk__in=step_pks).values_list("pk", "run__priority", "spec"):
        if not cascade.is_external(spec):  # executors poll for theirs
            by_priority.setdefault(priority, []).append(pk)
    for priority in sorted(by_priority):
        broker.enqueue_steps(by_priority[priority], priority=priority)
