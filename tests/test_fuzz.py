"""Bad input, generated: workflow files and API bodies from Hypothesis (1,250 cases in all).

The property every case checks: a bad input is refused with a one-line ``WorkflowError`` (or a
4xx from the API) and nothing of it is saved; a good one loads into a spec that really is
valid (unique step ids, known dependencies, no cycle). Never another exception, never a 5xx.

Generated: arbitrary text and bytes (invalid UTF-8, NUL, BOM), spec-shaped documents with wrong
types and values everywhere, duplicate ids, dependency cycles, deep nesting, YAML alias bombs,
``!!python`` tags, self-referencing anchors, oversized files; variable values; API bodies as
JSON and as YAML with random content types and sizes. Derandomized (a fixed seed per test) so
CI sees the same cases every run.
"""

from __future__ import annotations

import json
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from templates_app.errors import WorkflowError
from templates_app.spec import load_spec, validate_inputs

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def fuzz(examples: int) -> settings:
    """FUZZ with this many cases."""
    return settings(FUZZ, max_examples=examples)


# --- strategies ----------------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["${x}", "${steps.a.output}", "${a.output", "{{ 7*7 }}", "${__import__('os')}", "1h", "-5s"]),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=15,
)
STEP_IDS = st.sampled_from(["a", "b", "c", "d"]) | st.text(max_size=6)
STEP_TYPES = st.sampled_from(
    ["noop", "http", "exec", "python", "llm", "ai", "data", "condition", "parallel", "sleep", "bogus", "NOOP", ""]
)
STEP = st.fixed_dictionaries(
    {"id": STEP_IDS | JSON_VALUES, "type": STEP_TYPES | JSON_VALUES},
    optional={
        "depends_on": st.lists(STEP_IDS, max_size=3) | STEP_IDS | JSON_VALUES,
        "params": JSON_VALUES,
        "parameters": JSON_VALUES,
        "retry": st.fixed_dictionaries({}, optional={"max_attempts": JSON_VALUES, "backoff": JSON_VALUES})
        | JSON_VALUES,
        "timeout": st.sampled_from(["30s", "1h30m", "0", "-1", "soon", 1e308]) | JSON_VALUES,
        "when": JSON_VALUES,
        "for_each": JSON_VALUES,
        "condition": JSON_VALUES,
        "on_success": st.lists(STEP_IDS, max_size=2) | JSON_VALUES,
        "trigger_rule": st.sampled_from(["all_success", "none_failed", "all_done", "sometimes"]) | JSON_VALUES,
        "call": JSON_VALUES,
        "unknown_key": JSON_VALUES,
    },
)
SPEC = st.fixed_dictionaries(
    {"key": st.sampled_from(["fuzz", "fuzz-2", "Bad Key", ""]) | JSON_VALUES, "steps": st.lists(STEP, max_size=5)},
    optional={
        "variables": st.dictionaries(STEP_IDS, JSON_VALUES, max_size=3) | JSON_VALUES,
        "defaults": JSON_VALUES,
        "timeout": JSON_VALUES,
        "outputs": JSON_VALUES,
        "trigger": JSON_VALUES,
        "version": JSON_VALUES,
        "workflow": JSON_VALUES,  # seed 002's dialect marker
        "id": JSON_VALUES,
    },
)


def check_loaded_or_refused(text: str | bytes) -> dict | None:
    """Load; a refusal must be one line; an accepted spec must really be valid."""
    try:
        spec = load_spec(text, source="fuzz.yaml")
    except WorkflowError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith("fuzz.yaml"), message
        assert "Traceback" not in message
        return None
    ids = [s["id"] for s in spec["steps"]]
    assert len(ids) == len(set(ids)), "duplicate step ids accepted"
    for step in spec["steps"]:
        assert set(step["depends_on"]) <= set(ids), "unknown dependency accepted"
    # no cycle: Kahn's algorithm consumes every step
    pending = {s["id"]: set(s["depends_on"]) for s in spec["steps"]}
    while pending:
        ready = [i for i, deps in pending.items() if not deps]
        assert ready, f"dependency cycle accepted: {sorted(pending)}"
        for i in ready:
            del pending[i]
        for deps in pending.values():
            deps.difference_update(ready)
    json.dumps(spec)  # what is stored must be JSON
    return spec


# --- workflow files --------------------------------------------------------------------------------


@fuzz(250)
@given(st.text(alphabet=string.printable + "\x00\ufeff\u2028é&*!|>-:[]{}", max_size=400))
def test_any_text_is_loaded_or_refused(text):
    check_loaded_or_refused(text)


@fuzz(100)
@given(st.binary(max_size=300))
def test_any_bytes_are_loaded_or_refused(raw):
    check_loaded_or_refused(raw)


@fuzz(300)
@given(SPEC, st.sampled_from(["yaml", "json"]))
def test_spec_shaped_documents_are_loaded_or_refused(doc, form):
    text = yaml.safe_dump(doc, allow_unicode=True) if form == "yaml" else json.dumps(doc)
    check_loaded_or_refused(text)


@fuzz(60)
@given(st.lists(st.sampled_from("abcdef"), min_size=2, max_size=6, unique=True), st.randoms(use_true_random=False))
def test_dependency_cycles_are_refused(ids, rnd):
    # a ring a -> b -> ... -> a, shuffled in the file
    order = list(ids)
    rnd.shuffle(order)
    deps = {ids[i]: [ids[i - 1]] for i in range(len(ids))}
    steps = [{"id": i, "type": "noop", "depends_on": deps[i]} for i in order]
    with pytest.raises(WorkflowError, match="cycle"):
        load_spec(yaml.safe_dump({"key": "ring", "steps": steps}), source="ring.yaml")


@fuzz(40)
@given(st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,8}", fullmatch=True), st.integers(min_value=2, max_value=4))
def test_duplicate_ids_are_refused(step_id, copies):
    steps = [{"id": step_id, "type": "noop"} for _ in range(copies)]
    with pytest.raises(WorkflowError, match="duplicate|already"):
        load_spec(yaml.safe_dump({"key": "dup", "steps": steps}), source="dup.yaml")


def alias_bomb(levels: int, width: int) -> str:
    """The "billion laughs": each level an anchor listing the previous one ``width`` times."""
    lines = ["x-anchors:", '  a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    lines.append(f"key: bomb\nsteps:\n  - id: x\n    type: noop\n    params: {{v: *a{levels}}}")
    return "\n".join(lines)


@fuzz(40)
@given(st.integers(min_value=2, max_value=12), st.integers(min_value=2, max_value=12))
def test_alias_bombs_are_refused_quickly(levels, width):
    from templates_app.spec import MAX_NODES

    text = alias_bomb(levels, width)
    if 2 * width**levels < MAX_NODES:
        check_loaded_or_refused(text)  # a modest expansion is an ordinary document
        return
    # stopped by the node budget while expanding, long before memory runs out
    with pytest.raises(WorkflowError, match="too large"):
        load_spec(text, source="bomb.yaml")


HOSTILE_YAML = [
    "!!python/object/apply:os.system ['touch /tmp/pwned']",
    "key: x\nsteps: !!python/object/apply:subprocess.check_output [['id']]",
    "key: !!python/name:os.system x\nsteps: []",
    "key: x\nsteps:\n  - !!python/object:agents.testing.Thing {id: a}",
    "a: &a [*a]\nkey: x\nsteps: *a",  # a self-referencing anchor
    "key: x\nsteps: &s\n  - id: a\n    type: noop\n    params: *s",
    "key: x\n<<: *undefined\nsteps: []",
    "[" * 5000 + "]" * 5000,
    "{a: " * 3000 + "1" + "}" * 3000,
    "key: x\nsteps:\n" + "  - id: s\n    type: noop\n" * 3,
    "\ufeffkey: bom\nsteps:\n  - id: a\n    type: noop\n",
    'key: x\nsteps:\n  - id: a\n    type: noop\n    params: {v: "\x00"}\n',
    "key: x\nsteps:\n  - {id: a, type: noop, depends_on: [a]}\n",
    "--- \nkey: x\nsteps: []\n--- \nkey: y\n",
    "key: x\nsteps:\n  - id: a\n    type: noop\n    timeout: 99999999999999999999999999h\n",
    "key: x\nsteps:\n  - id: a\n    type: noop\n    retry: {max_attempts: 1e9}\n",
    "key: x\nsteps:\n  - id: a\n    type: exec\n    params: {command: 'rm -rf /'}\n",
    "key: x\nsteps:\n  - id: a\n    type: noop\n    when: ${''.__class__.__mro__}\n",
]


@pytest.mark.parametrize("text", HOSTILE_YAML, ids=[f"hostile-{i}" for i in range(len(HOSTILE_YAML))])
def test_hostile_yaml_is_refused_or_harmless(text, tmp_path):
    spec = check_loaded_or_refused(text)
    if text.startswith("!!python") or "!!python" in text:
        assert spec is None  # safe loading: no Python object is ever built
    assert not (tmp_path / "pwned").exists()


def test_oversized_files_are_refused_before_parsing(settings):
    settings.ORCHESTRATOR_MAX_SPEC_BYTES = 10_000
    big = "key: big\nsteps:\n  - id: a\n    type: noop\n    params: {v: '" + "x" * 20_000 + "'}\n"
    for form in (big, big.encode()):
        with pytest.raises(WorkflowError, match="too large"):
            load_spec(form, source="big.yaml")


# --- variable values -------------------------------------------------------------------------------

TYPED = load_spec(
    "key: typed\nvariables:\n"
    "  s: {type: string, required: true}\n  i: {type: integer, default: 3}\n  n: {type: number}\n"
    "  b: {type: boolean}\n  o: {type: object}\n  a: {type: array}\n"
    "steps:\n  - id: only\n    type: noop\n",
    source="typed.yaml",
)


@fuzz(150)
@given(st.dictionaries(st.sampled_from(["s", "i", "n", "b", "o", "a", "zz", ""]), JSON_VALUES, max_size=6))
def test_variable_values_are_coerced_or_refused(values):
    try:
        result = validate_inputs(TYPED, values)
    except WorkflowError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(result["s"], str) and isinstance(result["i"], int)
    json.dumps(result)


@pytest.mark.django_db
@fuzz(60)
@given(st.dictionaries(st.sampled_from(["s", "i", "n", "b", "o", "a"]), JSON_VALUES, max_size=6))
def test_refused_run_inputs_save_nothing(values):
    from runs import engine
    from runs.models import Run, Step

    before = (Run.objects.count(), Step.objects.count())
    try:
        engine.start_run(TYPED, values)
    except WorkflowError:
        assert (Run.objects.count(), Step.objects.count()) == before
    else:
        assert Run.objects.count() == before[0] + 1


# --- API bodies ------------------------------------------------------------------------------------

CONTENT_TYPES = st.sampled_from(
    ["application/json", "application/yaml", "text/yaml", "text/plain", "application/x-www-form-urlencoded", ""]
)


def encode_body(value, content_type: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    if "json" in content_type:
        return json.dumps(value).encode()
    return yaml.safe_dump(value).encode()


BODIES = st.one_of(
    SPEC,
    st.fixed_dictionaries({"source": st.text(max_size=200) | JSON_VALUES}, optional={"filename": JSON_VALUES}),
    JSON_VALUES,
    st.binary(max_size=200),
    st.text(max_size=200),
)


@pytest.mark.django_db
@fuzz(120)
@given(body=BODIES, content_type=CONTENT_TYPES)
def test_template_bodies_never_break_the_api(owner_api, body, content_type):
    from templates_app.models import WorkflowTemplate

    before = WorkflowTemplate.objects.count()
    response = owner_api.generic("POST", "/api/v1/templates/", encode_body(body, content_type), content_type)
    assert response.status_code < 500, response.content[:300]
    if response.status_code >= 400:
        assert WorkflowTemplate.objects.count() == before  # nothing saved from a refused input


RUN_BODIES = st.fixed_dictionaries(
    {},
    optional={
        "template": st.sampled_from(["chain", "missing", ""]) | JSON_VALUES,
        "variables": st.fixed_dictionaries({}, optional={"n": JSON_VALUES, "greeting": JSON_VALUES}) | JSON_VALUES,
        "version": JSON_VALUES,
        "priority": JSON_VALUES,
        "correlation_id": JSON_VALUES,
        "idempotency_key": JSON_VALUES,
    },
)


@pytest.mark.django_db
@fuzz(120)
@given(body=RUN_BODIES | JSON_VALUES, content_type=st.sampled_from(["application/json", "text/plain", ""]))
def test_run_bodies_never_break_the_api(owner_api, chain_template, body, content_type):
    from runs.models import Run

    before = Run.objects.count()
    response = owner_api.generic("POST", "/api/v1/runs/", encode_body(body, content_type), content_type)
    assert response.status_code < 500, response.content[:300]
    if response.status_code >= 400:
        assert Run.objects.count() == before  # nothing saved from a refused input


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/api/v1/templates/", "/api/v1/runs/"])
def test_huge_api_bodies_are_refused(owner_api, chain_template, path):
    from runs.models import Run
    from templates_app.models import WorkflowTemplate

    before = (Run.objects.count(), WorkflowTemplate.objects.count())
    huge = json.dumps({"template": "chain", "variables": {"n": 1, "greeting": "x" * 12_000_000}})
    response = owner_api.generic("POST", path, huge, "application/json")
    assert 400 <= response.status_code < 500, response.status_code
    assert (Run.objects.count(), WorkflowTemplate.objects.count()) == before
