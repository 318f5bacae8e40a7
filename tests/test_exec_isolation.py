"""exec steps against a tenant trying to escape (issue 10): the worker's environment, /proc,
/etc/shadow, PostgreSQL and Redis on loopback, files outside the work directory. Under the
bubblewrap sandbox every attempt fails and nothing of the worker's secrets reaches the step.

Also: which isolation a deployment gets (bwrap, the embedded fallback with one warning, the
refusal of a multi-tenant deployment without bubblewrap) and the `network: true` rules.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import uuid
from pathlib import Path

import pytest
from django.conf import settings as django_settings

from agents import sandbox
from agents.registry import StepContext, StepError, get_handler, run_with_timeout
from tests.conftest import SERVICE_TOKEN, WORKER_SECRET_KEY, run_to_end

pytestmark = pytest.mark.django_db

REPO = Path(__file__).resolve().parent.parent

#: One script, every escape the issue reproduced; prints {attempt: "ok: ..." | "error: ..."}.
ESCAPES = r"""
import json, os, socket, sys
results = {}
def attempt(name, fn):
    try:
        results[name] = "ok: " + str(fn())[:300]
    except Exception as exc:
        results[name] = "error: " + type(exc).__name__ + ": " + str(exc)[:200]
def connect(port):
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    return "connected"
def host_pids():
    pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
    if len(pids) > 3 or os.getppid() != 1:
        return pids
    raise PermissionError(f"only this sandbox's processes: {pids}")
worker_pid = sys.argv[1]
attempt("proc_1_environ", lambda: open("/proc/1/environ", "rb").read())
attempt("worker_environ", lambda: open(f"/proc/{worker_pid}/environ", "rb").read())
attempt("list_proc", host_pids)
attempt("etc_shadow", lambda: open("/etc/shadow").read())
attempt("postgres", lambda: connect(5432))
attempt("redis", lambda: connect(6379))
attempt("write_outside", lambda: open(sys.argv[2], "w").write("escaped"))
attempt("write_usr", lambda: open("/usr/escaped", "w").write("escaped"))
attempt("root_uid", lambda: os.getuid() if os.getuid() == 0 else (_ for _ in ()).throw(PermissionError(os.getuid())))
print(json.dumps({"results": results, "uid": os.getuid(), "env": sorted(os.environ)}))
"""

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap is not installed (apt-get install bubblewrap)"
)


@pytest.fixture(autouse=True)
def _fresh_isolation():
    getattr(sandbox, "reset_isolation", lambda: None)()
    yield
    getattr(sandbox, "reset_isolation", lambda: None)()


def _ctx(params: dict, timeout: float = 30.0) -> StepContext:
    return StepContext(
        run_id="run-iso",
        step_id="escape",
        step_pk=1,
        attempt=1,
        params=params,
        timeout=timeout,
        idempotency_key="run-iso:escape",
    )


def run_exec(params: dict):
    return run_with_timeout(get_handler("exec"), _ctx(params))


def fail_exec(params: dict) -> StepError:
    with pytest.raises(StepError) as info:
        run_with_timeout(get_handler("exec"), _ctx(params))
    return info.value


def _assert_all_refused(report: dict) -> None:
    for name, outcome in report["results"].items():
        assert outcome.startswith("error:"), f"{name} was not refused: {outcome}"
    assert report["uid"] != 0


@needs_bwrap
def test_escapes_fail_in_the_sandbox(monkeypatch, tmp_path):
    # Given a worker whose environment holds secrets, as a deployed worker's does ...
    canaries = {
        "DJANGO_SECRET_KEY": f"secret-{uuid.uuid4().hex}",
        "DATABASE_URL": f"postgres://admin:pw-{uuid.uuid4().hex}@127.0.0.1:5432/orchestrator",
    }
    for name, value in canaries.items():
        monkeypatch.setenv(name, value)
    outside = tmp_path / "escaped.txt"
    # When a step tries every escape of issue 10 ...
    output = run_exec({"command": ["python", "-c", ESCAPES, str(os.getpid()), str(outside)]})
    report = output["stdout"]
    print(json.dumps(report["results"], indent=1))
    # ... each one fails, the command is not root, and none of the worker's secrets came along
    _assert_all_refused(report)
    assert sandbox.isolation().mode == "bwrap"
    assert not outside.exists() and not Path("/usr/escaped").exists()
    text = json.dumps(output)
    for value in [*canaries.values(), django_settings.SECRET_KEY]:
        assert value not in text
    assert set(report["env"]) <= {"PATH", "LANG", "HOME", "TMPDIR", "LC_CTYPE"}


@needs_bwrap
def test_the_command_runs_as_an_unprivileged_user():
    output = run_exec({"command": ["id", "-u"]})
    assert int(output["stdout"]) != 0
    if os.geteuid() == 0:
        assert int(output["stdout"]) == django_settings.ORCHESTRATOR_EXEC_UID


@needs_bwrap
def test_the_sandbox_sees_a_filtered_etc_and_its_own_proc():
    code = (
        "import os, json; "
        "print(json.dumps({'etc': sorted(os.listdir('/etc')), 'init': open('/proc/1/cmdline').read()}))"
    )
    seen = run_exec({"command": ["python", "-c", code]})["stdout"]
    assert "passwd" in seen["etc"]
    for secret in ("shadow", "gshadow", "sudoers", "ssh", "sudoers.d"):
        assert secret not in seen["etc"]
    assert seen["init"].split("\x00")[0].endswith("bwrap")  # PID 1 is the sandbox's own init


def test_a_multi_tenant_deployment_without_bubblewrap_refuses_exec(settings):
    # Given no usable bubblewrap and a deployment with its own broker (not the embedded default) ...
    settings.ORCHESTRATOR_EXEC_BWRAP = "/nonexistent/bwrap"
    settings.ORCHESTRATOR_EMBEDDED = False
    settings.ORCHESTRATOR_EXEC_SANDBOX = "auto"
    # ... an exec step fails at once, permanently, with one line saying why
    error = fail_exec({"command": ["true"]})
    assert error.permanent
    assert "\n" not in error.message
    assert "bubblewrap" in error.message and "not installed" in error.message
    # and "bwrap" demands it even in the embedded default
    settings.ORCHESTRATOR_EMBEDDED = True
    settings.ORCHESTRATOR_EXEC_SANDBOX = "bwrap"
    assert fail_exec({"command": ["true"]}).permanent


def test_the_embedded_default_falls_back_and_warns_once(settings, caplog):
    settings.ORCHESTRATOR_EXEC_BWRAP = "/nonexistent/bwrap"
    settings.ORCHESTRATOR_EMBEDDED = True
    settings.ORCHESTRATOR_EXEC_SANDBOX = "auto"
    with caplog.at_level(logging.WARNING, logger="agents.sandbox"):
        for _ in range(3):
            assert run_exec({"command": ["echo", "still works"]})["stdout"] == "still works\n"
    warnings = [r for r in caplog.records if r.name == "agents.sandbox" and "WITHOUT namespaces" in r.getMessage()]
    assert len(warnings) == 1
    assert "install bubblewrap" in warnings[0].getMessage().lower()


def test_a_bad_sandbox_setting_refuses_exec(settings):
    settings.ORCHESTRATOR_EXEC_SANDBOX = "docker"
    error = fail_exec({"command": ["true"]})
    assert error.permanent and "ORCHESTRATOR_EXEC_SANDBOX" in error.message


# --- network ----------------------------------------------------------------------------------


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1 that answers "hello" to every connection."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"hello")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


CONNECT = "import socket, sys; print(socket.create_connection(('127.0.0.1', int(sys.argv[1])), 2).recv(5).decode())"


@needs_bwrap
def test_no_network_without_declaring_it(listener):
    error = fail_exec({"command": ["python", "-c", CONNECT, str(listener)]})
    assert "Network is unreachable" in error.message or "Connection refused" in error.message


@needs_bwrap
def test_network_needs_the_allow_list_and_the_ssrf_guard(settings, listener):
    params = {"command": ["python", "-c", CONNECT, str(listener)], "network": True, "hosts": ["127.0.0.1"]}
    # not on the exec allow-list: refused before anything runs
    settings.ORCHESTRATOR_EXEC_NETWORK_HOSTS = []
    error = fail_exec(params)
    assert error.permanent and "ORCHESTRATOR_EXEC_NETWORK_HOSTS" in error.message
    # on it, but the SSRF guard refuses loopback
    settings.ORCHESTRATOR_EXEC_NETWORK_HOSTS = ["*"]
    settings.ORCHESTRATOR_HTTP_ALLOW_HOSTS = []
    error = fail_exec(params)
    assert error.permanent and "loopback" in error.message
    # both allow it: the command shares the network and reaches the host
    settings.ORCHESTRATOR_HTTP_ALLOW_HOSTS = ["127.0.0.1"]
    assert run_exec(params)["stdout"] == "hello\n"


def test_network_params_are_validated():
    handler = get_handler("exec")
    with pytest.raises(ValueError, match="needs hosts"):
        handler.validate_params({"command": ["true"], "network": True})
    with pytest.raises(ValueError, match="network must be true or false"):
        handler.validate_params({"command": ["true"], "network": "yes"})
    with pytest.raises(ValueError, match=r"hosts\[0\]"):
        handler.validate_params({"command": ["true"], "network": True, "hosts": ["http://x/y"]})
    handler.validate_params({"command": ["true"], "network": True, "hosts": ["api.example.com:443"]})


# --- the real worker --------------------------------------------------------------------------


@needs_bwrap
def test_escapes_fail_in_a_real_worker(worker, worker_env):
    # Given the real Celery worker (its environment: DATABASE_URL, DJANGO_SECRET_KEY, the service
    # token) ...
    outside = REPO / "tests" / f"escaped-{uuid.uuid4().hex}"
    yaml_text = (
        "key: escape\nsteps:\n  - id: escape\n    type: exec\n    params:\n      command: "
        + json.dumps(["python", "-c", ESCAPES, str(worker.pid), str(outside)])
        + "\n"
    )
    # When a workflow's exec step tries every escape ...
    run, steps = run_to_end(yaml_text, timeout=60)
    # ... it ran (in the bubblewrap sandbox, as an unprivileged user) and every attempt failed
    assert run.status == "succeeded", steps["escape"].error
    report = steps["escape"].output["stdout"]
    print(json.dumps(report["results"], indent=1))
    _assert_all_refused(report)
    assert not outside.exists()
    # ... and no secret of the worker is in the step's output, its attempts or the run's traces
    from runs.models import Trace

    seen = json.dumps(steps["escape"].output) + json.dumps(
        list(Trace.objects.filter(run=run).values_list("message", "data")), default=str
    )
    sandbox_info = [d for _, d in Trace.objects.filter(run=run).values_list("message", "data") if d and "sandbox" in d]
    assert sandbox_info and sandbox_info[0]["sandbox"]["isolation"] == "bwrap"
    for secret in (WORKER_SECRET_KEY, SERVICE_TOKEN, worker_env["DATABASE_URL"]):
        assert secret not in seen
