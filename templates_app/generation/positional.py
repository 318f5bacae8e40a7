"""The positional workflow schema: what the loader would refuse, the schema itself rules out.

The full schema (:func:`templates_app.spec.json_schema`) describes shape only; which step a
``depends_on`` names, cycles and expressions are left to the loader. A small model decoding under
that schema writes valid JSON that the loader refuses (``depends_on`` naming steps that do not
exist, seen on SmolLM2-135M three rounds in a row). A llama.cpp server turns the schema into a
grammar, and a grammar can forbid those answers outright, so for ``llamacpp`` providers the
generator sends this one instead (``ORCHESTRATOR_GENERATE_LLAMACPP_SCHEMA``, default
``positional``):

- ``steps`` is one of n tuples (``prefixItems``, 1 to the complexity's cap) whose ids are fixed:
  ``step_1`` ... ``step_n`` in order.
- step k's ``depends_on`` is a list of ``step_1`` ... ``step_{k-1}`` (an ``enum``): no unknown
  step, no self-reference, no cycle is expressible. Repeats are allowed by the grammar and
  removed by the loader.
- each step is one variant per step type (``type`` a ``const``) with that type's params; the
  types are those a generated step can use without expressions or queues (``condition``,
  ``parallel`` and ``external`` are left out).
- strings that the loader reads as templates (every string in ``params``) are plain text of a
  bounded character set with no ``$``, so no expression can be wrong; numbers the grammar cannot
  bound (``sleep.seconds``, ``max_tokens``) are enums; ``variables`` is ``{}``; every string has a
  maximum length, so an answer always fits in ``max_tokens`` and is never cut short.

The price: no data flows between generated steps (no ``${steps.x.output}``), no conditions, no
loops. That is the right trade for a tiny model whose job is to prove the protocol; set the
setting to ``full`` for a capable model behind llama.cpp.

Only JSON Schema that llama.cpp's converter (``llama_cpp.llama_grammar.json_schema_to_gbnf``,
a port of llama.cpp's ``json_schema_to_grammar``) turns into a grammar is used: ``$defs``/``$ref``
(each definition becomes one shared rule, so the grammar grows with n, not n squared),
``prefixItems`` with ``items: false`` (an exact tuple), ``anyOf``, ``const``, ``enum``,
``maxItems``, and ``pattern`` made of character classes with ``{m,n}`` bounds (which is how every
string is bounded: the converter ignores ``maxLength`` next to a pattern, and ``minimum``,
``maximum`` and ``uniqueItems`` always, so none is relied on). jsonschema still validates the
answer against the same schema (draft 2020-12).

Size (measured, llama-cpp-python 0.3.36): the grammar of 3 / 8 / 20 steps (complexity low /
medium / high) is 45 / 100 / 275 kB, and the longest answer each allows is 1,363 / 3,348 / 9,288
characters of JSON (tests/test_generate_positional.py draws it); in SmolLM2's vocabulary that is
983 / 2,346 tokens when the strings are random characters, so ``max_tokens`` above that never
cuts an answer off. SmolLM2-135M's own answers at low complexity take 160 to 270 tokens.
"""

from __future__ import annotations

from typing import Any

#: Step types a positional step may have (each needs no expression, queue or branch).
POSITIONAL_TYPES = ("exec", "http", "llm", "noop", "python", "sleep")
#: Plain text: no ``$`` (so never an expression), no quote or backslash (so no escapes to get wrong).
TEXT_CHARS = "A-Za-z0-9 ,.:;!?'()_/=+-"
SLEEP_SECONDS = [1, 5, 10, 30, 60]
LLM_MAX_TOKENS = [64, 256, 1024]


def step_id(position: int) -> str:
    """The fixed id of the step at ``position`` (1-based): ``step_1``, ``step_2``..."""
    return f"step_{position}"


def _text(low: int, high: int) -> dict[str, Any]:
    return {"type": "string", "pattern": f"^[{TEXT_CHARS}]{{{low},{high}}}$"}


def params_definitions(callables: list[str]) -> dict[str, dict[str, Any]]:
    """``{"params_<type>": JSON Schema}`` for :data:`POSITIONAL_TYPES` (python only when
    ``callables`` is not empty: its ``callable`` is an enum of them)."""
    from orchestrator_site.conf import conf

    method = {"type": "string", "enum": ["GET", "POST", "PUT", "PATCH", "DELETE"]}
    max_tokens = [n for n in LLM_MAX_TOKENS if n <= int(conf.llm_max_tokens_cap)] or [1]
    defs: dict[str, dict[str, Any]] = {
        "params_http": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "method": method,
                        "url": {"type": "string", "pattern": "^https://[a-z0-9.-]{1,40}/[A-Za-z0-9._/-]{0,60}$"},
                    },
                    "required": ["method", "url"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {
                        "method": method,
                        "call": {"type": "string", "pattern": "^/[A-Za-z0-9._/-]{1,60}$"},
                    },
                    "required": ["method", "call"],
                    "additionalProperties": False,
                },
            ]
        },
        "params_llm": {
            "type": "object",
            "properties": {
                "prompt": _text(1, 200),
                "max_tokens": {"type": "integer", "enum": max_tokens},
            },
            "required": ["prompt", "max_tokens"],
            "additionalProperties": False,
        },
        "params_exec": {
            "type": "object",
            "properties": {
                "command": {
                    "type": "array",
                    "items": {"type": "string", "pattern": "^[A-Za-z0-9.,:=_/+-]{1,40}$"},
                    "minItems": 1,
                    "maxItems": 4,
                }
            },
            "required": ["command"],
            "additionalProperties": False,
        },
        "params_noop": {
            "type": "object",
            "properties": {"output": _text(0, 80)},
            "additionalProperties": False,
        },
        "params_sleep": {
            "type": "object",
            "properties": {"seconds": {"type": "integer", "enum": SLEEP_SECONDS}},
            "required": ["seconds"],
            "additionalProperties": False,
        },
    }
    if callables:
        defs["params_python"] = {
            "type": "object",
            "properties": {"callable": {"type": "string", "enum": list(callables)}},
            "required": ["callable"],
            "additionalProperties": False,
        }
    return defs


def _step(position: int, types: list[str]) -> dict[str, Any]:
    earlier = [step_id(k) for k in range(1, position)]
    depends_on: dict[str, Any] = (
        {"type": "array", "items": {"type": "string", "enum": earlier}, "maxItems": len(earlier)}
        if earlier
        else {"type": "array", "const": []}  # an array schema with no items would be any array to llama.cpp
    )
    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "const": step_id(position)},
                    "name": _text(1, 40),
                    "type": {"type": "string", "const": name},
                    "depends_on": depends_on,
                    "params": {"$ref": f"#/$defs/params_{name}"},
                },
                "required": ["id", "name", "type", "depends_on", "params"],
                "additionalProperties": False,
            }
            for name in types
        ]
    }


def positional_schema(max_steps: int, callables: list[str], step_types: list[str] | None = None) -> dict[str, Any]:
    """The workflow JSON Schema (draft 2020-12) for schema-constrained decoding; see the module docstring.

    ``max_steps``: the most steps (1 to 50; the complexity's cap). ``callables``: the python
    callables allowed (``ORCHESTRATOR_PYTHON_CALLABLES``); ``step_types``: the registered types
    (default: all of :data:`POSITIONAL_TYPES`), of which only :data:`POSITIONAL_TYPES` are used.
    A loaded answer is also an instance of the full schema's format: the canonical keys only.

    Raises ValueError when ``max_steps`` is out of range or no step type is left.
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or not 1 <= max_steps <= 50:
        raise ValueError(f"max_steps: must be an integer from 1 to 50, got {max_steps!r}")
    defs = params_definitions(callables)
    allowed = set(step_types) if step_types is not None else set(POSITIONAL_TYPES)
    types = [t for t in POSITIONAL_TYPES if t in allowed and f"params_{t}" in defs]
    if not types:
        raise ValueError(f"step_types: none of {', '.join(POSITIONAL_TYPES)} is available")
    defs = {name: schema for name, schema in defs.items() if name.removeprefix("params_") in types}
    for position in range(1, max_steps + 1):
        defs[step_id(position)] = _step(position, types)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "workflow",
        "$defs": defs,
        "type": "object",
        "properties": {
            "key": {"type": "string", "pattern": "^[a-z][a-z0-9-]{0,39}$"},
            "name": _text(1, 60),
            "description": _text(0, 120),
            "variables": {"type": "object", "additionalProperties": False},
            "steps": {
                "anyOf": [
                    {
                        "type": "array",
                        "prefixItems": [{"$ref": f"#/$defs/{step_id(k)}"} for k in range(1, count + 1)],
                        "items": False,
                        "minItems": count,
                    }
                    for count in range(1, max_steps + 1)
                ]
            },
        },
        "required": ["key", "name", "description", "variables", "steps"],
        "additionalProperties": False,
    }
