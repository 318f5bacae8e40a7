"""The beat scheduler: django-celery-beat's DatabaseScheduler that stamps each schedule firing.

``CELERY_BEAT_SCHEDULER = "scheduler.beat:TickScheduler"``. For the entries of
``scheduler.run_schedule`` it adds ``tick`` (the instant the schedule fired for, see
``scheduler.ticks``) to the message's keyword arguments; the run's idempotency key is built from
it, so two beats (or one beat sending the same firing twice) start one run. Every other entry
(the sweeper, the health report, the purge) is sent unchanged.
"""

from __future__ import annotations

import datetime as dt
import logging

from django_celery_beat.schedulers import DatabaseScheduler

from . import ticks

log = logging.getLogger("orchestrator.beat")

#: The task whose messages carry a tick.
RUN_SCHEDULE_TASK = "scheduler.run_schedule"


class TickScheduler(DatabaseScheduler):
    """DatabaseScheduler + ``tick`` in the kwargs of ``scheduler.run_schedule`` messages."""

    def apply_async(self, entry, producer=None, advance=True, **kwargs):
        if entry.task == RUN_SCHEDULE_TASK:
            if advance:  # reserve first: reserving rebuilds the entry from its row
                entry = self.reserve(entry)
                advance = False
            try:
                tick = ticks.tick_for(entry.schedule, dt.datetime.now(dt.UTC))
            except ValueError:
                tick = None
                log.warning("no tick for beat entry %s; the worker computes it", entry.name)
            if tick is not None:
                # The entry object belongs to this scheduler and is sent synchronously: stamp it
                # for this message only (ModelEntry cannot be copied).
                original = entry.kwargs
                entry.kwargs = {**(original or {}), "tick": ticks.format_tick(tick)}
                try:
                    return super().apply_async(entry, producer=producer, advance=advance, **kwargs)
                finally:
                    entry.kwargs = original
        return super().apply_async(entry, producer=producer, advance=advance, **kwargs)
