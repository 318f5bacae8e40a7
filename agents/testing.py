"""Small callables for ``python`` steps in tests, benchmarks and demos.

None of them is on the default ``ORCHESTRATOR_PYTHON_CALLABLES`` allow-list: ``flaky`` writes
a counter file wherever ``counter_path`` says, which no workflow of a deployment may choose. The
test settings (``orchestrator_site/test_settings.py``) and the tests' worker allow ``echo``,
``fail`` and ``flaky``; add ``agents.testing.slow`` where a test needs it.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from typing import Any


def echo(**kwargs: Any) -> dict[str, Any]:
    """Return the keyword arguments as given."""
    return kwargs


def fail(message: str = "boom") -> None:
    """Raise ``RuntimeError(message)`` (a transient step failure)."""
    raise RuntimeError(message)


def flaky(key: str = "flaky", failures: int = 1, counter_path: str | None = None) -> dict[str, int]:
    """Fail the first ``failures`` calls for ``key``, then succeed with ``{"calls": n}``.

    All arguments have defaults (``key="flaky"``, ``failures=1``) so a step may give only
    ``counter_path`` and ``failures``.

    Calls are counted in a file shared by every process of the machine: ``counter_path`` when
    given, else ``<tempdir>/orchestrator-flaky-<key>.count``. Each call appends one line with a
    single ``O_APPEND`` write (atomic for lines this short) and then counts the lines up to
    its own, so concurrent workers each see a distinct ``n``. Delete the file to start over.

    Raises:
        RuntimeError: on calls 1..failures.
    """
    path = counter_path or os.path.join(
        tempfile.gettempdir(), f"orchestrator-flaky-{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.count"
    )
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{key}\n".encode())
        # With O_APPEND the offset is now the end of our own line: lines up to it are ours and
        # earlier callers', never later ones.
        end = os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)
    with open(path, "rb") as counter:
        head = counter.read(end)
    calls = head.decode("utf-8", errors="replace").splitlines().count(key)
    if calls <= failures:
        raise RuntimeError(f"flaky {key!r}: call {calls} fails ({failures} planned failures)")
    return {"calls": calls}


def slow(seconds: float = 1.0) -> dict[str, float]:
    """Sleep ``seconds`` without watching any deadline (exercises ``run_with_timeout``)."""
    time.sleep(seconds)
    return {"slept": seconds}
