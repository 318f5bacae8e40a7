"""The admin's run graph, timeline JSON, step rerun form, dashboard charts and the role rules it shares
with the API (viewers read, owners and members operate, per tenant). Browser tests: test_admin_browser.py."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from runs import admin_graph, engine
from runs.admin_views import parse_edited_input
from runs.management.commands.add_member import Command as AddMember
from runs.models import Run, Step
from runs.services import Invalid

pytestmark = pytest.mark.django_db


def staff(username: str, roles: dict[str, str]) -> Client:
    """A logged-in staff user with the operator permissions and ``roles`` {tenant: role}."""
    for slug, role in roles.items():
        AddMember().add(slug, username, role=role, create_user=True, staff=True)
    client = Client()
    client.force_login(get_user_model().objects.get(username=username))
    return client


@pytest.fixture
def root_client(db):
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw"))
    return client


def make_run(template, tenant="acme", **kwargs):
    return engine.start_run(template.spec, {"n": 1}, template=template, tenant_id=tenant, **kwargs)


# --- graph layout -------------------------------------------------------------------------------------


def test_layout_puts_each_step_in_the_layer_of_its_longest_path():
    # given a diamond with a shortcut: a -> b -> d, a -> c -> d, a -> d
    steps = [
        {"id": "a", "depends_on": []},
        {"id": "b", "depends_on": ["a"]},
        {"id": "c", "depends_on": ["a"]},
        {"id": "d", "depends_on": ["b", "c", "a"]},
    ]
    drawn = admin_graph.layout(steps)
    layers = {n["id"]: n["layer"] for n in drawn["nodes"]}
    assert layers == {"a": 0, "b": 1, "c": 1, "d": 2}
    assert len(drawn["edges"]) == 5
    xs = {n["id"]: n["x"] for n in drawn["nodes"]}
    assert xs["a"] < xs["b"] == xs["c"] < xs["d"]
    ys = {n["id"]: n["y"] for n in drawn["nodes"]}
    assert ys["b"] != ys["c"]  # no two boxes on one spot
    assert drawn["width"] >= xs["d"] + admin_graph.NODE_W


def test_run_page_draws_steps_with_status_classes_and_folds_map_items(root_client, chain_template):
    run = make_run(chain_template)
    a = Step.objects.get(run=run, step_id="a")
    Step.objects.filter(pk=a.pk).update(status="running")
    for i, status in enumerate(["succeeded", "succeeded", "failed", "running"]):
        Step.objects.create(run=run, step_id=f"a[{i}]", parent=a, map_index=i, type="noop", status=status)
    page = root_client.get(f"/admin/runs/run/{run.pk}/change/").content.decode()
    assert page.count('class="dag-node ') == 2  # items folded into their step
    assert 'class="dag-node status-running" data-step="a"' in page
    assert 'class="dag-node status-pending" data-step="b"' in page
    assert 'class="dag-count c-succeeded" data-status="succeeded"> 2<' in page
    assert 'id="run-timeline"' in page and "chart.js-4.5.1/chart.umd.min.js" in page

    live = root_client.get(f"/admin/runs/run/{run.pk}/live/").json()
    by_id = {s["id"]: s for s in live["steps"]}
    assert by_id["a"]["items"] == {"failed": 1, "running": 1, "succeeded": 2}
    assert by_id["b"]["items"] is None
    assert live["run"] == {"status": "running", "finished": False, "error": "", "elapsed": live["run"]["elapsed"]}


def test_live_json_of_another_tenants_run_is_a_404(chain_template, tenants):
    run = make_run(chain_template, tenant="acme")
    outsider = staff("ops-globex", {"globex": "owner"})
    assert outsider.get(f"/admin/runs/run/{run.pk}/live/").status_code == 404


def test_a_rerun_shows_trigger_rerun(root_client, chain_template):
    run = make_run(chain_template)
    Run.objects.filter(pk=run.pk).update(status="failed")
    root_client.post(f"/admin/runs/run/{run.pk}/operate/rerun/")
    rerun = Run.objects.get(rerun_of=run)
    page = root_client.get(f"/admin/runs/run/{rerun.pk}/change/").content.decode()
    assert '<div class="readonly">Rerun</div>' in page
    listing = root_client.get("/admin/runs/run/").content.decode()
    assert '<td class="field-trigger_display">Rerun</td>' in listing
    assert "?trigger__exact=rerun" in listing  # the filter says Rerun and filters the stored value
    assert len(root_client.get("/admin/runs/run/?trigger__exact=rerun").context["cl"].result_list) == 1


def test_view_site_opens_the_dashboard(root_client):
    page = root_client.get("/admin/").content.decode()
    assert '<a href="/admin/dashboard/">View site</a>' in page


# --- roles: the API's rule in the admin ---------------------------------------------------------------


def test_viewer_with_staff_status_gets_no_buttons_and_every_post_is_refused(chain_template, tenants):
    # given a staff user who is a viewer in acme, and a dead step in one of acme's runs
    run = make_run(chain_template)
    Step.objects.filter(run=run, step_id="a").update(status="dead", attempts=1, error="boom")
    dead = Step.objects.get(run=run, step_id="a")
    viewer = staff("ops-viewer", {"acme": "viewer"})

    # then the pages show no operator buttons
    page = viewer.get(f"/admin/runs/run/{run.pk}/change/").content.decode()
    assert 'id="run-cancel"' not in page and 'id="run-rerun"' not in page
    assert "is <b>viewer</b>: this run is read only" in page
    assert 'name="action"' not in viewer.get("/admin/runs/run/").content.decode()
    assert 'name="action"' not in viewer.get("/admin/runs/step/").content.decode()
    dashboard = viewer.get("/admin/dashboard/").content.decode()
    assert 'name="step"' not in dashboard
    step_page = viewer.get(f"/admin/runs/step/{dead.pk}/change/").content.decode()
    assert 'id="rerun-form"' not in step_page and "read only" in step_page
    assert "Run now" not in viewer.get("/admin/templates_app/workflowtemplate/").content.decode()

    # and every POST is refused with a message, changing nothing
    for url, data in [
        (f"/admin/runs/run/{run.pk}/operate/cancel/", {}),
        (f"/admin/runs/run/{run.pk}/operate/rerun/", {}),
        (f"/admin/runs/run/{run.pk}/operate/retry/", {}),
        (f"/admin/runs/run/{run.pk}/operate/trigger/", {}),
        ("/admin/runs/run/", {"action": "cancel_runs", "_selected_action": [str(run.pk)]}),
        ("/admin/runs/run/", {"action": "rerun_runs", "_selected_action": [str(run.pk)]}),
        ("/admin/runs/step/", {"action": "requeue_dead", "_selected_action": [dead.pk]}),
        ("/admin/dashboard/", {"step": [dead.pk]}),
        (f"/admin/runs/step/{dead.pk}/rerun/", {"input": "{}"}),
        (f"/admin/templates_app/workflowtemplate/{chain_template.pk}/run/", {"n": "2"}),
    ]:
        response = viewer.post(url, data, follow=True)
        assert response.status_code == 200, url
        text = response.content.decode()
        assert "Refused: your role in tenant &#x27;acme&#x27; is viewer: read only" in text, url
    assert Run.objects.count() == 1
    run.refresh_from_db()
    assert run.status == "running"
    assert Step.objects.get(pk=dead.pk).status == "dead"


def test_member_operates_in_their_tenant_but_not_where_they_are_a_viewer(chain_template, tenants):
    # given one user: member of acme, viewer of globex, with a run in each tenant
    from templates_app.services import save_template

    globex_template = save_template(chain_template.spec, chain_template.source, tenant_id="globex").template
    mine = make_run(chain_template, tenant="acme")
    theirs = make_run(globex_template, tenant="globex")
    client = staff("ops-mixed", {"acme": "member", "globex": "viewer"})

    assert 'id="run-cancel"' in client.get(f"/admin/runs/run/{mine.pk}/change/").content.decode()
    assert 'id="run-cancel"' not in client.get(f"/admin/runs/run/{theirs.pk}/change/").content.decode()

    # when both are selected for cancelling
    response = client.post(
        "/admin/runs/run/",
        {"action": "cancel_runs", "_selected_action": [str(mine.pk), str(theirs.pk)]},
        follow=True,
    )
    text = response.content.decode()
    # then acme's run is cancelled and globex's refused by name
    assert "Cancelled 1 run(s)." in text
    assert "Refused: your role in tenant &#x27;globex&#x27; is viewer" in text
    assert Run.objects.get(pk=mine.pk).status == "cancelled"
    assert Run.objects.get(pk=theirs.pk).status == "running"


def test_viewer_cannot_edit_schedules_or_credentials_of_the_tenant(chain_template, tenants):
    viewer = staff("ops-viewer", {"acme": "viewer"})
    from django.contrib.auth.models import Permission

    user = get_user_model().objects.get(username="ops-viewer")
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["add_schedule", "change_schedule", "add_credential"])
    )
    assert viewer.get("/admin/scheduler/schedule/add/").status_code == 403
    assert viewer.get("/admin/agents/credential/add/").status_code == 403


# --- rerun with edited input: the form's checks ---------------------------------------------------------


def test_edited_input_errors_name_the_step_and_field(chain_template):
    run = make_run(chain_template)
    step = Step.objects.get(run=run, step_id="b")
    for text, expected in [
        ("{oops", "step 'b', field input: not JSON (Expecting property name enclosed in double quotes"),
        ("[1, 2]", "step 'b', field input: must be a JSON object"),
        ('{"x": "${steps.zzz.output}"}', "step 'b', field input: refers to step 'zzz'"),
        ('{"x": "' + "y" * 70_000 + '"}', "step 'b', field input: 70009 bytes, at most 65536"),
    ]:
        with pytest.raises(Invalid) as caught:
            parse_edited_input(step, text)
        assert str(caught.value).startswith(expected), str(caught.value)
    assert parse_edited_input(step, '{"output": "${steps.a.output}"}') == {"output": "${steps.a.output}"}
    assert json.loads('{"a": 1}') == parse_edited_input(step, '{"a": 1}')


# --- dashboard numbers ---------------------------------------------------------------------------------


def test_percentile_is_the_nearest_rank():
    from runs.admin_views import percentile

    values = list(range(1, 101))  # 1..100
    assert [percentile(values, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile([7], 99) == 7
    assert percentile([], 50) is None


def test_dashboard_charts_count_runs_per_hour_and_scope_to_the_tenant(chain_template, tenants):
    from datetime import timedelta

    from django.utils import timezone

    from runs.admin_views import chart_data
    from runs.models import Attempt

    # given finished runs in acme (one an hour ago, one dead step) and one in globex
    now = timezone.now()
    done = make_run(chain_template)
    Run.objects.filter(pk=done.pk).update(
        status="succeeded", started_at=now - timedelta(hours=2), finished_at=now - timedelta(hours=1)
    )
    failed = make_run(chain_template)
    Run.objects.filter(pk=failed.pk).update(status="failed", started_at=now - timedelta(hours=1), finished_at=now)
    step = Step.objects.get(run=failed, step_id="a")
    Step.objects.filter(pk=step.pk).update(status="dead", attempts=1, finished_at=now)
    Attempt.objects.create(step=step, run=failed, number=1, lease_token=done.pk, outcome="failed", started_at=now)
    Attempt.objects.create(
        step=Step.objects.get(run=done, step_id="a"),
        run=done,
        number=1,
        lease_token=done.pk,
        outcome="succeeded",
        started_at=now - timedelta(hours=1),
        duration_ms=40,
    )
    from templates_app.services import save_template

    other = save_template(chain_template.spec, chain_template.source, tenant_id="globex").template
    theirs = make_run(other, tenant="globex")
    Run.objects.filter(pk=theirs.pk).update(status="succeeded", started_at=now - timedelta(hours=1), finished_at=now)

    class Request:
        def __init__(self, user):
            self.user = user

    member = get_user_model().objects.create_user("m")
    from runs.models import Membership

    Membership.objects.create(user=member, tenant=tenants["acme"], role="member", is_default=True)
    charts = chart_data(Request(member), now, {"dead": 1})

    # then acme's member counts acme's runs only, in the right hours
    assert charts["runs_finished"]["succeeded"][-2:] == [1, 0]
    assert charts["runs_finished"]["failed"][-1] == 1
    assert sum(charts["runs_finished"]["succeeded"]) == 1  # globex's run is not counted
    assert charts["durations"]["types"] == ["noop"] and charts["durations"]["series"]["p50"] == [40]
    assert charts["rates"]["retries"][-1] == 1 and charts["rates"]["dead"][-1] == 1
    assert charts["rates"]["attempts"] == 2 and charts["rates"]["retry_rate"] == 0.5
    assert charts["tokens"] is None  # no attempt of the window called a model

    # and once LLM calls record their usage on attempts, tokens per tenant (acme's only here)
    usage = {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150, "estimated": False}
    Attempt.objects.filter(run=done).update(usage=usage)
    Attempt.objects.create(
        step=Step.objects.get(run=theirs, step_id="a"),
        run=theirs,
        number=1,
        lease_token=theirs.pk,
        outcome="succeeded",
        started_at=now,
        usage={**usage, "prompt_tokens": 999},
    )
    charts = chart_data(Request(member), now, {"dead": 1})
    assert charts["tokens"] == {"tenants": ["acme"], "prompt": [120], "completion": [30]}
