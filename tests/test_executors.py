"""External executors (seed 001): the reference executor script over HTTP, killed mid-task and
recovered, and the executor API's scoping and lease rules."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from runs import engine
from runs.engine import executors
from runs.models import Attempt, Executor, Step, Tenant
from tests.conftest import ROOT, start, wait_for_run

EXTERNAL = """\
key: ext
steps:
  - {id: a, type: noop, params: {output: {n: 3}}}
  - id: work
    type: external
    queue: QUEUE
    depends_on: [a]
    retry: {max_attempts: 3, initial_delay: 0.1, jitter: false}
    params: {sleep: SLEEP, n: "${steps.a.output.n}"}
  - {id: c, type: noop, depends_on: [work], params: {output: "${steps.work.output.echo.n}"}}
"""


def _executor(tenant_slug: str, queues: list[str]) -> tuple[Executor, str]:
    tenant, _ = Tenant.objects.get_or_create(slug=tenant_slug, defaults={"name": tenant_slug})
    return Executor.issue(tenant, f"ex-{uuid.uuid4().hex[:6]}", queues)


def _spawn(url: str, token: str, queue: str, log_path, lease: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "executor.py"), "--url", url, "--token", token]
        + ["--queue", queue, "--lease", str(lease), "--poll-interval", "0.2"],
        stdout=open(log_path, "ab"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_reference_executor_killed_mid_task_is_recovered(worker, live_server, tmp_path):
    queue = f"ext-{uuid.uuid4().hex[:6]}"
    _executor_row, token = _executor("default", [queue])
    run = start(EXTERNAL.replace("QUEUE", queue).replace("SLEEP", "30"))
    log_path = tmp_path / "executor.log"
    # given an executor that takes the step and works on it (a 30 s task, a 2 s lease)...
    first = _spawn(live_server.url, token, queue, log_path, lease=2.0)
    try:
        deadline = time.time() + 60
        while not Step.objects.filter(run=run, step_id="work", status="running").exists():
            assert time.time() < deadline, log_path.read_text()
            time.sleep(0.1)
        # ...when it is SIGKILLed mid-task (no report, no more heartbeats)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    step = Step.objects.get(run=run, step_id="work")
    # the step is still running under the dead executor's lease: nobody else may take it yet
    assert executors.poll(tenant_id="default", queues=[queue], executor_id="other") == []
    # then the lease expires, the sweeper counts the attempt as lost and the step is queued again
    deadline = time.time() + 30
    while Step.objects.get(pk=step.pk).status != "queued":
        assert time.time() < deadline, Step.objects.get(pk=step.pk).status
        engine.sweep()
        time.sleep(0.2)
    # and a new executor finishes it (short work this time), and the run goes on through Celery
    Step.objects.filter(pk=step.pk).update(spec={**step.spec, "params": {"sleep": 0.2, "n": "${steps.a.output.n}"}})
    second = _spawn(live_server.url, token, queue, log_path, lease=5.0)
    try:
        finished = wait_for_run(run.pk, timeout=60, sweep=True)
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(10)
    assert finished.status == "succeeded", log_path.read_text()
    outcomes = list(Attempt.objects.filter(step=step).order_by("number").values_list("outcome", flat=True))
    assert outcomes == ["lost", "succeeded"]
    assert Step.objects.get(run=run, step_id="c").output == 3  # the executor's output fed the next step
    work = Step.objects.get(pk=step.pk)
    assert work.output["idempotency_key"] == f"{run.pk}:work"  # the same key on both attempts


def test_executor_api_scopes_tenant_and_queues_and_refuses_late_reports(transactional_db, monkeypatch, client):
    monkeypatch.setattr(engine.broker, "enqueue_steps", lambda *a, **k: None)  # no worker needed
    queue = f"ext-{uuid.uuid4().hex[:6]}"
    _mine, token = _executor("default", [queue])
    _theirs, other_token = _executor("globex", [queue])
    run = start(EXTERNAL.replace("QUEUE", queue).replace("SLEEP", "0"))
    engine.execute_step(Step.objects.get(run=run, step_id="a").pk)  # a succeeds: work is queued
    assert Step.objects.get(run=run, step_id="work").status == "queued"

    def post(path, body, bearer=token):
        return client.post(
            f"/api/v1/executors/{path}", body, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {bearer}"
        )

    assert post("poll", {"queues": [queue]}, bearer="exe_nope").status_code == 401
    assert post("poll", {"queues": ["not-mine"]}).status_code == 403
    assert post("poll", {"queues": [queue], "max_tasks": 1000}).status_code == 400  # capped
    # another tenant's executor on a queue of the same name sees nothing of this tenant
    assert post("poll", {"queues": [queue]}, bearer=other_token).json() == {"tasks": []}
    tasks = post("poll", {"queues": [queue], "lease_seconds": 5}).json()["tasks"]
    assert len(tasks) == 1 and tasks[0]["params"] == {"sleep": 0, "n": 3}  # expressions resolved
    task = tasks[0]
    assert post("poll", {"queues": [queue]}).json() == {"tasks": []}  # claimed once
    # a heartbeat with a wrong lease token, or from the other tenant, is refused
    step_path = f"steps/{task['step']}"
    assert post(f"{step_path}/heartbeat", {"lease_token": str(uuid.uuid4())}).status_code == 409
    assert post(f"{step_path}/heartbeat", {"lease_token": task["lease_token"]}, bearer=other_token).status_code == 409
    assert post(f"{step_path}/heartbeat", {"lease_token": task["lease_token"]}).status_code == 200
    # a retryable failure: the step waits for its retry; the old lease can no longer report
    assert post(f"{step_path}/fail", {"lease_token": task["lease_token"], "error": "disk full"}).json() == {
        "result": "retry"
    }
    late = post(f"{step_path}/complete", {"lease_token": task["lease_token"], "output": 1})
    assert late.status_code == 409
    work = Step.objects.get(pk=task["step"])
    assert (work.status, work.error) == ("retry_wait", "disk full")
    # once due, the sweeper queues it for the executors (no Celery message) and it completes
    Step.objects.filter(pk=work.pk).update(next_attempt_at=work.next_attempt_at.replace(year=2000))
    engine.sweep()
    again = post("poll", {"queues": [queue]}).json()["tasks"][0]
    assert again["attempt"] == 2 and again["idempotency_key"] == task["idempotency_key"]
    done = post(f"steps/{again['step']}/complete", {"lease_token": again["lease_token"], "output": {"ok": 1}})
    assert done.json() == {"result": "succeeded"}
    assert Step.objects.get(pk=work.pk).output == {"ok": 1}


def test_external_step_declaration_errors():
    from templates_app.spec import WorkflowError, load_spec

    with pytest.raises(WorkflowError, match="an external step needs a `queue`"):
        load_spec("key: x\nsteps:\n  - {id: a, type: external}\n", source="x.yaml")
    with pytest.raises(WorkflowError, match="queue: expected a name"):
        load_spec("key: x\nsteps:\n  - {id: a, type: external, queue: 'a b'}\n", source="x.yaml")
    with pytest.raises(WorkflowError, match="takes no rate_limit or concurrency"):
        load_spec("key: x\nsteps:\n  - {id: a, type: noop, queue: q, concurrency: 2}\n", source="x.yaml")
    spec = load_spec("key: x\nsteps:\n  - {id: a, type: external, queue: gpu, params: {x: 1}}\n", source="x.yaml")
    assert spec["steps"][0]["queue"] == "gpu"
