"""The commands a new user runs to get an API token: create_tenant, add_member, create_token; and
serve_metrics for worker-only machines."""

from __future__ import annotations

import io

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from prometheus_client import generate_latest

from runs.management.commands.serve_metrics import Command as ServeMetrics
from runs.models import Membership, Tenant
from tests.conftest import api_client_for

pytestmark = pytest.mark.django_db


def run(*args) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_tenant_member_token_walkthrough():
    assert run("create_tenant", "acme", "--name", "Acme Inc.")[0].startswith("created tenant acme")
    assert run("create_tenant", "acme")[0].startswith("exists  tenant acme")
    out, _ = run("add_member", "acme", "alice", "--create-user", "--role", "owner")
    assert out.strip() == "alice is owner of acme (default tenant)"
    out, err = run("create_token", "alice", "--days", "7")
    explanation, token = out.strip().splitlines()
    assert token.startswith("orch_") and "shown only now" in explanation
    assert err == ""  # stderr is for errors only
    client = api_client_for(None)
    me = client.get("/api/v1/me", HTTP_AUTHORIZATION=f"Token {token}").json()
    assert me == {
        "username": "alice",
        "is_superuser": False,
        "tenant": "acme",
        "role": "owner",
        "tenants": [{"slug": "acme", "name": "Acme Inc.", "role": "owner", "is_default": True}],
    }
    # a second tenant; --default moves the default
    run("create_tenant", "globex")
    run("add_member", "globex", "alice", "--role", "viewer", "--default")
    defaults = dict(Membership.objects.filter(user__username="alice").values_list("tenant__slug", "is_default"))
    assert defaults == {"acme": False, "globex": True}


def test_command_errors_are_one_line():
    with pytest.raises(CommandError, match="tenant slug 'Bad Slug'"):
        run("create_tenant", "Bad Slug")
    with pytest.raises(CommandError, match="no tenant 'nope'"):
        run("add_member", "nope", "alice")
    Tenant.objects.create(slug="acme")
    with pytest.raises(CommandError, match="no user 'ghost'"):
        run("add_member", "acme", "ghost")
    with pytest.raises(CommandError, match="no active user 'ghost'"):
        run("create_token", "ghost")
    get_user_model().objects.create_user("bob")
    with pytest.raises(CommandError, match="--days"):
        run("create_token", "bob", "--days", "-1")


def test_staff_member_gets_the_operator_permissions(tenants):
    run("add_member", "acme", "ops", "--create-user", "--staff")
    ops = get_user_model().objects.get(username="ops")
    assert ops.is_staff and not ops.is_superuser
    assert ops.has_perm("runs.view_run") and ops.has_perm("runs.change_step") and ops.has_perm("runs.add_run")


def test_serve_metrics_reads_every_process_files():
    from runs import metrics

    metrics.TASKS_SCHEDULED.inc(0)
    text = generate_latest(ServeMetrics().registry()).decode()
    assert "orchestrator_tasks_scheduled_total" in text
    assert "task_queue_jobs" not in text  # database gauges are the web's


def test_serve_metrics_requires_the_metrics_token_when_set(settings):
    from wsgiref.util import setup_testing_defaults

    app = ServeMetrics().wsgi_app(ServeMetrics().registry())

    def scrape(authorization: str | None) -> str:
        environ: dict = {"PATH_INFO": "/metrics"}
        if authorization is not None:
            environ["HTTP_AUTHORIZATION"] = authorization
        setup_testing_defaults(environ)
        statuses = []
        b"".join(app(environ, lambda status, headers: statuses.append(status)))
        return statuses[0]

    settings.ORCHESTRATOR_METRICS_TOKEN = ""
    assert scrape(None).startswith("200")
    settings.ORCHESTRATOR_METRICS_TOKEN = "scrape-secret"
    assert scrape(None).startswith("401") and scrape("Bearer wrong").startswith("401")
    assert scrape("Bearer scrape-secret").startswith("200")


def test_commands_print_no_warning_a_user_cannot_act_on(tmp_path, settings):
    # Given: a production-shaped environment without ORCHESTRATOR_FERNET_KEYS
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    db = settings.DATABASES["default"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO_SETTINGS", "ORCHESTRATOR_"))}
    server = f"{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
    env.update(
        DATABASE_URL=f"postgres://{server}/{db['NAME']}",
        CELERY_BROKER_URL=settings.CELERY_BROKER_URL,
        DJANGO_SECRET_KEY="commands-check",
        ORCHESTRATOR_DATA_DIR=str(tmp_path),
    )

    def manage(*args):
        return subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )

    # When / Then: everyday commands keep stderr for errors
    for args in (["check"], ["showmigrations", "runs"], ["create_token", "--help"]):
        result = manage(*args)
        assert result.returncode == 0 and result.stderr == "", (args, result.stderr)
    # ...while the deployment review still reports the missing key
    deploy = manage("check", "--deploy")
    assert "agents.E003" in deploy.stderr
