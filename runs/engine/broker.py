"""Sending step messages: the engine's only contact with the broker.

Messages are sent by task name (``runs.execute_step``), so the engine does not import the Celery
task module that calls it. Task arguments are step ids only (no secrets, no payloads).
"""

from __future__ import annotations

import logging
from typing import Any

from .. import metrics

log = logging.getLogger("orchestrator.engine")

#: The Celery task that claims and runs one step (runs/tasks.py).
EXECUTE_STEP = "runs.execute_step"
#: The Celery task that times out a run past its deadline (runs/tasks.py).
EXPIRE_RUN = "runs.expire_run"


def _app():
    from orchestrator_site.celery import app

    return app


def batches(step_pks: list[int], size: int, spread: int) -> list[list[int]]:
    """Split ``step_pks`` into the step ids of one message each, in order: at most ``size`` ids
    per message and at least ``spread`` messages (one per id when there are fewer ids), sizes
    differing by one at most. ``[1..10]``, 16, 8 -> 2, 2, 1, 1, 1, 1, 1, 1 ids; 199 ids -> 13
    messages of 15 or 16."""
    if not step_pks:
        return []
    count = max(min(len(step_pks), max(1, spread)), -(-len(step_pks) // max(1, size)))
    share, extra = divmod(len(step_pks), count)
    out, start = [], 0
    for index in range(count):
        end = start + share + (1 if index < extra else 0)
        out.append(step_pks[start:end])
        start = end
    return out


def enqueue_steps(
    step_pks: list[int], *, countdown: float | None = None, priority: int | None = None, batch: bool = True
) -> None:
    """Send ``runs.execute_step`` messages for the step ids, over one broker connection.

    Called from ``transaction.on_commit`` (or for steps already committed ``queued``), so a worker
    never sees an uncommitted row. A send that fails is logged and left to the sweeper, which
    re-sends steps queued for too long. ``countdown`` in seconds. ``priority`` is the run's (0 =
    most urgent .. 9): the broker serves a backlog in that order (settings:
    CELERY_BROKER_TRANSPORT_OPTIONS priority_steps, RabbitMQ x-max-priority); None =
    CELERY_TASK_DEFAULT_PRIORITY.

    With ``batch`` (and no countdown), many ids go as fewer messages (:func:`batches`,
    ``ORCHESTRATOR_BATCH_STEPS`` / ``ORCHESTRATOR_BATCH_SPREAD``): arguments ``[first, [rest]]``,
    run by one worker one after the other (runs/engine/worker.py ``execute_step``). Celery's cost
    per message (about 1.5 ms of worker CPU on the bench machine, README Performance) is then
    paid once per batch.
    """
    if not step_pks:
        return
    options: dict[str, Any] = {}  # the queue: Celery's routing (task_default_queue, ORCHESTRATOR_QUEUE)
    if countdown:
        options["countdown"] = countdown
    if priority is not None:
        options["priority"] = max(0, min(9, int(priority)))
    if batch and not countdown:
        from orchestrator_site.conf import conf

        groups = batches(list(step_pks), conf.batch_steps, conf.batch_spread)
    else:
        groups = [[pk] for pk in step_pks]
    app = _app()
    try:
        with app.producer_or_acquire() as producer:
            for first, *rest in groups:
                args = [first, rest] if rest else [first]
                app.send_task(EXECUTE_STEP, args=args, producer=producer, **options)
        metrics.steps_sent(len(step_pks))
    except Exception:
        log.exception("enqueue of %d steps failed; the sweeper will re-send them", len(step_pks))


def schedule_deadline(run_id: Any, seconds: float) -> None:
    """Ask for the run's deadline check ``seconds`` from now (the sweeper checks deadlines too)."""
    try:
        # routed to the system queue (CELERY_TASK_ROUTES)
        _app().send_task(EXPIRE_RUN, args=[str(run_id)], countdown=seconds + 0.5)
    except Exception:  # the sweeper enforces deadlines too; a broker hiccup here loses nothing
        log.warning("could not schedule the deadline check of run %s; the sweeper will", run_id)
