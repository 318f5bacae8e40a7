"""Worker faults against real PostgreSQL, Redis and celery worker processes.

1. SIGKILL a whole worker (its process group) while 100 steps run; a new worker finishes them.
2. SIGKILL one pool process mid-step; the step is retried by another process at once.
3. SIGSTOP a worker past its lease; another takes the step over; after SIGCONT the late
   completion of the first attempt is refused and the step's state changed once.
7. A step that always fails makes exactly max_attempts attempts, its delays inside the backoff
   and jitter bounds, then is dead; so is a step whose code calls os._exit.

Each test prints its figure (``-s`` shows them) and asserts it.
"""

from __future__ import annotations

import os
import signal
import time

from runs import engine
from runs.choices import AttemptOutcome, StepStatus
from runs.models import Attempt, Run, Step, Trace
from tests.conftest import start
from tests.faults.conftest import wait_until, worker_results


def effect_chain(
    receiver, seconds: float, *, timeout: float = 30, attempts: int = 3, key: str = "effect", path: str = "effect"
) -> str:
    """A run: an http step with a side effect taking ``seconds``, then a noop."""
    return f"""
key: {key}
steps:
  - id: effect
    type: http
    params: {{url: "{receiver.url}/{path}/{seconds}", method: POST, json: {{}}}}
    timeout: {timeout}
    retry: {{max_attempts: {attempts}, initial_delay: 0.2, max_delay: 1, jitter: true}}
  - id: after
    type: noop
    depends_on: [effect]
"""


def wait_for_runs(run_ids, timeout: float) -> list[Run]:
    def done():
        runs = list(Run.objects.filter(pk__in=run_ids))
        return runs if all(r.status in ("succeeded", "failed", "cancelled", "timed_out") for r in runs) else None

    return wait_until(done, timeout, f"{len(run_ids)} runs to finish", 0.2)


def assert_exactly_once(receiver, runs) -> dict[str, int]:
    """Every effect step applied once, and all its deliveries carried one key; returns figures."""
    deliveries = receiver.deliveries()
    expected = {f"{run.pk}:effect" for run in runs}
    assert set(receiver.applied_keys) == expected, "an effect was never applied, or applied under a foreign key"
    assert all(count == 1 for count in receiver.applied_keys.values())
    return {
        "effects": len(expected),
        "applied twice": sum(1 for count in receiver.applied_keys.values() if count > 1),
        "redelivered (same key, deduplicated)": sum(count - 1 for count in deliveries.values() if count > 1),
    }


def test_sigkill_whole_worker_loses_nothing(processes, receiver):
    # Given a worker whose 100 threads each run a step with a 3 s side effect, and a sweeper ...
    first = processes.worker("first", pool="threads", concurrency=100, env={"ORCHESTRATOR_RELEASE_DB_DURING_STEP": "1"})
    processes.beat("beat")
    yaml_text = effect_chain(receiver, 25, path="held")  # the calls hang until the kill, retries pass
    run_ids = [start(yaml_text).pk for _ in range(100)]
    running = wait_until(
        lambda: (n := Step.objects.filter(run_id__in=run_ids, step_id="effect", status="running").count()) >= 100 and n,
        60,
        "100 steps running",
    )
    # When the whole worker (master and threads: its process group) is killed ...
    killed_at = time.monotonic()
    first.signal(signal.SIGKILL)
    first.popen.wait(10)
    receiver.release()
    # ... and a new worker starts
    processes.worker("second", concurrency=4)
    runs = wait_for_runs(run_ids, 120)
    recovery = time.monotonic() - killed_at
    # Then every run finished, no step was lost, no effect was applied twice
    assert [r.status for r in runs] == ["succeeded"] * 100
    steps = Step.objects.filter(run_id__in=run_ids)
    assert steps.count() == 200 and steps.filter(status=StepStatus.SUCCEEDED).count() == 200
    lost = Attempt.objects.filter(run_id__in=run_ids, outcome=AttemptOutcome.LOST).count()
    assert lost == running  # each killed attempt was counted lost, then retried
    figures = assert_exactly_once(receiver, runs)
    print(
        f"\nFAULT 1 SIGKILL worker group: {running} steps running when killed, 0 lost, "
        f"{figures['applied twice']} effects applied twice, {figures['redelivered (same key, deduplicated)']} "
        f"redelivered with the same key, all 100 runs finished {recovery:.1f} s after the kill"
    )


def test_sigkill_pool_process_retries_on_another(processes, receiver):
    # Given a prefork worker with two pool processes, one of them running a step ...
    worker = processes.worker("pool", concurrency=2)
    run = start(effect_chain(receiver, 2, timeout=120))
    step = wait_until(
        lambda: Step.objects.filter(run=run, step_id="effect", status="running").exclude(worker="").first(),
        30,
        "the step to run",
    )
    victim = int(step.worker.rpartition(":")[2])
    assert victim in worker.children()
    lease_expires_at = step.lease_expires_at
    # When that pool process is SIGKILLed mid-step ...
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    run = wait_for_runs([run.pk], 60)[0]
    # Then the step was retried by another process, long before its lease would have expired
    assert run.status == "succeeded"
    attempts = list(Attempt.objects.filter(step__run=run, step__step_id="effect").order_by("number"))
    assert [a.outcome for a in attempts] == [AttemptOutcome.LOST, AttemptOutcome.SUCCEEDED]
    assert int(attempts[1].worker.rpartition(":")[2]) != victim
    assert attempts[1].started_at < lease_expires_at
    assert worker.alive()
    print(
        f"\nFAULT 2 SIGKILL pool process: attempt 1 lost, attempt 2 on pid {attempts[1].worker.rpartition(':')[2]} "
        f"started {(attempts[1].started_at - attempts[0].started_at).total_seconds():.1f} s after attempt 1 "
        f"(lease would have expired after {(lease_expires_at - attempts[0].started_at).total_seconds():.0f} s); "
        f"run done {time.monotonic() - killed:.1f} s after the kill"
    )


def test_sigstop_past_lease_late_completion_refused(processes, receiver):
    # Given worker A running a step whose lease is 3 s + 2 s grace ...
    worker_a = processes.worker("a", concurrency=1)
    run = start(effect_chain(receiver, 0.5, timeout=3))
    step = wait_until(
        lambda: Step.objects.filter(run=run, step_id="effect", status="running").first(), 30, "A to claim"
    )
    assert step.worker.startswith("a-")
    # When A is frozen (SIGSTOP) past the lease, and another worker is there ...
    worker_a.signal(signal.SIGSTOP)
    stopped = time.monotonic()
    processes.worker("b", concurrency=1)
    wait_until(lambda: time.time() > step.lease_expires_at.timestamp() + 0.2, 30, "the lease to expire")
    # ... the sweeper hands the step over and B finishes the run
    assert engine.sweep()["expired_leases"] == 1
    run = wait_for_runs([run.pk], 60)[0]
    assert run.status == "succeeded"
    done = Step.objects.get(pk=step.pk)
    assert done.attempts == 2 and done.worker.startswith("b-")
    # ... then A wakes up and its late completion is refused: the step does not change again
    worker_a.signal(signal.SIGCONT)
    frozen_for = time.monotonic() - stopped
    wait_until(
        lambda: Attempt.objects.filter(step=step, number=1, outcome=AttemptOutcome.REFUSED).exists(),
        30,
        "A's late completion to be refused",
    )
    after = Step.objects.get(pk=step.pk)
    assert (after.status, after.output, after.finished_at, after.attempts) == (
        done.status,
        done.output,
        done.finished_at,
        done.attempts,
    )
    assert Trace.objects.filter(step_row=step, message__contains="succeeded in").count() == 1
    assert Trace.objects.filter(step_row=step, message__contains="late completion refused").count() == 1
    assert Run.objects.get(pk=run.pk).finished_at == run.finished_at
    print(
        f"\nFAULT 3 SIGSTOP past lease: A frozen {frozen_for:.1f} s, B took over as attempt 2; "
        f"A's late completion refused, step state changed once (1 'succeeded' trace)"
    )


def test_always_failing_step_is_dead_after_max_attempts(processes, receiver, settings):
    # Given a step that always fails, 4 attempts, exponential backoff 0.5 s .. 2 s with jitter ...
    processes.worker("retry", concurrency=2)
    processes.beat("beat")
    retry = {"max_attempts": 4, "backoff": "exponential", "initial_delay": 0.5, "max_delay": 2, "jitter": True}
    run = start(
        "key: always-fails\nsteps:\n  - id: boom\n    type: python\n"
        "    params: {callable: agents.testing.fail, kwargs: {message: nope}}\n"
        f"    retry: {retry}\n".replace("'", "")
    )
    run = wait_for_runs([run.pk], 60)[0]
    step = Step.objects.get(run=run, step_id="boom")
    attempts = list(Attempt.objects.filter(step=step).order_by("number"))
    # Then exactly max_attempts attempts, then dead ...
    assert run.status == "failed" and step.status == StepStatus.DEAD
    assert [a.number for a in attempts] == [1, 2, 3, 4]
    assert all(a.outcome == AttemptOutcome.FAILED for a in attempts)
    # ... and each delay inside its bounds: equal jitter draws from [d/2, d], d = min(0.5 * 2**(n-1), 2)
    planned = [t.data["delay_s"] for t in Trace.objects.filter(step_row=step, data__delay_s__gt=0).order_by("id")]
    gaps = [(b.started_at - a.finished_at).total_seconds() for a, b in zip(attempts, attempts[1:], strict=False)]
    assert len(planned) == 3
    for n, (delay, gap) in enumerate(zip(planned, gaps, strict=True), start=1):
        ceiling = min(0.5 * 2 ** (n - 1), 2.0)
        assert ceiling / 2 <= delay <= ceiling, (n, delay)
        assert gap >= delay - 0.05, (n, gap, delay)  # never earlier than planned
    print(
        "\nFAULT 7 always failing: 4 attempts then dead; planned delays "
        + ", ".join(f"{d:.2f}" for d in planned)
        + " s (bounds [0.25,0.5], [0.5,1], [1,2]); observed gaps "
        + ", ".join(f"{g:.2f}" for g in gaps)
        + " s"
    )


def test_os_exit_in_step_is_dead_after_max_attempts(processes, settings):
    # Given a python step whose code kills its own process (os._exit), 3 attempts ...
    hard_exit = "tests.faults.callables.hard_exit"
    settings.ORCHESTRATOR_PYTHON_CALLABLES = [*settings.ORCHESTRATOR_PYTHON_CALLABLES, hard_exit]
    worker = processes.worker("exit", concurrency=2)
    run = start(
        "key: hard-exit\nsteps:\n  - id: bye\n    type: python\n"
        "    params: {callable: tests.faults.callables.hard_exit}\n"
        "    timeout: 120\n"
        "    retry: {max_attempts: 3, initial_delay: 0.2, max_delay: 0.5}\n"
    )
    started = time.monotonic()
    run = wait_for_runs([run.pk], 60)[0]
    step = Step.objects.get(run=run, step_id="bye")
    attempts = list(Attempt.objects.filter(step=step).order_by("number"))
    # Then each killed attempt counted as lost, and the step is dead after the third
    assert run.status == "failed" and step.status == StepStatus.DEAD
    assert [a.outcome for a in attempts] == [AttemptOutcome.LOST] * 3
    assert "exited during the attempt" in step.error
    assert worker.alive()  # the master replaced its pool processes and goes on
    results = worker_results(worker)
    print(
        f"\nFAULT 7b os._exit: 3 attempts, each lost with its process, then dead after "
        f"{time.monotonic() - started:.1f} s (step timeout 120 s); worker alive; messages: {dict(results)}"
    )
