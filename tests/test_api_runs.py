"""Operating runs through the API with a real worker: cancel (revoking running tasks), retry (failed
steps and what is downstream, succeeded ones kept; partial retry of a map step), rerun from
scratch, and 50 concurrent requests with one Idempotency-Key making exactly one run."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection

from runs.models import Attempt, Run, Step
from tests.conftest import api_client_for, wait_for_run

API = "/api/v1"


def load(client, yaml_text: str) -> None:
    response = client.post(f"{API}/templates", {"source": yaml_text}, format="json")
    assert response.status_code in (200, 201), response.content


def start(client, key: str, variables: dict | None = None) -> str:
    response = client.post(f"{API}/runs", {"template": key, "variables": variables or {}}, format="json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def attempts_of(run_id: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for step_id, number in Attempt.objects.filter(run_id=run_id).values_list("step__step_id", "number"):
        out.setdefault(step_id, []).append(number)
    return {k: sorted(v) for k, v in out.items()}


def retryable_yaml(counter) -> str:
    return f"""\
key: retryable
steps:
  - id: a
    type: noop
    params: {{output: {{a: 1}}}}
  - id: b
    type: python
    depends_on: [a]
    retry: {{max_attempts: 1}}
    params: {{callable: agents.testing.flaky, key: b, failures: 1, counter_path: "{counter}"}}
  - id: c
    type: noop
    depends_on: [b]
    params: {{output: {{c: "${{steps.b.output.calls}}"}}}}
  - id: d
    type: noop
    params: {{output: {{d: 1}}}}
"""


def test_retry_reruns_failed_and_downstream_keeps_succeeded(worker, owner, tmp_path):
    client = api_client_for(owner)
    load(client, retryable_yaml(tmp_path / "b.count"))
    run_id = start(client, "retryable")
    run = wait_for_run(run_id)
    statuses = dict(Step.objects.filter(run_id=run_id).values_list("step_id", "status"))
    assert run.status == "failed"
    assert statuses == {"a": "succeeded", "b": "dead", "c": "skipped", "d": "succeeded"}

    response = client.post(f"{API}/runs/{run_id}/retry")
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["retried_steps"], body["downstream_steps"]) == (["b"], ["c"])
    assert body["status"] == "running"

    run = wait_for_run(run_id)
    assert run.status == "succeeded", run.error
    # a and d were not run again; b got a second attempt (numbers go on), c ran once
    assert attempts_of(run_id) == {"a": [1], "b": [1, 2], "c": [1], "d": [1]}
    assert run.outputs == {"c": {"c": 2}, "d": {"d": 1}}
    b = Step.objects.get(run_id=run_id, step_id="b")
    assert (b.attempts, b.max_attempts) == (2, 2)
    detail = client.get(f"{API}/runs/{run_id}").json()
    assert detail["progress"]["percent"] == 100
    assert any("retried by owner" in t["message"] for t in client.get(f"{API}/runs/{run_id}/traces").json()["results"])
    # nothing left to retry
    assert client.post(f"{API}/runs/{run_id}/retry").status_code == 409


def test_retry_of_a_map_step_reruns_only_its_failed_items(worker, owner, tmp_path):
    client = api_client_for(owner)
    counter = tmp_path / "items.count"
    load(
        client,
        f"""\
key: mapped
steps:
  - id: each
    type: python
    for_each: [1, 2, 3]
    retry: {{max_attempts: 1}}
    params:
      callable: agents.testing.flaky
      key: "item-${{item}}"
      failures: "${{1 if item == 2 else 0}}"
      counter_path: "{counter}"
  - id: after
    type: noop
    depends_on: [each]
    params: {{output: "${{steps.each.output}}"}}
""",
    )
    run_id = start(client, "mapped")
    assert wait_for_run(run_id).status == "failed"
    assert Step.objects.get(run_id=run_id, step_id="each[1]").status == "dead"

    response = client.post(f"{API}/runs/{run_id}/retry")
    assert response.status_code == 200, response.content
    assert response.json()["retried_steps"] == ["each[1]"]
    assert response.json()["downstream_steps"] == ["after"]
    run = wait_for_run(run_id)
    assert run.status == "succeeded", run.error
    assert attempts_of(run_id) == {"each[0]": [1], "each[1]": [1, 2], "each[2]": [1], "after": [1]}
    assert [item["calls"] for item in run.outputs["after"]] == [1, 2, 1]


def test_cancel_revokes_the_running_task_and_cancels_pending_steps(worker, owner):
    from orchestrator_site.celery import app

    client = api_client_for(owner)
    load(
        client,
        """\
key: slow
steps:
  - id: nap
    type: sleep
    timeout: 120
    params: {seconds: 60}
  - id: after
    type: noop
    depends_on: [nap]
""",
    )
    run_id = start(client, "slow")
    deadline = time.time() + 20
    attempt = None
    while time.time() < deadline and attempt is None:
        attempt = Attempt.objects.filter(run_id=run_id, step__step_id="nap").first()
        time.sleep(0.1)
    assert attempt is not None and attempt.task_id, "the sleep step never started"

    def active_ids() -> set[str]:
        replies = app.control.inspect(timeout=1.0).active() or {}
        return {task["id"] for tasks in replies.values() for task in tasks}

    assert attempt.task_id in active_ids()
    started = time.monotonic()
    response = client.post(f"{API}/runs/{run_id}/cancel")
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "cancelled"
    assert dict(Step.objects.filter(run_id=run_id).values_list("step_id", "status")) == {
        "nap": "cancelled",
        "after": "cancelled",
    }
    # the worker process running the sleep is terminated: the task leaves the active list at once
    while attempt.task_id in active_ids():
        assert time.monotonic() - started < 15, "the running task was not revoked"
        time.sleep(0.2)
    assert time.monotonic() - started < 15
    attempt.refresh_from_db()
    assert attempt.outcome == "cancelled" and attempt.finished_at is not None
    # the worker pool is healthy after the termination: a new run goes through
    load(client, "key: quick\nsteps:\n  - {id: q, type: noop}\n")
    assert wait_for_run(start(client, "quick")).status == "succeeded"


def test_rerun_starts_a_new_run_from_scratch(worker, owner):
    client = api_client_for(owner)
    load(
        client,
        """\
key: greet
variables:
  who: {type: string, required: true}
steps:
  - id: hello
    type: noop
    params: {output: "hi ${who}"}
""",
    )
    first = start(client, "greet", {"who": "ada"})
    assert wait_for_run(first).status == "succeeded"
    response = client.post(f"{API}/runs/{first}/rerun")
    assert response.status_code == 201, response.content
    second = response.json()
    assert second["id"] != first and second["rerun_of"] == first and second["inputs"] == {"who": "ada"}
    run = wait_for_run(second["id"])
    assert run.status == "succeeded" and run.outputs == {"hello": "hi ada"}
    assert run.trigger == "rerun"
    assert attempts_of(first) == {"hello": [1]}  # the original is untouched


def test_fifty_concurrent_requests_with_one_key_make_one_run(transactional_db, owner, chain_template):
    body = {"template": "chain", "variables": {"n": 5}}
    barrier = threading.Barrier(50)
    token_client = api_client_for(owner)
    token = token_client.token

    def post(_: int):
        client = api_client_for(None)
        client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        try:
            barrier.wait(timeout=30)
            response = client.post(f"{API}/runs", body, format="json", HTTP_IDEMPOTENCY_KEY="one-key")
            return response.status_code, response.json().get("id")
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(post, range(50)))
    codes = sorted(code for code, _ in results)
    assert codes.count(201) == 1 and codes.count(200) == 49, codes
    assert len({run_id for _, run_id in results}) == 1
    assert Run.objects.filter(idempotency_key="one-key").count() == 1
    assert Run.objects.count() == 1
    # and a different body with the key is refused, even now
    other = token_client.post(f"{API}/runs", {**body, "priority": 1}, format="json", HTTP_IDEMPOTENCY_KEY="one-key")
    assert other.status_code == 409


@pytest.mark.parametrize("verb", ["cancel", "retry", "rerun"])
def test_outsider_cannot_operate_runs(worker, owner, outsider, verb):
    client = api_client_for(owner)
    load(client, "key: quick\nsteps:\n  - {id: q, type: noop}\n")
    run_id = start(client, "quick")
    wait_for_run(run_id)
    response = api_client_for(outsider).post(f"{API}/runs/{run_id}/{verb}")
    assert response.status_code == 404
    assert Run.objects.count() == 1 and Run.objects.get(pk=run_id).status == "succeeded"


# --- the batch path -------------------------------------------------------------------------------


def test_batch_starts_many_runs_in_one_transaction_or_none(worker, owner_api, chain_template):
    from runs.models import Run

    url = "/api/v1/runs/batch"
    # one bad item: a 400 that names it, and nothing started
    bad = owner_api.post(
        url, {"template": "chain", "runs": [{"variables": {"n": 1}}, {"variables": {}}]}, format="json"
    )
    assert bad.status_code == 400 and "runs[1]" in bad.json()["detail"], bad.content
    assert not Run.objects.filter(template_key="chain").exists()
    too_many = owner_api.post(url, {"template": "chain", "runs": [{"variables": {"n": 1}}] * 1001}, format="json")
    assert too_many.status_code == 400
    # three good ones: 201, in request order, each running to the end
    body = {"template": "chain", "runs": [{"variables": {"n": i}, "correlation_id": f"b-{i}"} for i in range(3)]}
    response = owner_api.post(url, body, format="json")
    assert response.status_code == 201, response.content
    ids = [item["id"] for item in response.json()["runs"]]
    assert [Run.objects.get(pk=i).correlation_id for i in ids] == ["b-0", "b-1", "b-2"]
    assert all(wait_for_run(i).status == "succeeded" for i in ids)
    assert {Run.objects.get(pk=i).tenant_id for i in ids} == {"acme"}
