"""Errors raised while loading, validating and evaluating workflow files.

Both are ``ValueError`` subclasses whose ``str()`` is always ONE line, so a management command can
print it as is (``CommandError(str(exc))``) and an API can return it in a JSON field.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

__all__ = ["ExpressionError", "TemplateNotFound", "WorkflowError", "did_you_mean", "one_line"]

_WHITESPACE = re.compile(r"\s+")
_MAX_MESSAGE = 1000


def one_line(text: object, limit: int = _MAX_MESSAGE) -> str:
    """``text`` as a single line: runs of whitespace (newlines included) become one space.

    Messages longer than ``limit`` characters are cut and end with an ellipsis.
    """
    line = _WHITESPACE.sub(" ", str(text)).strip()
    if len(line) > limit:
        line = line[: limit - 3].rstrip() + "..."
    return line


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``known`` to a misspelled ``name``, else ``""``.

    Closeness is difflib's ``get_close_matches`` ratio (at least 0.6, the best one only).
    """
    matches = difflib.get_close_matches(name, sorted(set(known)), n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


class WorkflowError(ValueError):
    """A workflow file (or the inputs of a run) is wrong.

    ``str(exc)`` is one line: ``"<source>: step '<id>': <problem>"``, where the source and step
    parts are present when known (``source`` is the file name or ``"<string>"``).

    Attributes:
        problem: the problem alone, without source and step.
        source: the file the problem was found in, or None.
        step: the id of the step concerned, or None.
    """

    def __init__(self, problem: object, *, source: str | None = None, step: str | None = None) -> None:
        self.problem = one_line(problem)
        self.source = source
        self.step = step
        parts = []
        if source:
            parts.append(one_line(source, 200))
        if step is not None:
            parts.append(f"step {one_line(step, 100)!r}")
        parts.append(self.problem)
        self.message = one_line(": ".join(parts))
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class ExpressionError(WorkflowError):
    """An expression cannot be parsed, refers to something undefined, or was refused by the sandbox.

    Raised by :mod:`templates_app.expressions` at compile time (syntax) and at evaluation time
    (undefined names, type errors, sandbox refusals). One line, like every WorkflowError.
    """


class TemplateNotFound(WorkflowError):
    """No template (or no such version) with that key in the tenant: a 404 in the API, exit code
    2 in the commands (it is a WorkflowError)."""
