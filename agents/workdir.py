"""Per-run work directories: the only folder where python-step callables read and write files.

A workflow author chooses the paths a callable gets (``report_path: ../../etc/cron.d/x``), so a
callable never opens a path it was given as such: :func:`confine` resolves it inside the run's
work directory, ``<ORCHESTRATOR_RUN_WORK_ROOT>/<tenant>/<run id>``, and refuses anything that
lands outside (absolute paths, ``..``, and symlinks pointing out, since the path is resolved
with every symlink followed before the check). The ``python`` handler puts the directory into
``StepContext.work_dir`` for callables that take ``ctx``; ``exec`` steps of the same run see it
read-only under the same path. It lives on the worker's machine: steps of one run on different
machines do not share it. The purge of old runs removes it with the run.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from django.conf import settings

from orchestrator_site.conf import conf

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _segment(value: str, fallback: str) -> str:
    text = _UNSAFE.sub("_", str(value or ""))[:100].strip(".") or fallback
    return text


def work_root() -> Path:
    """The folder holding every run's work directory (``ORCHESTRATOR_RUN_WORK_ROOT``)."""
    return Path(str(conf.run_work_root or (Path(settings.DATA_DIR) / "work")))


def run_work_path(tenant_id: Any, run_id: Any) -> Path:
    """Where a run's work directory is (whether it exists or not)."""
    return work_root() / _segment(tenant_id, "default") / _segment(run_id, "run")


def run_work_dir(ctx: Any) -> Path:
    """The run's work directory for the step ``ctx`` (a StepContext), created if missing.

    Mode 0755 (files 0644): the exec steps of the run read it as the sandbox's unprivileged user;
    keep ``ORCHESTRATOR_RUN_WORK_ROOT``'s parent (the data directory) 0700 against other users
    of the host.

    Uses ``ctx.work_dir`` when set; otherwise derives it from the tenant and run id and records
    it there. Returns the resolved path.
    """
    given = getattr(ctx, "work_dir", "") or ""
    path = Path(given) if given else run_work_path(getattr(ctx, "tenant_id", ""), getattr(ctx, "run_id", ""))
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    resolved = path.resolve()
    if hasattr(ctx, "work_dir"):
        ctx.work_dir = str(resolved)
    return resolved


def confine(root: Path | str, relative: Any, field: str = "path") -> Path:
    """``relative`` resolved inside ``root``; ValueError naming ``field`` when it would escape.

    Refused: empty, NUL, absolute or ``~`` paths, and any path whose resolution (``..`` and
    every symlink followed, existing or not) is not ``root`` or beneath it.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise ValueError(f"{field} is empty")
    if "\x00" in relative:
        raise ValueError(f"{field} must not contain NUL")
    if relative.startswith(("/", "~")):
        raise ValueError(f"{field} must be a path relative to the run's work directory, got {relative!r}")
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"{field} {relative!r} leaves the run's work directory")
    return target


def remove_run_work_dirs(pairs: list[tuple[Any, Any]]) -> int:
    """Delete the work directories of ``(tenant_id, run_id)`` pairs; returns how many existed."""
    removed = 0
    for tenant_id, run_id in pairs:
        path = run_work_path(tenant_id, run_id)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def write_file(path: Path, data: bytes) -> int:
    """Write ``data`` to ``path`` (confined already) atomically; returns its size in bytes.

    The temporary file is created with O_EXCL | O_NOFOLLOW, so a symlink planted between the
    check and the write is not followed; the rename replaces a symlink, never writes through it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)
    return len(data)
