"""4. Redis killed mid-run and started again empty; 5. PostgreSQL restarted in immediate mode mid-run.

These restart the machine's shared servers, so they run after every other test (see
conftest.py) and ``services_restored`` brings both back, pass or fail. Redis is started again
with nothing persisted (``--save "" --appendonly no``): every message it held is gone, and the
sweeper must re-send what the broker lost. PostgreSQL's immediate stop is a crash for its
clients: every connection dies mid-transaction; workers must reconnect and the API must say 503
(service unavailable, retry), never 500, while the database is away.
"""

from __future__ import annotations

import subprocess
import time

from django.db import connections

from runs.models import Run, Step
from tests.conftest import start
from tests.faults.conftest import PG_CLUSTER, postgres_ready, redis_ready, start_redis, wait_until
from tests.faults.test_workers import assert_exactly_once, wait_for_runs


def three_steps(receiver, seconds: float) -> str:
    return f"""
key: outage
steps:
  - id: effect
    type: http
    params: {{url: "{receiver.url}/effect/{seconds}", method: POST, json: {{}}}}
    timeout: 20
    retry: {{max_attempts: 5, initial_delay: 0.5, max_delay: 2}}
  - id: b
    type: noop
    depends_on: [effect]
  - id: c
    type: noop
    depends_on: [b]
"""


def in_flight(run_ids) -> bool:
    steps = Step.objects.filter(run_id__in=run_ids)
    return steps.filter(status="succeeded").exists() and steps.filter(status__in=["queued", "running"]).count() >= 10


def test_redis_lost_mid_run_sweeper_resends(processes, receiver, services_restored):
    # Given 40 runs in flight on two workers with a sweeper ...
    workers = [processes.worker("r1", concurrency=4), processes.worker("r2", concurrency=4)]
    processes.beat("beat")
    run_ids = [start(three_steps(receiver, 0.5)).pk for _ in range(40)]
    wait_until(lambda: in_flight(run_ids), 60, "runs to be in flight")
    # When Redis dies without saving and comes back empty ...
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "shutdown", "nosave"], capture_output=True, check=False)
    wait_until(lambda: not redis_ready(), 10, "Redis to stop", 0.05)
    down = time.monotonic()
    queued_when_lost = Step.objects.filter(run_id__in=run_ids, status="queued").count()
    time.sleep(2)
    start_redis()
    back = time.monotonic()
    # Then the sweeper re-sends what the broker lost and every run finishes
    runs = wait_for_runs(run_ids, 120)
    finished = time.monotonic()
    assert [r.status for r in runs] == ["succeeded"] * 40
    assert all(w.alive() for w in workers)
    figures = assert_exactly_once(receiver, runs)
    print(
        f"\nFAULT 4 Redis lost: down {back - down:.1f} s with {queued_when_lost} steps queued in it; "
        f"all 40 runs finished {finished - back:.1f} s after it came back, "
        f"{figures['applied twice']} effects applied twice"
    )


def test_postgres_restart_mid_run_workers_reconnect(processes, receiver, owner_api, services_restored):
    # Given 40 runs in flight on two workers with a sweeper ...
    workers = [processes.worker("p1", concurrency=4), processes.worker("p2", concurrency=4)]
    processes.beat("beat")
    run_ids = [start(three_steps(receiver, 0.5)).pk for _ in range(40)]
    assert owner_api.get("/api/v1/runs/").status_code == 200
    wait_until(lambda: in_flight(run_ids), 60, "runs to be in flight")
    # When PostgreSQL stops in immediate mode (its clients see a crash) and starts again ...
    connections.close_all()
    stopping = subprocess.Popen(["pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, "stop", "-m", "immediate"])
    stopping.wait(60)
    down = time.monotonic()
    # ... the API answers 503 meanwhile, never 500
    statuses = set()
    for path in ("/api/v1/runs/", f"/api/v1/runs/{run_ids[0]}/", "/api/v1/templates/"):
        response = owner_api.get(path)
        statuses.add(response.status_code)
    ready = owner_api.get("/ready").status_code
    connections.close_all()
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, "start"], check=False)
    wait_until(postgres_ready, 60, "PostgreSQL to accept connections", 0.2)
    back = time.monotonic()
    connections.close_all()
    assert statuses == {503}, statuses
    assert ready == 503
    # Then the workers reconnect and every run finishes
    runs = wait_for_runs(run_ids, 180)
    finished = time.monotonic()
    assert [r.status for r in runs] == ["succeeded"] * 40
    assert all(w.alive() for w in workers)
    figures = assert_exactly_once(receiver, runs)
    assert Run.objects.filter(pk__in=run_ids, status="succeeded").count() == 40
    print(
        f"\nFAULT 5 PostgreSQL immediate restart: down {back - down:.1f} s, API answered {sorted(statuses)} "
        f"(/ready {ready}) meanwhile; all 40 runs finished {finished - back:.1f} s after it came back, "
        f"{figures['applied twice']} effects applied twice, "
        f"{figures['redelivered (same key, deduplicated)']} redelivered with the same key"
    )
