"""The engine: runs as rows, dependency counting in the database, Celery only delivers step ids.

The public verbs (everything else in this package is internal):

=========================== =====================================================================
``start_run``               create a run's rows and queue its roots (lifecycle)
``start_runs``              many runs of one spec in one transaction (the batch path)
``execute_step``            claim, run and record one step: the Celery task's body (worker)
``sweep``                   one recovery pass (sweeper)
``cancel_run``              stop an active run: steps cancelled, late completions refused
``expire_run``              time out a run past its deadline
``decide_pending``          decide a run's ready steps after rows were reset (services.retry)
``reset_for_retry``         reset failed steps and their downstream, then decide (services.retry)
``admit_waiting_runs``      start runs waiting for a run slot that now fits
``limit_changed``           an operator changed a concurrency limit: wake or admit what fits
``recover_dead_holders``    count attempts of dead local processes as lost
``build_context``           the expression context of a step
``backoff_delay``           seconds before a retry (exponential, equal jitter)
``enqueue_steps``           send step messages (after commit)
=========================== =====================================================================

Layout: ``state`` is the only writer of run/step/attempt status, under one lock order (the run,
then its steps by id); ``sql`` spells the hot statements (PostgreSQL, with portable twins);
``cascade`` decides steps (dependency counting, trigger rules, expansion); ``worker``,
``sweeper`` and ``lifecycle`` compose transactions; ``gate`` (rate limits, concurrency slots,
run admission) returns decisions and never calls back. docs/engine.md explains the design.
Errors raised to callers: ``templates_app.errors.WorkflowError`` for bad inputs.
"""

from __future__ import annotations

from .attempts import backoff_delay
from .broker import enqueue_steps
from .cascade import admit_waiting_runs, decide_pending
from .context import build_context
from .lifecycle import cancel_run, expire_run, limit_changed, reset_for_retry, start_run, start_runs, wake_steps
from .sweeper import recover_dead_holders, sweep
from .worker import execute_step

__all__ = [
    "admit_waiting_runs",
    "backoff_delay",
    "build_context",
    "cancel_run",
    "decide_pending",
    "enqueue_steps",
    "execute_step",
    "expire_run",
    "limit_changed",
    "recover_dead_holders",
    "reset_for_retry",
    "start_run",
    "start_runs",
    "sweep",
    "wake_steps",
]
