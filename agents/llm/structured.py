"""Structured output: how a JSON Schema is asked for, and how the answer is checked.

Request (``response_format``):

- OpenAI-compatible providers: ``{"type": "json_schema", "json_schema": {"name": <name>,
  "schema": <schema>, "strict": true}}`` (OpenAI "Structured Outputs").
- llama.cpp servers (kind ``llamacpp``): ``{"type": "json_object", "schema": <schema>}``, which
  llama-cpp-python's server turns into a grammar that constrains decoding.

Answer: parsed as JSON (a fenced ```json block is accepted), then validated with ``jsonschema``
(the schema's own draft, Draft 2020-12 when it names none). Failures raise
:class:`agents.llm.errors.LLMSchemaError` with one line per problem.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError

from .errors import LLMSchemaError

__all__ = ["check_schema", "parse_and_validate", "response_format"]

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?\s*```$", re.S)

#: Problems listed in an LLMSchemaError at most.
MAX_ERRORS = 20


def check_schema(schema: dict[str, Any], name: str) -> None:
    """Raise ValueError when ``schema`` is not a valid JSON Schema or ``name`` is not a valid name."""
    if not isinstance(schema, dict):
        raise ValueError("schema must be a JSON Schema object (a dict)")
    if not _NAME.match(name):
        raise ValueError("schema_name must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -")
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"schema is not a valid JSON Schema: {exc.message}") from None


def response_format(schema: dict[str, Any], name: str, kind: str) -> dict[str, Any]:
    """The ``response_format`` asking ``kind``'s provider for JSON valid against ``schema``."""
    if kind == "llamacpp":
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _path(error: jsonschema.ValidationError) -> str:
    path = "$"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def parse_and_validate(content: str, schema: dict[str, Any]) -> Any:
    """Parse ``content`` as JSON and validate it against ``schema``; return the value.

    Raises:
        LLMSchemaError: not JSON (one error naming line and column) or not valid (one line per
            problem, ``"$.steps[0].id: 5 is not of type 'string'"``, at most MAX_ERRORS).
    """
    text = (content or "").strip()
    match = _FENCE.match(text)
    if match:
        text = match.group(1).strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        problem = f"answer is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise LLMSchemaError(problem, content=content, errors=[problem]) from None
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    errors = sorted(cls(schema).iter_errors(value), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{_path(e)}: {e.message}"[:500] for e in errors[:MAX_ERRORS]]
        more = f" (and {len(errors) - MAX_ERRORS} more)" if len(errors) > MAX_ERRORS else ""
        raise LLMSchemaError(
            f"answer does not match the schema: {lines[0]}{more}"
            if len(lines) == 1
            else f"answer does not match the schema: {len(errors)} problems, first {lines[0]}",
            content=content,
            errors=lines,
        )
    return value
