"""The project callable of examples/release-notes.yaml (the README's complete example).

``python`` steps may call only allow-listed callables: run the example with
``ORCHESTRATOR_PYTHON_CALLABLES=examples.release_notes.filter_by_label``.
"""

from __future__ import annotations

from typing import Any


def filter_by_label(changes: list[dict[str, Any]] | None, label: str) -> list[dict[str, Any]]:
    """The merged changes (dicts with a ``labels`` list) that carry ``label``, in their order."""
    return [change for change in changes or [] if label in (change.get("labels") or [])]
