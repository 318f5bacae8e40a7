"""Containment for ``exec`` steps: namespaces (bubblewrap), a process limit, Landlock.

Namespaces (the end of this module): :func:`isolation` decides once per process whether commands
run in bubblewrap (``bwrap``: own PID/IPC/UTS/cgroup/network namespaces, fresh /proc, read-only
system, filtered /etc, an unprivileged uid) or, only where that is allowed, with the process
limits below alone; :func:`bwrap_command` builds the command line. Sources: bubblewrap(1),
namespaces(7), user_namespaces(7), capabilities(7).

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

import logging
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator_site.conf import conf

from . import sandbox_init

log = logging.getLogger(__name__)

# --- Landlock (one implementation, in agents/sandbox_init.py) ---------------------------------

WRITABLE_DEVICES = sandbox_init.WRITABLE_DEVICES
landlock_abi = sandbox_init.landlock_abi
landlock_restrict = sandbox_init.landlock_restrict


def landlock_ruleset(workdir: str) -> int | None:
    """A Landlock ruleset fd: read/execute anywhere, write only beneath ``workdir`` (and devices).

    For the ``process`` isolation: built in the parent, enforced in the child by
    :func:`child_setup`. None when the kernel has no Landlock; OSError when it cannot be built.
    """
    return sandbox_init.landlock_ruleset([workdir])


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


# --- Namespaces: bubblewrap -------------------------------------------------------------------

#: Values of ORCHESTRATOR_EXEC_SANDBOX.
ISOLATION_MODES = ("auto", "bwrap", "process")

#: Where agents/sandbox_init.py is mounted inside the sandbox.
INIT_PATH = "/run/orchestrator/init.py"

#: What a command sees of /etc (read-only, each only where the host has it). Everything else is
#: absent: shadow, gshadow, sudoers, ssh host keys, ssl/private, the configuration of the
#: services running beside the worker.
ETC_ENTRIES = (
    "passwd",
    "group",
    "hosts",
    "hostname",
    "resolv.conf",
    "nsswitch.conf",
    "host.conf",
    "gai.conf",
    "localtime",
    "timezone",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "ssl/certs",
    "ssl/openssl.cnf",
    "ca-certificates",
    "ca-certificates.conf",
    "mime.types",
    "protocols",
    "services",
    "os-release",
    "debian_version",
    "locale.alias",
    "magic",
)

#: Top-level system folders, bound read-only (or re-created as the symlinks they are, merged /usr).
SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


class SandboxUnavailable(Exception):
    """This deployment may not run exec steps here: ``str()`` is one line saying why and what to do."""


@dataclass(frozen=True)
class Isolation:
    """How exec steps run in this process.

    ``mode`` is "bwrap" (namespaces) or "process" (process limits only). ``uid``/``gid`` are the
    ids commands run as under bwrap: an unprivileged pair when the worker is root, -1 when the
    worker is not root (it already is unprivileged; bwrap maps it in a user namespace).
    ``bwrap`` is the program's path. ``note`` says why "process" was chosen.
    """

    mode: str
    uid: int = -1
    gid: int = -1
    bwrap: str = ""
    note: str = ""


_isolation_cache: dict[tuple, Isolation | SandboxUnavailable] = {}
_warned: set[str] = set()
_isolation_lock = threading.Lock()


def reset_isolation() -> None:
    """Forget the cached decision and warnings (tests change the settings)."""
    _isolation_cache.clear()
    _warned.clear()


def _setting(name: str, default):
    from django.conf import settings

    return getattr(settings, name, default)  # DATA_DIR only: the ORCHESTRATOR_* ones come from conf


def isolation() -> Isolation:
    """The isolation exec steps get here, decided once per process and settings.

    ``ORCHESTRATOR_EXEC_SANDBOX``: "bwrap" requires bubblewrap; "process" uses the process limits
    only (logs a warning once); "auto" (default) uses bubblewrap when it works here, else falls
    back to the process limits only in the embedded default (``ORCHESTRATOR_EMBEDDED``: one user
    on their own machine) with a warning logged once, and refuses otherwise.

    Raises:
        SandboxUnavailable: bubblewrap is required (or the deployment is multi-tenant) and it
            does not work here; the message names the cause.
    """
    wanted = str(conf.exec_sandbox or "auto").strip().lower()
    program = str(conf.exec_bwrap or "bwrap")
    embedded = bool(conf.embedded)
    uid = int(conf.exec_uid)
    gid = int(conf.exec_gid)
    key = (wanted, program, embedded, uid, gid, os.geteuid())
    with _isolation_lock:  # the embedded worker's threads ask at once: one probe, one warning
        cached = _isolation_cache.get(key)
        if cached is None:
            cached = _decide(wanted, program, embedded, uid, gid)
            _isolation_cache[key] = cached
        if isinstance(cached, Isolation) and cached.mode == "process" and cached.note not in _warned:
            _warned.add(cached.note)
            log.warning("%s", cached.note)
    if isinstance(cached, SandboxUnavailable):
        raise cached
    return cached


def _decide(wanted: str, program: str, embedded: bool, uid: int, gid: int) -> Isolation | SandboxUnavailable:
    if wanted not in ISOLATION_MODES:
        return SandboxUnavailable(
            f"ORCHESTRATOR_EXEC_SANDBOX={wanted!r} is not one of {', '.join(ISOLATION_MODES)}: exec steps refused"
        )
    if wanted == "process":
        return Isolation(
            "process",
            note="exec steps run WITHOUT namespaces (ORCHESTRATOR_EXEC_SANDBOX=process): only process limits "
            "and Landlock contain them; a command can read what the worker's user can read",
        )
    if os.geteuid() == 0 and (uid <= 0 or gid <= 0):
        return SandboxUnavailable(
            "ORCHESTRATOR_EXEC_UID/GID must name an unprivileged user (not 0): exec steps refused"
        )
    found = shutil.which(program)
    candidate = Isolation("bwrap", uid if os.geteuid() == 0 else -1, gid if os.geteuid() == 0 else -1, found or "")
    problem = _probe(candidate) if found else f"bubblewrap ({program}) is not installed"
    if problem is None:
        return candidate
    if wanted == "auto" and embedded:
        return Isolation(
            "process",
            note=f"exec steps run WITHOUT namespaces: {problem}; falling back to process limits and Landlock "
            "(embedded default, one user). Install bubblewrap to isolate them (README: Sandbox)",
        )
    return SandboxUnavailable(
        f"exec steps refused: {problem} (this deployment requires the bubblewrap sandbox; see README: Sandbox)"
    )


def _probe(iso: Isolation) -> str | None:
    """Run ``true`` in a full sandbox once; None when it works, else the reason (one line)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="orchestrator-probe-") as workdir:
        try:
            prepare_workdir(iso, workdir)
            argv = bwrap_command(iso, workdir, ["true"], network=False)
            done = subprocess.run(
                argv,
                cwd=workdir,
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return f"bubblewrap cannot start: {exc}"
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
    reason = lines[-1] if lines else f"exit code {done.returncode}"
    return f"bubblewrap does not work here ({reason[:200]}; user namespaces or privileges missing?)"


def prepare_workdir(iso: Isolation, workdir: str) -> None:
    """Give the work directory (and what is in it) to the sandbox's user, when that user differs."""
    if iso.mode != "bwrap" or iso.uid < 0:
        return
    os.chown(workdir, iso.uid, iso.gid)
    for root, dirs, files in os.walk(workdir):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), iso.uid, iso.gid)


def _python_paths() -> list[str]:
    """Folders of the worker's interpreter and its installed packages (read-only in the sandbox)."""
    import site
    import sys

    candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    try:
        candidates += site.getsitepackages()
    except AttributeError:  # pragma: no cover - some virtualenv flavours
        pass
    candidates += [str(p) for p in conf.exec_ro_paths or []]
    return candidates


def read_only_paths() -> list[str]:
    """Extra folders bound read-only: the interpreter's prefixes, site-packages, ORCHESTRATOR_EXEC_RO_PATHS.

    Never one that holds the data directory (secret key, SQLite database, key files), ``/``
    itself, ``/etc``, ``/proc`` or ``/sys``; paths under ``/usr`` are there already.
    """
    data_dir = os.path.realpath(str(_setting("DATA_DIR", "") or "/nonexistent"))
    chosen: list[str] = []
    for raw in _python_paths():
        path = os.path.realpath(raw)
        if not os.path.isdir(path) or path in ("/", "/etc", "/proc", "/sys", "/dev", "/run"):
            continue
        if path == "/usr" or path.startswith("/usr/"):
            continue
        if data_dir == path or data_dir.startswith(path.rstrip("/") + "/"):
            log.warning("exec sandbox: %s holds the data directory; not made visible to commands", path)
            continue
        chosen.append(path)
    chosen.sort(key=len)
    result: list[str] = []
    for path in chosen:
        if not any(path == done or path.startswith(done + "/") for done in result):
            result.append(path)
    return result


def _mount_point(path: str, made: set[str], args: list[str]) -> None:
    """Create the parents of ``path`` in the sandbox as 0755 folders (bwrap's default is 0700)."""
    parts = path.strip("/").split("/")[:-1]
    current = ""
    for part in parts:
        current += "/" + part
        if current not in made and current not in ("/usr", "/tmp", "/proc", "/dev"):
            made.add(current)
            args += ["--perms", "0755", "--dir", current]


def bwrap_command(
    iso: Isolation, workdir: str, argv: list[str], network: bool, readable: list[str] | None = None
) -> list[str]:
    """The bubblewrap command line that runs ``argv`` in ``workdir`` (see the module docstring).

    New PID, IPC, UTS, cgroup and (unless ``network``) network namespaces, plus a user namespace
    when the worker is not root; a fresh /proc; a minimal /dev; /tmp a private tmpfs of
    ``ORCHESTRATOR_EXEC_TMPFS_MB`` MiB; /usr, the system folders, the filtered /etc and the
    interpreter read-only, plus the ``readable`` folders (the run's work directory); ``workdir``
    writable (same path as outside). The init
    (agents/sandbox_init.py) then drops to ``iso.uid``, applies Landlock and execs ``argv``.
    """
    import sys

    tmpfs_bytes = max(1, int(conf.exec_tmpfs_mb)) * 1024 * 1024
    args = [iso.bwrap or "bwrap", "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    args += ["--unshare-cgroup-try", "--hostname", "sandbox"]
    if not network:
        args.append("--unshare-net")
    if os.geteuid() == 0:
        # Root keeps only what the init needs to become the unprivileged user; it loses them then.
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args.append("--unshare-user")
    args += ["--ro-bind", "/usr", "/usr"]
    for name in SYSTEM_DIRS:
        if os.path.islink(name):
            args += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            args += ["--ro-bind", name, name]
    made = {"/etc", "/run", "/run/orchestrator"}
    args += ["--perms", "0755", "--dir", "/etc"]
    for entry in ETC_ENTRIES:
        path = f"/etc/{entry}"
        if os.path.exists(path):
            _mount_point(path, made, args)
            args += ["--ro-bind-try", path, path]
    args += ["--proc", "/proc", "--dev", "/dev"]
    args += ["--perms", "1777", "--size", str(tmpfs_bytes), "--tmpfs", "/tmp"]
    for path in [*read_only_paths(), *(readable or [])]:
        _mount_point(path, made, args)
        args += ["--ro-bind", path, path]
    _mount_point(workdir, made, args)
    args += ["--bind", workdir, workdir]
    args += ["--perms", "0755", "--dir", "/run", "--perms", "0755", "--dir", "/run/orchestrator"]
    # chdir into the work directory happens in the init, as its owner: root without capabilities
    # may not enter a 0700 folder of another user.
    args += ["--ro-bind", sandbox_init.__file__, INIT_PATH, "--chdir", "/"]
    args += ["--", sys.executable, "-I", "-S", INIT_PATH, str(iso.uid), str(iso.gid), workdir, "--", *argv]
    return args
