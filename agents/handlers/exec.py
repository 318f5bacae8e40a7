"""``exec`` steps: run a command in a sandboxed subprocess.

Isolation (``agents.sandbox.isolation``, README "Sandbox"): bubblewrap namespaces (own PID, IPC,
UTS, cgroup and network namespaces, a fresh /proc, a read-only system and filtered /etc, the
work directory writable, an unprivileged uid when the worker is root), or, where bubblewrap
is missing, only in the embedded default, the process limits alone (a multi-tenant deployment
refuses the step, permanently). No container runtime is used; an ``image`` param is accepted for
seed 002's files and recorded in the trace, nothing more. On top of either:

- no shell ever: ``command`` is an argument list (``python`` / ``python3`` as ``command[0]`` mean
  the worker's own interpreter, ``sys.executable``);
- a scrubbed environment: only ``PATH=/usr/local/bin:/usr/bin:/bin``, ``LANG=C.UTF-8``,
  ``HOME`` and ``TMPDIR`` (both the work directory), plus the step's ``env``;
- a fresh temporary work directory as cwd, removed afterwards; ``files`` are written into it
  (seed 002 paths ``/workspace/input/<name>`` in the command are rewritten to point there);
- its own session and process group (``start_new_session``), killed as a whole (SIGKILL) on
  timeout and after the command exits (no stragglers left behind);
- resource limits set in the child before exec: address space ``ORCHESTRATOR_EXEC_MEMORY_MB``
  MiB (0 = none), CPU seconds ``ceil(timeout) + 1``, file size 100 MiB, no core dumps;
- a process limit, ``ORCHESTRATOR_EXEC_MAX_PROCESSES``, that holds for root too (a pids cgroup
  where one can be made, else a watchdog counting the command's session): a fork bomb is killed
  whole and the step fails with "process limit reached" (``agents.sandbox``);
- Landlock where the kernel has it: reads anywhere, writes only inside the work directory, no
  signals to processes outside the command (it cannot kill its worker);
- stdout kept up to ``ORCHESTRATOR_EXEC_MAX_OUTPUT`` bytes (the rest is read and dropped),
  stderr's tail kept.

Params:
    command: list of strings (required).
    env: mapping of extra environment variables.
    files: list of ``{"name": relative path, "content": str or JSON value, "executable": bool}``.
    stdin: a string, or any JSON value (sent as JSON).
    timeout: seconds, capped by the step's timeout.
    network: true to get the network (default: none); needs ``hosts``, each on
        ``ORCHESTRATOR_EXEC_NETWORK_HOSTS`` and passing the SSRF guard (see :func:`_network`).
    hosts: list of ``host`` / ``host:port`` the command will reach (at most ``MAX_HOSTS``).

Output: ``{"exit_code": int, "stdout": parsed JSON when stdout is JSON else text,
"stderr": last 4000 characters}`` (plus ``"truncated": true`` when stdout was cut).
A non-zero exit raises a transient ``StepError`` (message: the exit code and the last line of
stderr; ``output`` as above); death by a signal names the signal; a timeout raises
``StepTimeout``.

Limits of the approach: ``RLIMIT_AS`` counts virtual memory, so runtimes that reserve large
address ranges up front (JVM, Go) need a higher limit; ``preexec_fn`` runs between fork and exec,
which CPython documents as unsafe with threads around: it only calls ``setrlimit`` on values
computed beforehand, the least that can be done there.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator_site.conf import conf

from .. import netguard, sandbox
from .. import workdir as workdir_module
from ..httpclient import duration_ms
from ..registry import StepContext, StepError, StepHandler, StepTimeout, is_expression, register
from ..sandbox_init import EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, EXIT_SETUP, MARKER

#: The whole environment a command starts with (plus HOME/TMPDIR and the step's env).
BASE_PATH = "/usr/local/bin:/usr/bin:/bin"

#: Largest file a command may write, bytes (RLIMIT_FSIZE).
MAX_FILE_BYTES = 100 * 1024 * 1024

#: Characters of stderr kept in the output.
STDERR_CHARS = 4000

#: Seconds to wait for the pipes to close after the command exited (a background child may
#: still hold them; it is killed with the process group afterwards).
PIPE_GRACE = 0.5

#: Seconds between two checks of the process limit while a command runs.
LIMIT_CHECK = 0.05

#: Most hosts one step may declare with ``network: true``.
MAX_HOSTS = 20

#: Tests set this to exercise the watchdog where a pids cgroup could be made.
FORCE_WATCHDOG = False

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SEED002_INPUT = "/workspace/input/"
_PYTHON_NAMES = ("python", "python3")


@register
class ExecHandler(StepHandler):
    """Run ``command`` in the sandbox described in the module docstring."""

    type_name = "exec"
    enforces_timeout = True

    def validate_params(self, params: dict[str, Any]) -> None:
        """Check command, env, files, timeout. Raises ValueError naming the field."""
        super().validate_params(params)
        if "command" not in params or params["command"] is None:
            raise ValueError("command is required")
        command = params["command"]
        if isinstance(command, str) and not _whole_expression(command):
            raise ValueError("command must be a list of strings (no shell: split the arguments)")
        if not is_expression(command):
            if not isinstance(command, list) or not command:
                raise ValueError("command must be a non-empty list")
            for index, arg in enumerate(command):
                if not isinstance(arg, (str, int, float)) or isinstance(arg, bool):
                    raise ValueError(f"command[{index}] must be a string")
        env = params.get("env")
        if env is not None and not is_expression(env):
            if not isinstance(env, dict):
                raise ValueError("env must be a mapping")
            for name, value in env.items():
                if not isinstance(name, str) or not _ENV_NAME.match(name):
                    raise ValueError(f"env: invalid variable name {name!r}")
                if isinstance(value, (dict, list)):
                    raise ValueError(f"env.{name} must be a string")
        files = params.get("files")
        if files is not None and not is_expression(files):
            if not isinstance(files, list):
                raise ValueError("files must be a list of {name, content}")
            for index, entry in enumerate(files):
                if not isinstance(entry, dict) or "name" not in entry:
                    raise ValueError(f"files[{index}] must be a mapping with name and content")
                name = entry["name"]
                if not is_expression(name):
                    try:
                        _safe_relative(name)
                    except ValueError as exc:
                        raise ValueError(f"files[{index}].name: {exc}") from None
        network = params.get("network")
        if network is not None and not is_expression(network) and not isinstance(network, bool):
            raise ValueError("network must be true or false")
        hosts = params.get("hosts")
        if hosts is not None and not is_expression(hosts):
            if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                raise ValueError("hosts must be a list of host or host:port strings")
            if len(hosts) > MAX_HOSTS:
                raise ValueError(f"hosts: at most {MAX_HOSTS} entries")
            for index, entry in enumerate(hosts):
                try:
                    _host_port(entry)
                except ValueError as exc:
                    raise ValueError(f"hosts[{index}]: {exc}") from None
        if network is True and not hosts:
            raise ValueError("network: true needs hosts: the list of hosts the command will reach")
        timeout = params.get("timeout")
        if timeout is not None and not is_expression(timeout):
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
                raise ValueError("timeout must be a positive number")

    def run(self, ctx: StepContext) -> Any:
        """Run the command; see the module docstring for the output and failures."""
        p = ctx.params
        command = p.get("command")
        if not isinstance(command, list) or not command:
            raise StepError("command must be a non-empty list of strings", permanent=True)
        cap = float(p["timeout"]) if p.get("timeout") is not None else None
        timeout = ctx.remaining(cap)
        if timeout <= 0:
            raise StepTimeout("exec: no time left before the step's deadline")
        memory_mb = int(conf.exec_memory_mb or 0)
        max_output = int(conf.exec_max_output)
        max_processes = int(conf.exec_max_processes or 0)

        try:
            iso = sandbox.isolation()
        except sandbox.SandboxUnavailable as exc:
            # A deployment setting, not this attempt's luck: retrying cannot help.
            raise StepError(str(exc), permanent=True) from None
        network = _network(p, iso)

        with tempfile.TemporaryDirectory(prefix="orchestrator-exec-") as workdir:
            _write_files(workdir, p.get("files") or [])
            argv = _argv([str(arg) for arg in command], workdir)
            env = {"PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
            env.update({str(k): _env_value(v) for k, v in (p.get("env") or {}).items()})
            stdin = _stdin_bytes(p.get("stdin"))
            trace_data: dict[str, Any] = {"command": argv, "attempt": ctx.attempt}
            if p.get("image"):
                trace_data["image"] = p["image"]
                trace_data["note"] = "no container runtime: ran in the exec sandbox"

            limit = (
                sandbox.process_limit(max_processes, memory_mb * 1024 * 1024, force_watchdog=FORCE_WATCHDOG)
                if max_processes > 0
                else None
            )
            ruleset = None
            try:
                if iso.mode == "bwrap":
                    sandbox.prepare_workdir(iso, workdir)
                    run_dir = workdir_module.run_work_path(ctx.tenant_id, ctx.run_id)
                    readable = [str(run_dir.resolve())] if run_dir.is_dir() else []
                    popen_argv = sandbox.bwrap_command(iso, workdir, argv, network=bool(network), readable=readable)
                else:
                    ruleset = sandbox.landlock_ruleset(workdir)
                    popen_argv = argv
            except OSError as exc:
                _release(limit, ruleset)
                raise StepError(f"exec sandbox unavailable: {exc}") from None
            trace_data["sandbox"] = {
                "isolation": iso.mode,
                "uid": iso.uid if iso.mode == "bwrap" and iso.uid >= 0 else os.geteuid(),
                "network": network if iso.mode == "bwrap" else "host (no network namespace)",
                "process_limit": f"{limit.mode} ({max_processes})" if limit else "none",
                "landlock_abi": sandbox.landlock_abi() or None,
            }
            started = time.monotonic()
            try:
                proc = subprocess.Popen(
                    popen_argv,
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                    close_fds=True,
                    preexec_fn=sandbox.child_setup(limit, ruleset, _limits(memory_mb, timeout)),
                )
            except (FileNotFoundError, PermissionError) as exc:
                _release(limit, ruleset)
                reason = "not found" if isinstance(exc, FileNotFoundError) else "not executable"
                message = f"command {reason}: {popen_argv[0]}"
                self.trace(ctx, "exec", f"exec {argv[0]} -> {reason}", {**trace_data, "error": message})
                raise StepError(message, permanent=True) from None
            except (OSError, subprocess.SubprocessError) as exc:
                _release(limit, ruleset)
                message = f"could not start {argv[0]}: {type(exc).__name__}: {exc}"
                self.trace(ctx, "exec", f"exec {argv[0]} -> not started", {**trace_data, "error": message})
                raise StepError(message) from None

            if ruleset is not None:
                os.close(ruleset)
            if limit is not None:
                limit.started(proc.pid)
            try:
                captured = _communicate(proc, stdin, started + timeout, max_output, limit)
            finally:
                _kill_group(proc)
                if limit is not None:
                    limit.close()  # kills stragglers that left the process group, removes the cgroup
            elapsed = duration_ms(started)
            if limit is not None:
                trace_data["sandbox"]["peak_processes"] = limit.peak

        returncode = proc.returncode
        if iso.mode == "bwrap":
            returncode = _bwrap_returncode(returncode)
            init_error = _init_error(returncode, captured.stderr_text())
            if init_error is not None:
                message, permanent = init_error
                trace_data["error"] = message
                self.trace(ctx, "exec", f"exec {argv[0]} -> {message}", trace_data)
                raise StepError(message, permanent=permanent)
        output: dict[str, Any] = {
            "exit_code": returncode,
            "stdout": _stdout_value(captured.stdout, captured.truncated),
            "stderr": captured.stderr_text()[-STDERR_CHARS:],
        }
        if captured.truncated:
            output["truncated"] = True
        trace_data.update(
            exit_code=returncode,
            duration_ms=elapsed,
            timed_out=captured.timed_out,
            stdout_bytes=captured.stdout_total,
            stderr_tail=output["stderr"][-500:],
        )
        shown = " ".join(argv)[:200]
        if captured.limit_hit:
            message = f"command killed: {captured.limit_hit}"
            trace_data["error"] = message
            self.trace(ctx, "exec", f"exec {shown} -> {captured.limit_hit} in {elapsed} ms", trace_data)
            # A command that forks without bound does so again: retrying cannot help.
            raise StepError(message, permanent=True, output=output)
        if captured.timed_out:
            message = f"command timed out after {timeout:.3g}s (process group killed)"
            trace_data["error"] = message
            self.trace(ctx, "exec", f"exec {shown} -> timed out in {elapsed} ms", trace_data)
            raise StepTimeout(message, output=output)
        failure = _failure(returncode, output["stderr"], memory_mb)
        if failure:
            trace_data["error"] = failure
        self.trace(ctx, "exec", f"exec {shown} -> exit {returncode} in {elapsed} ms", trace_data)
        if failure:
            raise StepError(failure, output=output)
        return output


@dataclass
class _Captured:
    """What came out of the pipes."""

    stdout: bytearray = field(default_factory=bytearray)
    stdout_total: int = 0
    stderr_tail: bytearray = field(default_factory=bytearray)
    truncated: bool = False
    timed_out: bool = False
    limit_hit: str | None = None  # why the process limit killed the command

    def stderr_text(self) -> str:
        return self.stderr_tail.decode("utf-8", errors="replace")


def _communicate(
    proc: subprocess.Popen[bytes],
    stdin: bytes | None,
    deadline: float,
    max_output: int,
    limit: sandbox.ProcessLimit | None = None,
) -> _Captured:
    """Feed stdin and drain stdout/stderr until the command ends or ``deadline`` passes.

    Memory stays bounded whatever the command prints: stdout beyond ``max_output`` bytes and all
    but the last 16 KiB of stderr are read and dropped. On timeout the process group is killed.
    ``limit`` is checked every ``LIMIT_CHECK`` seconds; when it is hit every process of the
    command is killed and ``limit_hit`` says why.
    """
    out = _Captured()
    stderr_keep = 4 * STDERR_CHARS * 4  # bytes: 4000 characters of up to 4 UTF-8 bytes each
    assert proc.stdout is not None and proc.stderr is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, "stdout")
        selector.register(proc.stderr, selectors.EVENT_READ, "stderr")
        pending = memoryview(stdin) if stdin is not None else None
        if proc.stdin is not None:
            if pending:
                os.set_blocking(proc.stdin.fileno(), False)
                selector.register(proc.stdin, selectors.EVENT_WRITE, "stdin")
            else:
                proc.stdin.close()
        exited_at: float | None = None
        next_check = 0.0
        while selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                out.timed_out = True
                break
            if limit is not None and now >= next_check:
                next_check = now + LIMIT_CHECK
                out.limit_hit = limit.check()
                if out.limit_hit:
                    limit.kill_all()
                    break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > PIPE_GRACE:
                break  # a background child keeps the pipes open; it dies with the group
            wait = min(deadline - now, LIMIT_CHECK if limit is not None else 0.25)
            for key, _ in selector.select(timeout=wait):
                if key.data == "stdin":
                    assert pending is not None and proc.stdin is not None
                    try:
                        written = os.write(key.fd, pending[:65536])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        written = len(pending)
                    pending = pending[written:]
                    if not pending:
                        selector.unregister(key.fileobj)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                if key.data == "stdout":
                    out.stdout_total += len(chunk)
                    room = max_output - len(out.stdout)
                    if len(chunk) > room:
                        out.truncated = True
                    if room > 0:
                        out.stdout += chunk[:room]
                else:
                    out.stderr_tail += chunk
                    if len(out.stderr_tail) > stderr_keep:
                        del out.stderr_tail[:-stderr_keep]
    if out.timed_out or out.limit_hit:
        _kill_group(proc)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None and not pipe.closed:
            pipe.close()
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        # The command closed its pipes but kept running past the deadline.
        out.timed_out = True
        _kill_group(proc)
        proc.wait()
    return out


def _release(limit: sandbox.ProcessLimit | None, ruleset: int | None) -> None:
    """Undo the sandbox preparations of a command that did not start."""
    if ruleset is not None:
        os.close(ruleset)
    if limit is not None:
        limit.close()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the command's process group (its pgid is its pid: it leads its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _limits(memory_mb: int, timeout: float) -> Callable[[], None]:
    """The ``preexec_fn`` setting the child's rlimits; values are computed here, in the parent."""
    wanted = {
        resource.RLIMIT_CPU: math.ceil(timeout) + 1,
        resource.RLIMIT_FSIZE: MAX_FILE_BYTES,
        resource.RLIMIT_CORE: 0,
    }
    if memory_mb > 0:
        wanted[resource.RLIMIT_AS] = memory_mb * 1024 * 1024
    limits: list[tuple[int, tuple[int, int]]] = []
    for which, soft in wanted.items():
        _, hard_now = resource.getrlimit(which)
        hard = soft + 1 if which == resource.RLIMIT_CPU else soft
        if hard_now != resource.RLIM_INFINITY:
            # An unprivileged process cannot raise its hard limit.
            hard = min(hard, hard_now)
            soft = min(soft, hard)
        limits.append((which, (soft, hard)))

    def apply() -> None:
        for which, pair in limits:
            resource.setrlimit(which, pair)

    return apply


def _failure(returncode: int, stderr: str, memory_mb: int) -> str | None:
    """The failure message for an exit status, or None for exit code 0."""
    if returncode == 0:
        return None
    memory_hint = f" (memory limit {memory_mb} MiB)" if memory_mb > 0 else ""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = {
            "SIGXCPU": " (CPU time limit)",
            "SIGXFSZ": f" (file size limit {MAX_FILE_BYTES // 1048576} MiB)",
            "SIGKILL": memory_hint,
            "SIGSEGV": memory_hint,
            "SIGABRT": memory_hint,
            "SIGBUS": memory_hint,
        }.get(name, "")
        message = f"command killed by {name}{hint}"
    else:
        message = f"command exited with code {returncode}"
    last = _last_line(stderr)
    if last:
        message += f": {last}"
        if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
            message += memory_hint
    return message


def _last_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()[:300]
    return ""


def _stdout_value(data: bytearray, truncated: bool) -> Any:
    """Stdout parsed as JSON when it is JSON (and complete), else the text."""
    text = data.decode("utf-8", errors="replace")
    if not truncated and text.strip():
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def _whole_expression(value: str) -> bool:
    stripped = value.strip()
    return stripped.startswith("${") and stripped.endswith("}") and stripped.count("${") == 1


def _safe_relative(name: Any) -> str:
    """``name`` as a normalized relative path inside the work directory; ValueError otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("must be a non-empty string")
    if "\x00" in name:
        raise ValueError("must not contain NUL")
    if name.startswith("/") or name.startswith("~"):
        raise ValueError("must be a relative path")
    normalized = posixpath.normpath(name)
    if normalized == "." or normalized == ".." or normalized.startswith("../"):
        raise ValueError("must stay inside the work directory")
    return normalized


def _write_files(workdir: str, files: list[Any]) -> None:
    """Write the ``files`` entries into ``workdir`` (permanent StepError on a bad entry)."""
    root = Path(workdir).resolve()
    for index, entry in enumerate(files):
        if not isinstance(entry, dict):
            raise StepError(f"files[{index}] must be a mapping", permanent=True)
        try:
            relative = _safe_relative(entry.get("name"))
        except ValueError as exc:
            raise StepError(f"files[{index}].name: {exc}", permanent=True) from None
        target = (root / relative).resolve()
        if root not in target.parents:
            raise StepError(f"files[{index}].name: must stay inside the work directory", permanent=True)
        content = entry.get("content", "")
        text = content if isinstance(content, str) else json.dumps(content)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        if entry.get("executable"):
            target.chmod(0o755)


def _argv(command: list[str], workdir: str) -> list[str]:
    """Resolve ``python`` to this interpreter and seed 002's ``/workspace/input/`` paths."""
    argv = list(command)
    if argv[0] in _PYTHON_NAMES:
        argv[0] = sys.executable
    prefix = workdir.rstrip("/") + "/"
    return [arg.replace(_SEED002_INPUT, prefix) if _SEED002_INPUT in arg else arg for arg in argv]


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _stdin_bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value).encode("utf-8")


def _bwrap_returncode(code: int) -> int:
    """bubblewrap reports a command killed by signal N as 128 + N (as shells do): undo that."""
    if 128 < code < 128 + 65:
        try:
            signal.Signals(code - 128)
        except ValueError:
            return code
        return -(code - 128)
    return code


def _init_error(returncode: int, stderr: str) -> tuple[str, bool] | None:
    """(message, permanent) when the sandbox itself failed, not the command; else None."""
    last = _last_line(stderr)
    if returncode in (EXIT_NOT_FOUND, EXIT_NOT_EXECUTABLE) and last.startswith(MARKER):
        return last[len(MARKER) :].strip(), True
    if returncode == EXIT_SETUP and last.startswith(MARKER):
        return f"exec sandbox unavailable: {last[len(MARKER) :].strip()}", False
    if returncode == 1 and last.startswith("bwrap:"):
        return f"exec sandbox unavailable: {last}", False
    return None


def _host_port(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port`` or ``[v6]:port`` -> (host, port or None); ValueError when malformed."""
    text = entry.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    host = host.strip().lower().rstrip(".")
    if not host or any(c in host for c in "/@ ?#"):
        raise ValueError(f"{entry!r} is not a host or host:port")
    port = None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{entry!r} has an invalid port")
        port = int(port_text)
    return host, port


def _host_listed(host: str, allowed: list[str]) -> bool:
    """True when ``allowed`` names ``host`` (``*.example.com`` matches its subdomains)."""
    for raw in allowed:
        entry = str(raw).strip().lower().rstrip(".")
        if entry == "*" or entry == host or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


def _network(params: dict[str, Any], iso: sandbox.Isolation) -> list[str]:
    """The hosts a step with ``network: true`` may reach ([] = no network); permanent StepError.

    Network is granted only when every declared host is on ``ORCHESTRATOR_EXEC_NETWORK_HOSTS``
    and passes the SSRF guard of http steps (``agents.netguard.check_host``: it resolves to
    public addresses, or the operator allow-listed it in ``ORCHESTRATOR_HTTP_ALLOW_HOSTS``).
    The kernel does not hold the command to these hosts once it shares the worker's network
    namespace: see the README's Sandbox section for what that means and how to firewall it.
    """
    if not params.get("network"):
        return []
    hosts = params.get("hosts")
    if not isinstance(hosts, list) or not hosts:
        raise StepError("network: true needs hosts: the list of hosts the command will reach", permanent=True)
    allowed = list(conf.exec_network_hosts or [])
    if not allowed:
        raise StepError(
            "network: exec steps may not use the network here (ORCHESTRATOR_EXEC_NETWORK_HOSTS is empty)",
            permanent=True,
        )
    if iso.mode != "bwrap":
        raise StepError(
            "network: needs the bubblewrap sandbox (without it the command would reach every host)", permanent=True
        )
    granted = []
    for index, entry in enumerate(hosts):
        try:
            host, port = _host_port(str(entry))
        except ValueError as exc:
            raise StepError(f"hosts[{index}]: {exc}", permanent=True) from None
        if not _host_listed(host, allowed):
            raise StepError(f"hosts[{index}]: {host!r} is not in ORCHESTRATOR_EXEC_NETWORK_HOSTS", permanent=True)
        try:
            netguard.check_host(host, port)
        except netguard.BlockedAddress as exc:
            raise StepError(f"hosts[{index}]: {exc}", permanent=True) from None
        except OSError as exc:
            raise StepError(f"hosts[{index}]: {host!r} does not resolve ({exc})") from None
        granted.append(str(entry))
    return granted
