"""Recovery from a dead worker in seconds: heartbeats name the steps a worker holds, and the
sweeper re-sends them when the heartbeats stop (runs/workers.py, runs/engine/sweeper.py).

Before heartbeats, a step whose message a killed worker had taken but not claimed stayed
``queued`` for ORCHESTRATOR_REQUEUE_AFTER (300 s), and Redis kept the message unacked for its
visibility timeout (3 h).
"""

from __future__ import annotations

import time
from datetime import timedelta

from django.utils import timezone

from runs import engine
from runs.models import Attempt, Step, WorkerHeartbeat
from tests.conftest import start, wait_for_run
from tests.flow_support import route_to
from tests.workers import purge_queue, start_workers

NAP = (
    "key: nap\nsteps:\n  - {id: nap, type: sleep, params: {seconds: 3}, retry: {max_attempts: 3, initial_delay: 0.1}}\n"
)


def test_a_worker_writes_heartbeats_naming_the_steps_it_holds(worker):
    # given the session worker, busy with a step
    run = start(NAP)
    step = Step.objects.get(run=run)
    deadline = time.time() + 20
    held = None
    while time.time() < deadline:
        held = next((b for b in WorkerHeartbeat.objects.all() if step.pk in (b.step_ids or [])), None)
        if held is not None:
            break
        time.sleep(0.2)
    # then one of its heartbeats names the step, its pool processes and its two queues
    assert held is not None, list(WorkerHeartbeat.objects.values("name", "step_ids", "last_seen"))
    assert held.pool_pids and any(q.endswith("-system") for q in held.queues)
    assert (timezone.now() - held.last_seen).total_seconds() < 10
    assert wait_for_run(run.pk).status == "succeeded"


def test_steps_of_a_worker_whose_heartbeats_stopped_are_sent_again(worker, monkeypatch):
    # given a step whose message a worker took and then died with (no message left anywhere)
    with monkeypatch.context() as patch:
        patch.setattr(engine.broker, "enqueue_steps", lambda *a, **k: None)
        run = start("key: held\nsteps:\n  - {id: a, type: noop}\n")
    step = Step.objects.get(run=run)
    assert step.status == "queued"
    WorkerHeartbeat.objects.create(
        name="gone@elsewhere:1",
        node="gone@elsewhere",
        pid=1,
        pool_pids=[2],
        step_ids=[step.pk],
        started_at=timezone.now() - timedelta(minutes=5),
        last_seen=timezone.now() - timedelta(minutes=1),
    )
    # when the sweeper runs, the step is sent again at once (not after ORCHESTRATOR_REQUEUE_AFTER)
    counts = engine.sweep()
    assert (counts["lost_workers"], counts["resent"]) == (1, 1)
    assert not WorkerHeartbeat.objects.filter(name="gone@elsewhere:1").exists()
    assert wait_for_run(run.pk, timeout=20).status == "succeeded"


def test_whole_worker_sigkill_recovers_in_seconds(worker, worker_env, tmp_path):
    # given a worker node (prefork) running steps and holding their messages, heartbeats every 0.5 s
    env = {"ORCHESTRATOR_WORKER_HEARTBEAT": "0.5", "ORCHESTRATOR_WORKER_LOST_AFTER": "3"}
    first = start_workers(worker_env, tmp_path, concurrency=4, env=env)
    try:
        with route_to(first.queue):
            run_ids = [start(NAP).pk for _ in range(8)]
        deadline = time.time() + 30
        while Step.objects.filter(run_id__in=run_ids, status="running").count() < 4:
            assert time.time() < deadline, first.log_text()[-2000:]
            time.sleep(0.05)
        # when the whole node is SIGKILLed (its process group: no acks, no cleanup)...
        first.kill(0)
        # ...and a new node starts on the same queue
        second = start_workers(worker_env, tmp_path, concurrency=4, queue=first.queue, env=env)
        started = time.monotonic()
        try:
            runs = [wait_for_run(pk, timeout=60, sweep=True) for pk in run_ids]
        finally:
            second.stop()
        recovery = time.monotonic() - started
    finally:
        first.stop()
        purge_queue(first.queue)
    # then every run finished, each killed attempt counted lost once, nothing ran twice at once
    assert [r.status for r in runs] == ["succeeded"] * 8
    lost = Attempt.objects.filter(run_id__in=run_ids, outcome="lost").count()
    assert lost >= 4
    print(f"\nwhole-worker SIGKILL: {lost} attempts lost, all 8 runs finished {recovery:.1f} s after the new worker")
