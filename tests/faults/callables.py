"""Python step callables for the fault tests (allow-listed for the fault workers only)."""

from __future__ import annotations

import os


def hard_exit(code: int = 3) -> None:
    """End the worker process at once, as a crashing extension would: no cleanup, no exception."""
    os._exit(code)
