"""Schemathesis against the OpenAPI schema: generated requests to every operation, authenticated as
a tenant member with a template and a run to find, must never get a 5xx; and the ``schemathesis
run --checks all`` command against a live server (examples, coverage, fuzzing and stateful phases)
must report no conformance failure: every status code and content type documented, schema-valid
requests accepted, schema-violating ones refused.

Bounded (a few examples per operation, derandomized) so it stays well under a minute in the suite.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, Phase, settings

from runs import engine
from tests.conftest import ROOT, api_client_for

app = get_wsgi_application()
schema = schemathesis.openapi.from_wsgi("/api/v1/schema?format=json", app)


@pytest.fixture
def token(owner, chain_template):
    """An API token of the owner of ``acme``, which has template ``chain`` and one run of it."""
    engine.start_run(chain_template.spec, {"n": 1}, template=chain_template, tenant_id="acme")
    # As Django's test client does: keep the test's connection (and transaction) across requests.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield api_client_for(owner).token
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.mark.django_db
@schema.parametrize()
@settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case, token):
    response = case.call(headers={"Authorization": f"Token {token}"})
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
    )


@pytest.mark.slow
def test_schemathesis_run_with_all_checks_reports_no_failure(live_server, owner, chain_template, tmp_path):
    # Given: a tenant with a template, a finished-or-not run, and an API token
    engine.start_run(chain_template.spec, {"n": 1}, template=chain_template, tenant_id="acme")
    token = api_client_for(owner).token
    # When: the CLI runs every check; logout endpoints are left out (they revoke the token in use)
    result = subprocess.run(
        [
            sys.executable, "-m", "schemathesis.cli",
            "--config-file", str(ROOT / "tests" / "schemathesis.toml"),
            "--no-color",
            "run", f"{live_server.url}/api/v1/schema?format=json",
            "--checks", "all",
            "--header", f"Authorization: Token {token}",
            "--exclude-path-regex", "auth/logout",
            "--max-examples", "5",
            "--seed", "12",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    # Then: nothing to report
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:]
