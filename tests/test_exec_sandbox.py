"""exec steps against hostile commands: fork bombs, a 10 GB allocation, a CPU spin, writes outside
the work directory, a command that tries to kill its worker. Each must be contained, reported as
the step's error, and leave the worker (here: the test process, then a real Celery worker) unharmed.

The worker usually runs as root, for which ``RLIMIT_NPROC`` does nothing; containment comes from
``agents.sandbox`` (pids cgroup or watchdog, Landlock). Tests that need a kernel feature skip,
saying which, where the machine lacks it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import psutil
import pytest

from agents import sandbox
from agents.handlers import exec as exec_handler
from agents.registry import StepContext, StepError, StepTimeout, get_handler, run_with_timeout
from tests.conftest import run_to_end

PYTHON_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
FORK_BOMBS = {
    "python": ["python", "-c", PYTHON_BOMB],
    # the leader waits: under bubblewrap its exit would end the PID namespace, bomb included,
    # before the limit is reached (contained too, but not what this test measures)
    "bash": ["bash", "-c", ":(){ :|:& };:; sleep 20"],
}
#: Four threads hashing a large buffer (hashlib releases the GIL): CPU time runs faster than the clock.
PARALLEL_SPIN = (
    "import hashlib, threading\n"
    "b = bytes(1 << 20)\n"
    "def s():\n"
    "    while True:\n"
    "        hashlib.sha256(b).digest()\n"
    "[threading.Thread(target=s).start() for _ in range(4)]\n"
    "s()\n"
)

needs_landlock = pytest.mark.skipif(sandbox.landlock_abi() < 1, reason="the kernel has no Landlock")
needs_landlock_scopes = pytest.mark.skipif(
    sandbox.landlock_abi() < 6, reason="Landlock signal scoping needs ABI 6 (Linux 6.12)"
)


def cgroup_available() -> bool:
    limit = sandbox.process_limit(8)
    limit.close()
    return limit.mode == "cgroup"


def _ctx(params: dict, timeout: float, events: list) -> StepContext:
    return StepContext(
        run_id="run-x",
        step_id="hostile",
        step_pk=1,
        attempt=1,
        params=params,
        timeout=timeout,
        idempotency_key="run-x:hostile",
        trace=lambda kind, message, data=None: events.append((kind, message, data)),
    )


def run_exec(params: dict, timeout: float = 20.0):
    events: list = []
    return run_with_timeout(get_handler("exec"), _ctx(params, timeout, events)), events


def fail_exec(params: dict, timeout: float = 20.0) -> tuple[StepError, list]:
    events: list = []
    with pytest.raises(StepError) as info:
        run_with_timeout(get_handler("exec"), _ctx(params, timeout, events))
    return info.value, events


@pytest.fixture(params=["cgroup", "watchdog"])
def containment(request, monkeypatch):
    """Run the test under each process-limit mechanism."""
    if request.param == "cgroup" and not cgroup_available():
        pytest.skip("no writable pids cgroup on this machine")
    monkeypatch.setattr(exec_handler, "FORCE_WATCHDOG", request.param == "watchdog")
    return request.param


@pytest.mark.parametrize("bomb", sorted(FORK_BOMBS))
def test_fork_bomb_is_contained(settings, containment, bomb):
    settings.ORCHESTRATOR_EXEC_MAX_PROCESSES = 32
    before = {p.pid for p in psutil.process_iter()}
    # When a command forks without bound ...
    error, events = fail_exec({"command": FORK_BOMBS[bomb]}, timeout=30)
    # ... it is killed whole well before its timeout and the step fails permanently, saying why
    assert "process limit reached" in error.message and error.permanent
    sandbox_info = events[-1][2]["sandbox"]
    print(f"{bomb} fork bomb ({containment}): {error.message}; peak {sandbox_info['peak_processes']} processes")
    assert sandbox_info["process_limit"].startswith(containment)
    if containment == "cgroup":
        assert sandbox_info["peak_processes"] <= 32
    # ... and no process of it survives
    survivors = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.pid not in before and any("os.fork" in part or ":(){" in part for part in p.info["cmdline"] or [])
    ]
    assert [p for p in survivors if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    # the test process (our "worker") still runs commands
    assert run_exec({"command": ["python", "-c", "print(6 * 7)"]})[0]["stdout"] == 42


def test_ten_gigabyte_allocation_is_refused(settings):
    settings.ORCHESTRATOR_EXEC_MEMORY_MB = 512
    error, _ = fail_exec({"command": ["python", "-c", "x = bytearray(10 * 1024**3)"]})
    assert "MemoryError" in error.message and "memory limit 512 MiB" in error.message
    print(f"10 GB allocation: {error.message}")


def test_cpu_spin_is_stopped_at_the_limit():
    # a single-threaded spin hits the wall-clock timeout ...
    with pytest.raises(StepTimeout, match="timed out"):
        run_exec({"command": ["python", "-c", "while True: pass"], "timeout": 1.5})
    # ... a spin on several cores burns CPU time faster than the clock: RLIMIT_CPU may end it first
    with pytest.raises(StepError) as info:
        run_exec({"command": ["python", "-c", PARALLEL_SPIN], "timeout": 3})
    assert "SIGXCPU" in info.value.message or "timed out" in info.value.message
    print(f"CPU spin on 4 threads: {info.value.message}")


#: How a write outside the work directory fails: Landlock (process isolation), or the folder is
#: absent or read-only in the bubblewrap sandbox.
REFUSED = ("Permission denied", "No such file or directory", "Read-only file system", "Operation not permitted")


@needs_landlock
@pytest.mark.parametrize("where", ["tmp", "home", "repo"])
def test_write_outside_the_work_directory_is_refused(where):
    folder = {"tmp": Path("/tmp"), "home": Path.home(), "repo": Path(__file__).resolve().parent.parent}[where]
    path = folder / f"orchestrator-sandbox-{uuid.uuid4().hex}"
    command = ["python", "-c", f"open({str(path)!r}, 'w').write('escaped')"]
    if where == "tmp" and sandbox.isolation().mode == "bwrap":
        # /tmp of a bubblewrap sandbox is its own tmpfs: the write works there, never reaches ours
        run_exec({"command": command})
    else:
        error, _ = fail_exec({"command": command})
        assert any(reason in error.message for reason in REFUSED), error.message
    assert not path.exists()
    # inside the work directory writing works, and to /dev/null too
    output, _ = run_exec(
        {"command": ["sh", "-c", "mkdir -p out && echo ok > out/f && cat out/f && echo x > /dev/null"]}
    )
    assert output["stdout"].strip() == "ok"


@needs_landlock
def test_deleting_outside_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    error, _ = fail_exec({"command": ["python", "-c", f"import os; os.remove({str(victim)!r})"]})
    assert any(reason in error.message for reason in REFUSED), error.message
    assert victim.read_text() == "keep me"


@needs_landlock_scopes
def test_command_cannot_signal_its_worker():
    error, _ = fail_exec({"command": ["python", "-c", "import os, signal; os.kill(os.getppid(), signal.SIGKILL)"]})
    assert "Operation not permitted" in error.message
    # the command may still signal its own children
    output, _ = run_exec({"command": ["sh", "-c", "sleep 30 & kill $! ; wait; echo done"]})
    assert output["stdout"].strip() == "done"


def test_no_cgroup_is_left_behind():
    if not cgroup_available():
        pytest.skip("no writable pids cgroup on this machine")
    base = sandbox._controller_dir("pids") / sandbox.CGROUP_DIR

    def mine() -> list[str]:
        return sorted(p.name for p in base.iterdir() if p.is_dir() and p.name.startswith(f"{os.getpid()}-"))

    assert mine() == []
    fail_exec({"command": FORK_BOMBS["bash"]})
    run_exec({"command": ["true"]})
    assert mine() == []


#: Outside every sandbox (under bubblewrap /tmp is the command's own tmpfs, so not there).
ESCAPE_TARGET = Path(__file__).resolve().parent / f"orchestrator-escape-{uuid.uuid4().hex}"


def test_hostile_steps_leave_the_worker_unharmed(worker):
    # Given the real Celery worker and its pool processes ...
    master = psutil.Process(worker.pid)
    pool_before = sorted(c.pid for c in master.children())
    hostile = {
        "bomb": FORK_BOMBS["bash"],
        "memory": ["python", "-c", "x = bytearray(10 * 1024**3)"],
        "spin": ["python", "-c", "while True: pass"],
        "escape": ["python", "-c", f"open({str(ESCAPE_TARGET)!r}, 'w').write('x')"],
        "parricide": ["python", "-c", "import os, signal; os.kill(os.getppid(), signal.SIGKILL)"],
    }
    if sandbox.landlock_abi() < 1:
        del hostile["escape"]  # nothing confines writes on this kernel
    if sandbox.landlock_abi() < 6:
        del hostile["parricide"]  # nothing stops the signal on this kernel
    lines = ["key: hostile", "steps:"]
    for name, command in hostile.items():
        lines += [f"  - id: {name}", "    type: exec", f"    params: {{command: {command!r}, timeout: 2}}"]
    lines += [
        "  - id: after",
        "    type: noop",
        f"    depends_on: [{', '.join(hostile)}]",
        "    trigger_rule: all_done",
    ]
    # When every hostile step has run ...
    run, steps = run_to_end("\n".join(lines) + "\n", timeout=90)
    # ... each failed with its own reason, and the run went on to its end ...
    for name in hostile:
        assert steps[name].status in ("failed", "dead"), (name, steps[name].status, steps[name].error)
        print(f"{name}: {steps[name].error}")
    assert "process limit reached" in steps["bomb"].error
    assert "MemoryError" in steps["memory"].error
    assert "timed out" in steps["spin"].error or "SIGXCPU" in steps["spin"].error
    assert steps["after"].status == "succeeded" and run.status == "failed"
    assert not ESCAPE_TARGET.exists()
    # ... and the worker is the same: same master, same pool processes, still running
    assert worker.poll() is None
    assert sorted(c.pid for c in master.children()) == pool_before
