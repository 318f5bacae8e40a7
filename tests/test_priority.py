"""Run priority (seed 004: lower number = more urgent) orders a backlog of ready steps.

The messages carry the run's priority; on Redis each level is a list of its own and a worker's
BRPOP names them most urgent first (settings: CELERY_BROKER_TRANSPORT_OPTIONS). With prefetch 1
and late acks a worker holds no more messages than it runs, so the next step taken from a backlog
is always the most urgent one waiting.
"""

from __future__ import annotations

from runs.models import Attempt, Run
from tests.conftest import start, wait_for_run
from tests.flow_support import purge_queue, route_to, start_workers

ONE_STEP = "key: prio\nsteps:\n  - {id: only, type: noop}\n"


def test_backlog_is_served_most_urgent_first(django_db_setup, transactional_db, worker_env, tmp_path):
    queue = f"prio-{tmp_path.name[-12:]}"
    try:
        # given a backlog: 5 runs at priority 9, then 5 at 5, then 5 at 0, and no worker yet
        with route_to(queue):
            runs = [start(ONE_STEP, priority=p) for p in [9] * 5 + [5] * 5 + [0] * 5]
        assert all(r.status == "running" for r in runs)
        # when one worker process (prefetch 1) starts on that queue
        workers = start_workers(worker_env, tmp_path, queue=queue, nodes=1, concurrency=1)
        try:
            finished = [wait_for_run(r.pk, timeout=60) for r in runs]
        finally:
            workers.stop()
    finally:
        purge_queue(queue)
    assert all(r.status == "succeeded" for r in finished)
    # then it took them most urgent first, in submission order within a level
    order = list(
        Attempt.objects.filter(run__in=[r.pk for r in runs]).order_by("started_at").values_list("run_id", flat=True)
    )
    priorities = [Run.objects.get(pk=run_id).priority for run_id in order]
    assert priorities == [0] * 5 + [5] * 5 + [9] * 5
    submitted = {r.pk: i for i, r in enumerate(runs)}
    for level in (0, 5, 9):
        ranks = [submitted[run_id] for run_id, p in zip(order, priorities, strict=True) if p == level]
        assert ranks == sorted(ranks)
