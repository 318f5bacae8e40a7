"""The floor: the bench shapes as raw Celery tasks on the same broker, with no bookkeeping.

Its own Celery app (``bench_raw``) and queue, configured like the platform's (JSON, acks_late,
prefetch 1, no results), on the platform's broker (``CELERY_BROKER_URL``). One task, ``node``:
it does nothing (as a ``noop`` step), then sends its dependents whose dependencies are all done.
A join needs a counter somewhere: a Redis ``INCR`` per (run, node) with more than one dependency,
the least a DAG can be run with (no database, no attempt rows, no traces, no leases, no results).
A sink records completion with ``INCR`` on the workload's done counter and the wall time of the
last completion, which the driver reads.

Run a worker with ``celery -A bench.rawtasks worker -Q <BENCH_RAW_QUEUE> -c 2``.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from bench.shapes import graph

BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("BENCH_RAW_QUEUE", "bench-raw")

# Not the current app: imported next to the platform's app (bench/run.py), it must not become
# the app that the platform's shared tasks bind to.
app = Celery("bench_raw", broker=BROKER_URL, set_as_current=False)
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": 3 * 3600},
    worker_enable_remote_control=False,
)

_client: tuple[int, redis.Redis] | None = None


def client() -> redis.Redis:
    """This process's Redis client (made again after a fork)."""
    global _client
    if _client is None or _client[0] != os.getpid():
        _client = (os.getpid(), redis.Redis.from_url(BROKER_URL))
    return _client[1]


def send(shape: str, run_key: str, done_key: str, nodes: list[int]) -> None:
    """Send one ``node`` message per node index, over one producer."""
    with app.producer_or_acquire() as producer:
        for index in nodes:
            node.apply_async(args=[shape, run_key, index, done_key], producer=producer)


@app.task(name="bench.raw.node")
def node(shape: str, run_key: str, index: int, done_key: str) -> None:
    """Run node ``index`` of ``shape`` (a no-op), then release the dependents that are ready."""
    g = graph(shape)
    dependents = g.dependents[index]
    if not dependents:
        r = client()
        pipe = r.pipeline(transaction=False)
        pipe.incr(done_key)
        pipe.set(f"{done_key}:last", repr(time.time()))
        pipe.execute()
        return
    ready = []
    for dep in dependents:
        needed = len(g.deps[dep])
        if needed == 1 or client().incr(f"{run_key}:{dep}") == needed:
            ready.append(dep)
    if ready:
        send(shape, run_key, done_key, ready)
