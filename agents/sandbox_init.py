"""Landlock, and the init that runs first inside a bubblewrap sandbox. Standard library only.

This file is the one implementation of the Landlock rules of ``exec`` steps. It is used twice:

- imported by :mod:`agents.sandbox` in the worker, where the ruleset is built in the parent and
  enforced in the child between fork and exec (the ``process`` isolation, no namespaces);
- bind-mounted read-only into a bubblewrap sandbox and run as a script by the worker's own
  interpreter (``python -I -S init.py UID GID WORKDIR -- COMMAND...``): after bubblewrap made the
  namespaces and mounts, it drops to the unprivileged ``UID``/``GID`` (when started as root),
  sets ``no_new_privs``, enforces Landlock (write only beneath the work directory, ``/tmp`` and
  a few devices; no signals or abstract Unix sockets outside the sandbox from ABI 6), then
  ``exec``s the command. Landlock has to be applied in here, after the mounts: a Landlocked
  process may not mount, and path rules follow the file hierarchy the process sees.

Exit codes of the init (its own failures, the command never ran): 125 setup failed, 126 the
command is not executable, 127 the command was not found; the reason is one stderr line starting
with :data:`MARKER`.

Sources: Landlock kernel documentation (Documentation/userspace-api/landlock.rst: ABI versions,
``landlock_create_ruleset(2)``, ``landlock_add_rule(2)``, ``landlock_restrict_self(2)``),
``prctl(2)`` PR_SET_NO_NEW_PRIVS, ``setresuid(2)``.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys

#: First words of the init's own error line on stderr.
MARKER = "orchestrator-sandbox:"
EXIT_SETUP, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND = 125, 126, 127

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


def landlock_ruleset(writable: list[str]) -> int | None:
    """A Landlock ruleset fd: read/execute anywhere, write only beneath the ``writable`` folders.

    The devices of :data:`WRITABLE_DEVICES` may be written too. Returns None when the kernel has
    no Landlock. The caller enforces it with :func:`landlock_restrict` (in the process that is
    about to exec the command) and closes the fd. Raises OSError when Landlock exists but the
    ruleset cannot be built.
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
        for folder in writable:
            _add_path_rule(ruleset_fd, folder, handled)
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
    """Before exec: no new privileges, then enforce the ruleset on this thread. Raises OSError."""
    no_new_privs()
    if _lib().syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset_fd, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "landlock_restrict_self")


def no_new_privs() -> None:
    """``prctl(PR_SET_NO_NEW_PRIVS)``: setuid binaries and file capabilities stop granting anything."""
    if _lib().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(PR_SET_NO_NEW_PRIVS)")


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` for good (real, effective and saved ids; no supplementary groups).

    Changing the uid of a root process away from 0 clears its permitted and effective
    capabilities (capabilities(7), "Effect of user ID changes on capabilities"). Raises OSError.
    """
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
        raise OSError(1, f"still uid {os.geteuid()} gid {os.getegid()} after dropping to {uid}:{gid}")


def _fail(code: int, text: str) -> None:
    os.write(2, f"{MARKER} {text}\n".encode(errors="replace"))
    os._exit(code)


def main(args: list[str]) -> None:
    """The init: ``UID GID WORKDIR -- COMMAND...`` (UID -1: keep the current ids). Never returns."""
    try:
        separator = args.index("--")
        uid, gid, workdir = int(args[0]), int(args[1]), args[2]
        command = args[separator + 1 :]
        if not command:
            raise ValueError("no command")
    except (ValueError, IndexError) as exc:
        _fail(EXIT_SETUP, f"setup failed: bad arguments ({exc})")
        return
    try:
        if uid >= 0:
            drop_privileges(uid, gid)
        os.chdir(workdir)
        os.environ.pop("PWD", None)  # bubblewrap's (it says "/"); the command starts with what it was given
        no_new_privs()
        ruleset = landlock_ruleset([workdir, "/tmp"])
        if ruleset is not None:
            landlock_restrict(ruleset)
            os.close(ruleset)
    except OSError as exc:
        _fail(EXIT_SETUP, f"setup failed: {exc}")
        return
    try:
        os.execvp(command[0], command)
    except FileNotFoundError:
        _fail(EXIT_NOT_FOUND, f"command not found: {command[0]}")
    except PermissionError:
        _fail(EXIT_NOT_EXECUTABLE, f"command not executable: {command[0]}")
    except OSError as exc:
        _fail(EXIT_NOT_EXECUTABLE, f"cannot run {command[0]}: {exc.strerror or exc}")


if __name__ == "__main__":
    main(sys.argv[1:])
