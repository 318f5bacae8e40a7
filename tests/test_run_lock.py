"""The run's lock in completions (runs/engine/state.py, "Shared completions"): the completion of a
step with dependents holds it shared, so two of them in one run do not wait for each other; a
completion that may finish the run holds it exclusively; a shared completion whose cascade needs
more than queueing is rolled back and runs again exclusively. PostgreSQL only (SQLite has one
writer at a time).
"""

from __future__ import annotations

import threading
import time
import uuid
from unittest import mock

import psycopg
import pytest
from django.db import connection

from runs import engine
from runs.engine import broker, state
from runs.models import Attempt, Run, Trace
from tests.conftest import start
from tests.flow_support import route_to

WORKER = "test@host:1"


@pytest.fixture
def postgres():
    if connection.vendor != "postgresql":
        pytest.skip("row lock modes are PostgreSQL's (SQLite has one writer at a time)")


@pytest.fixture
def quiet():
    """Messages go nowhere: the test runs each step itself."""
    with route_to(f"nobody-{uuid.uuid4().hex[:8]}"), mock.patch.object(broker, "enqueue_steps"):
        yield


class ShareHolder:
    """Another session holding the run's lock ``FOR SHARE``, as a shared completion in flight does."""

    def __init__(self, run_id: int):
        params = connection.get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        self.conn = psycopg.connect(**params, autocommit=False)
        self.conn.execute(f"SELECT 1 FROM {Run._meta.db_table} WHERE id = %s FOR SHARE", [run_id])

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()


def _blocked_by(holder: ShareHolder, timeout: float = 10.0) -> bool:
    """Whether a session waits for a lock ``holder`` holds, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                [holder.conn.info.backend_pid],
            )
            if cursor.fetchone()[0]:
                return True
            time.sleep(0.05)
    return False


@pytest.mark.django_db(transaction=True)
def test_a_completion_with_dependents_does_not_wait_for_another_one_in_flight(postgres, quiet):
    # Given: a run of two branches, and another completion in flight holding the run shared
    run = start(
        "key: branches\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop}\n"
        "  - {id: a2, type: noop, depends_on: [a]}\n  - {id: b2, type: noop, depends_on: [b]}\n"
    )
    holder = ShareHolder(run.pk)
    try:
        # When: a step with a dependent completes (its message ran here, and it continues with
        # its dependent inline, a leaf: that one's completion must wait)
        a = run.steps.get(step_id="a")
        done = []

        def execute() -> None:
            try:
                done.append(engine.execute_step(a.pk, worker=WORKER, task_id="t1"))
            finally:
                connection.close()

        thread = threading.Thread(target=execute, daemon=True)
        thread.start()
        # Then: a's completion went through while the other held the run; a2's (a leaf's: it
        # checks whether the run is over) waits for it
        assert _blocked_by(holder)
        assert run.steps.get(step_id="a").status == "succeeded"
        assert run.steps.get(step_id="a2").status == "running"
        assert not done
    finally:
        holder.release()
    thread.join(30)
    assert done == ["succeeded"]
    assert run.steps.get(step_id="a2").status == "succeeded"
    assert Run.objects.get(pk=run.pk).status == "running"  # b's branch is still to run


@pytest.mark.django_db(transaction=True)
def test_a_shared_completion_whose_cascade_finishes_a_step_runs_again_exclusively(postgres, quiet):
    # Given: a step whose dependent is skipped by its condition, a leaf: the run ends there
    run = start(
        "key: skip-after\nvariables:\n  go: {type: boolean, default: false}\nsteps:\n  - {id: a, type: noop}\n"
        '  - {id: b, type: noop, depends_on: [a], when: "${go}"}\n'
    )
    a = run.steps.get(step_id="a")

    # When: a completes
    real, modes = state.close_successes, []

    def close_successes(run_id, items, *, shared=False, **kwargs):
        modes.append(shared)
        return real(run_id, items, shared=shared, **kwargs)

    with mock.patch.object(state, "close_successes", close_successes):
        assert engine.execute_step(a.pk, worker=WORKER, task_id="t1") == "succeeded"

    # Then: the shared try was rolled back, and the exclusive one did the work, once
    assert modes == [True, False]
    run.refresh_from_db()
    assert run.status == "succeeded"
    assert run.steps.get(step_id="b").status == "skipped"
    assert [x.outcome for x in Attempt.objects.filter(step=a)] == ["succeeded"]
    assert Trace.objects.filter(step_row=a, message__startswith="step 'a' succeeded").count() == 1
    assert Trace.objects.filter(run=run, message__startswith="run succeeded").count() == 1


@pytest.mark.django_db(transaction=True)
def test_lattice_completions_in_parallel_finish_the_run_once(postgres, worker):
    """Completions of one run race with the lock shared (a lattice: each step counts down two
    dependents, each dependent waits for two steps); every step runs once, the run ends once."""
    from tests.conftest import wait_for_run

    width, layers = 6, 5
    lines = []
    for layer in range(layers):
        for i in range(width):
            deps = [] if layer == 0 else [f"n{layer - 1}_{i}", f"n{layer - 1}_{(i + 1) % width}"]
            lines.append(f"  - {{id: n{layer}_{i}, type: noop, depends_on: [{', '.join(deps)}]}}")
    run = start("key: lattice\nsteps:\n" + "\n".join(lines) + "\n")
    run = wait_for_run(run.pk, timeout=60)
    assert run.status == "succeeded"
    assert Attempt.objects.filter(step__run=run).count() == width * layers
    assert set(Attempt.objects.filter(step__run=run).values_list("outcome", flat=True)) == {"succeeded"}
    assert Trace.objects.filter(run=run, message__startswith="run succeeded").count() == 1
