"""Credentials (encrypted at rest, rotated, write-only, masked, resolved by alias at run time), the
signed service JWT, the credential_resolution_total metric, and a canary secret that must appear
in no trace, output, error, log line or API answer."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import jwt
import pytest
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from agents import credentials, service_auth
from agents.models import Credential
from agents.redaction import forget_registered_secrets, known_secrets
from agents.registry import StepContext, StepError, get_handler, run_with_timeout
from runs.metrics import exposition, parse_families
from runs.models import Attempt, Run, Step, Trace
from tests.conftest import api_client_for, start, wait_for_run
from tests.flow_support import FERNET_KEY, purge_queue, route_to, start_workers

CANARY = "canary-SECRET-7d1f0c2b"
API = "/api/v1"


@pytest.fixture(autouse=True)
def _forget_resolved_secrets():
    """Secrets resolved in this process are remembered for redaction: keep other tests clean of them."""
    yield
    forget_registered_secrets()


def make_credential(alias: str = "svc", secret: str = CANARY, tenant: str = "default", **fields: Any) -> Credential:
    credential = Credential(tenant_id=tenant, alias=alias, **fields)
    credential.set_secret(secret)
    credential.save()
    return credential


def raw_secret_column(pk: int) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT secret_encrypted FROM {Credential._meta.db_table} WHERE id = %s", [pk])
        return cursor.fetchone()[0]


# --- encryption at rest and key rotation --------------------------------------------------------------


def test_secret_is_encrypted_at_rest(db, settings):
    settings.ORCHESTRATOR_FERNET_KEYS = [FERNET_KEY]
    credential = make_credential()
    stored = raw_secret_column(credential.pk)
    assert CANARY not in stored and CANARY.encode() not in base64.urlsafe_b64decode(stored + "==")
    assert Fernet(FERNET_KEY.encode()).decrypt(stored.encode()).decode() == CANARY
    assert CANARY not in repr(credential) and CANARY not in str(credential)


def test_without_keys_nothing_is_encrypted_with_a_key_derived_from_secret_key(db, settings, owner):
    # (issue 10: with the secret key, read from the worker's environment, an exec step derived
    # the credential key and decrypted another tenant's secrets)
    from agents.checks import check_fernet_keys, check_fernet_keys_deploy

    settings.ORCHESTRATOR_FERNET_KEYS = []
    # storing a secret is refused with one line, in code, in the API and by the system check
    with pytest.raises(credentials.CredentialError, match="ORCHESTRATOR_FERNET_KEYS"):
        make_credential()
    assert not Credential.objects.exists()
    answer = api_client_for(owner).post(
        f"{API}/credentials", {"alias": "svc", "kind": "bearer", "secret": CANARY}, format="json"
    )
    assert answer.status_code == 400 and "ORCHESTRATOR_FERNET_KEYS" in json.dumps(answer.json())
    assert CANARY not in json.dumps(answer.json())
    assert [e.id for e in check_fernet_keys_deploy()] == ["agents.E003"]  # `check --deploy`
    # with a key, the token does not open with the key derived from SECRET_KEY
    settings.ORCHESTRATOR_FERNET_KEYS = [FERNET_KEY]
    token = raw_secret_column(make_credential().pk)
    with pytest.raises(InvalidToken):
        Fernet(credentials.legacy_derived_key(settings.SECRET_KEY)).decrypt(token.encode())
    settings.ORCHESTRATOR_FERNET_KEYS = [credentials.legacy_derived_key(settings.SECRET_KEY).decode()]
    assert [e.id for e in check_fernet_keys()] == ["agents.W003"]


def test_secrets_of_older_versions_migrate_with_from_secret_key(db, settings, capsys):
    # Given a secret stored by a version that derived its key from SECRET_KEY ...
    legacy = Fernet(credentials.legacy_derived_key(settings.SECRET_KEY))
    settings.ORCHESTRATOR_FERNET_KEYS = [FERNET_KEY]
    credential = make_credential()
    Credential.objects.filter(pk=credential.pk).update(secret_encrypted=legacy.encrypt(CANARY.encode()).decode())
    # ... the configured key does not open it ...
    with pytest.raises(CommandError, match="1 secret\\(s\\) cannot be decrypted"):
        call_command("rotate_keys", "--check")
    # ... until rotate_keys --from-secret-key re-encrypts it with the configured key
    call_command("rotate_keys", "--from-secret-key")
    assert "1 secret(s) re-encrypted" in capsys.readouterr().out
    assert credentials.decrypt(raw_secret_column(credential.pk)) == CANARY
    call_command("rotate_keys", "--check")


def test_the_embedded_default_generates_its_key_once(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DATABASE_URL", "CELERY_BROKER"))}
    env.update(
        DJANGO_SETTINGS_MODULE="orchestrator_site.settings",
        ORCHESTRATOR_DATA_DIR=str(tmp_path),
        ORCHESTRATOR_FERNET_KEYS="",
        DJANGO_SECRET_KEY="",
    )
    code = "from django.conf import settings as s; print(','.join(s.ORCHESTRATOR_FERNET_KEYS), s.SECRET_KEY)"
    runs = [
        subprocess.run(
            [sys.executable, "-c", f"import django; django.setup(); {code}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        for _ in range(2)
    ]
    assert runs[0] == runs[1]  # the same key (and secret key) on every start
    key, secret_key = runs[0]
    Fernet(key.encode())
    assert key != credentials.legacy_derived_key(secret_key).decode()
    assert (tmp_path / "fernet_keys").stat().st_mode & 0o777 == 0o600


def test_rotate_keys_reencrypts_with_the_newest_key(db, settings, capsys):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.ORCHESTRATOR_FERNET_KEYS = [old]
    first, second = make_credential("one"), make_credential("two", secret="other-secret-123")
    # a new key goes first, the old one stays until every secret is re-encrypted
    settings.ORCHESTRATOR_FERNET_KEYS = [new, old]
    call_command("rotate_keys")
    assert "2 secret(s) re-encrypted" in capsys.readouterr().out
    settings.ORCHESTRATOR_FERNET_KEYS = [new]  # the old key is gone now
    assert credentials.decrypt(raw_secret_column(first.pk)) == CANARY
    assert credentials.decrypt(raw_secret_column(second.pk)) == "other-secret-123"
    call_command("rotate_keys", "--check")
    # with a key that opens nothing, --check and the rotation say which secrets are lost
    settings.ORCHESTRATOR_FERNET_KEYS = [old]
    with pytest.raises(CommandError, match="2 secret\\(s\\) cannot be decrypted: default/one, default/two"):
        call_command("rotate_keys", "--check")
    with pytest.raises(CommandError, match="could not be decrypted with any configured key"):
        call_command("rotate_keys")


def test_rotate_keys_generate_prints_a_valid_key(capsys):
    call_command("rotate_keys", "--generate")
    Fernet(capsys.readouterr().out.strip().encode())


def test_bad_fernet_key_is_a_system_check_error(settings):
    from agents.checks import check_fernet_keys

    settings.ORCHESTRATOR_FERNET_KEYS = ["not-a-key"]
    assert [e.id for e in check_fernet_keys()] == ["agents.E001"]


# --- resolution at run time ------------------------------------------------------------------------


class Recorder:
    """An httpx MockTransport recording requests and answering with a canned JSON body."""

    def __init__(self, body: Any = None, status: int = 200) -> None:
        self.requests: list[httpx.Request] = []
        self.body = {"ok": True} if body is None else body
        self.status = status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status, json=self.body)


@pytest.fixture
def recorder(monkeypatch, settings):
    settings.ORCHESTRATOR_AGENTS_BASE_URL = "http://agents.test"
    settings.ORCHESTRATOR_SERVICE_TOKEN = "static-service-token-1"
    recorder = Recorder()
    client = httpx.Client(transport=httpx.MockTransport(recorder))
    monkeypatch.setattr("agents.handlers.http.get_client", lambda: client)
    return recorder


def run_http(params: dict[str, Any], tenant: str = "default") -> tuple[Any, list]:
    events: list = []
    ctx = StepContext(
        run_id="11111111-2222-3333-4444-555555555555",
        step_id="call",
        step_pk=1,
        attempt=2,
        params=params,
        timeout=5.0,
        idempotency_key="run:call",
        tenant_id=tenant,
        trace=lambda kind, message, data=None: events.append((kind, message, data)),
    )
    return run_with_timeout(get_handler("http"), ctx), events


@pytest.mark.parametrize(
    ("fields", "header", "expected"),
    [
        ({"kind": "bearer"}, "authorization", f"Bearer {CANARY}"),
        (
            {"kind": "basic", "username": "bot"},
            "authorization",
            "Basic " + base64.b64encode(f"bot:{CANARY}".encode()).decode(),
        ),
        ({"kind": "header", "name": "X-Vendor-Token"}, "x-vendor-token", CANARY),
        ({"kind": "api_key"}, "x-api-key", CANARY),
    ],
)
def test_http_step_sends_its_credential(db, recorder, fields, header, expected):
    make_credential(**fields)
    output, events = run_http({"url": "https://api.vendor.test/v1/x", "credential": "svc"})
    sent = recorder.requests[0]
    assert sent.headers[header] == expected
    if header != "authorization":
        assert "authorization" not in sent.headers  # the service token never goes to a free URL
    # nothing the step wrote holds the secret
    assert CANARY not in json.dumps([output, events])
    assert events[0][2]["credential"] == "svc"


def test_api_key_in_the_query_string(db, recorder):
    make_credential(kind="api_key", name="key", location="query")
    _, events = run_http({"url": "https://api.vendor.test/v1/x", "credential": "svc", "params": {"q": "1"}})
    assert recorder.requests[0].url.params["key"] == CANARY
    assert recorder.requests[0].url.params["q"] == "1"
    assert CANARY not in json.dumps(events)


def test_credential_replaces_the_service_token_on_agent_calls(db, recorder):
    make_credential()
    run_http({"call": "/functions/v1/agent", "credential": "svc"})
    assert recorder.requests[0].headers["authorization"] == f"Bearer {CANARY}"


def test_credential_problems_are_permanent_and_secret_free(db, recorder, settings):
    make_credential(allowed_hosts=["api.vendor.test", "*.vendor.org"])
    with pytest.raises(StepError) as missing:
        run_http({"url": "https://api.vendor.test/", "credential": "nope"})
    assert missing.value.permanent and "credential 'nope' not found in tenant 'default'" in str(missing.value)
    with pytest.raises(StepError) as other_tenant:
        run_http({"url": "https://api.vendor.test/", "credential": "svc"}, tenant="acme")
    assert "not found in tenant 'acme'" in str(other_tenant.value)
    with pytest.raises(StepError) as denied:
        run_http({"url": "https://evil.test/", "credential": "svc"})
    assert denied.value.permanent and "may not be sent to host 'evil.test'" in str(denied.value)
    run_http({"url": "https://eu.vendor.org/", "credential": "svc"})  # wildcard subdomain
    settings.ORCHESTRATOR_FERNET_KEYS = [Fernet.generate_key().decode()]  # the key was lost
    with pytest.raises(StepError, match="credential 'svc' cannot be decrypted"):
        run_http({"url": "https://api.vendor.test/", "credential": "svc"})
    assert not recorder.requests[-1].url.host.startswith("evil")


def test_bad_credential_param_is_refused_at_load():
    from templates_app.spec import WorkflowError, load_spec

    with pytest.raises(WorkflowError, match="params: credential must be a credential alias"):
        load_spec("key: c\nsteps:\n  - {id: a, type: http, params: {url: 'https://x.test', credential: 'a b'}}\n")


def _resolutions(families, status, tenant=None):
    family = families.get("credential_resolution")
    for sample in family.samples if family else []:
        labels = {k: v for k, v in sample.labels.items() if v != ""}
        if sample.name == "credential_resolution_total" and labels == {
            "status": status,
            **({"tenant": tenant} if tenant else {}),
        }:
            return sample.value
    return 0.0


def test_resolution_metric(db, recorder, settings):
    settings.ORCHESTRATOR_METRICS_TENANT_LABEL = False
    make_credential(alias="tenant-private-alias")
    before = parse_families(exposition()[0].decode())
    run_http({"url": "https://api.vendor.test/", "credential": "tenant-private-alias"})
    with pytest.raises(StepError):
        run_http({"url": "https://api.vendor.test/", "credential": "ghost-alias-of-a-tenant"})
    text = exposition()[0].decode()
    after = parse_families(text)
    assert _resolutions(after, "ok") - _resolutions(before, "ok") == 1
    assert _resolutions(after, "not_found") - _resolutions(before, "not_found") == 1
    # /metrics is the operator's: the names a tenant chose appear nowhere in it
    assert "tenant-private-alias" not in text and "ghost-alias-of-a-tenant" not in text


def test_resolution_metric_tenant_label_only_when_enabled(db, recorder, settings):
    make_credential()
    settings.ORCHESTRATOR_METRICS_TENANT_LABEL = True
    before = parse_families(exposition()[0].decode())
    run_http({"url": "https://api.vendor.test/", "credential": "svc"})
    after = parse_families(exposition()[0].decode())
    assert _resolutions(after, "ok", tenant="default") - _resolutions(before, "ok", tenant="default") == 1


def test_resolved_secrets_are_known_to_the_redaction(db, recorder):
    make_credential(alias="late", secret="late-secret-9911")
    assert "late-secret-9911" not in known_secrets()
    run_http({"url": "https://api.vendor.test/", "credential": "late"})
    assert "late-secret-9911" in known_secrets()


# --- service JWT ------------------------------------------------------------------------------------

JWT_KEY = "jwt-shared-secret-of-at-least-32-chars"


def test_service_jwt_is_sent_to_agents_with_tenant_run_and_step(db, recorder, settings):
    settings.ORCHESTRATOR_SERVICE_JWT_KEY = JWT_KEY
    settings.ORCHESTRATOR_SERVICE_JWT_AUDIENCE = "agents"
    run_http({"call": "/functions/v1/agent"}, tenant="acme")
    auth = recorder.requests[0].headers["authorization"]
    assert auth.startswith("Bearer ") and "static-service-token" not in auth
    claims = service_auth.verify(auth.removeprefix("Bearer "))
    assert claims["tenant"] == "acme" and claims["step"] == "call" and claims["attempt"] == 2
    assert claims["run"] == "11111111-2222-3333-4444-555555555555" and claims["idem"] == "run:call"
    assert claims["exp"] - claims["iat"] == 60 and claims["aud"] == "agents" and claims["iss"] == "orchestrator"
    # never to a URL the workflow chose freely
    run_http({"url": "https://elsewhere.test/"})
    assert "authorization" not in recorder.requests[1].headers


def test_service_jwt_verification_refuses_bad_tokens(settings):
    settings.ORCHESTRATOR_SERVICE_JWT_KEY = JWT_KEY
    token = service_auth.mint(tenant_id="t", run_id="r", step_id="s", now=time.time() - 3600)
    with pytest.raises(jwt.ExpiredSignatureError):
        service_auth.verify(token)
    forged = jwt.encode({"tenant": "t", "run": "r", "step": "s", "exp": time.time() + 60}, "x" * 40, algorithm="HS256")
    with pytest.raises(jwt.InvalidSignatureError):
        service_auth.verify(forged)
    unsigned = jwt.encode({"tenant": "t", "run": "r", "step": "s"}, None, algorithm="none")
    with pytest.raises(jwt.InvalidAlgorithmError):
        service_auth.verify(unsigned)


def test_service_jwt_rs256_verifies_with_the_public_key(settings):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    settings.ORCHESTRATOR_SERVICE_JWT_KEY = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    settings.ORCHESTRATOR_SERVICE_JWT_ALGORITHM = "RS256"
    settings.ORCHESTRATOR_SERVICE_JWT_KID = "k1"
    token = service_auth.mint(tenant_id="t", run_id="r", step_id="s")
    assert jwt.get_unverified_header(token)["kid"] == "k1"
    claims = jwt.decode(token, service_auth.public_key_pem(), algorithms=["RS256"], issuer="orchestrator")
    assert claims["step"] == "s"


# --- API: write-only --------------------------------------------------------------------------------


def test_api_secret_is_write_only(owner_api, outsider_api, tenants, settings):
    settings.ORCHESTRATOR_FERNET_KEYS = [FERNET_KEY]
    created = owner_api.post(
        f"{API}/credentials", {"alias": "vendor", "kind": "bearer", "secret": CANARY}, format="json"
    )
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["has_secret"] is True and "secret" not in body and CANARY not in created.content.decode()
    listed = owner_api.get(f"{API}/credentials")
    assert [c["alias"] for c in listed.json()] == ["vendor"] and CANARY not in listed.content.decode()
    detail = f"{API}/credentials/{body['id']}"
    # a change without the secret keeps it; with one, replaces it
    assert owner_api.patch(detail, {"description": "prod"}, format="json").status_code == 200
    credential = Credential.objects.get(pk=body["id"])
    assert credentials.decrypt(credential.secret_encrypted) == CANARY and credential.tenant_id == "acme"
    assert owner_api.patch(detail, {"secret": "rotated-secret-1"}, format="json").status_code == 200
    assert credentials.decrypt(Credential.objects.get(pk=body["id"]).secret_encrypted) == "rotated-secret-1"
    # one-line errors; another tenant's credential does not exist for the outsider
    missing = owner_api.post(f"{API}/credentials", {"alias": "x", "kind": "bearer"}, format="json")
    assert missing.status_code == 400 and "secret" in missing.json()["detail"]
    header = owner_api.post(f"{API}/credentials", {"alias": "h", "kind": "header", "secret": "s3cr3t"}, format="json")
    assert header.status_code == 400 and "header's name" in header.json()["detail"]
    duplicate = owner_api.post(f"{API}/credentials", {"alias": "vendor", "secret": "zzzz"}, format="json")
    assert duplicate.status_code == 409 and "already exists" in duplicate.json()["detail"]  # a conflict
    assert outsider_api.get(detail).status_code == 404
    assert outsider_api.get(f"{API}/credentials").json() == []
    assert api_client_for(None).get(f"{API}/credentials").status_code == 401


def test_viewer_cannot_write_credentials(viewer):
    response = api_client_for(viewer).post(f"{API}/credentials", {"alias": "v", "secret": "abcd"}, format="json")
    assert response.status_code == 403


def test_admin_masks_the_secret_and_keeps_it_when_left_empty(admin_client, settings):
    settings.ORCHESTRATOR_FERNET_KEYS = [FERNET_KEY]
    credential = make_credential()
    page = admin_client.get(f"/admin/agents/credential/{credential.pk}/change/")
    assert page.status_code == 200 and CANARY not in page.content.decode() and "••••" in page.content.decode()
    listing = admin_client.get("/admin/agents/credential/")
    assert CANARY not in listing.content.decode()
    response = admin_client.post(
        f"/admin/agents/credential/{credential.pk}/change/",
        {
            "tenant_id": "default",
            "alias": "svc",
            "kind": "bearer",
            "secret": "",
            "username": "",
            "name": "",
            "location": "header",
            "allowed_hosts": "[]",
            "description": "edited",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    credential.refresh_from_db()
    assert credential.description == "edited" and credentials.decrypt(credential.secret_encrypted) == CANARY
    added = admin_client.post(
        "/admin/agents/credential/add/",
        {
            "tenant_id": "default",
            "alias": "new",
            "kind": "bearer",
            "secret": "",
            "location": "header",
            "allowed_hosts": "[]",
        },
    )
    assert added.status_code == 200 and "A new credential needs its secret." in added.content.decode()


# --- the canary, end to end with real workers ------------------------------------------------------

CANARY_FLOW = """\
key: canary
steps:
  - id: call
    call: /echo
    credential: svc
    retry: {max_attempts: 2, initial_delay: 0.1, jitter: false}
  - id: after
    type: noop
    depends_on: [call]
    params: {output: "${steps.call.output}"}
"""


@pytest.fixture(scope="module")
def canary_workers(django_db_setup, worker_env, tmp_path_factory):
    workers = start_workers(
        worker_env,
        tmp_path_factory.mktemp("canary-workers"),
        nodes=1,
        concurrency=2,
        env={"ORCHESTRATOR_FERNET_KEYS": FERNET_KEY, "ORCHESTRATOR_LOG_LEVEL": "DEBUG"},
    )
    yield workers
    workers.stop()
    purge_queue(workers.queue)


def test_canary_secret_appears_nowhere(canary_workers, transactional_db, agent_server, settings):
    settings.ORCHESTRATOR_FERNET_KEYS = [FERNET_KEY]
    settings.ORCHESTRATOR_AGENTS_BASE_URL = agent_server.url
    agent_server.reset()
    make_credential()
    # the agent echoes the secret back: in a failure's error text, then in a success body
    agent_server.program(
        "/echo",
        [
            (500, {"ok": False, "error": f"token {CANARY} was refused"}, {"X-Echo": CANARY}),
            (200, {"ok": True, "echo": f"Bearer {CANARY}", "nested": [{"k": CANARY}]}, {"X-Echo": CANARY}),
        ],
    )
    settings.ORCHESTRATOR_REQUEUE_AFTER = 5.0
    with route_to(canary_workers.queue):
        run = wait_for_run(start(CANARY_FLOW).pk, timeout=60, sweep=True)
    assert run.status == "succeeded", run.error
    # the secret was really used...
    calls = agent_server.calls("/echo")
    assert [c.headers["Authorization"] for c in calls] == [f"Bearer {CANARY}"] * 2
    # ...and is in no row the run wrote
    rows = {
        "traces": list(Trace.objects.filter(run=run).values("message", "data")),
        "steps": list(Step.objects.filter(run=run).values("input", "output", "error")),
        "attempts": list(Attempt.objects.filter(run=run).values("error")),
        "run": list(Run.objects.filter(pk=run.pk).values("outputs", "error", "inputs", "metadata")),
    }
    dumped = json.dumps(rows, default=str)
    assert CANARY not in dumped
    assert "***" in dumped  # masked where it was echoed back
    assert Attempt.objects.filter(run=run, step__step_id="call").count() == 2  # the failure was recorded too
    # ...nor in the workers' logs (DEBUG level)
    logs = canary_workers.log_text()
    assert "runs.execute_step" in logs and CANARY not in logs
    # nor in the stored credential
    assert CANARY not in raw_secret_column(Credential.objects.get(alias="svc").pk)


# --- an api_key in the query string, every encoding of it, through a real worker ---------------------

#: Characters that change under percent-encoding, so the raw form is not what the URL carries.
QUERY_CANARY = "qc/SECRET+9e2a=77&k y"

QUERY_FLOW = """\
key: query-canary
steps:
  - id: call
    call: /echo
    credential: qkey
    retry: {max_attempts: 2, initial_delay: 0.1, jitter: false}
  - id: after
    type: noop
    depends_on: [call]
    params: {output: "${steps.call.output}"}
"""


def every_encoding(secret: str) -> dict[str, str]:
    """The forms a secret leaks in (what the redaction must mask)."""
    from urllib.parse import quote, quote_plus

    raw = secret.encode()
    return {
        "raw": secret,
        "quote": quote(secret, safe=""),
        "quote lower-case hex": quote(secret, safe="").replace("%2F", "%2f").replace("%2B", "%2b"),
        "quote with /": quote(secret),
        "quote_plus": quote_plus(secret),
        "base64": base64.b64encode(raw).decode(),
        "base64 unpadded": base64.b64encode(raw).decode().rstrip("="),
        "urlsafe base64": base64.urlsafe_b64encode(raw).decode(),
        "urlsafe base64 unpadded": base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "hex": raw.hex(),
        "HEX": raw.hex().upper(),
    }


def test_every_encoding_is_redacted():
    from agents.redaction import redact

    for name, form in every_encoding(QUERY_CANARY).items():
        assert redact(f"before {form} after", [QUERY_CANARY]) == "before *** after", name
    # inside a longer base64 text, at any alignment (a Basic header's "user:secret")
    for prefix in (b"", b"u:", b"us:", b"use:"):
        text = base64.b64encode(prefix + QUERY_CANARY.encode()).decode()
        assert "***" in redact(text, [QUERY_CANARY]) and text not in redact(text, [QUERY_CANARY])


def test_query_string_api_key_appears_nowhere_in_any_encoding(
    canary_workers, transactional_db, agent_server, settings, client
):
    from django.contrib.auth import get_user_model

    from runs.models import Membership, Tenant

    settings.ORCHESTRATOR_FERNET_KEYS = [FERNET_KEY]
    settings.ORCHESTRATOR_AGENTS_BASE_URL = agent_server.url
    settings.ORCHESTRATOR_REQUEUE_AFTER = 5.0
    agent_server.reset()
    make_credential(alias="qkey", secret=QUERY_CANARY, kind="api_key", name="api_key", location="query")
    forms = every_encoding(QUERY_CANARY)
    # Given an agent that echoes the key back in every encoding, in an error and then in a success
    agent_server.program(
        "/echo",
        [
            (500, {"error": "refused " + " ".join(forms.values())}, {"X-Echo": forms["quote"]}),
            (200, {"ok": True, "echo": forms, "list": list(forms.values())}, {"X-Echo": forms["base64"]}),
        ],
    )
    with route_to(canary_workers.queue):
        run = wait_for_run(start(QUERY_FLOW).pk, timeout=60, sweep=True)
    assert run.status == "succeeded", run.error
    # the key really went in the query string, percent-encoded
    calls = agent_server.calls("/echo")
    assert [c.query for c in calls] == ["api_key=" + forms["quote_plus"]] * 2

    # When everything the platform shows about the run is collected ...
    rows = {
        "traces": list(Trace.objects.filter(run=run).values("message", "data")),
        "steps": list(Step.objects.filter(run=run).values("input", "output", "error")),
        "attempts": list(Attempt.objects.filter(run=run).values("error")),
        "run": list(Run.objects.filter(pk=run.pk).values("outputs", "error", "inputs", "metadata")),
    }
    seen = {"rows": json.dumps(rows, default=str)}
    tenant, _ = Tenant.objects.get_or_create(slug="default", defaults={"name": "Default"})
    user = get_user_model().objects.create_user("qc-owner", password="pw", is_staff=True, is_superuser=True)
    Membership.objects.create(user=user, tenant=tenant, role="owner", is_default=True)
    api = api_client_for(user)
    for path in ("", "/steps", "/attempts", "/traces"):
        response = api.get(f"{API}/runs/{run.pk}{path}")
        assert response.status_code == 200, (path, response.content[:200])
        seen[f"api{path}"] = response.content.decode()
    client.force_login(user)
    step = Step.objects.get(run=run, step_id="call")
    attempt = Attempt.objects.filter(run=run, step=step).first()
    for url in (
        f"/admin/runs/run/{run.pk}/change/",
        f"/admin/runs/step/{step.pk}/change/",
        f"/admin/runs/attempt/{attempt.pk}/change/",
        f"/admin/runs/trace/?run__id__exact={run.pk}",
        "/admin/runs/attempt/",
    ):
        response = client.get(url)
        assert response.status_code == 200, url
        seen[url] = response.content.decode()
    seen["worker logs"] = canary_workers.log_text()
    # ... the key is in none of it, in no encoding
    import html

    for where, text in seen.items():
        for name, form in forms.items():
            assert form not in text and html.escape(form) not in text, f"{name} form of the key in {where}"
    assert "***" in seen["rows"]  # masked where it was echoed back
    assert "runs.execute_step" in seen["worker logs"]


def test_http_client_log_lines_lose_query_strings_and_encoded_secrets(settings):
    import logging

    from orchestrator_site.logging import RedactFilter, build_logging_config

    # the HTTP client loggers write one INFO line per request: warnings only
    config = build_logging_config("DEBUG")
    assert config["loggers"]["httpx"]["level"] == "WARNING" and config["loggers"]["httpcore"]["level"] == "WARNING"
    # and what still gets through loses the URL's query string
    forms = every_encoding(QUERY_CANARY)
    record = logging.LogRecord(
        "httpx",
        logging.WARNING,
        __file__,
        1,
        "HTTP Request: %s %s",
        ("GET", f"https://v.test/a?api_key={forms['quote_plus']}"),
        None,
    )
    RedactFilter().filter(record)
    assert record.getMessage() == "HTTP Request: GET https://v.test/a?***"
    # any other logger: every encoding of a known secret is masked
    settings.ORCHESTRATOR_SERVICE_TOKEN = QUERY_CANARY
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "got %s", (forms["base64"],), None)
    RedactFilter().filter(record)
    assert record.getMessage() == "got ***"


def test_redaction_masks_the_longest_secret_and_many_secrets_at_once():
    from agents.redaction import redact

    assert redact("x abcd-1234-efgh y abcd-12 z", ["abcd-12", "abcd-1234-efgh"]) == "x *** y *** z"
    many = [f"secret-number-{i:04d}-value" for i in range(300)]
    text = " ".join(many[::7]) + " plain words stay"
    assert redact(text, many) == " ".join(["***"] * len(many[::7])) + " plain words stay"
