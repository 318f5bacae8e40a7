"""``run_workflow`` and ``load_templates``: exit codes, --json, bad input, embedded mode, builtins."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

from runs.models import Run, Step
from templates_app.models import WorkflowTemplate
from tests.conftest import ROOT, TEST_CALLABLES, WORKFLOWS


def run_command(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command(*args, stdout=out, stderr=err)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue(), err.getvalue()


def test_run_workflow_json_with_external_worker(worker):
    code, out, err = run_command("run_workflow", str(WORKFLOWS / "chain.yaml"), "--var", "greeting=hi", "--json")
    assert code == 0, err
    data = json.loads(out)  # exactly one JSON object
    assert set(data) >= {"run_id", "status", "steps", "outputs"}
    assert data["status"] == "succeeded"
    assert data["outputs"] == {"said": "hi world"}
    assert data["steps"]["second"] == {
        "status": "succeeded",
        "attempts": 1,
        "output": {"said": "hi world"},
        "error": None,
    }
    assert Run.objects.get(pk=data["run_id"]).trigger == "cli"


def test_run_workflow_progress_and_failure_exit_1(worker):
    code, out, err = run_command("run_workflow", str(WORKFLOWS / "fails.yaml"))
    assert code == 1
    assert "broken" in out and "dead" in out
    assert "run " in out.splitlines()[-2] or "failed" in out


BAD_FILES = {
    "syntax.yaml": ("key: x\nsteps: [\n", "YAML"),
    "unknown-type.yaml": ("key: x\nsteps:\n  - id: a\n    type: teleport\n", "teleport"),
    "duplicate.yaml": ("key: x\nsteps:\n  - id: a\n    type: noop\n  - id: a\n    type: noop\n", "'a'"),
    "unknown-dep.yaml": ("key: x\nsteps:\n  - id: a\n    type: noop\n    depends_on: [ghost]\n", "ghost"),
    "cycle.yaml": (
        "key: x\nsteps:\n  - id: a\n    type: noop\n    depends_on: [b]\n  - id: b\n    type: noop\n"
        "    depends_on: [a]\n",
        "cycle",
    ),
    "undefined-var.yaml": ("key: x\nsteps:\n  - id: a\n    type: noop\n    params: {v: '${nope}'}\n", "nope"),
    "undefined-step.yaml": ("key: x\nsteps:\n  - id: a\n    type: noop\n    params: {v: '${steps.zz.output}'}\n", "zz"),
    "bad-var-type.yaml": ("key: x\nvariables:\n  n: {type: integr}\nsteps:\n  - id: a\n    type: noop\n", "integr"),
    "bad-duration.yaml": ("key: x\nsteps:\n  - id: a\n    type: noop\n    timeout: soon\n", "soon"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_one_line_error_nothing_saved(db, tmp_path, name):
    text, fragment = BAD_FILES[name]
    path = tmp_path / name
    path.write_text(text)
    code, out, err = run_command("run_workflow", str(path))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert name in lines[0] and fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert Run.objects.count() == 0 and WorkflowTemplate.objects.count() == 0


def test_missing_required_variable_exit_2(db, tmp_path):
    path = tmp_path / "needs.yaml"
    path.write_text(
        "key: needs\nvariables:\n  who: {type: string, required: true}\nsteps:\n  - id: a\n    type: noop\n"
    )
    code, out, err = run_command("run_workflow", str(path))
    assert code == 2 and "who" in err and len(err.strip().splitlines()) == 1
    assert Run.objects.count() == 0 and WorkflowTemplate.objects.count() == 0
    code, out, err = run_command("run_workflow", str(path), "--var", "oops")
    assert code == 2 and "NAME=VALUE" in err


def test_unknown_template_key_exit_2(db):
    code, out, err = run_command("run_workflow", "no-such-template")
    assert code == 2 and "no-such-template" in err


def test_misspelled_template_key_gets_a_suggestion(db):
    code, out, err = run_command("run_workflow", "package-audti")
    assert code == 2
    assert err.strip() == "error: no template with key 'package-audti' (did you mean 'package-audit'?)"


def test_load_templates_idempotent_and_versions(db, tmp_path):
    folder = tmp_path / "flows"
    folder.mkdir()
    (folder / "a.yaml").write_text("key: mine\nsteps:\n  - id: a\n    type: noop\n")
    code, out, err = run_command("load_templates", str(folder))
    assert code == 0, err
    assert "created   mine v1" in out
    assert WorkflowTemplate.objects.filter(key="package-audit").exists()
    assert WorkflowTemplate.objects.filter(key="source-report").exists()
    code, out, _ = run_command("load_templates", str(folder))
    assert "unchanged mine v1" in out
    (folder / "a.yaml").write_text("key: mine\nsteps:\n  - id: b\n    type: noop\n")
    code, out, _ = run_command("load_templates", str(folder))
    assert "updated   mine v2" in out
    assert list(WorkflowTemplate.objects.filter(key="mine").values_list("version", flat=True)) == [2, 1]
    # a bad file in the folder: nothing from the folder is saved
    (folder / "b.yaml").write_text("key: other\nsteps:\n  - id: a\n    type: nope\n")
    (folder / "a.yaml").write_text("key: mine\nsteps:\n  - id: c\n    type: noop\n")
    code, out, err = run_command("load_templates", str(folder))
    assert code == 2 and "b.yaml" in err
    assert WorkflowTemplate.objects.filter(key="mine").count() == 2


def test_builtin_package_audit(worker):
    code, out, err = run_command("run_workflow", "package-audit", "--var", "report_path=reports/audit.md", "--json")
    assert code == 0, out + err
    data = json.loads(out)
    assert data["status"] == "succeeded"
    assert data["outputs"]["packages"] > 20
    # written in the run's work directory, under the worker's ORCHESTRATOR_RUN_WORK_ROOT
    report = Path(data["outputs"]["report_path"])
    assert report.parts[-3:] == (data["run_id"], "reports", "audit.md")
    text = report.read_text()
    assert "Django" in text or "django" in text
    run = Run.objects.get(pk=data["run_id"])
    assert Step.objects.filter(run=run, parent__step_id="inspect").count() >= 2  # fanned out over batches
    branch = {s: data["steps"][s]["status"] for s in ("flag_copyleft", "all_clear")}
    assert sorted(branch.values()) == ["skipped", "succeeded"]


def test_builtin_source_report(worker):
    code, out, err = run_command("run_workflow", "source-report", "--json")
    assert code == 0, out + err
    data = json.loads(out)
    totals = data["outputs"]["totals"]
    assert totals["files"] > 100 and totals["classes"] > 100 and totals["functions"] > 1000
    run = Run.objects.get(pk=data["run_id"])
    assert Step.objects.filter(run=run, parent__step_id="scan", type="exec").count() >= 5


def embedded_env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "CELERY_BROKER_URL", "ORCHESTRATOR_QUEUE", "DJANGO_SETTINGS_MODULE")
    }
    env["ORCHESTRATOR_DATA_DIR"] = str(tmp_path / "data")
    env["ORCHESTRATOR_PYTHON_CALLABLES"] = TEST_CALLABLES  # chain.yaml calls agents.testing.echo
    return env


def test_embedded_mode_needs_no_servers(tmp_path):
    """No DATABASE_URL, no broker: SQLite file + a worker inside the command's process."""
    proc = subprocess.run(
        [sys.executable, "manage.py", "run_workflow", str(WORKFLOWS / "chain.yaml"), "--json"],
        cwd=ROOT,
        env=embedded_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["status"] == "succeeded"
    assert data["outputs"] == {"said": "hello world"}
    assert (tmp_path / "data" / "orchestrator.sqlite3").exists()
    # progress on a terminal, then the summary
    proc = subprocess.run(
        [sys.executable, "manage.py", "run_workflow", str(WORKFLOWS / "fails.yaml")],
        cwd=ROOT,
        env=embedded_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "broken" in proc.stdout and "dead" in proc.stdout


@pytest.mark.parametrize("isolation", ["bwrap", "fallback"])
def test_embedded_builtin_exec_template_runs_with_and_without_bubblewrap(tmp_path, isolation):
    """The builtin templates' exec steps work in the embedded default under bubblewrap, and with
    nothing but pip (no bubblewrap: the process limits, one warning) (issue 10)."""
    env = embedded_env(tmp_path)
    env["ORCHESTRATOR_LOG_FORMAT"] = "text"
    if isolation == "bwrap":
        if shutil.which("bwrap") is None:
            pytest.skip("bubblewrap is not installed (apt-get install bubblewrap)")
        env["ORCHESTRATOR_EXEC_SANDBOX"] = "bwrap"  # required: fails instead of falling back
    else:
        env["ORCHESTRATOR_EXEC_BWRAP"] = str(tmp_path / "no-bwrap-here")
    proc = subprocess.run(
        [sys.executable, "manage.py", "run_workflow", "source-report", "--var", "source_dir=celery", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    assert data["status"] == "succeeded"
    assert data["outputs"]["totals"]["files"] > 100
    warnings = proc.stderr.count("exec steps run WITHOUT namespaces")
    assert warnings == (1 if isolation == "fallback" else 0), proc.stderr[-2000:]
