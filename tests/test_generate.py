"""Plain language to a workflow (issue 8 section 3): planner, model rounds with repair, dry run, jobs, API.

Real PostgreSQL; the model is the scripted OpenAI-compatible server (tests/llm_server.py) or, for the
job run by the real Celery worker, the agent server's programmed chat completions.
"""

from __future__ import annotations

import copy
import io
import json
import time

import pytest
from django.core.management import call_command

from runs.models import Run, Step
from templates_app.generation import dry_run, generate, parse_request, plan
from templates_app.generation import planner as planner_module
from templates_app.generation.metrics import GENERATION_FAILURES
from templates_app.models import GenerationStatus, WorkflowGenerationJob, WorkflowTemplate
from templates_app.services import load_builtin_templates
from templates_app.spec import json_schema, load_spec
from tests.conftest import api_client_for

API = "/api/v1"
AUDIT = "audit the licences of the installed Python packages"
LINES = "count the lines of code of the Django source"

#: A valid answer: an http call, then a noop shaping its status (http is stubbed in the dry run).
GOOD = {
    "key": "gen-status",
    "name": "Status check",
    "description": "Fetch the status endpoint and keep its HTTP status.",
    "variables": {"who": {"type": "string", "default": "world"}},
    "steps": [
        {"id": "fetch", "type": "http", "depends_on": [], "params": {"url": "https://status.example.com/api"}},
        {
            "id": "shape",
            "type": "noop",
            "depends_on": ["fetch"],
            "params": {"output": {"status": "${steps.fetch.output.status}", "who": "${who}"}},
        },
    ],
}


def _variant(**changes):
    answer = copy.deepcopy(GOOD)
    for step_id, fields in changes.items():
        step = next(s for s in answer["steps"] if s["id"] == step_id)
        step.update(fields)
    return answer


CYCLE = _variant(fetch={"depends_on": ["shape"]})
UNKNOWN_DEP = _variant(shape={"depends_on": ["nowhere"]})
MISSING_OUTPUT = _variant(shape={"params": {"output": {"status": "${steps.fetch.output.statuz}"}}})


def failures(stage: str) -> float:
    return GENERATION_FAILURES.labels(stage)._value.get()


@pytest.fixture
def offline(settings):
    """No LLM provider at all: the memory planner answers."""
    settings.ORCHESTRATOR_LLM_BASE_URL = ""
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = []
    settings.GEMINI_API_KEY = ""
    return settings


@pytest.fixture
def model(settings, llm_server):
    """The scripted server is the tenant's only provider."""
    settings.ORCHESTRATOR_LLM_BASE_URL = llm_server.url
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = []
    settings.GEMINI_API_KEY = ""
    settings.ORCHESTRATOR_GENERATE_REPAIR_ROUNDS = 2
    return llm_server


@pytest.fixture
def builtins(tenants):
    load_builtin_templates(tenant_id="acme")
    return tenants


# --- planner ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_planner_ranks_builtin_templates_offline_on_postgresql(builtins):
    # British "licences" (the prompt) and American "license" are both found
    audit = plan(AUDIT, "acme")
    assert audit.backend == "postgresql"
    assert [m.name for m in audit.templates][0] == "package-audit"
    assert audit.templates[0].score > audit.templates[-1].score or len(audit.templates) == 1
    assert audit.chain[0] == {"id": "list", "type": "python", "depends_on": []}
    assert plan("licence audit", "acme").templates[0].name == "package-audit"
    assert plan("license audit", "acme").templates[0].name == "package-audit"

    lines = plan(LINES, "acme")
    assert lines.templates[0].name == "source-report"
    assert lines.step_types[0].name == "exec"  # "count lines code" are what exec steps are for
    assert plan("fly a kite to the moon", "acme").templates == []


def test_planner_fts5_ranking_for_the_embedded_default():
    """The SQLite path ranks in an in-memory FTS5 table (porter stemmer); no database needed."""
    rows = [
        ("package-audit", "package audit Package audit", _builtin_description("package-audit"), "maintenance"),
        ("source-report", "source report Source report", _builtin_description("source-report"), "reporting"),
    ]
    audit = planner_module._fts5_rank(planner_module.words(AUDIT), rows, 5)
    lines = planner_module._fts5_rank(planner_module.words(LINES), rows, 5)
    assert audit[0][0] == "package-audit" and audit[0][1] > 0
    assert lines[0][0] == "source-report"
    assert planner_module._fts5_rank(planner_module.words("the of and"), rows, 5) == []  # stop words only


def _builtin_description(key: str) -> str:
    from templates_app.services import BUILTIN_DIR

    return load_spec((BUILTIN_DIR / f"{key}.yaml").read_bytes())["description"]


@pytest.mark.django_db
def test_planner_never_matches_another_tenants_templates(builtins):
    load_spec_text = (
        "key: kite-flyer\nname: Kite flyer\ndescription: fly a kite to the moon\nsteps:\n  - {id: a, type: noop}\n"
    )
    from templates_app.services import save_template

    save_template(load_spec(load_spec_text), load_spec_text, tenant_id="globex")
    assert [m.name for m in plan("fly a kite to the moon", "globex").templates] == ["kite-flyer"]
    assert plan("fly a kite to the moon", "acme").templates == []


# --- memory planner end to end: the command ------------------------------------------------------


@pytest.mark.django_db
def test_generate_workflow_command_offline_answers_with_the_best_template(builtins, offline):
    out = io.StringIO()
    call_command("generate_workflow", AUDIT, "--json", "--tenant", "acme", stdout=out, stderr=io.StringIO())
    answer = json.loads(out.getvalue())
    assert answer["ok"] is True and answer["planner"] == "memory"
    assert answer["matched_templates"][0] == "package-audit"
    assert answer["template_key"] is None and answer["template_version"] is None  # not saved
    assert "key: package-audit" in answer["yaml"]
    assert answer["dry_run"]["status"] == "succeeded"
    statuses = {s["id"]: s["status"] for s in answer["dry_run"]["steps"]}
    # the condition really evaluated: no copyleft in the placeholder audit, so all_clear ran
    assert statuses["flag_copyleft"] == "skipped" and statuses["all_clear"] == "succeeded"
    assert Run.objects.count() == 0  # the dry run rolled back
    job = WorkflowGenerationJob.objects.get(pk=answer["job_id"])
    assert job.status == GenerationStatus.SUCCEEDED and job.tenant_id == "acme" and job.planner == "memory"
    (entry,) = job.rounds
    assert entry["template"] == "package-audit" and entry["chain"][0]["id"] == "list"
    assert entry["chain"][-1]["id"] == "report" and "python" in entry["step_types"]


@pytest.mark.django_db
def test_generate_workflow_command_exit_codes(builtins, offline):
    with pytest.raises(SystemExit) as bad:
        call_command("generate_workflow", AUDIT, "--complexity", "extreme", stdout=io.StringIO(), stderr=io.StringIO())
    assert bad.value.code == 2
    with pytest.raises(SystemExit) as empty:
        call_command("generate_workflow", "   ", stdout=io.StringIO(), stderr=io.StringIO())
    assert empty.value.code == 2
    err = io.StringIO()
    with pytest.raises(SystemExit) as nothing:
        call_command(
            "generate_workflow", "fly a kite to the moon", "--tenant", "acme", stdout=io.StringIO(), stderr=err
        )
    assert nothing.value.code == 1
    assert "no stored template matches" in err.getvalue()


# --- with a model: rounds, repair, dry run -------------------------------------------------------


@pytest.mark.django_db
def test_cycle_is_repaired_in_round_2_and_saved_as_generated(builtins, model):
    model.script(CYCLE, GOOD, schema="workflow")
    before = failures("validate")
    prompt = "check the status endpoint of the package audit service"
    request = parse_request({"prompt": prompt, "save": True}, tenant_id="acme")
    from templates_app.generation import create_job

    job = create_job(request)
    result = generate(request, job=job)

    assert result.ok and result.planner == "llm" and result.rounds == 2, result.errors
    assert result.template_key == "gen-status" and result.template_version == 1
    saved = WorkflowTemplate.objects.get(tenant_id="acme", key="gen-status")
    assert saved.generated is True and saved.source == result.yaml
    assert load_spec(saved.source)["steps"][1]["depends_on"] == ["fetch"]
    assert failures("validate") == before + 1
    # the journal: round 1 refused by the loader (the cycle), round 2 dry-run ok
    job.refresh_from_db()
    assert job.status == GenerationStatus.SUCCEEDED and job.template_id == saved.pk
    assert [(r["round"], r["stage"], r["ok"]) for r in job.rounds] == [(1, "validate", False), (2, "dry_run", True)]
    assert "dependency cycle" in job.rounds[0]["errors"][0]
    assert job.usage["total_tokens"] > 0
    # what the model was sent: the schema named workflow with the step types as an enum, then the error
    first, second = model.calls("workflow")
    fmt = first["response_format"]["json_schema"]
    assert fmt["name"] == "workflow"
    variants = fmt["schema"]["properties"]["steps"]["items"]["anyOf"]  # one per step type, its params
    assert {"http", "python", "exec", "llm", "noop", "condition"} <= {
        v["properties"]["type"]["const"] for v in variants
    }
    assert "package-audit" in first["messages"][0]["content"]  # the planner's matches as examples
    assert "dependency cycle" in second["messages"][-1]["content"]
    assert Run.objects.count() == 0


@pytest.mark.django_db
def test_never_valid_fails_with_exit_1_and_saves_nothing(builtins, model):
    model.script(UNKNOWN_DEP, UNKNOWN_DEP, UNKNOWN_DEP, schema="workflow")
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit) as exit_:
        call_command(
            "generate_workflow",
            "check the status endpoint",
            "--save",
            "--json",
            "--tenant",
            "acme",
            stdout=out,
            stderr=err,
        )
    assert exit_.value.code == 1
    answer = json.loads(out.getvalue())
    assert answer["ok"] is False and answer["rounds"] == 3  # 1 + ORCHESTRATOR_GENERATE_REPAIR_ROUNDS
    assert "unknown step 'nowhere'" in answer["errors"][0]
    assert answer["template_key"] is None and answer["template_version"] is None
    assert not WorkflowTemplate.objects.filter(key="gen-status").exists()
    assert len(model.calls("workflow")) == 3
    job = WorkflowGenerationJob.objects.get(pk=answer["job_id"])
    assert job.status == GenerationStatus.FAILED and len(job.rounds) == 3 and job.template is None


@pytest.mark.django_db
def test_dry_run_catches_a_reference_to_a_missing_output(builtins, model):
    model.script(MISSING_OUTPUT, GOOD, schema="workflow")
    before = failures("dry_run")
    result = generate(parse_request({"prompt": "check the status endpoint"}, tenant_id="acme"))
    assert result.ok and result.rounds == 2
    assert failures("dry_run") == before + 1
    repair = model.calls("workflow")[1]["messages"][-1]["content"]
    assert "dry run" in repair and "statuz" in repair
    assert result.template_key is None  # not asked to save
    assert not WorkflowTemplate.objects.filter(key="gen-status").exists()


@pytest.mark.django_db
def test_dry_run_evaluates_conditions_and_stubs_side_effects(tenants, agent_server, settings):
    settings.ORCHESTRATOR_AGENTS_BASE_URL = agent_server.url
    agent_server.reset()
    text = """\
key: branches
steps:
  - id: ask
    type: http
    params: {call: /functions/v1/agent, json: {q: 1}}
  - id: gate
    type: condition
    depends_on: [ask]
    condition: ${steps.ask.output.status == 200}
    on_success: [taken]
    on_failure: [other]
  - id: taken
    type: noop
    params: {output: {body: "${steps.ask.output.body.anything.deep}"}}
  - id: other
    type: noop
    params: {output: {n: 1}}
  - id: after
    type: noop
    depends_on: [taken, other]
    trigger_rule: none_failed
    params: {output: {n: "${steps.other.output.n}"}}
"""
    report = dry_run(load_spec(text), "acme")
    statuses = {s["id"]: s["status"] for s in report.steps}
    # status 200 from the http stub: `taken` ran (its unknown body answered), `other` was skipped, and
    # `after` reads the skipped step's output: the dry run fails exactly there
    assert statuses["ask"] == "succeeded" and statuses["taken"] == "succeeded" and statuses["other"] == "skipped"
    assert statuses["after"] in ("dead", "failed") and report.status == "failed"
    assert any("after" in e and "steps.other.output.n" in e for e in report.errors), report.errors
    assert agent_server.calls() == []  # the http step never left the process
    assert Run.objects.count() == 0 and Step.objects.count() == 0


@pytest.mark.django_db
def test_dry_run_catches_a_python_call_that_cannot_bind(tenants):
    # write_audit_report(audit, report_path=..., ctx=None): `audit` is required
    text = """\
key: calls
steps:
  - id: listed
    type: python
    params: {callable: templates_app.builtin_tasks.list_distributions}
  - id: report
    type: python
    depends_on: [listed]
    params: {callable: templates_app.builtin_tasks.write_audit_report, kwargs: {report_path: a.md}}
"""
    report = dry_run(load_spec(text), "acme")

    statuses = {s["id"]: s["status"] for s in report.steps}
    assert statuses["listed"] == "succeeded" and statuses["report"] in ("dead", "failed")
    assert any("report" in e and "missing a required argument: 'audit'" in e for e in report.errors), report.errors

    # an unknown keyword fails the same way; a call that binds passes
    bad = text.replace("kwargs: {report_path: a.md}", "kwargs: {audit: {}, colour: red}")
    assert "unexpected keyword argument 'colour'" in " ".join(dry_run(load_spec(bad), "acme").errors)
    good = text.replace("kwargs: {report_path: a.md}", "kwargs: {audit: {}, report_path: a.md}")
    assert dry_run(load_spec(good), "acme").ok


def test_json_schema_comes_from_the_loader():
    import jsonschema

    from agents import registry

    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    step = schema["properties"]["steps"]["items"]
    assert set(step["properties"]["type"]["enum"]) == registry.handler_types() | {"condition", "parallel"}
    assert step["required"] == ["id", "type", "depends_on", "params"]
    jsonschema.validate(GOOD, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_variant(fetch={"type": "teleport"}), schema)
    # with the params of each type: an http step needs url or call, a python step an allowed callable
    from templates_app.generation.service import params_schemas

    typed = json_schema(params=params_schemas())
    jsonschema.Draft202012Validator.check_schema(typed)
    jsonschema.validate(GOOD, typed)
    for wrong in (
        _variant(fetch={"params": {}}),
        _variant(fetch={"type": "python", "params": {"callable": "os.system"}}),
        _variant(shape={"condition": "${true}"}),  # only condition steps take a condition
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, typed)


# --- API ------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_api_generate_sync_offline(builtins, offline, owner, viewer, outsider):
    client = api_client_for(owner)
    response = client.post(f"{API}/generate", {"prompt": LINES, "domain": "reporting"}, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["ok"] and body["planner"] == "memory" and body["matched_templates"][0] == "source-report"
    assert body["dry_run"]["status"] == "succeeded" and body["template_version"] is None
    job = client.get(f"{API}/generate/{body['job_id']}").json()
    assert job["status"] == "succeeded" and job["result"]["ok"] is True and job["rounds"][0]["stage"] == "dry_run"
    assert [j["id"] for j in client.get(f"{API}/generate").json()["results"]] == [body["job_id"]]

    # another tenant neither sees the job nor lists it
    other = api_client_for(outsider)
    assert other.get(f"{API}/generate/{body['job_id']}").status_code == 404
    assert other.get(f"{API}/generate").json()["results"] == []
    # the outsider's own generation never matches acme's templates
    miss = other.post(f"{API}/generate", {"prompt": LINES}, format="json")
    assert miss.status_code == 422 and miss.json()["matched_templates"] == []

    # errors: one-line 400s; a viewer may not generate
    for bad, message in (
        ({}, "prompt: required"),
        ({"prompt": "x", "complexity": "extreme"}, "complexity"),
        ({"prompt": "x", "required_services": ["teleport"]}, "unknown service"),
        ({"prompt": "x", "colour": "red"}, "colour: unknown field"),
        ({"prompt": "x" * 5000}, "longer than"),
    ):
        answer = client.post(f"{API}/generate", bad, format="json")
        assert answer.status_code == 400 and message in answer.json()["detail"], answer.content
        assert "\n" not in answer.json()["detail"]
    assert api_client_for(viewer).post(f"{API}/generate", {"prompt": LINES}, format="json").status_code == 403
    assert api_client_for(None).post(f"{API}/generate", {"prompt": LINES}, format="json").status_code in (401, 403)


def _completion(content: dict) -> tuple[int, dict, dict]:
    text = json.dumps(content)
    return (
        200,
        {
            "id": "cmpl-gen",
            "model": "test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 40, "total_tokens": 90},
        },
        {},
    )


def test_api_generate_async_runs_on_the_worker(worker, agent_server, owner, outsider):
    # The worker's LLM is the agent server (worker_env): it answers the cycle, then the fixed workflow.
    load_builtin_templates(tenant_id="acme")
    agent_server.program("/v1/chat/completions", [_completion(CYCLE), _completion(GOOD)])
    client = api_client_for(owner)
    response = client.post(
        f"{API}/generate",
        {
            "prompt": "check the status endpoint",
            "domain": "operations",
            "complexity": "low",
            "required_services": ["data"],
            "save": True,
            "async": True,
        },
        format="json",
    )
    assert response.status_code == 202, response.content
    job_id = response.json()["id"]
    assert response.json()["status_url"].endswith(f"/generate/{job_id}")
    deadline = time.time() + 60
    while time.time() < deadline:
        job = client.get(f"{API}/generate/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    assert job["planner"] == "llm" and job["result"]["rounds"] == 2
    assert job["template_key"] == "gen-status" and job["template_version"] == 1
    assert job["usage"]["total_tokens"] == 180
    assert WorkflowTemplate.objects.get(tenant_id="acme", key="gen-status").generated
    assert not WorkflowTemplate.objects.filter(tenant_id="globex").exists()
    assert api_client_for(outsider).get(f"{API}/generate/{job_id}").status_code == 404


@pytest.mark.django_db
def test_dry_run_maps_over_unknown_lists_and_compares_unknown_values(tenants):
    text = """\
key: unknown-shapes
steps:
  - {id: a, type: http, params: {url: "https://api.example.com/items"}}
  - id: each
    type: noop
    depends_on: [a]
    for_each: ${steps.a.output.body.items}
    params: {output: {name: "${item.name}"}}
  - id: big
    type: condition
    depends_on: [a]
    condition: ${steps.a.output.body.count > 3}
    on_success: [many]
    on_failure: [few]
  - {id: many, type: noop, params: {output: 1}}
  - {id: few, type: noop, params: {output: 0}}
  - id: total
    type: noop
    depends_on: [each, many, few]
    trigger_rule: none_failed
    params: {output: {names: "${steps.each.output | length}", wrong: "${steps.each.output[0].nmae}"}}
"""
    report = dry_run(load_spec(text), "acme")
    statuses = {s["id"]: s["status"] for s in report.steps}
    assert statuses["each[0]"] == "succeeded"  # one placeholder item: the loop body was checked
    assert statuses["many"] == "skipped" and statuses["few"] == "succeeded"  # unknown > 3 is false
    # `each` is a noop whose output is declared ({"name": ...}): a misspelt key of it is caught
    assert statuses["total"] in ("dead", "failed") and "nmae" in " ".join(report.errors)


@pytest.mark.django_db
def test_admin_lists_generation_jobs_of_the_staff_members_tenants(builtins, offline, client):
    from runs.models import Membership
    from templates_app.generation import create_job
    from tests.conftest import _user

    acme_job = create_job(parse_request({"prompt": LINES}, tenant_id="acme"))
    globex_job = create_job(parse_request({"prompt": "secret globex plan"}, tenant_id="globex"))
    staff = _user("ops", builtins["acme"], "owner", is_staff=True)
    from django.contrib.auth.models import Permission

    staff.user_permissions.add(*Permission.objects.filter(codename__in=["view_workflowgenerationjob"]))
    assert Membership.objects.filter(user=staff).count() == 1
    client.force_login(staff)
    listing = client.get("/admin/templates_app/workflowgenerationjob/")
    assert listing.status_code == 200
    assert str(acme_job.pk) in listing.content.decode() and "secret globex plan" not in listing.content.decode()
    assert client.get(f"/admin/templates_app/workflowgenerationjob/{acme_job.pk}/change/").status_code == 200
    assert client.get(f"/admin/templates_app/workflowgenerationjob/{globex_job.pk}/change/").status_code in (302, 404)


@pytest.mark.django_db
def test_a_generated_workflow_never_takes_over_a_hand_written_key(builtins, model):
    taken = copy.deepcopy(GOOD)
    taken["key"] = "package-audit"
    model.script(taken, GOOD, schema="workflow")
    result = generate(parse_request({"prompt": "check the status endpoint", "save": True}, tenant_id="acme"))
    assert result.ok and result.rounds == 2 and result.template_key == "gen-status"
    assert (
        "belongs to a stored workflow that was not generated" in model.calls("workflow")[1]["messages"][-1]["content"]
    )
    assert list(
        WorkflowTemplate.objects.filter(tenant_id="acme", key="package-audit").values_list("version", "generated")
    ) == [(1, False)]


@pytest.mark.django_db
def test_generation_series_are_scraped(builtins, model, client):
    from runs.metrics import parse_families

    model.script(UNKNOWN_DEP, UNKNOWN_DEP, UNKNOWN_DEP, schema="workflow")
    before = parse_families(client.get("/metrics").content.decode())
    generate(parse_request({"prompt": "check the status endpoint"}, tenant_id="acme"))
    after = parse_families(client.get("/metrics").content.decode())

    def value(families, name, sample, labels=None):
        family = families.get(name)
        if family is None:
            return 0.0
        return sum(s.value for s in family.samples if s.name == sample and (labels is None or s.labels == labels))

    failures_total = ("workflow_generation_failures", "workflow_generation_failures_total")
    assert (
        value(after, *failures_total, {"stage": "validate"})
        == value(before, *failures_total, {"stage": "validate"}) + 3
    )
    seconds = ("workflow_generation_seconds", "workflow_generation_seconds_count")
    assert value(after, *seconds) == value(before, *seconds) + 1
    assert {"stage": "dry_run"} in [s.labels for s in after["workflow_generation_failures"].samples]


@pytest.mark.django_db
def test_run_job_claims_once_and_takes_over_a_job_whose_worker_died(builtins, offline):
    from datetime import timedelta

    from django.utils import timezone

    from templates_app.generation import create_job, run_job
    from templates_app.generation.service import stale_after

    job = create_job(parse_request({"prompt": LINES}, tenant_id="acme"))
    done = run_job(job.pk)
    assert done.status == GenerationStatus.SUCCEEDED and done.result["ok"]
    assert run_job(job.pk) is None  # a duplicate message: nothing to claim

    # a job left running by a killed worker: taken over once it is older than stale_after()
    lost = create_job(parse_request({"prompt": LINES}, tenant_id="acme"))
    recent = timezone.now() - timedelta(seconds=stale_after() - 60)
    WorkflowGenerationJob.objects.filter(pk=lost.pk).update(status=GenerationStatus.RUNNING, started_at=recent)
    assert run_job(lost.pk) is None
    old = timezone.now() - timedelta(seconds=stale_after() + 60)
    WorkflowGenerationJob.objects.filter(pk=lost.pk).update(started_at=old)
    assert run_job(lost.pk).status == GenerationStatus.SUCCEEDED
