"""Containment for ``exec`` steps beyond rlimits: a process limit and a filesystem confinement.

Why more than ``setrlimit``: ``RLIMIT_NPROC`` does not apply to root (the kernel skips the check
for CAP_SYS_RESOURCE / CAP_SYS_ADMIN), and nothing in a plain process stops a command from
writing anywhere its user may. Workers often run as root in containers, so:

Process limit (fork bombs), first that works of:

1. a **pids cgroup** made for the one command (cgroup v1 ``pids`` hierarchy, or cgroup v2 when
   the worker's cgroup delegates ``pids``), nested under the worker's own cgroup, with
   ``pids.max`` = ``ORCHESTRATOR_EXEC_MAX_PROCESSES``: the kernel refuses the fork past the limit
   (EAGAIN), whatever the user and even after ``setsid``. The child joins the cgroup between fork
   and exec, so no process of the command ever runs outside it. Where the ``memory`` controller
   can be nested too, the whole command (all its processes together) also gets
   ``ORCHESTRATOR_EXEC_MEMORY_MB``, on top of the per-process ``RLIMIT_AS``.
2. else a **watchdog** in the worker that counts the processes of the command's session
   (``/proc/<pid>/stat`` field 6) every 50 ms and kills the session when the count passes the
   limit. Weaker: a bomb gets up to one interval of growth, and a process that calls ``setsid``
   leaves the count (it still dies with the process group kill if it kept the group).

Either way, reaching the limit kills every process of the command and fails the step with
"process limit reached", instead of leaving a bomb spinning until the timeout.

Filesystem (and signals): **Landlock** (Linux >= 5.13, ``landlock_create_ruleset(2)``; unprivileged
and effective for root too). The command may read and execute anywhere, write only beneath its
work directory (and to ``/dev/null``-like devices); from Landlock ABI 6 (Linux 6.12) it also cannot
signal processes outside its own sandbox (it cannot kill the worker) nor reach abstract Unix
sockets outside it. A write elsewhere fails with EACCES, which the command reports and the step
records as its error. Where the kernel has no Landlock, this layer is absent (the trace says so).

The rules are built in the parent; the child only makes two syscalls before ``exec``
(``prctl(PR_SET_NO_NEW_PRIVS)``, ``landlock_restrict_self``) and writes its pid into the
cgroup: the least possible work between fork and exec. Sources: Landlock kernel documentation
(Documentation/userspace-api/landlock.rst), cgroup v1 pids (Documentation/admin-guide/cgroup-v1/
pids.rst), cgroup v2 (Documentation/admin-guide/cgroup-v2.rst, "no internal process" rule).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# --- Landlock ---------------------------------------------------------------------------------

_SYS_LANDLOCK_CREATE_RULESET = 444  # the same number on every architecture (new-style syscalls)
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_TRUNCATE = 1 << 14
_FS_IOCTL_DEV = 1 << 15
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
_SCOPE_SIGNAL = 1 << 1

#: Devices a command may write (shell redirections to /dev/null are everywhere).
WRITABLE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty")

_libc: ctypes.CDLL | None = None
_abi: int | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0 when Landlock is absent or disabled). Cached."""
    global _abi
    if _abi is None:
        try:
            version = _lib().syscall(
                _SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), _LANDLOCK_CREATE_RULESET_VERSION
            )
        except (OSError, AttributeError):
            version = -1
        _abi = max(0, int(version))
    return _abi


def _fs_rights(abi: int) -> int:
    """Every filesystem right the ABI knows (all of them are "handled": denied unless granted)."""
    top = {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)
    return (1 << top) - 1


def _add_path_rule(ruleset_fd: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        attr = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)
        if _lib().syscall(_SYS_LANDLOCK_ADD_RULE, ruleset_fd, _LANDLOCK_RULE_PATH_BENEATH, attr, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_add_rule({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def landlock_ruleset(workdir: str) -> int | None:
    """A Landlock ruleset fd: read/execute anywhere, write only beneath ``workdir``.

    Returns None when the kernel has no Landlock. The caller passes the fd to
    :func:`landlock_restrict` in the child and closes it in the parent afterwards.
    Raises OSError when Landlock exists but the ruleset cannot be built.
    """
    abi = landlock_abi()
    if abi < 1:
        return None
    handled = _fs_rights(abi)
    scoped = (_SCOPE_SIGNAL | _SCOPE_ABSTRACT_UNIX_SOCKET) if abi >= 6 else 0
    if abi >= 6:
        attr_bytes = struct.pack("=QQQ", handled, 0, scoped)
    elif abi >= 4:
        attr_bytes = struct.pack("=QQ", handled, 0)
    else:
        attr_bytes = struct.pack("=Q", handled)
    attr = ctypes.create_string_buffer(attr_bytes, len(attr_bytes))
    ruleset_fd = _lib().syscall(_SYS_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(len(attr_bytes)), 0)
    if ruleset_fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    try:
        _add_path_rule(ruleset_fd, "/", _FS_READ_FILE | _FS_READ_DIR | _FS_EXECUTE)
        _add_path_rule(ruleset_fd, workdir, handled)
        device_rights = _FS_READ_FILE | _FS_WRITE_FILE
        device_rights |= (_FS_TRUNCATE if abi >= 3 else 0) | (_FS_IOCTL_DEV if abi >= 5 else 0)
        for device in WRITABLE_DEVICES:
            if os.path.exists(device):
                try:
                    _add_path_rule(ruleset_fd, device, device_rights)
                except OSError:
                    pass  # e.g. no controlling tty: the device cannot be opened anyway
    except BaseException:
        os.close(ruleset_fd)
        raise
    os.set_inheritable(ruleset_fd, False)
    return ruleset_fd


def landlock_restrict(ruleset_fd: int) -> None:
    """In the child, before exec: no new privileges, then enforce the ruleset. Raises OSError."""
    lib = _lib()
    if lib.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(PR_SET_NO_NEW_PRIVS)")
    if lib.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset_fd, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "landlock_restrict_self")


# --- process limit: cgroup or watchdog --------------------------------------------------------

CGROUP_ROOT = "/sys/fs/cgroup"
#: Name of the folder, under the worker's own cgroup, that holds one cgroup per running command.
CGROUP_DIR = "orchestrator-exec"


def _own_cgroups() -> dict[str, str]:
    """{controller or "" (v2): path of this process's cgroup} from /proc/self/cgroup."""
    result: dict[str, str] = {}
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return result
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for name in controllers.split(",") if controllers else [""]:
            result[name] = path
    return result


def _controller_dir(controller: str) -> Path | None:
    """The worker's own cgroup folder where ``controller`` can be nested, or None.

    cgroup v1: ``/sys/fs/cgroup/<controller>/<own path>``. cgroup v2: the unified folder, if
    the controller is enabled (or can be enabled) for its children.
    """
    own = _own_cgroups()
    if controller in own:
        base = Path(CGROUP_ROOT) / controller / own[controller].lstrip("/")
        if (base / "cgroup.procs").exists():
            return base
    if "" in own:
        unified = Path(CGROUP_ROOT)
        if not (unified / "cgroup.controllers").exists():
            unified = unified / "unified"
        base = unified / own[""].lstrip("/")
        try:
            if controller not in (base / "cgroup.controllers").read_text().split():
                return None
            enabled = (base / "cgroup.subtree_control").read_text().split()
            if controller not in enabled:
                (base / "cgroup.subtree_control").write_text(f"+{controller}")
        except OSError:
            return None  # e.g. EBUSY: the "no internal process" rule of a non-root cgroup
        return base
    return None


@dataclass
class ProcessLimit:
    """The process (and, where possible, memory) limit of one command.

    Made with :func:`process_limit` before the command starts. ``preexec`` (run in the child)
    puts the child into the cgroup; ``check()`` (parent, in the output loop) says whether the
    limit was hit; ``kill_all()`` kills every process of the command; ``close()`` removes the
    cgroups. ``mode`` is "cgroup" or "watchdog".
    """

    max_processes: int
    mode: str
    dirs: list[Path] = field(default_factory=list)
    _fds: list[int] = field(default_factory=list)
    session: int | None = None
    peak: int = 0

    def preexec(self) -> None:
        for fd in self._fds:
            os.write(fd, b"0")  # 0 = the writing process (cgroup v1 and v2)

    def started(self, pid: int) -> None:
        """The command started as ``pid`` (the leader of its own session)."""
        self.session = pid
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def pids(self) -> list[int]:
        """The processes of the command now alive."""
        if self.mode == "cgroup":
            try:
                return [int(p) for p in (self.dirs[0] / "cgroup.procs").read_text().split()]
            except (OSError, ValueError, IndexError):
                return []
        return _session_members(self.session) if self.session else []

    def check(self) -> str | None:
        """A reason to kill the command (the limit was reached), or None."""
        if self.mode == "cgroup":
            pids_dir = self.dirs[0]
            try:
                events = (pids_dir / "pids.events").read_text().split()
                refused = int(events[events.index("max") + 1]) if "max" in events else 0
                current = int((pids_dir / "pids.current").read_text())
            except (OSError, ValueError, IndexError):
                return None
            self.peak = max(self.peak, current)
            if refused:
                return f"process limit reached ({self.max_processes} processes; {refused} forks refused)"
            return None
        count = len(self.pids())
        self.peak = max(self.peak, count)
        if count > self.max_processes:
            return f"process limit reached ({count} processes, limit {self.max_processes})"
        return None

    def kill_all(self) -> int:
        """SIGKILL every process of the command until none is left. Returns how many were killed."""
        killed = 0
        for _ in range(200):
            if self.session:
                try:
                    os.killpg(self.session, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            alive = self.pids()
            if not alive:
                break
            for pid in alive:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.01)
        return killed

    def close(self) -> None:
        """Kill what is left and remove the cgroup folders (best effort)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self.mode != "cgroup":
            return
        self.kill_all()
        for directory in self.dirs:
            for _ in range(50):
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)  # the last killed processes are still being reaped


def _session_members(session: int) -> list[int]:
    """Pids whose session id (``/proc/<pid>/stat`` field 6) is ``session``."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == session:
            members.append(int(name))
    return members


_swept = False


def _sweep_stale(parent: Path) -> None:
    """Remove cgroups left by commands of dead workers (empty folders only), once per process."""
    global _swept
    if _swept:
        return
    _swept = True
    try:
        for child in parent.iterdir():
            owner = child.name.split("-", 1)[0]
            if child.is_dir() and owner.isdigit() and not Path(f"/proc/{owner}").exists():
                try:
                    child.rmdir()
                except OSError:
                    pass
    except OSError:
        pass


def process_limit(max_processes: int, memory_bytes: int = 0, force_watchdog: bool = False) -> ProcessLimit:
    """Prepare the limits of one command: a pids (+ memory) cgroup if possible, else the watchdog."""
    if not force_watchdog:
        name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        made: list[Path] = []
        fds: list[int] = []
        try:
            pids_base = _controller_dir("pids")
            if pids_base is None:
                raise OSError("no writable pids cgroup")
            parent = pids_base / CGROUP_DIR
            parent.mkdir(exist_ok=True)
            _sweep_stale(parent)
            directory = parent / name
            directory.mkdir()
            made.append(directory)
            (directory / "pids.max").write_text(str(max_processes))
            fds.append(os.open(directory / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
            if memory_bytes > 0:
                memory_base = _controller_dir("memory")
                if memory_base is not None and memory_base != pids_base:  # v1: a separate hierarchy
                    try:
                        (memory_base / CGROUP_DIR).mkdir(exist_ok=True)
                        memory_dir = memory_base / CGROUP_DIR / name
                        memory_dir.mkdir()
                        made.append(memory_dir)
                        (memory_dir / "memory.limit_in_bytes").write_text(str(memory_bytes))
                        fds.append(os.open(memory_dir / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
                    except OSError:
                        log.debug("no memory cgroup for exec steps", exc_info=True)
                elif memory_base is not None:  # v2: the same folder holds both controllers
                    try:
                        (directory / "memory.max").write_text(str(memory_bytes))
                    except OSError:
                        pass
            return ProcessLimit(max_processes, "cgroup", made, fds)
        except OSError:
            for fd in fds:
                os.close(fd)
            for directory in reversed(made):
                try:
                    directory.rmdir()
                except OSError:
                    pass
            log.debug("exec process limit: falling back to the watchdog", exc_info=True)
    return ProcessLimit(max_processes, "watchdog")


def child_setup(limit: ProcessLimit | None, ruleset_fd: int | None, rlimits: Callable[[], None]) -> Callable[[], None]:
    """The ``preexec_fn``: join the cgroup, apply rlimits, then Landlock (last: it may deny writes)."""

    def setup() -> None:
        if limit is not None:
            limit.preexec()
        rlimits()
        if ruleset_fd is not None:
            landlock_restrict(ruleset_fd)

    return setup
