"""6. Two sweepers and two beats at once: nothing is enqueued or started twice.

Real processes: two workers and two beats on the fault queue (each beat sends ``runs.sweep``
every second, so sweeps run concurrently on both workers), plus two sweeps racing in this process
from a barrier. The work they share: steps whose message was lost, retries due without a
countdown message, and attempts whose lease expired. Every sweep's counts are added up (this
process's directly, the workers' from their logs) and must equal the prepared faults exactly;
no worker may ever receive a message for a step it cannot claim ("not-claimed": a duplicate).
"""

from __future__ import annotations

import re
import threading
import uuid
from collections import Counter
from datetime import timedelta

from django.db import connections, transaction
from django.utils import timezone

from runs import engine
from runs.choices import AttemptOutcome, StepStatus
from runs.models import Attempt, Run, Step
from tests.conftest import start
from tests.faults.conftest import task_results, wait_until, worker_results

FAULTS_PER_KIND = 20
YAML = "key: sweep-race\nsteps:\n  - id: a\n    type: noop\n    retry: {max_attempts: 3, initial_delay: 0.1}\n"


def sweep_counts(*procs) -> tuple[Counter[str], int]:
    """The counts returned by every ``runs.sweep`` the workers ran (from their logs), and how many."""
    total: Counter[str] = Counter()
    results = task_results("runs.sweep", *procs)
    for result in results:
        for key, value in re.findall(r"'(\w+)': (\d+)", result):
            total[key] += int(value)
    return total, len(results)


def test_two_sweepers_two_beats_enqueue_and_start_once(processes, settings, monkeypatch):
    settings.ORCHESTRATOR_REQUEUE_AFTER = 60  # only the prepared "lost" messages look lost
    env = {"ORCHESTRATOR_REQUEUE_AFTER": "60"}
    first = processes.worker("sweep-a", concurrency=2, env=env)
    second = processes.worker("sweep-b", concurrency=2, env=env)
    # Given runs whose first step never got its message (the broker "lost" them) ...
    monkeypatch.setattr(engine.broker, "enqueue_steps", lambda *args, **kwargs: None)
    runs = [start(YAML) for _ in range(3 * FAULTS_PER_KIND)]
    monkeypatch.undo()
    # (both beats already sending sweeps to both workers while the faults appear, all at once)
    processes.beat("beat-a")
    processes.beat("beat-b")
    steps = list(Step.objects.filter(run__in=runs).order_by("id"))
    lost, due, expired = (steps[i * FAULTS_PER_KIND : (i + 1) * FAULTS_PER_KIND] for i in range(3))
    now = timezone.now()
    hour_ago = now - timedelta(hours=1)
    # ... a third queued an hour ago, a third failed once and due to retry (no countdown message),
    # a third running under a lease that expired (their worker vanished)
    with transaction.atomic():  # the faults appear at once for the sweepers
        Step.objects.filter(pk__in=[s.pk for s in lost]).update(queued_at=hour_ago)
        for kind, group in (("due", due), ("expired", expired)):
            for step in group:
                token = uuid.uuid4()
                Attempt.objects.create(
                    step=step,
                    run_id=step.run_id,
                    number=1,
                    worker="gone@elsewhere:1",
                    lease_token=token,
                    started_at=hour_ago,
                    outcome=AttemptOutcome.FAILED if kind == "due" else AttemptOutcome.RUNNING,
                    finished_at=hour_ago if kind == "due" else None,
                )
                Step.objects.filter(pk=step.pk).update(
                    status=StepStatus.RETRY_WAIT if kind == "due" else StepStatus.RUNNING,
                    attempts=1,
                    next_attempt_at=now - timedelta(seconds=1) if kind == "due" else None,
                    queued_at=None,
                    lease_token=None if kind == "due" else token,
                    lease_expires_at=None if kind == "due" else now - timedelta(seconds=1),
                    worker="gone@elsewhere:1",
                    started_at=hour_ago,
                )
    # When two sweeps race here while two beats drive sweeps on both workers ...
    barrier = threading.Barrier(2)
    local: list[dict[str, int]] = []

    def racer() -> None:
        barrier.wait()
        try:
            local.append(engine.sweep())
        finally:
            connections.close_all()

    threads = [threading.Thread(target=racer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    finished = wait_until(
        lambda: Run.objects.filter(pk__in=[r.pk for r in runs], status="succeeded").count() == len(runs),
        90,
        "every run to succeed",
        0.2,
    )
    assert finished
    # Then each fault was acted on exactly once over all sweeps ...
    total, sweeps = sweep_counts(first, second)
    for counts in local:
        total.update(counts)
    assert total["requeued"] == FAULTS_PER_KIND, total
    assert total["retries"] == FAULTS_PER_KIND, total
    assert total["expired_leases"] == FAULTS_PER_KIND, total
    # ... every step started once more (and once only), and no message was delivered twice
    attempts = Counter(Attempt.objects.filter(run__in=runs).values_list("step_id", flat=True))
    assert all(attempts[s.pk] == 1 for s in lost)
    assert all(attempts[s.pk] == 2 for s in due + expired)
    assert Attempt.objects.filter(step__in=expired, number=1, outcome=AttemptOutcome.LOST).count() == FAULTS_PER_KIND
    results = worker_results(first, second)
    assert results["not-claimed"] == 0, results
    print(
        f"\nFAULT 6 two sweepers + two beats: {sweeps + len(local)} sweep passes "
        f"({len(local)} racing in-process); lost messages re-sent {total['requeued']}x for {FAULTS_PER_KIND}, "
        f"due retries sent {total['retries']}x for {FAULTS_PER_KIND}, expired leases recovered "
        f"{total['expired_leases']}x for {FAULTS_PER_KIND}; duplicate deliveries 0; every step started once"
    )
