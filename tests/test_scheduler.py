"""Schedules and system jobs: tick times, beat entries that follow templates, one run per tick even
when beat fires twice, the schedules API and admin, the sweeper's three cases, the health report,
purging old runs, and a real `celery beat` process driving a schedule and the sweeper."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from runs import engine
from runs.models import Attempt, Run, Step, Trace
from scheduler import services, ticks
from scheduler.models import Schedule
from templates_app.services import save_template
from templates_app.spec import WorkflowError, load_spec
from tests.conftest import ROOT, api_client_for, start, wait_for_run

UTC = dt.UTC
API = "/api/v1"


# --- ticks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "now", "tz", "expected"),
    [
        ("0 7 * * *", "2026-03-10T06:59:59+00:00", "UTC", "2026-03-09T07:00:00Z"),
        ("0 7 * * *", "2026-03-10T07:00:00+00:00", "UTC", "2026-03-10T07:00:00Z"),
        ("0 7 * * *", "2026-03-10T07:00:40+00:00", "UTC", "2026-03-10T07:00:00Z"),
        ("*/15 * * * *", "2026-03-10T06:59:00+00:00", "UTC", "2026-03-10T06:45:00Z"),
        ("0 18 * * SUN", "2026-03-10T06:59:00+00:00", "Europe/Paris", "2026-03-08T17:00:00Z"),  # seed 004
        ("30 2 1 * *", "2026-03-10T00:00:00+00:00", "UTC", "2026-03-01T02:30:00Z"),
        ("0 0 29 2 *", "2026-03-10T00:00:00+00:00", "UTC", "2024-02-29T00:00:00Z"),
    ],
)
def test_previous_cron_tick(cron, now, tz, expected):
    tick = ticks.previous_cron_tick(ticks.parse_cron(cron), dt.datetime.fromisoformat(now), tz)
    assert ticks.format_tick(tick) == expected


def test_interval_ticks_and_bad_crons():
    now = dt.datetime(2026, 3, 10, 6, 59, 45, 123, tzinfo=UTC)
    assert ticks.format_tick(ticks.previous_interval_tick(30, now)) == "2026-03-10T06:59:30Z"
    assert ticks.format_tick(ticks.previous_interval_tick(3600, now)) == "2026-03-10T06:00:00Z"
    assert ticks.parse_tick("2026-03-10T06:59:30Z") == dt.datetime(2026, 3, 10, 6, 59, 30, tzinfo=UTC)
    with pytest.raises(ValueError, match="must have 5 fields"):
        ticks.parse_cron("0 7 * *")
    with pytest.raises(ValueError, match="invalid cron"):
        ticks.parse_cron("99 7 * * *")
    with pytest.raises(ValueError, match="never occurs"):
        ticks.parse_cron("0 0 31 2 *")


# --- templates make beat entries --------------------------------------------------------------------


def template_yaml(trigger: str, variables: str = "{}") -> str:
    return f"key: nightly\nvariables: {variables}\ntrigger: {trigger}\nsteps:\n  - {{id: a, type: noop}}\n"


def save(text: str, tenant: str = "default"):
    return save_template(load_spec(text, source="nightly.yaml"), text, tenant_id=tenant).template


def test_beat_entries_follow_template_changes(db, settings, tmp_path):
    settings.TIME_ZONE = "Europe/Paris"
    # a cron trigger loaded by load_templates becomes a schedule and a beat entry
    (tmp_path / "nightly.yaml").write_text(
        template_yaml('{cron: "0 7 * * *", variables: {n: 3}}', "{n: {type: integer}}")
    )
    call_command("load_templates", str(tmp_path), stdout=open(os.devnull, "w"))
    schedule = Schedule.objects.get(name="template:nightly", tenant_id="default")
    task = PeriodicTask.objects.get(pk=schedule.periodic_task_id)
    assert (schedule.source, schedule.cron, schedule.variables, schedule.enabled) == (
        "template",
        "0 7 * * *",
        {"n": 3},
        True,
    )
    assert task.task == "scheduler.run_schedule" and json.loads(task.kwargs) == {"schedule_id": schedule.pk}
    assert (task.crontab.minute, task.crontab.hour, str(task.crontab.timezone)) == ("0", "7", "Europe/Paris")
    assert (
        task.enabled and task.interval is None and task.expire_seconds == settings.ORCHESTRATOR_SCHEDULE_MISFIRE_GRACE
    )

    # a new version with another cron updates the same entry
    save(template_yaml('{type: cron_or_event, cron: "30 6 * * 1-5", event_types: [go]}'))
    task.refresh_from_db()
    assert (task.crontab.minute, task.crontab.hour, task.crontab.day_of_week) == ("30", "6", "1-5")
    assert Schedule.objects.get(pk=schedule.pk).variables == {}

    # an operator's "disabled" survives a reload
    services.set_enabled(Schedule.objects.get(pk=schedule.pk), False)
    save(template_yaml("{interval: 45s}"))
    schedule.refresh_from_db()
    task.refresh_from_db()
    assert (schedule.cron, schedule.interval, schedule.enabled, task.enabled) == ("", 45, False, False)
    assert task.crontab is None and (task.interval.every, task.interval.period) == (45, IntervalSchedule.SECONDS)
    assert task.expire_seconds == 45  # a late tick superseded by the next is dropped

    # when the trigger goes away, so do the schedule and its beat entry
    save(template_yaml("{event_types: [go]}"))
    assert not Schedule.objects.filter(name="template:nightly").exists()
    assert not PeriodicTask.objects.filter(pk=task.pk).exists()


def test_missing_required_variables_make_a_disabled_schedule(db):
    save(template_yaml('{cron: "0 7 * * *"}', "{path: {type: string, required: true}}"))
    schedule = Schedule.objects.get(name="template:nightly")
    assert not schedule.enabled and "variable 'path': required" in schedule.last_error
    assert not PeriodicTask.objects.get(pk=schedule.periodic_task_id).enabled


def test_bad_trigger_values_are_refused_at_load():
    cases = [
        (template_yaml('{cron: "0 7 * * *", variables: {x: 1}}'), "trigger: variables: unknown variable 'x'"),
        (
            template_yaml('{cron: "0 7 * * *", variables: {n: many}}', "{n: {type: integer}}"),
            "trigger: variables: variable 'n': expected integer",
        ),
        (template_yaml("{interval: 500ms}"), "trigger: interval: must be at least 1s"),
        (template_yaml('{cron: "0 7 * * *", variables: [1]}'), "trigger: 'variables' must be a mapping"),
    ]
    for text, message in cases:
        with pytest.raises(WorkflowError) as caught:
            load_spec(text, source="nightly.yaml")
        assert message in str(caught.value) and str(caught.value).startswith("nightly.yaml: ")


# --- one run per tick -------------------------------------------------------------------------------


def make_schedule(template_key: str = "nightly", **fields) -> Schedule:
    schedule = Schedule(name=fields.pop("name", f"s-{uuid.uuid4().hex[:6]}"), template_key=template_key, **fields)
    return services.save_schedule(schedule)


def test_a_tick_fired_twice_starts_one_run(db):
    save(template_yaml("manual", "{n: {type: integer, default: 1}}"))
    schedule = make_schedule(cron="0 7 * * *", variables={"n": "5"}, priority=2)
    assert schedule.variables == {"n": 5}  # coerced once, when saved
    tick = dt.datetime(2026, 3, 10, 7, 0, tzinfo=UTC)
    first = services.fire_schedule(schedule.pk, tick)
    again = services.fire_schedule(schedule.pk, tick)
    assert first.pk == again.pk
    assert first.idempotency_key == f"schedule:{schedule.pk}:2026-03-10T07:00:00Z"
    assert (first.trigger, first.priority, first.inputs) == ("cron", 2, {"n": 5})
    next_day = services.fire_schedule(schedule.pk, tick + timedelta(days=1))
    assert next_day.pk != first.pk
    schedule.refresh_from_db()
    assert (schedule.last_run_id, schedule.last_tick) == (next_day.pk, tick + timedelta(days=1))
    # a disabled schedule starts nothing; a broken one records why
    services.set_enabled(schedule, False)
    assert services.fire_schedule(schedule.pk, tick + timedelta(days=2)) is None
    services.set_enabled(schedule, True)
    Schedule.objects.filter(pk=schedule.pk).update(variables={"n": "x"})
    assert services.fire_schedule(schedule.pk, tick + timedelta(days=3)) is None
    assert "expected integer" in Schedule.objects.get(pk=schedule.pk).last_error


def wait_clear_of_minute_boundary() -> None:
    seconds = timezone.now().second + timezone.now().microsecond / 1e6
    if seconds > 58.5:
        time.sleep(61 - seconds)


def test_beat_firing_the_same_entry_twice_starts_one_run(worker):
    """Two beat schedulers (or one sending twice) fire one entry: two messages, one run."""
    from orchestrator_site.celery import app
    from scheduler.beat import TickScheduler

    save(template_yaml("manual"))
    schedule = make_schedule(cron="* * * * *")
    wait_clear_of_minute_boundary()
    for _ in range(2):
        beat = TickScheduler(app=app)
        entry = beat.schedule[f"{services.PERIODIC_TASK_PREFIX}{schedule.pk}"]
        beat.apply_entry(entry)
    deadline = time.time() + 30
    while Schedule.objects.get(pk=schedule.pk).last_run_id is None:
        assert time.time() < deadline, "no run started"
        time.sleep(0.1)
    time.sleep(1.0)  # the second message has been handled by now
    runs = Run.objects.filter(idempotency_key__startswith=f"schedule:{schedule.pk}:")
    assert runs.count() == 1
    tick = ticks.previous_cron_tick(ticks.parse_cron("* * * * *"), timezone.now(), "UTC")
    assert runs.get().idempotency_key == f"schedule:{schedule.pk}:{ticks.format_tick(tick)}"
    assert wait_for_run(runs.get().pk).status == "succeeded"


# --- schedules in the API and the admin -------------------------------------------------------------


@pytest.fixture
def acme_template(tenants):
    text = "key: report\nvariables: {n: {type: integer, required: true}}\nsteps: [{id: a, type: noop}]\n"
    return save_template(load_spec(text), text, tenant_id="acme").template


def test_schedules_api(owner_api, outsider_api, acme_template):
    created = owner_api.post(
        f"{API}/schedules",
        {"name": "every-5", "template_key": "report", "interval": 300, "variables": {"n": "2"}, "priority": 1},
        format="json",
    )
    assert created.status_code == 201, created.content
    body = created.json()
    assert (body["when"], body["variables"], body["source"]) == ("every 300 s", {"n": 2}, "user")
    schedule = Schedule.objects.get(pk=body["id"])
    assert schedule.tenant_id == "acme" and PeriodicTask.objects.get(pk=schedule.periodic_task_id).interval.every == 300

    def refused(payload, message, method="post", url=f"{API}/schedules"):
        response = getattr(owner_api, method)(url, payload, format="json")
        assert response.status_code == 400, response.content
        assert message in response.json()["detail"] and "\n" not in response.json()["detail"]

    refused({"name": "x", "template_key": "report", "cron": "61 * * * *", "variables": {"n": 1}}, "cron: invalid cron")
    refused({"name": "x", "template_key": "report", "cron": "0 7 * * *"}, "variables: variable 'n': required")
    refused(
        {"name": "x", "template_key": "report", "cron": "0 7 * * *", "interval": 5, "variables": {"n": 1}},
        "give exactly one of cron and interval",
    )
    refused({"name": "x", "template_key": "nope", "interval": 60}, "template: no template with key 'nope'")
    refused({"name": "every-5", "template_key": "report", "interval": 60, "variables": {"n": 1}}, "name: a schedule")
    refused(
        {"name": "x", "template_key": "report", "interval": 60, "timezone": "Mars/Olympus", "variables": {"n": 1}},
        "timezone: unknown time zone",
    )

    detail = f"{API}/schedules/{schedule.pk}"
    changed = owner_api.patch(detail, {"cron": "0 7 * * *", "enabled": False}, format="json")
    assert changed.status_code == 200, changed.content
    task = PeriodicTask.objects.get(pk=schedule.periodic_task_id)
    assert (task.crontab.hour, task.interval, task.enabled) == ("7", None, False)
    started = owner_api.post(f"{detail}/run")
    assert started.status_code == 201 and Run.objects.get(pk=started.json()["run_id"]).inputs == {"n": 2}
    # the list is cursor-paginated like every other list (README: "Lists use cursor pagination")
    page = owner_api.get(f"{API}/schedules?page_size=1").json()
    assert set(page) == {"next", "previous", "results"} and len(page["results"]) == 1
    # another tenant sees nothing
    assert outsider_api.get(detail).status_code == 404
    assert outsider_api.get(f"{API}/schedules").json() == {"next": None, "previous": None, "results": []}
    assert outsider_api.delete(detail).status_code == 404
    assert owner_api.delete(detail).status_code == 204
    assert not PeriodicTask.objects.filter(pk=task.pk).exists()


def test_template_schedules_are_read_only_in_the_api(owner_api, tenants):
    text = 'key: daily\ntrigger: {cron: "0 7 * * *"}\nsteps: [{id: a, type: noop}]\n'
    save_template(load_spec(text), text, tenant_id="acme")
    schedule = Schedule.objects.get(tenant_id="acme", name="template:daily")
    refused = owner_api.patch(f"{API}/schedules/{schedule.pk}", {"cron": "0 8 * * *"}, format="json")
    assert refused.status_code == 400 and "follows its template's trigger" in refused.json()["detail"]
    assert owner_api.patch(f"{API}/schedules/{schedule.pk}", {"enabled": False}, format="json").status_code == 200
    assert not PeriodicTask.objects.get(pk=schedule.periodic_task_id).enabled


def test_viewer_cannot_create_schedules(viewer, acme_template):
    response = api_client_for(viewer).post(
        f"{API}/schedules",
        {"name": "v", "template_key": "report", "interval": 60, "variables": {"n": 1}},
        format="json",
    )
    assert response.status_code == 403


def test_admin_creates_and_validates_schedules(admin_client, db):
    save(template_yaml("manual", "{n: {type: integer, required: true}}"))
    form = {
        "tenant_id": "default",
        "name": "from-admin",
        "template_key": "nightly",
        "cron": "0 3 * * *",
        "interval": "",
        "timezone": "UTC",
        "variables": '{"n": 4}',
        "priority": 5,
        "user_id": "",
        "enabled": "on",
        "description": "",
    }
    response = admin_client.post("/admin/scheduler/schedule/add/", form)
    assert response.status_code == 302, response.content.decode()[:3000]
    schedule = Schedule.objects.get(name="from-admin")
    assert PeriodicTask.objects.get(pk=schedule.periodic_task_id).crontab.hour == "3"
    bad = admin_client.post("/admin/scheduler/schedule/add/", {**form, "name": "bad", "variables": "{}"})
    assert bad.status_code == 200 and "variables: variable &#x27;n&#x27;: required" in bad.content.decode()


# --- system jobs ------------------------------------------------------------------------------------


def test_system_jobs_are_on_beat(settings):
    beat = settings.CELERY_BEAT_SCHEDULE
    assert beat["orchestrator-sweep"]["task"] == "runs.sweep"
    assert beat["orchestrator-health-report"]["task"] == "scheduler.health_report"
    assert str(beat["orchestrator-health-report"]["schedule"]).startswith("<crontab: 0 * * * *")  # hourly
    assert beat["orchestrator-purge-runs"]["task"] == "scheduler.purge_runs"
    assert settings.CELERY_BEAT_SCHEDULER == "scheduler.beat:TickScheduler"


THREE_STEPS = """\
key: recover
steps:
  - {id: lost_message, type: noop}
  - {id: due_retry, type: noop, retry: {max_attempts: 3}}
  - {id: dead_worker, type: noop, retry: {max_attempts: 3, initial_delay: 0.1, jitter: false}}
"""


def test_sweeper_recovers_each_of_its_three_cases(worker, monkeypatch):
    # given three steps whose messages never reach a worker...
    with monkeypatch.context() as patch:
        patch.setattr(engine.broker, "enqueue_steps", lambda *args, **kwargs: None)
        run = start(THREE_STEPS)
    long_ago = timezone.now() - timedelta(hours=1)
    steps = {s.step_id: s for s in run.steps.all()}
    # 1. queued, and the broker lost the message
    Step.objects.filter(pk=steps["lost_message"].pk).update(queued_at=long_ago)
    # 2. a retry that came due while its countdown message was lost
    Step.objects.filter(pk=steps["due_retry"].pk).update(status="retry_wait", attempts=1, next_attempt_at=long_ago)
    # 3. running under a lease whose worker died
    token = uuid.uuid4()
    Step.objects.filter(pk=steps["dead_worker"].pk).update(
        status="running", attempts=1, lease_token=token, lease_expires_at=long_ago, started_at=long_ago
    )
    Attempt.objects.create(
        step=steps["dead_worker"], run=run, number=1, lease_token=token, started_at=long_ago, worker="gone:1"
    )
    # when the sweeper runs (beat's runs.sweep)
    counts = engine.sweep()
    assert (counts["requeued"], counts["retries"], counts["expired_leases"]) == (1, 1, 1)
    # then every step is done and the run succeeded
    run = wait_for_run(run.pk, timeout=30, sweep=True)
    assert run.status == "succeeded", run.error
    dead = list(Attempt.objects.filter(step=steps["dead_worker"]).order_by("number").values_list("outcome", flat=True))
    assert dead == ["lost", "succeeded"]
    assert Attempt.objects.get(step=steps["due_retry"]).number == 2


def test_health_report_is_a_run_with_a_trace_and_metrics(worker, monkeypatch):
    from runs.metrics import exposition, parse_families
    from scheduler import health

    report = health.collect()
    assert report["status"] == "ok", report
    assert report["checks"]["workers"]["count"] >= 1 and report["checks"]["database"]["ok"]

    run = wait_for_run(health.start_health_run().pk, timeout=60)
    assert run.status == "succeeded" and run.trigger == "cron" and run.template_key == "system-health"
    trace = Trace.objects.get(run=run, kind="checkpoint")
    assert trace.message == "health ok" and trace.data["checks"]["broker"]["ok"] is True
    families = parse_families(exposition()[0].decode())
    samples = {s.labels.get("check"): s.value for s in families["orchestrator_health_check_ok"].samples}
    assert samples["database"] == 1 and samples["stuck_runs"] == 1

    # a step stuck past the sweeper's reach makes the next report degraded (and its run failed)
    with monkeypatch.context() as patch:
        patch.setattr(engine.broker, "enqueue_steps", lambda *args, **kwargs: None)  # its message is lost
        stuck = start("key: stuck\nsteps: [{id: a, type: noop}]\n")
    Step.objects.filter(run=stuck).update(queued_at=timezone.now() - timedelta(days=1))
    report = health.collect()
    assert report["status"] == "degraded" and report["checks"]["stuck_runs"]["run_ids"] == [str(stuck.pk)]
    failed = wait_for_run(health.start_health_run(timezone.now() + timedelta(minutes=1)).pk, timeout=60)
    assert failed.status == "failed" and "stuck_runs failed" in failed.error


def test_purge_runs(db, capsys, settings):
    old = timezone.now() - timedelta(days=40)
    finished = [start("key: p\nsteps: [{id: a, type: noop}]\n") for _ in range(3)]
    active = start("key: p\nsteps: [{id: a, type: noop}]\n")
    for run in finished[:2]:
        engine.cancel_run(run.pk)
        Run.objects.filter(pk=run.pk).update(started_at=old, finished_at=old)
    engine.cancel_run(finished[2].pk)  # finished today: kept
    Run.objects.filter(pk=active.pk).update(created_at=old, started_at=old)  # old but still running: kept
    call_command("purge_runs", "--older-than", "30", "--dry-run")
    assert "would delete 2 run(s)" in capsys.readouterr().out
    call_command("purge_runs", "--older-than", "30", "--batch-size", "1")
    assert "deleted 2 run(s)" in capsys.readouterr().out
    assert set(Run.objects.values_list("pk", flat=True)) == {finished[2].pk, active.pk}
    assert not Step.objects.filter(run_id__in=[r.pk for r in finished[:2]]).exists()
    settings.ORCHESTRATOR_RUN_RETENTION_DAYS = 0
    with pytest.raises(CommandError, match="--older-than must be greater than 0"):
        call_command("purge_runs")


# --- a real beat process ----------------------------------------------------------------------------


def test_real_beat_drives_a_schedule_and_the_sweeper(worker, worker_env, tmp_path):
    # given an interval schedule of 1 s and a step whose message was lost an hour ago
    save(template_yaml("manual"))
    schedule = make_schedule(interval=1)
    lost = start("key: lost\nsteps: [{id: a, type: noop}]\n")
    Step.objects.filter(run=lost).update(queued_at=timezone.now() - timedelta(hours=1))
    # when `celery beat` runs for a few seconds (sweeping every second)
    log_path = tmp_path / "beat.log"
    with open(log_path, "wb") as log:
        beat = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "orchestrator_site",
                "beat",
                "-l",
                "INFO",
                "--max-interval",
                "1",
                "-s",
                str(tmp_path / "beat-schedule"),
                "--pidfile",
                str(tmp_path / "beat.pid"),
            ],
            cwd=ROOT,
            env={**worker_env, "ORCHESTRATOR_SWEEP_INTERVAL": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 40
            while Run.objects.filter(idempotency_key__startswith=f"schedule:{schedule.pk}:").count() < 2:
                assert beat.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.2)
            lost = wait_for_run(lost.pk, timeout=30)
        finally:
            os.killpg(beat.pid, signal.SIGTERM)
            beat.wait(20)
    # then each tick started its own run, keyed by the tick, and the sweeper re-sent the lost step
    keys = list(
        Run.objects.filter(idempotency_key__startswith=f"schedule:{schedule.pk}:").values_list(
            "idempotency_key", flat=True
        )
    )
    assert len(keys) == len(set(keys)) >= 2
    assert all(k.endswith("Z") for k in keys)
    assert lost.status == "succeeded"
    assert "Sending due task orchestrator:schedule:" in log_path.read_text()


def test_health_callable_sees_only_its_own_tenant(db, settings):
    settings.ORCHESTRATOR_EMBEDDED = True  # the workers check answers for itself: no worker needed here
    # Given a stuck run in tenant acme ...
    from agents.registry import StepContext
    from scheduler import health

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "enqueue_steps", lambda *args, **kwargs: None)  # its message is lost
        stuck = start("key: stuck\nsteps: [{id: a, type: noop}]\n", tenant_id="acme")
    Step.objects.filter(run=stuck).update(queued_at=timezone.now() - timedelta(days=1))

    def ctx(tenant):
        return StepContext(
            run_id="r",
            step_id="check",
            step_pk=1,
            attempt=1,
            params={},
            timeout=10,
            idempotency_key="r:check",
            tenant_id=tenant,
        )

    # ... a workflow of tenant globex calling the health callable learns nothing about it
    report = health.check(ctx("globex"))
    assert report["checks"]["stuck_runs"] == {"ok": True, "count": 0, "run_ids": []}
    assert "names" not in report["checks"]["workers"]
    assert str(stuck.pk) not in json.dumps(report)
    # ... while acme's own step and the operator (no step context) see it
    from agents.registry import StepError

    with pytest.raises(StepError) as info:
        health.check(ctx("acme"))
    assert info.value.output["checks"]["stuck_runs"]["run_ids"] == [str(stuck.pk)]
    assert health.collect()["checks"]["stuck_runs"]["run_ids"] == [str(stuck.pk)]
