"""Signals the engine sends, for apps built on runs (agent tasks) without the engine importing them.

``run_finished``: sent after the commit that ended a run (succeeded, failed, cancelled, timed
out), only for runs that carry ``metadata`` (most carry none, so a plain run pays nothing).
Keyword arguments: ``run_id`` (UUID), ``status`` (str), ``metadata`` (dict, the run's own).
Receivers run in the process that finished the run; an exception in one is logged, not raised
(``send_robust``), since the run's end is already committed.
"""

from __future__ import annotations

from django.dispatch import Signal

run_finished = Signal()
