"""The REST API: authentication, tenancy (outsiders get 404), templates, runs, idempotency, filters,
cursor pages, the seed-compatible endpoints, one-line 400s and bounded query counts.

These tests need no worker: runs are created and read, their steps stay queued. The tests that
execute runs (cancel, retry, rerun) are in test_api_runs.py.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone
from knox.models import AuthToken

from runs import engine
from runs.models import Run, Step, Trace
from templates_app.spec import load_spec
from tests.conftest import CHAIN_YAML, api_client_for

pytestmark = pytest.mark.django_db

API = "/api/v1"


def make_run(template, tenant="acme", **kwargs):
    inputs = kwargs.pop("inputs", {"n": 1})
    return engine.start_run(template.spec, inputs, template=template, tenant_id=tenant, **kwargs)


# --- authentication --------------------------------------------------------------------------------


ENDPOINTS = [
    ("get", "/runs"),
    ("post", "/runs"),
    ("get", "/runs/{run}"),
    ("post", "/runs/{run}/cancel"),
    ("post", "/runs/{run}/retry"),
    ("post", "/runs/{run}/rerun"),
    ("get", "/runs/{run}/steps"),
    ("get", "/runs/{run}/steps/a"),
    ("get", "/runs/{run}/attempts"),
    ("get", "/runs/{run}/traces"),
    ("get", "/templates"),
    ("post", "/templates"),
    ("get", "/templates/chain"),
    ("put", "/templates/chain"),
    ("get", "/templates/chain/versions/1"),
    ("post", "/templates/validate"),
    ("post", "/workflows"),
    ("get", "/workflows/{run}/status"),
    ("post", "/dispatch"),
    ("get", "/me"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_every_endpoint_requires_authentication(chain_template, method, path):
    run = make_run(chain_template)
    response = getattr(api_client_for(None), method)(API + path.format(run=run.pk), {}, format="json")
    assert response.status_code == 401, response.content
    assert response.json()["detail"]
    assert response["WWW-Authenticate"] == "Token"


# (PUT /templates/chain is an upsert in the caller's own tenant: test_same_key_in_two_tenants)
@pytest.mark.parametrize(
    ("method", "path"), [e for e in ENDPOINTS if ("{run}" in e[1] or "chain" in e[1]) and e[0] != "put"]
)
def test_outsider_gets_404_for_every_object_of_another_tenant(chain_template, outsider_api, method, path):
    run = make_run(chain_template)
    response = getattr(outsider_api, method)(API + path.format(run=run.pk), {}, format="json")
    assert response.status_code == 404, response.content
    # and nothing happened to the run
    assert Run.objects.get(pk=run.pk).status == "running"


@pytest.mark.parametrize(("method", "path"), [e for e in ENDPOINTS if "{run}" in e[1] and e[0] == "get"])
def test_owner_can_read_every_run_endpoint(chain_template, owner_api, method, path):
    run = make_run(chain_template)
    response = owner_api.get(API + path.format(run=run.pk))
    assert response.status_code == 200, response.content


def test_lists_of_an_outsider_are_empty(chain_template, outsider_api):
    make_run(chain_template)
    assert outsider_api.get(f"{API}/runs").json()["results"] == []
    assert outsider_api.get(f"{API}/templates").json() == []


def test_foreign_tenant_header_is_404(chain_template, outsider_api, owner_api):
    assert outsider_api.get(f"{API}/runs", HTTP_X_TENANT="acme").status_code == 404
    assert owner_api.get(f"{API}/runs", HTTP_X_TENANT="no-such-tenant").status_code == 404
    assert owner_api.get(f"{API}/runs", HTTP_X_TENANT="bad slug!\x01").status_code == 404
    assert owner_api.get(f"{API}/runs", HTTP_X_TENANT="acme").status_code == 200


def test_member_of_two_tenants_chooses_with_header(chain_template, owner, tenants):
    from runs.models import Membership

    Membership.objects.create(user=owner, tenant=tenants["globex"], role="viewer")
    client = api_client_for(owner)
    run = make_run(chain_template)
    assert client.get(f"{API}/runs/{run.pk}").status_code == 200  # default tenant: acme
    assert client.get(f"{API}/runs/{run.pk}", HTTP_X_TENANT="globex").status_code == 404
    me = client.get(f"{API}/me", HTTP_X_TENANT="globex").json()
    assert me["tenant"] == "globex" and me["role"] == "viewer"
    assert {t["slug"] for t in me["tenants"]} == {"acme", "globex"}


def test_viewer_reads_but_cannot_write(chain_template, viewer):
    client = api_client_for(viewer)
    run = make_run(chain_template)
    assert client.get(f"{API}/runs/{run.pk}").status_code == 200
    assert client.post(f"{API}/runs", {"template": "chain", "variables": {"n": 1}}, format="json").status_code == 403
    assert client.post(f"{API}/runs/{run.pk}/cancel").status_code == 403
    assert Run.objects.get(pk=run.pk).status == "running"


def test_user_without_tenant_is_refused(db):
    from django.contrib.auth import get_user_model

    lonely = get_user_model().objects.create_user("lonely")
    response = api_client_for(lonely).get(f"{API}/runs")
    assert response.status_code == 403
    assert "not a member of any tenant" in response.json()["detail"]


def test_tokens_are_hashed_and_expire(owner):
    client = api_client_for(owner)
    stored = AuthToken.objects.get(user=owner)
    assert client.token.startswith("orch_")
    assert client.token not in (stored.digest, stored.token_key)  # only a prefix and the hash are kept
    assert client.get(f"{API}/me").status_code == 200
    AuthToken.objects.filter(pk=stored.pk).update(expiry=timezone.now() - timedelta(seconds=1))
    assert client.get(f"{API}/me").status_code == 401
    bad = api_client_for(None)
    bad.credentials(HTTP_AUTHORIZATION="Token orch_" + "x" * 64)
    assert bad.get(f"{API}/me").status_code == 401


def test_login_with_basic_auth_creates_a_token(owner):
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Basic " + __import__("base64").b64encode(b"owner:pw-owner").decode())
    response = client.post(f"{API}/auth/login")
    assert response.status_code == 200, response.content
    token = response.json()["token"]
    assert response.json()["expiry"]
    assert api_client_for(None).get(f"{API}/me", HTTP_AUTHORIZATION=f"Token {token}").status_code == 200


def test_session_auth_for_the_browsable_api(owner, client):
    client.force_login(owner)
    assert client.get(f"{API}/runs").status_code == 200
    assert client.get(f"{API}/runs", HTTP_ACCEPT="text/html").status_code == 200


# --- templates ----------------------------------------------------------------------------------


def test_create_template_from_yaml_json_and_raw(owner_api, tenants):
    response = owner_api.post(f"{API}/templates", {"source": CHAIN_YAML}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["key"], body["version"], body["action"], body["tenant"]) == ("chain", 1, "created", "acme")
    # the same file again: unchanged
    again = owner_api.post(f"{API}/templates", {"source": CHAIN_YAML}, format="json")
    assert again.status_code == 200 and again.json()["action"] == "unchanged"
    # a changed file, raw YAML through PUT: version 2
    changed = CHAIN_YAML.replace("name: A chain", "name: A better chain")
    response = owner_api.put(f"{API}/templates/chain", changed, content_type="application/yaml")
    assert response.status_code == 201, response.content
    assert response.json()["version"] == 2
    detail = owner_api.get(f"{API}/templates/chain").json()
    assert detail["version"] == 2 and detail["name"] == "A better chain"
    assert [v["version"] for v in detail["versions"]] == [2, 1]
    assert "source" in detail and detail["spec"]["key"] == "chain"
    v1 = owner_api.get(f"{API}/templates/chain/versions/1").json()
    assert v1["name"] == "A chain" and v1["source"] == CHAIN_YAML
    listed = owner_api.get(f"{API}/templates").json()
    assert [(t["key"], t["version"]) for t in listed] == [("chain", 2)]


def test_template_errors_are_the_loaders_one_line_400(owner_api, tenants):
    bad = CHAIN_YAML.replace("depends_on: [a]", "depends_on: [zz]")
    with pytest.raises(Exception) as raised:
        load_spec(bad, source="chain.yaml")
    for url in (f"{API}/templates", f"{API}/templates/validate"):
        response = owner_api.post(url, {"source": bad, "filename": "chain.yaml"}, format="json")
        assert response.status_code == 400
        assert response.json()["detail"] == str(raised.value)
        assert "\n" not in response.json()["detail"]
    syntax = owner_api.post(f"{API}/templates", "key: [unclosed", content_type="application/yaml")
    assert syntax.status_code == 400 and "YAML syntax error" in syntax.json()["detail"]
    mismatch = owner_api.put(f"{API}/templates/other", {"source": CHAIN_YAML}, format="json")
    assert mismatch.status_code == 400 and "does not match" in mismatch.json()["detail"]
    assert owner_api.post(f"{API}/templates", {}, format="json").json()["detail"] == "source: This field is required."


def test_validate_returns_the_normalized_spec(owner_api, tenants):
    response = owner_api.post(f"{API}/templates/validate", CHAIN_YAML, content_type="text/yaml")
    assert response.status_code == 200
    body = response.json()
    assert body["valid"] is True and body["steps"] == 2 and body["spec"]["steps"][1]["depends_on"] == ["a"]
    assert not owner_api.get(f"{API}/templates").json()  # nothing saved


def test_same_key_in_two_tenants(owner_api, outsider_api, tenants):
    assert owner_api.post(f"{API}/templates", {"source": CHAIN_YAML}, format="json").status_code == 201
    assert outsider_api.get(f"{API}/templates/chain").status_code == 404
    other = CHAIN_YAML.replace("A chain", "Globex chain")
    assert outsider_api.put(f"{API}/templates/chain", {"source": other}, format="json").json()["version"] == 1
    assert owner_api.get(f"{API}/templates/chain").json()["name"] == "A chain"


# --- runs -----------------------------------------------------------------------------------------


def test_create_run_and_read_it_in_seed_003_shape(owner_api, chain_template):
    response = owner_api.post(
        f"{API}/runs",
        {"template": "chain", "variables": {"n": "3"}, "correlation_id": "corr-1", "priority": 2},
        format="json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert response["Location"].endswith(f"/api/v1/runs/{body['id']}")
    assert body["status"] == "running" and body["tenant"] == "acme" and body["priority"] == 2
    assert body["inputs"] == {"n": 3, "greeting": "hello"}
    assert body["progress"] == {"percent": 0, "done": 0, "total": 2, "counts": {"queued": 1, "pending": 1}}
    assert body["current_step"] == "a"
    assert [(s["id"], s["status"], s["attempts"]) for s in body["steps"]] == [("a", "queued", 0), ("b", "pending", 0)]
    assert any(t["message"].startswith("run started") for t in body["latest_traces"])
    run = Run.objects.get(pk=body["id"])
    assert (run.user_id, run.trigger, run.correlation_id) == ("owner", "api", "corr-1")


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({}, "template: This field is required."),
        ({"template": "chain"}, "variable 'n': required"),
        ({"template": "chain", "variables": {"n": "x"}}, "variable 'n': expected integer, got 'x'"),
        ({"template": "chain", "variables": {"n": 1, "zz": 1}}, "variable 'zz': unknown variable (known: greeting, n)"),
        ({"template": "nope", "variables": {}}, "no template with key 'nope'"),
        ({"template": "chain", "version": 9}, "template 'chain' has no version 9"),
        ({"template": "chain", "variables": [1]}, "variables: Expected a dictionary of items"),
        ({"template": "chain", "variables": {"n": 1}, "priority": 10}, "priority: Ensure this value is less than"),
        ({"template": "chain", "variables": {"n": 1}, "correlation_id": "x" * 201}, "correlation_id: Ensure"),
        ({"template": "chain", "variables": {"n": "\x00"}}, "NUL"),
        ([1, 2], "Invalid data. Expected a dictionary"),
    ],
)
def test_bad_run_requests_are_one_line_400s(owner_api, chain_template, body, detail):
    response = owner_api.post(f"{API}/runs", body, format="json")
    # an unknown template or version is a 404 (like another tenant's: nothing says it exists)
    expected = 404 if "no template" in detail or "has no version" in detail else 400
    assert response.status_code == expected, response.content
    assert detail in response.json()["detail"]
    assert "\n" not in response.json()["detail"]
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    ("data", "content_type"),
    [("", "application/json"), ("{not json", "application/json"), ("[[[[" * 5000, "application/json")],
)
def test_malformed_bodies_are_400_not_500(owner_api, chain_template, data, content_type):
    response = owner_api.generic("POST", f"{API}/runs", data, content_type=content_type)
    assert response.status_code == 400, response.content


def test_wrong_content_type_is_415(owner_api, chain_template):
    assert owner_api.generic("POST", f"{API}/runs", "a=b", content_type="text/plain").status_code == 415


def test_idempotency_key_replays_or_conflicts(owner_api, chain_template):
    body = {"template": "chain", "variables": {"n": 1}}
    first = owner_api.post(f"{API}/runs", body, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert first.status_code == 201
    again = owner_api.post(f"{API}/runs", body, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    # the body field works the same as the header; defaults do not make a body "different"
    same = owner_api.post(f"{API}/runs", {**body, "priority": 5, "idempotency_key": "k-1"}, format="json")
    assert same.status_code == 200 and same.json()["id"] == first.json()["id"]
    other = owner_api.post(f"{API}/runs", {**body, "variables": {"n": 2}}, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert other.status_code == 409
    assert "already used with a different request" in other.json()["detail"]
    assert Run.objects.count() == 1
    clash = owner_api.post(f"{API}/runs", {**body, "idempotency_key": "a"}, format="json", HTTP_IDEMPOTENCY_KEY="b")
    assert clash.status_code == 400
    bad = owner_api.post(f"{API}/runs", body, format="json", HTTP_IDEMPOTENCY_KEY="has space")
    assert bad.status_code == 400


def test_idempotency_keys_are_per_tenant(owner_api, outsider_api, chain_template, tenants):
    other = CHAIN_YAML
    outsider_api.post(f"{API}/templates", {"source": other}, format="json")
    body = {"template": "chain", "variables": {"n": 1}}
    a = owner_api.post(f"{API}/runs", body, format="json", HTTP_IDEMPOTENCY_KEY="shared")
    b = outsider_api.post(f"{API}/runs", body, format="json", HTTP_IDEMPOTENCY_KEY="shared")
    assert a.status_code == b.status_code == 201
    assert a.json()["id"] != b.json()["id"]


def test_list_filters_and_cursor_pages(owner_api, chain_template):
    runs = [make_run(chain_template, correlation_id=f"c{i}") for i in range(5)]
    engine.cancel_run(runs[0].pk)
    old = timezone.now() - timedelta(days=3)
    Run.objects.filter(pk=runs[1].pk).update(created_at=old)
    make_run(chain_template, tenant="globex")  # never listed for acme

    def ids(query=""):
        return [r["id"] for r in owner_api.get(f"{API}/runs{query}").json()["results"]]

    assert len(ids()) == 5
    assert ids("?status=cancelled") == [str(runs[0].pk)]
    assert set(ids("?status=cancelled,running")) == {str(r.pk) for r in runs}
    assert ids("?correlation_id=c3") == [str(runs[3].pk)]
    assert len(ids("?template=chain")) == 5 and ids("?template=other") == []
    before = (old + timedelta(days=1)).isoformat()
    assert ids(f"?created_before={before.replace('+', '%2B')}") == [str(runs[1].pk)]
    assert str(runs[1].pk) not in ids(f"?created_after={before.replace('+', '%2B')}")
    # newest first, two per page, following `next` until it is null
    seen, url = [], f"{API}/runs?page_size=2"
    while url:
        page = owner_api.get(url).json()
        assert len(page["results"]) <= 2
        seen += [r["id"] for r in page["results"]]
        url = page["next"]
    assert seen == ids() and len(set(seen)) == 5
    for bad in ("?status=nope", "?created_after=yesterday", "?version=x", "?cursor=garbage"):
        response = owner_api.get(f"{API}/runs{bad}")
        assert response.status_code in (400, 404), bad
        assert response.json()["detail"]


def test_steps_attempts_traces_of_a_run(owner_api, chain_template):
    run = make_run(chain_template)
    steps = owner_api.get(f"{API}/runs/{run.pk}/steps").json()["results"]
    assert [(s["id"], s["status"], s["parent"]) for s in steps] == [("a", "queued", None), ("b", "pending", None)]
    assert owner_api.get(f"{API}/runs/{run.pk}/steps?status=pending").json()["results"][0]["id"] == "b"
    detail = owner_api.get(f"{API}/runs/{run.pk}/steps/a").json()
    assert detail["attempt_list"] == [] and detail["depends_on"] == []
    assert owner_api.get(f"{API}/runs/{run.pk}/steps/zz").status_code == 404
    traces = owner_api.get(f"{API}/runs/{run.pk}/traces").json()["results"]
    assert traces and traces[0]["kind"] == "state"
    newer = owner_api.get(f"{API}/runs/{run.pk}/traces?after={traces[-1]['id']}").json()["results"]
    assert newer == []
    assert owner_api.get(f"{API}/runs/{run.pk}/attempts").json()["results"] == []
    assert owner_api.get(f"{API}/runs/{uuid.uuid4()}/steps").status_code == 404


def test_queries_are_bounded(owner_api, chain_template, django_assert_max_num_queries):
    for i in range(30):
        make_run(chain_template, correlation_id=f"c{i}")
    run = Run.objects.first()
    for _ in range(20):
        Trace.objects.create(run=run, kind="log", message="x")
    # token + user + membership + the page (no COUNT, no per-row queries)
    with django_assert_max_num_queries(5):
        assert len(owner_api.get(f"{API}/runs?page_size=30").json()["results"]) == 30
    with django_assert_max_num_queries(8):
        assert owner_api.get(f"{API}/runs/{run.pk}").status_code == 200
    with django_assert_max_num_queries(6):
        assert owner_api.get(f"{API}/runs/{run.pk}/steps").status_code == 200
    with django_assert_max_num_queries(6):
        assert owner_api.get(f"{API}/runs/{run.pk}/traces").status_code == 200
    with django_assert_max_num_queries(5):
        assert owner_api.get(f"{API}/templates").status_code == 200


def test_cancel_without_worker_cancels_pending_steps(owner_api, chain_template):
    run = make_run(chain_template)
    response = owner_api.post(f"{API}/runs/{run.pk}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert set(Step.objects.filter(run=run).values_list("status", flat=True)) == {"cancelled"}
    again = owner_api.post(f"{API}/runs/{run.pk}/cancel")
    assert again.status_code == 409 and again.json()["detail"] == "run is already cancelled"


def test_retry_of_a_run_with_nothing_failed_is_409(owner_api, chain_template):
    run = make_run(chain_template)
    response = owner_api.post(f"{API}/runs/{run.pk}/retry")
    assert response.status_code == 409
    assert "nothing to retry" in response.json()["detail"]
    bad = owner_api.post(f"{API}/runs/{run.pk}/retry", {"steps": ["zz"]}, format="json")
    assert bad.status_code == 400 and bad.json()["detail"] == "run has no step 'zz'"
    busy = owner_api.post(f"{API}/runs/{run.pk}/retry", {"steps": ["a"]}, format="json")
    assert busy.status_code == 400 and "only failed, dead or cancelled" in busy.json()["detail"]


# --- seed-compatible endpoints ---------------------------------------------------------------------


def test_seed_002_workflows_endpoints(owner_api, outsider_api, chain_template):
    response = owner_api.post(
        f"{API}/workflows",
        {"workflow_template": "chain", "variables": {"n": 7}, "correlation_id": "workflow-001"},
        format="json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["workflow_template"] == "chain" and body["correlation_id"] == "workflow-001"
    status = owner_api.get(f"{API}/workflows/{body['execution_id']}/status")
    assert status.status_code == 200
    seed = status.json()
    assert seed["taskId"] == body["execution_id"] and seed["status"] == "running"
    assert seed["progress"] == 0 and seed["currentStep"] == 0 and seed["totalSteps"] == 2
    assert seed["steps"][0] == {
        "index": "0",
        "id": "a",
        "description": "a",
        "status": "queued",
        "attempts": 0,
        "startedAt": None,
        "finishedAt": None,
    }
    assert {"type", "message", "timestamp"} <= set(seed["latestTraces"][0])
    assert outsider_api.get(f"{API}/workflows/{body['execution_id']}/status").status_code == 404
    listed = owner_api.get(f"{API}/templates").json()
    assert listed[0]["key"] == "chain"


def test_seed_004_dispatch(owner_api, tenants):
    workflow = """\
key: daily_instructor_v1
variables:
  user_id: {type: string}
steps:
  - id: gather_signals
    call: "/functions/v1/agent-proxy/snapshot"
    method: GET
    timeout_ms: 8000
"""
    assert owner_api.post(f"{API}/templates", {"source": workflow}, format="json").status_code == 201
    body = {"user_id": "test-user-id", "workflow_key": "daily_instructor_v1", "payload": {"test": True}}
    response = owner_api.post(f"{API}/dispatch", body, format="json")
    assert response.status_code == 201, response.content
    out = response.json()
    assert out["ok"] is True and out["workflow_key"] == "daily_instructor_v1" and out["created"] is True
    run = Run.objects.get(pk=out["workflow_run_id"])
    assert run.inputs == {"user_id": "test-user-id"}  # declared variables are filled, the rest kept aside
    assert run.metadata == {"intent_id": None, "payload": {"test": True}}
    assert (run.trigger, run.user_id, run.tenant_id) == ("event", "test-user-id", "acme")
    replay = owner_api.post(f"{API}/dispatch", {**body, "intent_id": "i-1"}, format="json", HTTP_IDEMPOTENCY_KEY="e1")
    assert replay.status_code == 201
    again = owner_api.post(f"{API}/dispatch", {**body, "intent_id": "i-1"}, format="json", HTTP_IDEMPOTENCY_KEY="e1")
    assert again.status_code == 200 and again.json()["workflow_run_id"] == replay.json()["workflow_run_id"]
    assert Run.objects.get(pk=replay.json()["workflow_run_id"]).correlation_id == "i-1"
    missing = owner_api.post(f"{API}/dispatch", {"workflow_key": "daily_instructor_v1"}, format="json")
    assert missing.status_code == 400 and missing.json()["detail"] == "user_id: This field is required."


def test_openapi_schema_and_docs(owner_api, client, owner):
    schema = owner_api.get(f"{API}/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    doc = schema.json()
    assert doc["openapi"].startswith("3.")
    for path in ("/api/v1/runs/", "/api/v1/runs/{id}/retry/", "/api/v1/workflows/", "/api/v1/dispatch/"):
        assert path in doc["paths"], sorted(doc["paths"])
    client.force_login(owner)
    assert client.get(f"{API}/docs").status_code == 200


def test_template_fields_longer_than_their_columns_are_400(owner_api, tenants):
    long_name = CHAIN_YAML.replace("name: A chain", "name: " + "n" * 250)
    response = owner_api.post(f"{API}/templates", {"source": long_name, "filename": "long.yaml"}, format="json")
    assert response.status_code == 400
    assert response.json()["detail"] == "long.yaml: name: longer than 200 characters"


def test_superuser_acts_in_any_existing_tenant(chain_template, tenants):
    from django.contrib.auth import get_user_model

    root = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client = api_client_for(root)
    run = make_run(chain_template)
    assert client.get(f"{API}/runs/{run.pk}").status_code == 404  # acts in "default" without a header
    assert client.get(f"{API}/runs/{run.pk}", HTTP_X_TENANT="acme").status_code == 200
    assert client.get(f"{API}/runs", HTTP_X_TENANT="nope").status_code == 404
    assert client.get(f"{API}/me", HTTP_X_TENANT="acme").json()["role"] == "superuser"
