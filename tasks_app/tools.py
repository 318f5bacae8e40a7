"""The tools an agent task may use: stored workflow templates and configured agent endpoints.

A tool is described to the model as an OpenAI function (``{"type": "function", "function":
{"name", "description", "parameters"}}``):

- a workflow template, by key: its arguments are the template's variables, as a JSON Schema
  derived from their declarations (``type``, ``required``, ``default``, ``description``); a call
  starts the template as a child run of the task's tenant;
- an agent endpoint (:class:`tasks_app.models.AgentEndpoint`): its ``arguments_schema``; a call is
  an ``http`` request to its ``call`` path.

Everything is looked up in the task's tenant only; a name that is neither is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

#: Variable types of workflow files -> JSON Schema types.
_JSON_TYPES = {
    "string": "string",
    "integer": "integer",
    "number": "number",
    "boolean": "boolean",
    "object": "object",
    "array": "array",
}
#: OpenAI function names.
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class ToolError(ValueError):
    """A tool name or its arguments are not acceptable (one line, naming the tool)."""


@dataclass(frozen=True)
class Tool:
    """One granted tool. ``kind``: ``template`` or ``endpoint``; ``ref``: the template's pk or the
    endpoint's pk; ``version``: a hash of its definition (a change makes a replay refuse)."""

    name: str
    kind: str
    description: str
    parameters: dict[str, Any]
    ref: int
    expensive: bool
    version: str

    def openai(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description[:1000], "parameters": self.parameters},
        }

    def check_arguments(self, arguments: Any) -> None:
        """Raise ToolError when ``arguments`` do not validate against the tool's schema."""
        import jsonschema

        if not isinstance(arguments, dict):
            raise ToolError(f"tool '{self.name}': arguments must be an object")
        cls = jsonschema.validators.validator_for(self.parameters, default=jsonschema.Draft202012Validator)
        error = next(iter(sorted(cls(self.parameters).iter_errors(arguments), key=lambda e: list(e.path))), None)
        if error is not None:
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
            raise ToolError(f"tool '{self.name}': arguments{where}: {error.message}"[:500])


def variables_schema(variables: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema (object) of a template's variables: ``{name: {"type", "required",
    "default", "description"}}`` -> properties, required names, no other keys."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, decl in (variables or {}).items():
        decl = decl if isinstance(decl, dict) else {}
        prop: dict[str, Any] = {}
        if decl.get("type") in _JSON_TYPES:
            prop["type"] = _JSON_TYPES[decl["type"]]
        if decl.get("description"):
            prop["description"] = str(decl["description"])
        if "default" in decl and decl["default"] is not None:
            prop["default"] = decl["default"]
        properties[name] = prop
        if decl.get("required") and decl.get("default") is None:
            required.append(name)
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_tools(tenant_id: str, names: list[str]) -> dict[str, Tool]:
    """The granted tools by name, looked up in ``tenant_id``. Raises ToolError naming the first
    unknown name (a template key of the tenant, or one of its agent endpoints)."""
    from templates_app.models import WorkflowTemplate

    from .models import AgentEndpoint

    tools: dict[str, Tool] = {}
    for name in names:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"tools: {str(name)[:70]!r} is not a tool name (1-64 of a-z, A-Z, 0-9, _ and -)")
        if name in tools:
            continue
        endpoint = AgentEndpoint.objects.filter(tenant_id=tenant_id, name=name).first()
        if endpoint is not None:
            schema = endpoint.arguments_schema or {"type": "object"}
            tools[name] = Tool(
                name=name,
                kind="endpoint",
                description=endpoint.description or f"agent endpoint {endpoint.call}",
                parameters=schema,
                ref=endpoint.pk,
                expensive=endpoint.expensive,
                version=_hash([endpoint.call, endpoint.method, schema]),
            )
            continue
        template = (
            WorkflowTemplate.objects.filter(tenant_id=tenant_id, key=name, is_active=True).order_by("-version").first()
        )
        if template is None:
            raise ToolError(f"tools: no workflow template or agent endpoint named '{name}' in this tenant")
        tools[name] = Tool(
            name=name,
            kind="template",
            description=template.description or template.name or f"workflow {name}",
            parameters=variables_schema(template.variables),
            ref=template.pk,
            expensive=bool((template.spec or {}).get("expensive", False)),
            version=template.content_hash[:16] or str(template.version),
        )
    return tools
