"""``manage.py run_task``: live progress, ``--json``, exit codes 0 / 1 / 2, and the embedded default."""

from __future__ import annotations

import json
import subprocess
import sys

from tasks_app.models import AgentTask
from tests.conftest import ROOT
from tests.test_agent_tasks import PLAN, scripted, verdict  # noqa: F401 - the scripted fixture
from tests.test_cli import embedded_env, run_command


def test_run_task_json_exit_0_with_steps_checkpoints_usage_and_result(scripted, agent_server):  # noqa: F811
    scripted.script(PLAN, schema="decompose_goal")
    scripted.script(verdict(33), verdict(66), verdict(100, "finish", True), schema="evaluate_progress")
    scripted.script("Two themes: bugs and docs.")

    code, out, err = run_command(
        "run_task", "Summarize the issues", "--tool", "fetch_issues", "--tool", "store_report",
        "--checkpoint-interval", "2", "--json",
    )  # fmt: skip

    assert code == 0, err
    data = json.loads(out)  # exactly one JSON object
    assert set(data) >= {"task_id", "status", "progress", "steps", "checkpoints", "usage", "result"}
    assert (data["status"], data["progress"], data["checkpoints"]) == ("completed", 100, 1)
    assert data["steps"][0] == {
        "index": 0, "description": "Fetch the issues", "status": "completed", "tool": "fetch_issues", "attempts": 1,
    }  # fmt: skip
    assert data["usage"]["llm_calls"] == 5
    assert data["result"]["answer"].startswith("Result of tool store_report")
    assert AgentTask.objects.get(pk=data["task_id"]).run.trigger == "cli"


def test_run_task_progress_lines_and_exit_1_when_the_task_fails(scripted):  # noqa: F811
    scripted.script(PLAN, PLAN, PLAN, schema="decompose_goal")

    # the plan names tools that the task was not granted: two repair rounds, then it fails
    code, out, err = run_command("run_task", "Summarize", "--tool", "count_rows")

    assert code == 1
    assert "decompose" in out and "failed" in out
    assert "is not one of ['count_rows', None]" in out and "after 2 repair rounds" in out
    assert len(scripted.calls("decompose_goal")) == 3  # a permanent failure: not retried


def test_run_task_invalid_input_exit_2_with_one_line(db):
    code, out, err = run_command("run_task", "Summarize", "--tool", "nope")
    assert code == 2
    assert err.strip() == "error: tools: no workflow template or agent endpoint named 'nope' in this tenant"
    code, _, err = run_command("run_task", "x", "--max-steps", "0")
    assert code == 2 and err.startswith("error: max_steps:")
    assert AgentTask.objects.count() == 0


def test_run_task_in_the_embedded_default(tmp_path, llm_server):
    """No DATABASE_URL, no broker: SQLite and a worker inside the command, the LLM at the scripted server."""
    llm_server.script(
        {"steps": [{"id": "a", "description": "Say hi"}], "estimated_duration_s": 1}, schema="decompose_goal"
    )
    llm_server.script(verdict(100, "finish", True), schema="evaluate_progress")
    llm_server.script("hi")
    env = {**embedded_env(tmp_path), "ORCHESTRATOR_LLM_BASE_URL": llm_server.url, "ORCHESTRATOR_LLM_MODEL": "tiny"}

    proc = subprocess.run(
        [sys.executable, "manage.py", "run_task", "Say hi", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert data["status"] == "completed" and data["progress"] == 100
    assert data["steps"] == [{"index": 0, "description": "Say hi", "status": "completed", "tool": None, "attempts": 1}]
