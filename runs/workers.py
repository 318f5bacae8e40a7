"""Worker heartbeats: each Celery worker process says every few seconds which steps it holds.

Started by the ``worker_ready`` signal in the worker's main process (the one that takes messages
from the broker and hands them to its pool), stopped by ``worker_shutdown``, which also deletes
the row: a worker that stops cleanly gives its unacked messages back to the broker itself. A
worker that is killed stops writing; the sweeper then re-sends the steps it held
(runs/engine/sweeper.py ``recover_lost_workers``). One small UPSERT per worker per
``ORCHESTRATOR_WORKER_HEARTBEAT`` seconds: nothing is written per message.

The embedded worker (memory broker, same process as the command) writes none: it cannot die
without its command.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown

log = logging.getLogger("orchestrator.workers")

_STOP = threading.Event()
_NAME: dict[str, str] = {}


def held_step_ids() -> list[int]:
    """Step ids of the ``runs.execute_step`` messages this worker process holds (reserved or
    running), from Celery's worker state."""
    from celery.worker import state as worker_state

    ids: set[int] = set()
    for request in list(worker_state.reserved_requests) + list(worker_state.active_requests):
        if getattr(request, "name", "") != "runs.execute_step":
            continue
        args = getattr(request, "args", None) or ()
        if args and isinstance(args[0], int):
            ids.add(args[0])
        if len(args) > 1 and isinstance(args[1], (list, tuple)):  # a batched message's other steps
            ids.update(pk for pk in args[1] if isinstance(pk, int))
    return sorted(ids)


def beat_once(name: str, node: str, pool_pids: list[int], queues: list[str]) -> None:
    """Write this worker's heartbeat row now (created on the first beat)."""
    from django.db import connection
    from django.utils import timezone

    from .models import WorkerHeartbeat

    now = timezone.now()
    steps = held_step_ids()
    updated = WorkerHeartbeat.objects.filter(name=name).update(last_seen=now, step_ids=steps, pool_pids=pool_pids)
    if not updated:
        WorkerHeartbeat.objects.update_or_create(
            name=name,
            defaults={
                "node": node,
                "pid": os.getpid(),
                "pool_pids": pool_pids,
                "step_ids": steps,
                "queues": queues,
                "started_at": now,
                "last_seen": now,
            },
        )
    connection.close_if_unusable_or_obsolete()


def _pool_pids(consumer: Any) -> list[int]:
    try:
        return [int(pid) for pid in (consumer.pool.info or {}).get("processes", [])]
    except Exception:  # a pool without processes (threads, solo): the main pid holds attempts
        return [os.getpid()]


@worker_ready.connect
def _start(sender: Any = None, **kwargs: Any) -> None:
    from orchestrator_site.conf import conf

    if conf.embedded or sender is None:
        return
    node = sender.hostname
    name = f"{node}:{os.getpid()}"
    _NAME["name"] = name
    queues = sorted(q.name for q in sender.task_consumer.queues) if getattr(sender, "task_consumer", None) else []

    def loop() -> None:
        while not _STOP.is_set():
            try:
                beat_once(name, node, _pool_pids(sender), queues)
            except Exception:  # the database away: the next beat tries again
                log.warning("worker heartbeat failed", exc_info=True)
            _STOP.wait(conf.worker_heartbeat)

    threading.Thread(target=loop, name="orchestrator-heartbeat", daemon=True).start()


@worker_shutdown.connect
def _stop(**kwargs: Any) -> None:
    _STOP.set()
    name = _NAME.get("name")
    if not name:
        return
    try:
        from .models import WorkerHeartbeat

        WorkerHeartbeat.objects.filter(name=name).delete()
    except Exception:
        log.warning("could not remove the worker heartbeat %s", name, exc_info=True)
