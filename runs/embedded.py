"""A real Celery worker inside the current process, for the embedded default (no servers).

The worker consumes the in-memory broker (``memory://``) with a thread pool, so the same
``runs.execute_step`` tasks run as in production, just without a separate process. It is the
mechanism of ``celery.contrib.testing.worker`` (a WorkController started in a thread and
synchronized on ``on_consumer_ready``), written against the public WorkController API.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from celery.worker import WorkController


class _EmbeddedWorkController(WorkController):
    """A WorkController that tells when its consumer is ready."""

    def __init__(self, *args, **kwargs):
        self.ready = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer) -> None:
        self.ready.set()


@contextmanager
def embedded_worker(concurrency: int = 4, start_timeout: float = 30.0) -> Iterator[WorkController]:
    """Run a thread-pool Celery worker on the configured broker until the block exits.

    ``concurrency``: worker threads. Raises RuntimeError when the worker is not consuming within
    ``start_timeout`` seconds.
    """
    from django.conf import settings

    from orchestrator_site.celery import app

    worker = _EmbeddedWorkController(
        app=app,
        concurrency=concurrency,
        pool="threads",
        hostname=f"embedded@{socket.gethostname()}",
        queues=[settings.CELERY_TASK_DEFAULT_QUEUE, settings.ORCHESTRATOR_SYSTEM_QUEUE],
        loglevel="WARNING",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        optimization="fair",
    )
    thread = threading.Thread(target=worker.start, name="embedded-celery-worker", daemon=True)
    thread.start()
    if not worker.ready.wait(start_timeout):
        raise RuntimeError("the embedded Celery worker did not start")
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(10)
