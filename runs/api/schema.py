"""OpenAPI post-processing: the error answers every operation can give, documented once.

The API's shared machinery (runs/api/errors.py, authentication, tenancy, parsers, pagination)
answers the same errors on every path, so they are added here to each operation that lacks them
instead of being repeated on every view (a view's own description of a code wins):

- 400 ``{"detail", "errors"?}``: a body, query parameter or header that does not validate;
- 401: no or bad credentials; 403: a read-only role writing, or a user without a tenant;
- 404: not in this tenant, or an unknown ``X-Tenant``, or a stale pagination cursor;
- 409 (writes): the request conflicts with the current state (an idempotency key reused with
  another body, a run already finished);
- 413 / 415 (a body): too large / a content type the operation does not take;
- 414 (query parameters): a request line past the web server's limit;
- 503: the database cannot be reached (with ``Retry-After``).

Wired in as a drf-spectacular ``POSTPROCESSING_HOOKS`` entry (settings, issue 12 block).
"""

from __future__ import annotations

from typing import Any

ERROR_SCHEMA = {"$ref": "#/components/schemas/Error"}
WRITE_METHODS = {"post", "put", "patch", "delete"}

_DESCRIPTIONS = {
    "400": "Invalid request (detail says why).",
    "401": "No or bad credentials.",
    "403": "Read-only role, or no tenant.",
    "404": "Not found in this tenant (or unknown X-Tenant, or a stale cursor).",
    "409": "Conflicts with the current state (detail says why).",
    "413": "Request body too large.",
    "414": "Request line too long (the web server's limit).",
    "415": "Unsupported content type.",
    "503": "The database cannot be reached; retry after Retry-After seconds.",
}


def _codes_for(method: str, operation: dict[str, Any]) -> list[str]:
    parameters = operation.get("parameters", [])
    takes_input = "requestBody" in operation or any(
        p.get("in") == "query" or (p.get("in") == "header" and p.get("name") != "X-Tenant") for p in parameters
    )
    codes = ["401", "403", "404", "503"]
    if takes_input or method in WRITE_METHODS:
        codes.append("400")
    if any(p.get("in") == "query" for p in parameters):
        codes.append("414")
    if method in WRITE_METHODS:
        codes.append("409")
    if "requestBody" in operation:
        codes += ["413", "415"]
    return codes


def document_errors(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """drf-spectacular post-processing hook: adds the shared error responses to every operation."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault(
        "Error",
        {
            "type": "object",
            "properties": {"detail": {"type": "string"}, "errors": {}},
            "required": ["detail"],
        },
    )
    for operations in result.get("paths", {}).values():
        for method, operation in operations.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            for code in _codes_for(method, operation):
                if code not in responses:
                    responses[code] = {
                        "description": _DESCRIPTIONS[code],
                        "content": {"application/json": {"schema": ERROR_SCHEMA}},
                    }
    return result
