"""The positional workflow schema (templates_app/generation/positional.py): every answer it allows loads.

No model here: instances are drawn at random from the schema itself (every anyOf branch, enum
value, list length and string length the grammar allows, strings from the pattern's characters),
so the property holds for whatever a model decodes under it, not for one lucky answer. The
local model's own answers are in tests/test_generate_local.py.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

import jsonschema
import pytest

from templates_app.generation import dry_run
from templates_app.generation.positional import positional_schema, step_id
from templates_app.generation.service import COMPLEXITY_STEPS, to_yaml
from templates_app.spec import load_spec

#: Callables that need no argument (the only ones positional python steps are offered).
CALLABLES = ["agents.testing.echo", "templates_app.builtin_tasks.list_subpackages"]
_CLASS = re.compile(r"^\^\[(?P<chars>[^\]]+)\]\{(?P<low>\d+),(?P<high>\d+)\}\$$")


def _chars(spec: str) -> list[str]:
    out, index = [], 0
    while index < len(spec):
        if index + 2 < len(spec) and spec[index + 1] == "-":
            out.extend(chr(c) for c in range(ord(spec[index]), ord(spec[index + 2]) + 1))
            index += 3
        else:
            out.append(spec[index])
            index += 1
    return out


def _string(pattern: str, rng: random.Random, longest: bool) -> str:
    """A string matching the schema's patterns: one bounded class, or a fixed prefix then classes."""
    whole = _CLASS.match(pattern)
    if whole:
        chars, low, high = _chars(whole["chars"]), int(whole["low"]), int(whole["high"])
        return "".join(rng.choice(chars) for _ in range(high if longest else rng.randint(low, high)))
    # the key and http patterns: literals, then classes with or without {m,n}
    text, rest = "", pattern[1:-1]
    for literal, chars, low, high in re.findall(r"([^\[]*)\[([^\]]+)\](?:\{(\d+),(\d+)\})?", rest):
        low, high = int(low or 1), int(high or 1)
        count = high if longest else rng.randint(low, high)
        text += literal + "".join(rng.choice(_chars(chars)) for _ in range(count))
    assert re.fullmatch(pattern[1:-1], text), (pattern, text)
    return text


def instance(schema: dict[str, Any], root: dict[str, Any], rng: random.Random, longest: bool = False) -> Any:
    """A random value valid against ``schema`` (the subset of JSON Schema positional.py uses);
    ``longest``: the longest value it allows (every string and list at its maximum)."""
    if "$ref" in schema:
        return instance(root["$defs"][schema["$ref"].split("/")[-1]], root, rng, longest)
    if "anyOf" in schema:
        branches = schema["anyOf"]
        if longest:
            return max((instance(b, root, rng, True) for b in branches), key=lambda v: len(json.dumps(v)))
        return instance(rng.choice(branches), root, rng, longest)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return max(schema["enum"], key=lambda v: len(json.dumps(v))) if longest else rng.choice(schema["enum"])
    if schema.get("type") == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return {
            name: instance(sub, root, rng, longest)
            for name, sub in props.items()
            if name in required or longest or rng.random() < 0.5
        }
    if schema.get("type") == "array":
        if "prefixItems" in schema:
            return [instance(item, root, rng, longest) for item in schema["prefixItems"]]
        high = schema.get("maxItems", 3)
        count = high if longest else rng.randint(schema.get("minItems", 0), high)
        return [instance(schema["items"], root, rng, longest) for _ in range(count)]
    if schema.get("type") == "string":
        return _string(schema["pattern"], rng, longest)
    raise AssertionError(f"instance(): schema not handled: {schema}")


def test_the_positional_schema_fixes_ids_and_allows_only_earlier_dependencies():
    schema = positional_schema(3, CALLABLES)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    good = {
        "key": "hello",
        "name": "Hello",
        "description": "",
        "variables": {},
        "steps": [
            {"id": "step_1", "name": "a", "type": "noop", "depends_on": [], "params": {}},
            {"id": "step_2", "name": "b", "type": "sleep", "depends_on": ["step_1"], "params": {"seconds": 5}},
        ],
    }
    assert not list(validator.iter_errors(good))

    def refused(path: tuple[Any, ...], value: Any) -> bool:
        answer = json.loads(json.dumps(good))
        target = answer
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
        return bool(list(validator.iter_errors(answer)))

    assert refused(("steps", 1, "depends_on"), ["step_2"])  # itself
    assert refused(("steps", 1, "depends_on"), ["step_3"])  # a later step: a cycle could follow
    assert refused(("steps", 0, "depends_on"), ["step_2"])
    assert refused(("steps", 1, "depends_on"), ["hello"])  # an unknown step
    assert refused(("steps", 1, "id"), "step_1")  # ids are positional
    assert refused(("steps", 0, "params"), {"output": "${steps.step_2.output}"})  # no expression
    assert refused(("steps", 0, "params"), {"output": "${who}"})
    assert refused(("steps", 1, "params"), {"seconds": -1})  # the grammar cannot bound numbers: enums
    assert refused(("steps", 1, "type"), "condition")
    assert refused(("variables",), {"who": {"type": "string"}})
    assert refused(("steps",), [])
    with pytest.raises(ValueError, match="max_steps: must be an integer from 1 to 50"):
        positional_schema(0, CALLABLES)
    with pytest.raises(ValueError, match="step_types: none of"):
        positional_schema(3, CALLABLES, step_types=["condition"])
    # python steps only when a callable is allowed
    assert "params_python" not in positional_schema(3, [])["$defs"]


@pytest.mark.django_db
@pytest.mark.parametrize("complexity", ["low", "medium", "high"])
def test_every_answer_the_positional_schema_allows_loads_and_dry_runs(complexity, tenants, settings):
    settings.ORCHESTRATOR_PYTHON_CALLABLES = CALLABLES
    schema = positional_schema(COMPLEXITY_STEPS[complexity], CALLABLES)
    validator = jsonschema.Draft202012Validator(schema)
    rng = random.Random(f"positional-{complexity}")
    answers = [instance(schema, schema, rng) for _ in range(40)] + [instance(schema, schema, rng, longest=True)]
    step_counts, types = set(), set()
    for answer in answers:
        assert not list(validator.iter_errors(answer)), answer
        spec = load_spec(to_yaml(answer), source="generated.yaml")  # raises on what the loader refuses
        report = dry_run(spec, "acme")
        assert report.ok, (report.errors, answer)
        step_counts.add(len(spec["steps"]))
        types |= {s["type"] for s in spec["steps"]}
        assert [s["id"] for s in spec["steps"]] == [step_id(k) for k in range(1, len(spec["steps"]) + 1)]
    assert max(step_counts) == COMPLEXITY_STEPS[complexity]
    assert types == {"exec", "http", "llm", "noop", "python", "sleep"}


def test_the_positional_schema_converts_to_a_llama_cpp_grammar():
    """llama.cpp answers a schema it cannot convert WITHOUT constraint (silently): keep it convertible."""
    grammar = pytest.importorskip("llama_cpp.llama_grammar", reason="pip install -r requirements-llm.txt")
    for complexity, steps in COMPLEXITY_STEPS.items():
        gbnf = grammar.json_schema_to_gbnf(json.dumps(positional_schema(steps, CALLABLES)))
        # one shared rule per step position, referenced by every tuple length
        assert "root ::=" in gbnf and gbnf.count(f"\nstep-{steps} ::=") == 1, complexity
        assert "${" not in gbnf
