"""Helpers of the flow-control tests: extra Celery worker processes on a queue of their own.

The session worker (tests/conftest.py) serves the session queue. Tests that need several
worker nodes, a worker they may kill, or worker settings of their own start workers here, on a
queue named for the test, and route the test process's messages there with :func:`route_to`
(Celery reads ``task_default_queue`` at every send). Messages the workers send themselves
(successors, retries, waits) go to their own ``ORCHESTRATOR_QUEUE``, the same queue.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tests.workers import WorkerSet, purge_queue, start_workers  # noqa: F401 (re-exported)

#: A Fernet key shared by the test process and the extra workers (credential tests).
FERNET_KEY = "peUzMMa49ouYSTHc-2pSNjsRwsGBomITwILqQw_4jec="


@contextlib.contextmanager
def route_to(queue: str) -> Iterator[None]:
    """Send this process's step messages to ``queue`` inside the block."""
    from orchestrator_site.celery import app

    previous = app.conf.task_default_queue
    app.conf.task_default_queue = queue
    try:
        yield
    finally:
        app.conf.task_default_queue = previous
