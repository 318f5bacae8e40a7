"""The admin in a real browser: Playwright driving Debian's chromium against a live Django server
and the session's real Celery worker. Each test asserts on what a person sees (text, colours,
number of nodes and bars) and saves screenshots under ``ORCHESTRATOR_ARTIFACTS`` (default
``tests/artifacts/``).

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``; Playwright never downloads a
browser here) and the ``playwright`` package (requirements-dev.txt); skipped with the reason when
chromium is missing.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from runs.models import Run, Step
from tests.conftest import ROOT, api_client_for, wait_for_run

CHROMIUM = os.environ.get("ORCHESTRATOR_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("ORCHESTRATOR_ARTIFACTS") or ROOT / "tests" / "artifacts")
VIEWPORT = {"width": 1400, "height": 900}

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) or shutil.which("chromium")),
    reason=f"Debian's chromium is not installed ({CHROMIUM}): apt-get install -y chromium",
)

# Playwright's sync API runs an event loop in the test's thread; the test's own ORM calls are
# synchronous and safe there (Django cannot tell, so it must be told).
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

GREEN, RED, BLUE = "rgb(26, 127, 55)", "rgb(207, 34, 46)", "rgb(31, 111, 235)"

FANOUT_YAML = """\
key: fanout
name: Fan-out and join
variables:
  items: {type: array, default: [1, 2, 3, 4, 5]}
steps:
  - id: fetch
    type: noop
    params: {output: {values: "${items}"}}
  - id: square
    type: python
    depends_on: [fetch]
    for_each: ${steps.fetch.output.values}
    params: {callable: agents.testing.echo, kwargs: {n: "${item}"}}
  - id: audit
    type: sleep
    depends_on: [fetch]
    params: {seconds: 2}
  - id: report
    type: noop
    depends_on: [square, audit]
    params: {output: {squares: "${steps.square.output}"}}
"""

SLOW_YAML = """\
key: slow
steps:
  - id: wait
    type: sleep
    params: {seconds: 60}
  - id: after
    type: noop
    depends_on: [wait]
"""

FLAKY_YAML = """\
key: flaky-once
steps:
  - id: call
    type: python
    retry: {max_attempts: 1}
    params: {callable: agents.testing.flaky, key: call, failures: 1, counter_path: "COUNTER"}
  - id: publish
    type: noop
    depends_on: [call]
"""


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements-dev.txt (playwright)")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where chromium's own sandbox refuses to start
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def admin_user(worker):
    from django.contrib.auth import get_user_model

    from runs.models import Membership, Tenant

    user = get_user_model().objects.create_superuser("root", "root@example.com", "pw-root")
    tenant, _ = Tenant.objects.get_or_create(slug="acme", defaults={"name": "Acme"})
    Membership.objects.create(user=user, tenant=tenant, role="owner", is_default=True)
    return user


@pytest.fixture
def page(browser, live_server, request):
    """A logged-out browser tab of 1400 x 900 px on the live server. Whatever the outcome, the
    tab's last state is saved as ``<ARTIFACTS>/last-<test name>.png``."""
    context = browser.new_context(viewport=VIEWPORT, base_url=live_server.url)
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    yield tab
    shot(tab, f"last-{request.node.name}")
    context.close()


def shot(tab, name: str) -> Path:
    """Save a full-page screenshot ``<ARTIFACTS>/<name>.png``; returns its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    tab.screenshot(path=str(path), full_page=True)
    return path


def log_in(tab, username: str = "root", password: str = "pw-root") -> None:
    tab.goto("/admin/login/?next=/admin/")
    tab.fill("#id_username", username)
    tab.fill("#id_password", password)
    tab.click("input[type=submit]")
    tab.wait_for_selector("#site-name")
    assert "log out" in tab.inner_text("#user-tools").lower()


def start_run(owner, yaml_text: str, variables: dict | None = None) -> Run:
    client = api_client_for(owner)
    response = client.post("/api/v1/templates", {"source": yaml_text}, format="json")
    assert response.status_code in (200, 201), response.content
    key = re.search(r"^key: (\S+)", yaml_text, re.M).group(1)
    response = client.post("/api/v1/runs", {"template": key, "variables": variables or {}}, format="json")
    assert response.status_code == 201, response.content
    return Run.objects.get(pk=response.json()["id"])


def stroke(tab, step_id: str) -> str:
    return tab.eval_on_selector(f'.dag-node[data-step="{step_id}"] rect.box', "el => getComputedStyle(el).stroke")


def test_log_in_and_read_the_dashboard_charts(page, admin_user, tmp_path):
    # given finished runs: two that succeeded and one with a dead step
    for _ in range(2):
        assert wait_for_run(start_run(admin_user, FANOUT_YAML).pk).status == "succeeded"
    failed = wait_for_run(start_run(admin_user, FLAKY_YAML.replace("COUNTER", str(tmp_path / "c"))).pk)
    assert failed.status == "failed"

    # when an operator logs in and opens the dashboard
    log_in(page)
    page.click("text=Operations dashboard")
    page.wait_for_selector("body[data-charts-drawn='1']")

    # then the charts show what happened
    assert page.is_visible("text=Runs finished per hour, by status (last 24 h)")
    finished = page.evaluate(
        """() => Object.fromEntries(Chart.getChart('chart-runs-finished').data.datasets
                 .map(d => [d.label, d.data.reduce((a, b) => a + b, 0)]))"""
    )
    assert finished["succeeded"] == 2 and finished["failed"] == 1
    types = page.evaluate("() => Chart.getChart('chart-durations').data.labels")
    assert {"noop", "python", "sleep"} <= set(types)
    p50 = page.evaluate("() => Chart.getChart('chart-durations').data.datasets[0].data")
    sleep_p50 = p50[types.index("sleep")]
    assert sleep_p50 >= 2000  # the 2 s sleep step, in ms
    queue = page.evaluate(
        """() => { const c = Chart.getChart('chart-queue');
                   return Object.fromEntries(c.data.labels.map((l, i) => [l, c.data.datasets[0].data[i]])); }"""
    )
    assert queue["dead"] == 1
    dead_per_hour = page.evaluate("() => Chart.getChart('chart-rates').data.datasets[1].data")
    assert sum(dead_per_hour) == 1
    assert "attempts failed and were retried or died" in page.inner_text("#retry-rate")
    assert page.is_visible("#tokens-pending")
    assert "call" in page.inner_text("#dead-letters")
    shot(page, "dashboard")


def test_run_graph_and_timeline_update_live(page, admin_user):
    # given a fan-out run that takes a few seconds
    run = start_run(admin_user, FANOUT_YAML)
    log_in(page)

    # when the run page is open while it runs
    page.goto(f"/admin/runs/run/{run.pk}/change/")
    nodes = page.locator("svg#run-graph .dag-node")
    assert nodes.count() == 4  # fetch, square (5 items folded in), audit, report
    assert page.locator("svg#run-graph .dag-edge").count() == 4
    page.wait_for_selector('.dag-node[data-step="audit"].status-running')
    assert stroke(page, "audit") == BLUE
    shot(page, "run-graph-running")

    # then the page follows the run to its end without a reload
    page.wait_for_selector('.dag-node[data-step="report"].status-succeeded', timeout=60_000)
    page.wait_for_selector("body[data-run-finished='1']")
    assert page.inner_text("#run-live-status") == "succeeded"
    for step_id in ("fetch", "square", "audit", "report"):
        assert stroke(page, step_id) == GREEN, step_id
    counts = page.locator('.dag-node[data-step="square"] .dag-count')
    assert counts.count() == 1 and counts.first.text_content().strip() == "5"
    assert "c-succeeded" in counts.first.get_attribute("class")

    # and the timeline has one bar per attempt, the sleep's bar about 2 s long
    labels = page.evaluate("() => Chart.getChart('run-timeline').data.labels")
    assert len(labels) == run.attempt_rows.count() == 8  # fetch, 5 items, audit, report
    assert {"fetch #1", "audit #1", "report #1"} <= set(labels)
    assert sum(1 for label in labels if label.startswith("square[")) == 5
    bars = page.evaluate("() => Chart.getChart('run-timeline').data.datasets[0].data")
    audit = bars[labels.index("audit #1")]
    assert audit[1] - audit[0] >= 2.0
    colors = page.evaluate("() => Chart.getChart('run-timeline').data.datasets[0].backgroundColor")
    assert set(colors) == {"#1a7f37"}  # every attempt succeeded: green
    shot(page, "run-graph-and-timeline")

    # and clicking a step opens its attempts, input, output and traces
    page.click('.dag-node[data-step="report"]')
    page.wait_for_selector("#rerun-panel")
    assert page.is_visible("text=Attempts")
    assert '"squares": [' in page.inner_text(".field-output_display")
    assert page.locator("#step-traces tr").count() >= 2
    shot(page, "step-page")


def test_dead_letter_requeue_from_the_dashboard(page, admin_user, tmp_path):
    run = wait_for_run(start_run(admin_user, FLAKY_YAML.replace("COUNTER", str(tmp_path / "c"))).pk)
    assert run.status == "failed"
    log_in(page)
    page.goto("/admin/dashboard/")
    row = page.locator("#dead-letters tbody tr", has_text="call")
    assert row.count() == 1
    row.locator("input[name=step]").check()
    shot(page, "dead-letters")
    page.click("text=Requeue selected")
    assert "Requeued 1 dead step(s)." in page.inner_text("ul.messagelist")
    assert wait_for_run(run.pk).status == "succeeded"
    page.goto(f"/admin/runs/run/{run.pk}/change/")
    assert stroke(page, "call") == GREEN and stroke(page, "publish") == GREEN
    labels = page.evaluate("() => Chart.getChart('run-timeline').data.labels")
    assert labels == ["call #1", "call #2", "publish #1"]
    colors = page.evaluate("() => Chart.getChart('run-timeline').data.datasets[0].backgroundColor")
    assert colors[0] == "#cf222e" and colors[1] == "#1a7f37"  # the failed try red, the requeued one green
    shot(page, "dead-letter-requeued")


def test_cancel_a_running_run(page, admin_user):
    run = start_run(admin_user, SLOW_YAML)
    log_in(page)
    page.goto(f"/admin/runs/run/{run.pk}/change/")
    page.wait_for_selector('.dag-node[data-step="wait"].status-running')
    page.click("#run-cancel")
    assert "Run cancelled." in page.inner_text("ul.messagelist")
    assert page.inner_text("#run-live-status") == "cancelled"
    assert page.get_attribute('.dag-node[data-step="after"]', "data-status") == "cancelled"
    assert Run.objects.get(pk=run.pk).status == "cancelled"
    shot(page, "run-cancelled")


def test_rerun_a_step_with_edited_input(page, admin_user):
    from tests.conftest import CHAIN_YAML

    run = wait_for_run(start_run(admin_user, CHAIN_YAML, {"n": 3}).pk)
    assert run.status == "succeeded"
    step = Step.objects.get(run=run, step_id="b")
    log_in(page)
    page.goto(f"/admin/runs/step/{step.pk}/change/")
    page.click("#rerun-panel summary")  # folded: the step succeeded
    assert '"greeting": "hello"' in page.input_value("#rerun-form textarea")
    page.fill("#rerun-form textarea", '{"output": {"greeting": "edited by hand"}}')
    shot(page, "rerun-form")
    page.click("#rerun-submit")
    # a retry in place (Airflow's "clear"): step b runs again in the same run, step a is kept
    assert "Retrying step b in this run with edited input" in page.inner_text("ul.messagelist")
    assert f"/admin/runs/run/{run.pk}/change/" in page.url
    page.wait_for_selector("body[data-run-finished='1']", timeout=60_000)
    assert wait_for_run(run.pk).status == "succeeded"
    assert Step.objects.get(run=run, step_id="b").output == {"greeting": "edited by hand"}
    assert Step.objects.get(run=run, step_id="a").attempts == 1  # not run again
    assert Step.objects.get(run=run, step_id="b").attempts == 2
    page.click('.dag-node[data-step="b"]')
    assert "edited by hand" in page.inner_text(".field-output_display")
    shot(page, "rerun-with-edited-input")


def test_a_viewer_sees_the_run_but_no_operator_buttons(page, worker, live_server):
    from runs.management.commands.add_member import Command as AddMember
    from runs.models import Tenant

    Tenant.objects.get_or_create(slug="acme", defaults={"name": "Acme"})
    AddMember().add("acme", "watcher", role="viewer", create_user=True, staff=True)
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.get(username="watcher")
    user.set_password("pw-watcher")
    user.save()
    from templates_app.services import save_template
    from templates_app.spec import load_spec

    template = save_template(load_spec(SLOW_YAML), SLOW_YAML, tenant_id="acme").template
    from runs import engine

    run = engine.start_run(template.spec, {}, template=template, tenant_id="acme")
    log_in(page, "watcher", "pw-watcher")
    page.goto(f"/admin/runs/run/{run.pk}/change/")
    assert page.locator("svg#run-graph .dag-node").count() == 2
    assert page.locator("#run-cancel").count() == 0
    assert "is viewer: this run is read only for you" in page.inner_text("#read-only-note")
    shot(page, "viewer-run-page")
    engine.cancel_run(run.pk, "test over")


def test_run_list_keeps_its_right_columns_at_1400_px(page, admin_user):
    runs = [start_run(admin_user, SLOW_YAML, {}) for _ in range(3)]
    long_error = "step 'wait' dead: RuntimeError: upstream https://agents.example.internal/v1/very/long/path " * 4
    Run.objects.filter(pk=runs[0].pk).update(error=long_error, correlation_id="order-2026-11-30-000123456")
    log_in(page)
    page.goto("/admin/runs/run/")
    # every column header is in sight: left of the filter column, inside the results box, nothing scrolled away
    headers = page.eval_on_selector_all(
        "#result_list thead th", "els => els.map(e => e.innerText.trim().toLowerCase())"
    )
    assert headers[-3:] == ["created", "duration", "error"]
    right = page.eval_on_selector("#result_list thead th:last-child", "e => e.getBoundingClientRect().right")
    results = page.eval_on_selector("#changelist .results", "e => e.getBoundingClientRect().right")
    filters = page.eval_on_selector("#changelist-filter", "e => e.getBoundingClientRect().left")
    assert right <= results <= filters, (right, results, filters)
    assert page.eval_on_selector("#changelist .results", "e => e.scrollWidth <= e.clientWidth")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= VIEWPORT["width"]
    badge = page.locator("#result_list td.field-status_badge .status-badge").first
    assert badge.bounding_box()["height"] < 24  # "running" on one line
    shot(page, "run-list-1400")
    for run in Run.objects.filter(status="running"):
        from runs import engine

        engine.cancel_run(run.pk, "test over")
