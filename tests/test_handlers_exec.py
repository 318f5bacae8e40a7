"""``exec`` handler: real subprocesses in the sandbox (limits, scrubbed env, temp workdir)."""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from agents.registry import StepContext, StepError, StepTimeout, get_handler, run_with_timeout


def make_ctx(params: dict[str, Any], timeout: float = 20.0) -> StepContext:
    events: list[tuple[str, str, dict[str, Any] | None]] = []
    ctx = StepContext(
        run_id="run-1",
        step_id="script",
        step_pk=3,
        attempt=1,
        params=params,
        timeout=timeout,
        idempotency_key="run-1:script",
        trace=lambda kind, message, data=None: events.append((kind, message, data)),
    )
    ctx.events = events  # type: ignore[attr-defined]
    return ctx


def run_exec(params: dict[str, Any], timeout: float = 20.0) -> tuple[Any, StepContext]:
    ctx = make_ctx(params, timeout)
    return run_with_timeout(get_handler("exec"), ctx), ctx


def fail_exec(params: dict[str, Any], timeout: float = 20.0) -> tuple[StepError, StepContext]:
    ctx = make_ctx(params, timeout)
    with pytest.raises(StepError) as info:
        run_with_timeout(get_handler("exec"), ctx)
    return info.value, ctx


def py(code: str, *args: str) -> list[str]:
    return ["python", "-c", code, *args]


def sleepers(marker: str) -> list[int]:
    """Host pids of the running ``sleep <marker>`` processes (a command's own pids are those of its
    PID namespace, so the test finds its processes from outside by a unique argument)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["cmdline"] == ["sleep", marker] and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc.pid)
    return found


def unique_seconds() -> str:
    return f"30.{uuid.uuid4().int % 10**6:06d}"


def gone_or_zombie(pid: int) -> bool:
    """True when the process no longer runs (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_json_stdout_is_parsed_and_traced():
    output, ctx = run_exec(
        {"command": py("import json, sys; print(json.dumps({'n': 3, 'argv': sys.argv[1:]}))", "a b")}
    )
    assert output == {"exit_code": 0, "stdout": {"n": 3, "argv": ["a b"]}, "stderr": ""}
    [(kind, message, data)] = ctx.events
    assert kind == "exec"
    assert "-> exit 0 in" in message
    assert data["exit_code"] == 0 and isinstance(data["duration_ms"], int)
    assert data["command"][0] != "python"  # resolved to this interpreter


def test_text_stdout_stays_text():
    output, _ = run_exec({"command": ["echo", "hello world"]})
    assert output["stdout"] == "hello world\n"


def test_non_zero_exit_is_a_transient_error_with_stderr():
    error, ctx = fail_exec(
        {"command": py("import sys; print('partial'); sys.stderr.write('warming up\\nbad input file\\n'); sys.exit(3)")}
    )
    assert not error.permanent
    assert error.message == "command exited with code 3: bad input file"
    assert error.output == {"exit_code": 3, "stdout": "partial\n", "stderr": "warming up\nbad input file\n"}
    assert ctx.events[0][2]["exit_code"] == 3


def test_killed_by_a_signal_names_it():
    error, _ = fail_exec({"command": py("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")})
    assert error.message.startswith("command killed by SIGTERM")
    assert error.output["exit_code"] == -15


def test_timeout_kills_the_process_group_quickly():
    marker = unique_seconds()
    started = time.monotonic()
    error, ctx = fail_exec({"command": ["sh", "-c", f"sleep {marker} & sleep 30"]}, timeout=1)
    elapsed = time.monotonic() - started
    assert isinstance(error, StepTimeout)
    assert not error.permanent
    assert elapsed < 5
    assert "timed out" in ctx.events[0][1]
    # the background child went down with the group
    deadline = time.monotonic() + 3
    while sleepers(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sleepers(marker) == []


def test_param_timeout_is_capped_by_step_timeout():
    started = time.monotonic()
    with pytest.raises(StepTimeout):
        run_exec({"command": ["sleep", "30"], "timeout": 600}, timeout=0.5)
    assert time.monotonic() - started < 5


def test_background_child_is_killed_after_exit():
    marker = unique_seconds()
    started = time.monotonic()
    output, _ = run_exec({"command": ["sh", "-c", f"sleep {marker} & echo done"]})
    assert output["stdout"] == "done\n"
    assert time.monotonic() - started < 5  # did not wait for the straggler holding the pipes
    deadline = time.monotonic() + 3
    while sleepers(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sleepers(marker) == []


def test_memory_limit(settings):
    settings.ORCHESTRATOR_EXEC_MEMORY_MB = 256
    error, _ = fail_exec({"command": py("x = bytearray(2 * 1024 ** 3)")})
    assert not error.permanent
    assert "MemoryError" in error.message
    assert "memory limit 256 MiB" in error.message


def test_env_is_scrubbed(monkeypatch):
    monkeypatch.setenv("FAKE_SECRET", "hunter2-do-not-leak")
    code = "import json, os; print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd()}))"
    output, _ = run_exec({"command": py(code), "env": {"GREETING": "hi", "COUNT": 2}})
    env, cwd = output["stdout"]["env"], output["stdout"]["cwd"]
    assert "FAKE_SECRET" not in env
    assert "hunter2-do-not-leak" not in str(output)
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert env["LANG"] == "C.UTF-8"
    assert env["GREETING"] == "hi" and env["COUNT"] == "2"
    assert env["HOME"] == env["TMPDIR"] == cwd
    assert set(env) <= {"PATH", "LANG", "HOME", "TMPDIR", "GREETING", "COUNT", "LC_CTYPE"}


def test_cwd_is_a_fresh_temp_dir_with_the_files():
    code = (
        "import json, os; "
        "print(json.dumps({'cwd': os.getcwd(), 'files': sorted(os.listdir('.')), 'data': open('in/data.txt').read()}))"
    )
    output, _ = run_exec(
        {
            "command": py(code),
            "files": [{"name": "in/data.txt", "content": "payload"}, {"name": "conf.json", "content": {"a": 1}}],
        }
    )
    cwd = output["stdout"]["cwd"]
    assert cwd.startswith(os.path.realpath(tempfile.gettempdir())) or cwd.startswith(tempfile.gettempdir())
    assert cwd != os.getcwd()
    assert output["stdout"]["files"] == ["conf.json", "in"]
    assert output["stdout"]["data"] == "payload"
    assert not os.path.exists(cwd)  # removed afterwards


def test_stdin_string_and_json():
    output, _ = run_exec({"command": py("import sys; print(sys.stdin.read().upper())"), "stdin": "abc"})
    assert output["stdout"] == "ABC\n"
    code = "import json, sys; d = json.load(sys.stdin); print(json.dumps(sum(d['xs'])))"
    output, _ = run_exec({"command": py(code), "stdin": {"xs": [1, 2, 3]}})
    assert output["stdout"] == 6


def test_stdout_is_capped(settings):
    settings.ORCHESTRATOR_EXEC_MAX_OUTPUT = 1000
    output, _ = run_exec({"command": py("print('x' * 200000)")})
    assert output["truncated"] is True
    assert output["stdout"] == "x" * 1000


def test_seed002_workspace_paths_point_to_the_workdir():
    # seed 002: files are written to /workspace/input/<name>; here the work directory stands in.
    params = {
        "image": "python:3.9-slim",
        "command": ["python", "/workspace/input/process.py"],
        "files": [{"name": "process.py", "content": "import json\nprint(json.dumps({'processed': True}))\n"}],
    }
    get_handler("exec").validate_params(params)
    output, ctx = run_exec(params)
    assert output["stdout"] == {"processed": True}
    assert ctx.events[0][2]["image"] == "python:3.9-slim"


def test_missing_program_is_permanent():
    error, _ = fail_exec({"command": ["definitely-not-a-program-xyz"]})
    assert error.permanent
    assert "not found" in error.message


def test_exec_validate_params():
    handler = get_handler("exec")
    handler.validate_params({"command": "${steps.plan.output.argv}"})
    handler.validate_params({"command": ["python", "${vars.script}"], "env": {"A": "${vars.a}"}})
    for params, message in [
        ({}, "command is required"),
        ({"command": "ls -l"}, "command must be a list"),
        ({"command": []}, "non-empty list"),
        ({"command": ["ls", {"a": 1}]}, r"command\[1\] must be a string"),
        ({"command": ["ls"], "env": {"1BAD": "x"}}, "invalid variable name"),
        ({"command": ["ls"], "env": ["A=1"]}, "env must be a mapping"),
        ({"command": ["ls"], "files": [{"name": "../escape.txt", "content": ""}]}, r"files\[0\].name"),
        ({"command": ["ls"], "files": [{"name": "/etc/passwd", "content": ""}]}, "relative path"),
        ({"command": ["ls"], "timeout": -1}, "timeout must be a positive number"),
    ]:
        with pytest.raises(ValueError, match=message):
            handler.validate_params(params)
