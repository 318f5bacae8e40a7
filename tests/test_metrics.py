"""``/metrics``: seed 001's and seed 000's series, summed over the web process and the worker's
processes; a scrape after runs shows the counters moved; the exposition parses (and passes
``promtool check metrics`` when promtool is installed)."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from runs.metrics import parse_families
from tests.conftest import run_to_end

SEED_001 = [
    "orchestrator_flow_runs_processed",
    "orchestrator_run_execution_seconds",
    "orchestrator_active_runs",
    "orchestrator_tasks_scheduled",
    "orchestrator_tasks_completed",
    "orchestrator_task_execution_seconds",
    "orchestrator_active_tasks",
    "orchestrator_retry_attempts",
    "orchestrator_dead_letter_queue_size",
]


def scrape(client) -> tuple[str, dict]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    text = response.content.decode()
    return text, parse_families(text)


def value(families: dict, name: str, **labels) -> float:
    """The sample ``name`` (full sample name, e.g. ``x_total``) with exactly ``labels``; 0 when absent."""
    for family in families.values():
        for sample in family.samples:
            if sample.name == name and sample.labels == {k: str(v) for k, v in labels.items()}:
                return sample.value
    return 0.0


def promtool_check(text: str) -> None:
    """``promtool check metrics`` on the exposition when promtool is installed (Debian: prometheus)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


FLAKY = """\
key: metered
steps:
  - {id: a, type: noop}
  - {id: b, type: noop, depends_on: [a]}
  - {id: c, type: noop, depends_on: [a]}
  - id: f
    type: python
    depends_on: [b, c]
    retry: {max_attempts: 2, initial_delay: 0.05, jitter: false}
    params: {callable: agents.testing.flaky, key: f, failures: 1, counter_path: "COUNTER"}
"""


def test_scrape_after_runs_shows_the_counters_moved(worker, client, tmp_path):
    _, before = scrape(client)
    for name in SEED_001 + ["task_queue_jobs"]:
        assert name in before, f"{name} missing from /metrics"

    run, _ = run_to_end(FLAKY.replace("COUNTER", str(tmp_path / "f.count")))
    assert run.status == "succeeded"
    dead_run, _ = run_to_end(
        "key: dies\nsteps:\n"
        "  - {id: x, type: python, retry: {max_attempts: 1}, params: {callable: agents.testing.fail}}\n"
    )
    assert dead_run.status == "failed"

    expected = {
        ("orchestrator_flow_runs_processed_total", (("status", "succeeded"),)): 1,
        ("orchestrator_flow_runs_processed_total", (("status", "failed"),)): 1,
        ("orchestrator_run_execution_seconds_count", ()): 2,
        ("orchestrator_tasks_completed_total", (("status", "succeeded"),)): 4,
        ("orchestrator_tasks_completed_total", (("status", "retry"),)): 1,
        ("orchestrator_tasks_completed_total", (("status", "dead"),)): 1,
        ("orchestrator_retry_attempts_total", (("handler", "python"),)): 1,
        ("orchestrator_task_execution_seconds_count", (("handler", "noop"),)): 3,
        ("orchestrator_task_execution_seconds_count", (("handler", "python"),)): 3,
    }
    # completions are counted right after their commit: give the last one a moment
    deadline = time.time() + 10
    while True:
        text, after = scrape(client)
        moved = {key: value(after, key[0], **dict(key[1])) - value(before, key[0], **dict(key[1])) for key in expected}
        if moved == expected or time.time() > deadline:
            break
        time.sleep(0.2)
    assert moved == expected
    # 4 steps and a retry of the first run, 1 step of the second (sent, or continued inline)
    scheduled = value(after, "orchestrator_tasks_scheduled_total") - value(before, "orchestrator_tasks_scheduled_total")
    assert scheduled >= 6
    # gauges are read from the rows: one dead step, nothing active
    assert value(after, "orchestrator_dead_letter_queue_size") == 1
    assert value(after, "task_queue_jobs", status="dead") == 1
    assert value(after, "orchestrator_active_runs") == 0
    assert value(after, "orchestrator_active_tasks") == 0
    # django-prometheus's own series are there too, and the whole page is valid
    assert any(name.startswith("django_http_requests") for name in after)
    promtool_check(text)


@pytest.mark.django_db
def test_gauges_count_unfinished_steps_by_status(client, chain_template):
    from runs import engine

    engine.start_run(chain_template.spec, {"n": 1}, template=chain_template, tenant_id="acme")
    engine.start_run(chain_template.spec, {"n": 2}, template=chain_template, tenant_id="globex")
    text, families = scrape(client)
    assert value(families, "orchestrator_active_runs") == 2
    assert value(families, "task_queue_jobs", status="queued") == 2
    assert value(families, "task_queue_jobs", status="pending") == 2
    assert value(families, "orchestrator_active_tasks") == 2  # queued, running or retry_wait
    promtool_check(text)


@pytest.mark.django_db
def test_metrics_token(client, settings):
    settings.ORCHESTRATOR_METRICS_TOKEN = "scrape-secret"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret").status_code == 200


@pytest.mark.django_db
def test_metrics_of_every_machine_folder_under_the_root_are_summed(client, settings, monkeypatch, tmp_path):
    """Containers sharing the data folder each write under <root>/<hostname>; /metrics sums them."""
    import os

    from runs import metrics

    metrics.TASKS_SCHEDULED.inc(3)
    here = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    _, alone = scrape(client)
    for host in ("host-a", "host-b"):
        shutil.copytree(here, tmp_path / host)
    settings.ORCHESTRATOR_METRICS_ROOT = str(tmp_path)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "host-a"))
    _, summed = scrape(client)
    one = value(alone, "orchestrator_tasks_scheduled_total")
    assert one >= 3
    assert value(summed, "orchestrator_tasks_scheduled_total") == 2 * one
