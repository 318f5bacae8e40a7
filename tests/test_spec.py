"""Workflow files: loading, the three dialects, normalization, validation, inputs (no database)."""

from __future__ import annotations

import json

import pytest

from templates_app import spec as spec_module
from templates_app.durations import parse_duration
from templates_app.errors import WorkflowError
from templates_app.spec import load_spec, load_spec_file, validate_inputs
from tests.conftest import EXAMPLES

# --------------------------------------------------------------------------------------------
# A registry of step types that does not depend on the real handlers' rules
# --------------------------------------------------------------------------------------------


class FakeHandler:
    def __init__(self, name: str) -> None:
        self.name = name

    def validate_params(self, params):
        if not isinstance(params, dict):
            raise ValueError("params must be a mapping")
        if "bad" in params:
            raise ValueError(f"bad is not a {self.name} parameter")


class FakeRegistry:
    TYPES = {
        "http": ("data",),
        "llm": ("ai",),
        "exec": (),
        "python": (),
        "noop": (),
        "sleep": (),
        "condition": (),
        "parallel": (),
    }

    def canonical_type(self, name):
        key = name.strip().lower()
        for canonical, aliases in self.TYPES.items():
            if key == canonical or key in aliases:
                return canonical
        raise KeyError(name)

    def get_handler(self, type_name):
        return FakeHandler(self.canonical_type(type_name))

    def handler_types(self):
        return set(self.TYPES)


@pytest.fixture(autouse=True)
def fake_registry(monkeypatch):
    registry = FakeRegistry()
    monkeypatch.setattr(spec_module, "_registry", lambda: registry)
    return registry


@pytest.fixture
def real_registry(monkeypatch, fake_registry):
    """Undo the fake: load through ``agents.registry`` and the real handlers."""

    def real():
        from agents import registry

        return registry

    monkeypatch.setattr(spec_module, "_registry", real)


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and message.strip() == message and message
    return message


def load_error(text: str, source: str = "bad.yaml") -> str:
    with pytest.raises(WorkflowError) as info:
        load_spec(text, source=source)
    message = one_line(info.value)
    assert message.startswith(f"{source}: "), message
    return message


def by_id(spec):
    return {step["id"]: step for step in spec["steps"]}


# --------------------------------------------------------------------------------------------
# The canonical format (docs/spec-contract.md)
# --------------------------------------------------------------------------------------------

CANONICAL = """
key: package-audit
version: 1
name: Package audit
description: Audits packages
category: maintenance
timeout: 10m
variables:
  report_path: {type: string, required: true}
  batch_size:  {type: integer, default: 40}
defaults:
  retry: {max_attempts: 3, backoff: exponential, initial_delay: 1s, max_delay: 30s, jitter: true}
  timeout: 60s
trigger:
  type: cron_or_event
  cron: "0 7 * * *"
  event_types: [a, b]
outputs:
  report: ${steps.write.output.path}
steps:
  - id: list
    name: List
    type: python
    params: {callable: pkg.list, kwargs: {batch_size: "${batch_size}"}}
  - id: fetch
    name: Fetch
    type: http
    parameters: {url: "https://example.org/${steps.list.output.name}", method: GET}
    depends_on: list
    retry_policy: {max_retries: 4, backoff_type: linear, initial_delay: 2}
    timeout: 30s
    when: ${steps.list.output.count > 0}
  - id: inspect
    type: exec
    depends_on: [fetch]
    for_each: ${steps.list.output.items}
    as: pkg
    params: {command: [inspect, "${pkg}", "${index}"]}
    timeout: 1h30m
  - id: aggregate
    type: noop
    depends_on: [inspect]
    trigger_rule: all_done
    params: {output: "${steps.inspect.output}"}
  - id: check
    type: condition
    depends_on: [aggregate]
    condition: ${steps.aggregate.output.copyleft_count > 0}
    on_success: [flag]
    on_failure: [no_flag]
  - id: flag
    type: llm
    params: {prompt: "Flag ${steps.aggregate.output.copyleft}"}
  - id: no_flag
    type: noop
  - id: fan
    type: parallel
    depends_on: [aggregate]
    params: {tasks: [{type: noop, params: {}}, {id: b, type: sleep, params: {seconds: 1}, timeout: 5s}]}
  - id: write
    type: python
    depends_on: [flag, no_flag, fan]
    trigger_rule: none_failed
    params: {callable: pkg.write, kwargs: {path: "${report_path}", run: "${run.id}"}}
"""


def test_canonical_example_normalizes_to_the_contract_shape():
    spec = load_spec(CANONICAL, source="package-audit.yaml")
    assert json.loads(json.dumps(spec)) == spec  # stored as JSON on the template and the run
    assert list(spec) == [
        "key",
        "label",
        "name",
        "description",
        "category",
        "dialect",
        "timeout",
        "variables",
        "trigger",
        "outputs",
        "steps",
    ]
    assert spec["key"] == "package-audit"
    assert spec["label"] == "1"
    assert spec["name"] == "Package audit"
    assert spec["description"] == "Audits packages"
    assert spec["category"] == "maintenance"
    assert spec["dialect"] == "canonical"
    assert spec["timeout"] == 600.0
    assert spec["variables"] == {
        "report_path": {"type": "string", "required": True, "description": ""},
        "batch_size": {"type": "integer", "required": False, "description": "", "default": 40},
    }
    assert spec["trigger"] == {
        "type": "cron_or_event",
        "cron": "0 7 * * *",
        "event_types": ["a", "b"],
        "interval": None,
    }
    assert spec["outputs"] == {"report": "${steps.write.output.path}"}
    assert [s["id"] for s in spec["steps"]] == [
        "list",
        "fetch",
        "inspect",
        "aggregate",
        "check",
        "flag",
        "no_flag",
        "fan",
        "write",
    ]
    steps = by_id(spec)
    for step in spec["steps"]:
        assert list(step) == [
            "id",
            "name",
            "type",
            "params",
            "depends_on",
            "retry",
            "timeout",
            "when",
            "trigger_rule",
            "for_each",
            "as",
            "condition",
            "on_success",
            "on_failure",
            "branch_of",
            "refs",
        ]

    assert steps["list"] == {
        "id": "list",
        "name": "List",
        "type": "python",
        "params": {"callable": "pkg.list", "kwargs": {"batch_size": "${batch_size}"}},
        "depends_on": [],
        "retry": {"max_attempts": 3, "backoff": "exponential", "initial_delay": 1.0, "max_delay": 30.0, "jitter": True},
        "timeout": 60.0,
        "when": None,
        "trigger_rule": "all_success",
        "for_each": None,
        "as": "item",
        "condition": None,
        "on_success": [],
        "on_failure": [],
        "branch_of": None,
        "refs": [],
    }
    fetch = steps["fetch"]
    assert fetch["params"] == {"url": "https://example.org/${steps.list.output.name}", "method": "GET"}
    assert fetch["depends_on"] == ["list"]  # a single string is a list of one
    # retry_policy (seed 002 keys) merged key by key over defaults.retry
    assert fetch["retry"] == {
        "max_attempts": 5,
        "backoff": "linear",
        "initial_delay": 2.0,
        "max_delay": 30.0,
        "jitter": True,
    }
    assert fetch["timeout"] == 30.0
    assert fetch["when"] == "${steps.list.output.count > 0}"
    assert fetch["refs"] == ["list"]

    inspect = steps["inspect"]
    assert inspect["for_each"] == "${steps.list.output.items}"
    assert inspect["as"] == "pkg"
    assert inspect["timeout"] == 5400.0
    assert inspect["refs"] == ["list"]  # upstream through fetch

    assert steps["aggregate"]["trigger_rule"] == "all_done"
    check = steps["check"]
    assert check["condition"] == "${steps.aggregate.output.copyleft_count > 0}"
    assert check["on_success"] == ["flag"] and check["on_failure"] == ["no_flag"]
    assert check["refs"] == ["aggregate"]
    assert steps["flag"]["branch_of"] == {"step": "check", "when": True}
    assert steps["flag"]["depends_on"] == ["check"]
    assert steps["flag"]["refs"] == ["aggregate"]
    assert steps["no_flag"]["branch_of"] == {"step": "check", "when": False}
    assert steps["no_flag"]["depends_on"] == ["check"]
    assert steps["no_flag"]["params"] == {}

    retry = steps["list"]["retry"]
    assert steps["fan"]["params"] == {
        "tasks": [
            {"id": "0", "name": "0", "type": "noop", "params": {}, "retry": retry, "timeout": 60.0},
            {"id": "b", "name": "b", "type": "sleep", "params": {"seconds": 1}, "retry": retry, "timeout": 5.0},
        ]
    }
    write = steps["write"]
    assert write["trigger_rule"] == "none_failed"
    assert write["refs"] == []  # ${report_path} and ${run.id} are not steps


def test_minimal_canonical_file_gets_defaults(settings):
    settings.ORCHESTRATOR_DEFAULT_MAX_ATTEMPTS = 7
    settings.ORCHESTRATOR_DEFAULT_STEP_TIMEOUT = 42.0
    spec = load_spec("key: tiny\nsteps:\n  - {id: a, type: noop}\n")
    assert spec["label"] is None
    assert spec["name"] == "tiny"
    assert spec["description"] == "" and spec["category"] == ""
    assert spec["timeout"] is None
    assert spec["variables"] == {}
    assert spec["outputs"] is None
    assert spec["trigger"] == {"type": "manual", "cron": None, "event_types": [], "interval": None}
    (step,) = spec["steps"]
    assert step["name"] == "a"
    assert step["retry"] == {
        "max_attempts": 7,
        "backoff": "exponential",
        "initial_delay": 1.0,
        "max_delay": 60.0,
        "jitter": True,
    }
    assert step["timeout"] == 42.0


def test_settings_fallbacks_without_settings(monkeypatch):
    monkeypatch.setattr(spec_module, "_setting", lambda name, fallback: fallback)
    (step,) = load_spec("key: tiny\nsteps: [{id: a, type: noop}]")["steps"]
    assert step["retry"]["max_attempts"] == 3
    assert step["timeout"] == 300.0


def test_defaults_merge_into_steps_step_wins():
    spec = load_spec(
        """
key: merge
defaults:
  retry: {max_attempts: 5, initial_delay: 2s}
  timeout_ms: 1500
  trigger_rule: none_failed
steps:
  - {id: a, type: noop}
  - {id: b, type: noop, retry: {max_attempts: 1}, timeout: 3, trigger_rule: all_success}
  - {id: c, type: noop, retry_policy: {max_retries: 0, max_delay: 1m}}
"""
    )
    a, b, c = spec["steps"]
    assert a["retry"] == {
        "max_attempts": 5,
        "backoff": "exponential",
        "initial_delay": 2.0,
        "max_delay": 60.0,
        "jitter": True,
    }
    assert a["timeout"] == 1.5 and a["trigger_rule"] == "none_failed"
    assert b["retry"]["max_attempts"] == 1 and b["retry"]["initial_delay"] == 2.0
    assert b["timeout"] == 3.0 and b["trigger_rule"] == "all_success"
    assert c["retry"]["max_attempts"] == 1 and c["retry"]["max_delay"] == 60.0 and c["retry"]["initial_delay"] == 2.0


def test_variables_list_form_and_shorthand():
    spec = load_spec(
        """
key: vars
variables:
  - name: a
    type: int
    default: 3
  - name: b
    type: bool
  - {name: c, type: array, default: [1, 2], description: items}
  - {name: d, type: object, default: {x: 1}}
  - {name: e, type: number, default: 2}
  - {name: f, type: any, default: null}
steps: [{id: s, type: noop, params: {x: "${a} ${b} ${c} ${d} ${e} ${f}"}}]
"""
    )
    assert spec["variables"] == {
        "a": {"type": "integer", "required": False, "description": "", "default": 3},
        "b": {"type": "boolean", "required": False, "description": ""},
        "c": {"type": "array", "required": False, "description": "items", "default": [1, 2]},
        "d": {"type": "object", "required": False, "description": "", "default": {"x": 1}},
        "e": {"type": "number", "required": False, "description": "", "default": 2},
        "f": {"type": "any", "required": False, "description": "", "default": None},
    }
    shorthand = load_spec("key: v\nvariables: {n: 40, s: hi, flag: false, plain: null}\nsteps: [{id: a, type: noop}]")
    assert shorthand["variables"] == {
        "n": {"type": "integer", "required": False, "description": "", "default": 40},
        "s": {"type": "string", "required": False, "description": "", "default": "hi"},
        "flag": {"type": "boolean", "required": False, "description": "", "default": False},
        "plain": {"type": "string", "required": False, "description": ""},
    }


def test_trigger_forms():
    def trigger(text):
        return load_spec(f"key: t\ntrigger: {text}\nsteps: [{{id: a, type: noop}}]")["trigger"]

    assert trigger('{cron: "*/5 * * * *"}') == {
        "type": "cron",
        "cron": "*/5 * * * *",
        "event_types": [],
        "interval": None,
    }
    assert trigger("{event_types: ping}") == {"type": "event", "cron": None, "event_types": ["ping"], "interval": None}
    assert trigger("{interval: 30s}") == {"type": "interval", "cron": None, "event_types": [], "interval": 30.0}
    assert trigger("manual")["type"] == "manual"


def test_metadata_and_extension_keys_are_accepted_at_the_top():
    spec = load_spec("key: m\ntags: [a]\nauthor: me\nx-team: ops\nsteps: [{id: a, type: noop}]")
    assert "tags" not in spec and spec["key"] == "m"


def test_step_ids_with_dashes_use_subscripts():
    spec = load_spec(
        """
key: dash
steps:
  - {id: my-step, type: noop}
  - {id: b, type: noop, depends_on: [my-step], params: {x: "${steps['my-step'].output}"}}
"""
    )
    assert by_id(spec)["b"]["refs"] == ["my-step"]
    message = load_error(
        """
key: dash
steps:
  - {id: my-step, type: noop}
  - {id: b, type: noop, depends_on: [my-step], params: {x: "${steps.my-step.output}"}}
"""
    )
    assert "steps['my-step']" in message


def test_for_each_list_and_loop_names():
    spec = load_spec(
        """
key: loop
variables: {extra: {type: string, default: z}}
steps:
  - id: a
    type: noop
    for_each: [x, y, "${extra}"]
    params: {output: "${item}-${index}"}
"""
    )
    (step,) = spec["steps"]
    assert step["for_each"] == ["x", "y", "${extra}"]
    assert step["as"] == "item"


# --------------------------------------------------------------------------------------------
# Seed 004 (copied exactly as printed in the seed)
# --------------------------------------------------------------------------------------------

DAILY_INSTRUCTOR_V1 = (EXAMPLES / "seed004" / "daily_instructor_v1.yml").read_text()
WEEKLY_SEED_V1 = (EXAMPLES / "seed004" / "weekly_seed_v1.yml").read_text()


def test_seed004_daily_instructor():
    spec = load_spec(DAILY_INSTRUCTOR_V1, source="daily_instructor_v1.yml")
    assert spec["dialect"] == "seed004"
    assert spec["key"] == "daily_instructor_v1"
    assert spec["name"] == "daily_instructor_v1"
    assert spec["trigger"] == {
        "type": "cron_or_event",
        "cron": "0 7 * * *",
        "event_types": ["streak_ping", "user_start_day"],
        "interval": None,
    }
    steps = by_id(spec)
    assert [s["id"] for s in spec["steps"]] == ["gather_signals", "create_plan", "notify"]
    assert all(s["type"] == "http" for s in spec["steps"])
    assert steps["gather_signals"]["params"] == {"call": "/functions/v1/agent-proxy/snapshot", "method": "GET"}
    assert steps["gather_signals"]["timeout"] == 8.0
    assert steps["gather_signals"]["depends_on"] == []
    assert steps["create_plan"]["params"] == {"call": "/functions/v1/agent-proxy/instructor/daily", "method": "POST"}
    assert steps["create_plan"]["depends_on"] == ["gather_signals"]
    assert steps["create_plan"]["timeout"] == 300.0  # ORCHESTRATOR_DEFAULT_STEP_TIMEOUT
    assert steps["notify"]["depends_on"] == ["create_plan"]


def test_seed004_weekly_seed():
    spec = load_spec(WEEKLY_SEED_V1, source="weekly_seed_v1.yml")
    assert spec["dialect"] == "seed004"
    assert spec["trigger"] == {"type": "cron", "cron": "0 18 * * SUN", "event_types": [], "interval": None}
    steps = by_id(spec)
    assert steps["clo_begin_week"]["params"] == {"call": "/functions/v1/agent-proxy/clo/begin-week", "method": "POST"}
    assert steps["ta_generate_week"]["depends_on"] == ["clo_begin_week"]
    assert steps["socratic_seed"]["depends_on"] == ["clo_begin_week"]
    assert steps["brand_ingest"]["depends_on"] == ["ta_generate_week", "socratic_seed"]
    assert all(s["type"] == "http" and s["params"]["method"] == "POST" for s in spec["steps"])


def test_seed004_bytes_input():
    spec = load_spec(WEEKLY_SEED_V1.encode(), source="weekly_seed_v1.yml")
    assert spec["key"] == "weekly_seed_v1"


# --------------------------------------------------------------------------------------------
# Seed 002 (the template structure copied exactly as printed, trailing spaces included)
# --------------------------------------------------------------------------------------------

SEED002_TEMPLATE = (
    """id: my-workflow
name: My Custom Workflow
description: Description of what this workflow does
category: data-science
version: "1.0"
variables:
  - name: input_param
    type: string
    description: Parameter description
    required: true
    default: "default_value"

workflow:
  id: my-workflow-execution
  name: My Workflow Execution
  timeout: 3600
  variables:
    input_param: ${input_param}
<2 spaces>
  tasks:
    - id: task1
      name: First Task
      type: data
      parameters:
        operation: traverse
        query:
          cypher: "MATCH (n) RETURN n LIMIT ${input_param}"
      retry_policy:
        max_retries: 2
        backoff_type: exponential
        initial_delay: 1s
      timeout: 60
<6 spaces>
    - id: task2
      name: Second Task<2 spaces>
      type: ai
      depends_on: ["task1"]
      parameters:
        provider: anthropic
        prompt: "Analyze this data: ${task1.output}"
        response_format: json
      timeout: 120
"""
    # the seed's lines carry trailing spaces; spelled out so that editors and linters keep them
    .replace("<2 spaces>", "  ").replace("<6 spaces>", "      ")
)


def test_seed002_template_structure():
    spec = load_spec(SEED002_TEMPLATE, source="my-workflow.yaml")
    assert spec["dialect"] == "seed002"
    assert spec["key"] == "my-workflow"
    assert spec["label"] == "1.0"
    assert spec["name"] == "My Custom Workflow"
    assert spec["description"] == "Description of what this workflow does"
    assert spec["category"] == "data-science"
    assert spec["timeout"] == 3600.0
    # workflow.variables `input_param: ${input_param}` is the identity: nothing computed
    assert spec["variables"] == {
        "input_param": {
            "type": "string",
            "required": True,
            "description": "Parameter description",
            "default": "default_value",
        }
    }
    task1, task2 = spec["steps"]
    assert task1["id"] == "task1" and task1["name"] == "First Task"
    assert task1["type"] == "http"  # type: data
    assert task1["params"] == {
        "operation": "traverse",
        "query": {"cypher": "MATCH (n) RETURN n LIMIT ${input_param}"},
    }
    assert task1["retry"] == {
        "max_attempts": 3,  # max_retries + 1
        "backoff": "exponential",
        "initial_delay": 1.0,
        "max_delay": 60.0,
        "jitter": True,
    }
    assert task1["timeout"] == 60.0
    assert task1["refs"] == []
    assert task2["name"] == "Second Task"
    assert task2["type"] == "llm"  # type: ai
    assert task2["depends_on"] == ["task1"]
    assert task2["params"] == {
        "provider": "anthropic",
        "prompt": "Analyze this data: ${task1.output}",
        "response_format": "json",
    }
    assert task2["timeout"] == 120.0
    assert task2["refs"] == ["task1"]  # ${task1.output}: a bare step id
    assert validate_inputs(spec, {}) == {"input_param": "default_value"}


SEED002_TASK_TYPES = """
id: task-types
variables:
  - {name: data_quality_score, type: number, default: 0.9}
workflow:
  timeout: 600
  tasks:
    - id: graph_query
      type: data
      parameters:
        operation: traverse
        query:
          cypher: "MATCH (n)-[r]-(m) RETURN n,r,m LIMIT 100"
        enrich: ["metadata"]
    - id: ai_analysis
      type: ai
      parameters:
        provider: anthropic
        prompt: "Analyze this data and identify patterns"
        model: claude-3-sonnet
        response_format: json
        max_tokens: 2000
    - id: data_processing
      type: exec
      parameters:
        image: "python:3.9-slim"
        command: ["python", "/workspace/input/process.py"]
        files:
          - name: process.py
            content: |
              import json
              # Processing logic here
    - id: parallel_processing
      type: parallel
      parameters:
        tasks:
          - type: data
            parameters:
              operation: search
          - type: ai
            parameters:
              prompt: "Generate summary"
    - id: quality_check
      type: condition
      condition: "${data_quality_score > 0.8}"
      on_success: ["publish_results"]
      on_failure: ["retry_processing"]
    - id: publish_results
      type: data
      parameters: {operation: publish}
    - id: retry_processing
      type: exec
      parameters: {command: [retry]}
"""


def test_seed002_task_type_examples():
    spec = load_spec(SEED002_TASK_TYPES, source="task-types.yaml")
    steps = by_id(spec)
    assert spec["dialect"] == "seed002"
    assert steps["graph_query"]["type"] == "http"
    assert steps["ai_analysis"]["type"] == "llm"
    assert steps["data_processing"]["params"]["files"][0]["content"] == "import json\n# Processing logic here\n"
    tasks = steps["parallel_processing"]["params"]["tasks"]
    assert [(t["id"], t["type"], t["params"]) for t in tasks] == [
        ("0", "http", {"operation": "search"}),
        ("1", "llm", {"prompt": "Generate summary"}),
    ]
    assert steps["quality_check"]["condition"] == "${data_quality_score > 0.8}"
    assert steps["publish_results"]["branch_of"] == {"step": "quality_check", "when": True}
    assert steps["retry_processing"]["branch_of"] == {"step": "quality_check", "when": False}
    assert steps["retry_processing"]["depends_on"] == ["quality_check"]


def test_seed002_computed_workflow_variables():
    spec = load_spec(
        """
id: computed
variables:
  - {name: limit, type: integer, default: 5}
workflow:
  variables:
    limit: ${limit}
    doubled: ${limit * 2}
    label: "limit=${limit}"
  tasks:
    - {id: a, type: noop, parameters: {x: "${doubled}"}}
"""
    )
    assert spec["variables"]["doubled"] == {
        "type": "any",
        "required": False,
        "description": "",
        "expr": "${limit * 2}",
    }
    assert validate_inputs(spec, {"limit": "7"}) == {"limit": 7, "doubled": 14, "label": "limit=7"}
    with pytest.raises(WorkflowError) as info:
        validate_inputs(spec, {"doubled": 1})
    assert "computed" in one_line(info.value)


# --------------------------------------------------------------------------------------------
# Files that are wrong: one line naming the file, the step and the problem
# --------------------------------------------------------------------------------------------

OK_STEP = "  - {id: a, type: noop}\n"


@pytest.mark.parametrize(
    "text, step, fragments",
    [
        # YAML and document shape
        ("key: x\nsteps:\n  - id: a\n   type: noop\n", None, ["line 4", "YAML syntax error"]),
        ("key: [unclosed\n", None, ["YAML syntax error"]),
        ("key: x\nkey: y\nsteps: []\n", None, ["line 2", "duplicate key 'key'"]),
        ("- a\n- b\n", None, ["document must be a mapping"]),
        ("", None, ["document is empty"]),
        ("# only a comment\n", None, ["document is empty"]),
        ("!!python/object/apply:os.system ['echo pwned']\n", None, ["YAML syntax error", "python/object/apply"]),
        ("key: !!python/name:os.system\nsteps: []\n", None, ["YAML syntax error"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, params: {x: !!binary aGVsbG8=}}\n", None, ["binary"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, params: {x: .nan}}\n", None, ["nan"]),
        # top level
        ("steps:\n" + OK_STEP, None, ["missing 'key'"]),
        ("key: Bad_Key\nsteps:\n" + OK_STEP, None, ["invalid 'key'"]),
        ("key: x\n", None, ["no steps"]),
        ("key: x\nsteps: []\n", None, ["no steps"]),
        ("key: x\nsteps: {a: 1}\n", None, ["must be a list"]),
        ("key: x\nstep:\n" + OK_STEP, None, ["unknown key 'step'", "did you mean 'steps'"]),
        ("key: x\ndefualts: {}\nsteps:\n" + OK_STEP, None, ["unknown key 'defualts'", "did you mean 'defaults'"]),
        ("key: x\nversion: true\nsteps:\n" + OK_STEP, None, ["'version'"]),
        ("key: x\ntimeout: soon\nsteps:\n" + OK_STEP, None, ["timeout", "invalid duration 'soon'"]),
        ("key: x\ntimeout: -5\nsteps:\n" + OK_STEP, None, ["timeout", "negative"]),
        ("key: x\ntimeout: 0\nsteps:\n" + OK_STEP, None, ["timeout", "greater than zero"]),
        ("key: x\nname: [a]\nsteps:\n" + OK_STEP, None, ["'name' must be a string"]),
        # variables
        (
            "key: x\nvariables: {n: {type: float64}}\nsteps:\n" + OK_STEP,
            None,
            ["variable 'n'", "unknown type 'float64'"],
        ),
        (
            "key: x\nvariables: {n: {type: integer, default: abc}}\nsteps:\n" + OK_STEP,
            None,
            ["variable 'n'", "default"],
        ),
        ("key: x\nvariables: {n: {type: integer, default: true}}\nsteps:\n" + OK_STEP, None, ["expected integer"]),
        ("key: x\nvariables: {n: {type: boolean, default: 1}}\nsteps:\n" + OK_STEP, None, ["expected boolean"]),
        ("key: x\nvariables: {n: {type: string, required: maybe}}\nsteps:\n" + OK_STEP, None, ["'required'"]),
        ("key: x\nvariables: {n: {type: string, requird: true}}\nsteps:\n" + OK_STEP, None, ["unknown key 'requird'"]),
        ("key: x\nvariables: {steps: {type: string}}\nsteps:\n" + OK_STEP, None, ["variable 'steps'", "reserved"]),
        ("key: x\nvariables: {bad-name: {type: string}}\nsteps:\n" + OK_STEP, None, ["invalid variable name"]),
        ("key: x\nvariables: [{name: a}, {name: a}]\nsteps:\n" + OK_STEP, None, ["variable 'a'", "declared twice"]),
        ("key: x\nvariables: [{type: string}]\nsteps:\n" + OK_STEP, None, ["variables[0]", "missing 'name'"]),
        ("key: x\nvariables: 3\nsteps:\n" + OK_STEP, None, ["'variables' must be"]),
        # trigger
        ("key: x\ntrigger: {type: sometimes}\nsteps:\n" + OK_STEP, None, ["trigger", "unknown type"]),
        ("key: x\ntrigger: {type: cron}\nsteps:\n" + OK_STEP, None, ["needs 'cron'"]),
        ("key: x\ntrigger: {cron: '0 7 * *'}\nsteps:\n" + OK_STEP, None, ["5 fields"]),
        ("key: x\ntrigger: {cron: '99 7 * * *'}\nsteps:\n" + OK_STEP, None, ["invalid cron"]),
        ("key: x\ntrigger: {cron: '0 7 * * *', every: 1}\nsteps:\n" + OK_STEP, None, ["unknown key 'every'"]),
        # steps: shape, ids, keys, types
        ("key: x\nsteps:\n  - just a string\n", None, ["steps[0]", "must be a mapping"]),
        ("key: x\nsteps:\n  - {type: noop}\n", None, ["steps[0]", "missing 'id'"]),
        ("key: x\nsteps:\n  - {id: 1a, type: noop}\n", None, ["steps[0]", "invalid step id"]),
        ("key: x\nsteps:\n  - {id: 5, type: noop}\n", None, ["steps[0]", "invalid step id 5"]),
        ("key: x\nsteps:\n  - {id: 'a b', type: noop}\n", None, ["invalid step id 'a b'"]),
        ("key: x\nsteps:\n  - {id: a, type: noop}\n  - {id: a, type: noop}\n", "a", ["duplicate step id"]),
        ("key: x\nsteps:\n  - {id: a}\n", "a", ["missing 'type'"]),
        ("key: x\nsteps:\n  - {id: a, type: teleport}\n", "a", ["unknown step type 'teleport'", "known:"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, dependson: [b]}\n", "a", ["unknown key 'dependson'", "depends_on"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, params: [1]}\n", "a", ["params", "must be a mapping"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, params: {}, parameters: {}}\n", "a", ["give one of them"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, params: {bad: 1}}\n", "a", ["params", "bad is not a noop parameter"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, name: 3}\n", "a", ["'name' must be a string"]),
        ("key: x\nvariables: {a: {type: string}}\nsteps:\n  - {id: a, type: noop}\n", "a", ["collides with variable"]),
        # dependencies
        (
            "key: x\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop, depends_on: [zz]}\n",
            "b",
            ["depends_on references unknown step 'zz'"],
        ),
        ("key: x\nsteps:\n  - {id: a, type: noop, depends_on: [a]}\n", "a", ["depends_on references the step itself"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, depends_on: 3}\n", "a", ["depends_on", "list of step ids"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, depends_on: [[b]]}\n", "a", ["depends_on", "must be strings"]),
        (
            "key: x\nsteps:\n  - {id: a, type: noop, depends_on: [b]}\n  - {id: b, type: noop, depends_on: [a]}\n",
            "a",
            ["dependency cycle: a -> b -> a"],
        ),
        (
            "key: x\nsteps:\n  - {id: a, type: noop, depends_on: [c]}\n  - {id: b, type: noop, depends_on: [a]}\n"
            "  - {id: c, type: noop, depends_on: [b]}\n",
            "a",
            ["dependency cycle: a -> c -> b -> a"],
        ),
        # durations and retry
        ("key: x\nsteps:\n  - {id: a, type: noop, timeout: forever}\n", "a", ["timeout", "invalid duration 'forever'"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, timeout: -1s}\n", "a", ["timeout", "negative"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, timeout: 0}\n", "a", ["timeout", "greater than zero"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, timeout: 1, timeout_ms: 5}\n", "a", ["give one of them"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, timeout_ms: fast}\n", "a", ["timeout_ms"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, retry: {initial_delay: soon}}\n", "a", ["retry.initial_delay"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, retry: {max_delay: -3}}\n", "a", ["retry.max_delay", "negative"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, retry: {max_attempts: 0}}\n", "a", ["retry.max_attempts", ">= 1"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, retry: {max_attempts: true}}\n", "a", ["retry.max_attempts"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, retry_policy: {max_retries: -1}}\n", "a", ["max_retries"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, retry: {backoff: random}}\n", "a", ["unknown backoff 'random'"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, retry: {tries: 3}}\n", "a", ["unknown key 'tries'"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, retry: 3}\n", "a", ["retry", "must be a mapping"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, retry: {}, retry_policy: {}}\n", "a", ["give one of them"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, retry: {jitter: 1}}\n", "a", ["retry.jitter"]),
        ("key: x\ndefaults: {timeout: never}\nsteps:\n" + OK_STEP, None, ["defaults.timeout"]),
        ("key: x\ndefaults: {params: {}}\nsteps:\n" + OK_STEP, None, ["defaults", "unknown key 'params'"]),
        # trigger_rule, when, for_each, as
        ("key: x\nsteps:\n  - {id: a, type: noop, trigger_rule: one_success}\n", "a", ["trigger_rule", "one_success"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, when: [1]}\n", "a", ["when", "expression string"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, when: '${1 +}'}\n", "a", ["when", "syntax error"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, for_each: 3}\n", "a", ["for_each", "expression string or a list"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, for_each: {a: 1}}\n", "a", ["for_each"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, for_each: '${[1,}'}\n", "a", ["for_each", "syntax error"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, as: x}\n", "a", ["'as' is only valid together with 'for_each'"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, for_each: [1], as: index}\n", "a", ["as", "invalid loop variable"]),
        # expressions and references
        ("key: x\nsteps:\n  - {id: a, type: noop, params: {x: '${1 +}'}}\n", "a", ["params.x", "syntax error"]),
        ("key: x\nsteps:\n  - {id: a, type: noop, params: {x: 'a ${b'}}\n", "a", ["params.x", "unclosed"]),
        (
            "key: x\nsteps:\n  - {id: a, type: noop, params: {x: {y: ['${zz}']}}}\n",
            "a",
            ["params.x.y[0] references undefined variable 'zz'"],
        ),
        ("key: x\nsteps:\n  - {id: a, type: noop, params: {x: '${vars.zz}'}}\n", "a", ["undefined variable 'zz'"]),
        (
            "key: x\nsteps:\n  - {id: a, type: noop, when: '${zz > 1}'}\n",
            "a",
            ["when references undefined variable 'zz'"],
        ),
        (
            "key: x\nsteps:\n  - {id: a, type: noop, params: {x: '${steps.zz.output}'}}\n",
            "a",
            ["params.x references unknown step 'zz'"],
        ),
        ("key: x\nsteps:\n  - {id: a, type: noop, params: {x: '${steps.a.output}'}}\n", "a", ["the step itself"]),
        (
            "key: x\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop, params: {x: '${steps.a.output}'}}\n",
            "b",
            ["params.x references step 'a', which is not upstream", "depends_on"],
        ),
        (
            "key: x\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop, params: {x: '${a.output}'}}\n",
            "b",
            ["references step 'a', which is not upstream"],
        ),
        (
            "key: x\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop, when: '${steps.a.status == \"ok\"}'}\n",
            "b",
            ["when references step 'a', which is not upstream"],
        ),
        ("key: x\nsteps:\n  - {id: a, type: noop, params: {x: '${item}'}}\n", "a", ["loop variable 'item'"]),
        (
            "key: x\nsteps:\n  - {id: a, type: noop, for_each: [1], when: '${item > 0}'}\n",
            "a",
            ["when", "loop variable"],
        ),
        ("key: x\nsteps:\n  - {id: a, type: noop, for_each: '${item}'}\n", "a", ["for_each", "loop variable"]),
        # call / method (seed 004 shape)
        ("key: x\nsteps:\n  - {id: a, call: 5}\n", "a", ["call"]),
        (
            "key: x\nsteps:\n  - {id: a, type: noop, method: GET}\n",
            "a",
            ["'method' is only valid together with 'call'"],
        ),
        ("key: x\nsteps:\n  - {id: a, call: /x, type: llm}\n", "a", ["http step"]),
        ("key: x\nsteps:\n  - {id: a, call: /x, params: {call: /y}}\n", "a", ["'call' is given both"]),
        # condition steps
        (
            "key: x\nsteps:\n  - {id: a, type: noop, condition: '${true}'}\n",
            "a",
            ["only valid for steps of type condition"],
        ),
        (
            "key: x\nsteps:\n  - {id: a, type: noop, on_success: [b]}\n  - {id: b, type: noop}\n",
            "a",
            ["'on_success' is only valid"],
        ),
        ("key: x\nsteps:\n  - {id: c, type: condition}\n", "c", ["needs 'condition'"]),
        ("key: x\nsteps:\n  - {id: c, type: condition, condition: '${1 >}'}\n", "c", ["condition", "syntax error"]),
        (
            "key: x\nsteps:\n  - {id: c, type: condition, condition: '${true}', on_success: [zz]}\n",
            "c",
            ["on_success references unknown step 'zz'"],
        ),
        (
            "key: x\nsteps:\n  - {id: c, type: condition, condition: '${true}', on_success: [b], on_failure: [b]}\n"
            "  - {id: b, type: noop}\n",
            "c",
            ["'b' is in both on_success and on_failure"],
        ),
        (
            "key: x\nsteps:\n  - {id: c, type: condition, condition: '${true}', on_failure: [c]}\n",
            "c",
            ["cannot target the condition step itself"],
        ),
        (
            "key: x\nsteps:\n  - {id: c1, type: condition, condition: '${true}', on_success: [b]}\n"
            "  - {id: c2, type: condition, condition: '${false}', on_failure: [b]}\n  - {id: b, type: noop}\n",
            "c2",
            ["'b' is already a branch of condition step 'c1'"],
        ),
        (
            "key: x\nsteps:\n  - {id: c, type: condition, condition: '${true}', on_success: [b], depends_on: [b]}\n"
            "  - {id: b, type: noop}\n",
            "c",
            ["dependency cycle: c -> b -> c"],
        ),
        ("key: x\nsteps:\n  - {id: c, type: condition, condition: '${true}', for_each: [1]}\n", "c", ["for_each"]),
        # parallel steps
        ("key: x\nsteps:\n  - {id: p, type: parallel}\n", "p", ["params.tasks", "non-empty list"]),
        ("key: x\nsteps:\n  - {id: p, type: parallel, params: {tasks: []}}\n", "p", ["params.tasks"]),
        (
            "key: x\nsteps:\n  - {id: p, type: parallel, params: {tasks: [{params: {}}]}}\n",
            "p",
            ["params.tasks[0]", "missing 'type'"],
        ),
        (
            "key: x\nsteps:\n  - {id: p, type: parallel, params: {tasks: [{type: warp}]}}\n",
            "p",
            ["params.tasks[0].type", "unknown step type 'warp'"],
        ),
        (
            "key: x\nsteps:\n  - {id: p, type: parallel, params: {tasks: [{type: noop, params: {bad: 1}}]}}\n",
            "p",
            ["params.tasks[0].params", "bad is not a noop parameter"],
        ),
        (
            "key: x\nsteps:\n  - {id: p, type: parallel, params: {tasks: [{id: a, type: noop}, {id: a, type: sleep}]}}",
            "p",
            ["duplicate task id 'a'"],
        ),
        (
            "key: x\nsteps:\n  - {id: p, type: parallel, params: {tasks: [{type: noop, retries: 2}]}}\n",
            "p",
            ["unknown key 'retries'"],
        ),
        (
            "key: x\nsteps:\n  - {id: p, type: parallel, params: {tasks: [{type: noop, timeout: later}]}}\n",
            "p",
            ["params.tasks[0].timeout"],
        ),
        (
            "key: x\nsteps:\n  - {id: p, type: parallel, params: {tasks: [{type: parallel, params: {}}]}}\n",
            "p",
            ["cannot be nested"],
        ),
        ("key: x\nsteps:\n  - {id: p, type: parallel, params: {tasks: ['${zz}']}}\n", "p", ["params.tasks[0]"]),
        # outputs
        ("key: x\noutputs: {r: '${steps.zz.output}'}\nsteps:\n" + OK_STEP, None, ["outputs.r", "unknown step 'zz'"]),
        ("key: x\noutputs: {r: '${zz}'}\nsteps:\n" + OK_STEP, None, ["outputs.r", "undefined variable 'zz'"]),
        ("key: x\noutputs: {r: 3}\nsteps:\n" + OK_STEP, None, ["outputs.r", "must be a string"]),
        ("key: x\noutputs: {r: '${1 +}'}\nsteps:\n" + OK_STEP, None, ["outputs.r", "syntax error"]),
        ("key: x\noutputs: [a]\nsteps:\n" + OK_STEP, None, ["'outputs' must be a mapping"]),
    ],
)
def test_bad_files_are_refused_with_one_line(text, step, fragments):
    message = load_error(text)
    if step is not None:
        assert message.startswith(f"bad.yaml: step '{step}': "), message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("id: x\nworkflow: {tasks: []}\n", ["no steps", "workflow.tasks"]),
        ("id: x\nworkflow: 3\n", ["'workflow' must be a mapping"]),
        ("id: x\nworkflow: {tasks: [{id: a, type: noop}], retries: 3}\n", ["workflow", "unknown key 'retries'"]),
        ("name: no id\nworkflow: {tasks: [{id: a, type: noop}]}\n", ["missing 'id'"]),
        (
            "id: x\nworkflow:\n  variables: {y: '${nope}'}\n  tasks: [{id: a, type: noop}]\n",
            ["undefined variable 'nope'"],
        ),
        (
            "id: x\nvariables: [{name: a}]\nworkflow:\n  variables: {a: '${a}x'}\n  tasks: [{id: a2, type: noop}]\n",
            ["also a template variable"],
        ),
        ("id: x\ntimeout: 5\nworkflow: {timeout: 5, tasks: [{id: a, type: noop}]}\n", ["'timeout' is given both"]),
        (
            "id: x\nworkflow:\n  tasks:\n    - {id: t, type: data, retry_policy: {max_retries: 2, max_attempts: 3}}\n",
            ["step 't'", "not both"],
        ),
        (
            "id: x\nworkflow:\n  tasks:\n    - {id: t, type: data, retry_policy: {backoff_type: quadratic}}\n",
            ["step 't'", "retry_policy.backoff_type"],
        ),
        (
            "id: x\nworkflow:\n  tasks:\n    - {id: t, type: ai, parameters: {prompt: '${task0.output}'}}\n",
            ["step 't'", "undefined variable 'task0'"],
        ),
    ],
)
def test_bad_seed002_files(text, fragments):
    message = load_error(text)
    for fragment in fragments:
        assert fragment in message, message


def test_error_attributes():
    with pytest.raises(WorkflowError) as info:
        load_spec("key: x\nsteps:\n  - {id: a, type: noop, depends_on: [zz]}\n", source="f.yaml")
    assert info.value.source == "f.yaml"
    assert info.value.step == "a"
    assert info.value.problem == "depends_on references unknown step 'zz'"
    assert str(info.value) == "f.yaml: step 'a': depends_on references unknown step 'zz'"


def test_default_source_name():
    with pytest.raises(WorkflowError) as info:
        load_spec("key: x\n")
    assert str(info.value).startswith("<string>: ")


def test_sandbox_escape_in_params_is_refused_at_load_or_run():
    # The attribute is refused by the sandbox when evaluated; at load time the expression only
    # has to compile, and it refers to no name, so the file loads.
    spec = load_spec("key: x\nsteps:\n  - {id: a, type: noop, params: {x: '${ \"\".__class__ }'}}\n")
    from templates_app.errors import ExpressionError
    from templates_app.expressions import render

    with pytest.raises(ExpressionError):
        render(spec["steps"][0]["params"], {"vars": {}, "steps": {}})


# --------------------------------------------------------------------------------------------
# Size, encoding and structure limits
# --------------------------------------------------------------------------------------------


def test_size_limit_from_settings(settings):
    settings.ORCHESTRATOR_MAX_SPEC_BYTES = 100
    text = "key: x\nsteps:\n" + OK_STEP + "# " + "x" * 200 + "\n"
    assert "too large" in load_error(text)
    assert "too large" in load_error(text.encode())


def test_bytes_must_be_utf8():
    message = load_error(b"key: caf\xe9\nsteps: []\n")
    assert "UTF-8" in message


def test_utf8_bom_and_non_ascii_text():
    spec = load_spec("\ufeffkey: x\nname: Café ☕\nsteps:\n" + OK_STEP)
    assert spec["name"] == "Café ☕"
    assert load_spec(("key: x\nname: Café\nsteps:\n" + OK_STEP).encode("utf-8-sig"))["name"] == "Café"


def test_alias_bomb_is_refused():
    bomb = "key: x\n" + 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    previous = "a"
    for name in "bcdefghi":
        bomb += f"{name}: &{name} [{', '.join(['*' + previous] * 9)}]\n"
        previous = name
    bomb += "steps:\n" + OK_STEP
    message = load_error(bomb)
    assert "too large" in message or "unknown key" in message
    # the bomb inside params, where keys are free
    bomb2 = "key: x\nsteps:\n  - id: a\n    type: noop\n    params:\n"
    bomb2 += '      a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    previous = "a"
    for name in "bcdefghi":
        bomb2 += f"      {name}: &{name} [{', '.join(['*' + previous] * 9)}]\n"
        previous = name
    assert "more than 200000 values" in load_error(bomb2)


def test_deep_nesting_is_refused():
    deep = "key: x\nsteps:\n  - {id: a, type: noop, params: {x: " + "[" * 150 + "]" * 150 + "}}\n"
    assert "nested too deeply" in load_error(deep)


def test_recursive_alias_is_refused():
    text = "key: x\nsteps:\n  - id: a\n    type: noop\n    params: &p\n      self: *p\n"
    message = load_error(text)
    assert "nested too deeply" in message or "YAML" in message


def test_yaml_values_become_json_values():
    spec = load_spec("key: x\nsteps:\n  - {id: a, type: noop, params: {day: 2024-01-02, 2: two, true: yes}}\n")
    assert spec["steps"][0]["params"] == {"day": "2024-01-02", "2": "two", "true": True}
    assert json.loads(json.dumps(spec)) == spec


def test_yaml_merge_keys_still_work():
    spec = load_spec(
        "key: x\nx-base: &b {type: noop, timeout: 5}\nsteps:\n  - {<<: *b, id: a}\n  - {<<: *b, id: b, timeout: 7}\n"
    )
    a, b = spec["steps"]
    assert (a["type"], a["timeout"], b["timeout"]) == ("noop", 5.0, 7.0)


def test_load_spec_file(tmp_path):
    path = tmp_path / "weekly_seed_v1.yml"
    path.write_text(WEEKLY_SEED_V1)
    assert load_spec_file(path)["key"] == "weekly_seed_v1"
    bad = tmp_path / "bad.yml"
    bad.write_text("key: x\nsteps:\n  - {id: a, type: noop, depends_on: [zz]}\n")
    with pytest.raises(WorkflowError) as info:
        load_spec_file(bad)
    assert one_line(info.value).startswith(f"{bad}: step 'a': ")
    with pytest.raises(WorkflowError) as info:
        load_spec_file(tmp_path / "missing.yml")
    assert "cannot read" in one_line(info.value)
    assert str(tmp_path / "missing.yml") in str(info.value)


# --------------------------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, seconds",
    [
        (30, 30.0),
        (1.5, 1.5),
        (0, 0.0),
        ("30", 30.0),
        ("2.5", 2.5),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("1m30s", 90.0),
        ("2d", 172800.0),
        ("3600s", 3600.0),
        (" 10s ", 10.0),
        ("1H", 3600.0),
    ],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds
    assert spec_module.parse_duration is parse_duration


@pytest.mark.parametrize(
    "value",
    [
        "",
        "  ",
        "abc",
        "10x",
        "-5s",
        "-1",
        -1,
        -0.5,
        "5s-",
        "s",
        "1.2.3s",
        "ms",
        True,
        None,
        [1],
        float("nan"),
        float("inf"),
    ],
)
def test_parse_duration_refuses(value):
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert "\n" not in str(info.value) and "duration" in str(info.value)


# --------------------------------------------------------------------------------------------
# validate_inputs
# --------------------------------------------------------------------------------------------

INPUTS = """
key: inputs
variables:
  name: {type: string, required: true}
  count: {type: integer, default: 2}
  ratio: {type: number}
  flag: {type: boolean, default: false}
  config: {type: object, default: {a: 1}}
  items: {type: array}
  anything: {type: any}
steps:
  - {id: a, type: noop}
"""


@pytest.fixture
def inputs_spec():
    return load_spec(INPUTS)


def test_validate_inputs_applies_defaults(inputs_spec):
    values = validate_inputs(inputs_spec, {"name": "x"})
    assert values == {
        "name": "x",
        "count": 2,
        "ratio": None,
        "flag": False,
        "config": {"a": 1},
        "items": None,
        "anything": None,
    }
    values["config"]["a"] = 99
    assert inputs_spec["variables"]["config"]["default"] == {"a": 1}  # defaults are copied


def test_validate_inputs_coerces_cli_strings(inputs_spec):
    raw = {
        "name": "x",
        "count": "3",
        "ratio": "2.5",
        "flag": "yes",
        "config": '{"b": [1, 2]}',
        "items": "[1, 2]",
        "anything": "text",
    }
    values = validate_inputs(inputs_spec, raw)
    assert values == {
        "name": "x",
        "count": 3,
        "ratio": 2.5,
        "flag": True,
        "config": {"b": [1, 2]},
        "items": [1, 2],
        "anything": "text",
    }
    assert raw["count"] == "3"  # not modified
    for text, expected in [("true", True), ("False", False), ("1", True), ("0", False), ("no", False)]:
        assert validate_inputs(inputs_spec, {"name": "x", "flag": text})["flag"] is expected
    assert validate_inputs(inputs_spec, {"name": "x", "ratio": "4"})["ratio"] == 4
    assert validate_inputs(inputs_spec, {"name": "x", "count": " -7 "})["count"] == -7


def test_validate_inputs_accepts_native_values(inputs_spec):
    values = validate_inputs(
        inputs_spec, {"name": "x", "count": 5, "ratio": 1, "flag": True, "items": [1], "anything": {"k": 1}}
    )
    assert values["count"] == 5 and values["ratio"] == 1 and values["items"] == [1]


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({}, "variable 'name': required"),
        ({"name": None}, "variable 'name': required"),
        ({"name": "x", "nope": 1}, "variable 'nope': unknown variable"),
        ({"name": "x", "count": "abc"}, "variable 'count': expected integer"),
        ({"name": "x", "count": "3.5"}, "variable 'count': expected integer"),
        ({"name": "x", "count": True}, "variable 'count': expected integer, got boolean"),
        ({"name": "x", "count": 2.0}, "variable 'count': expected integer"),
        ({"name": "x", "ratio": "fast"}, "variable 'ratio': expected number"),
        ({"name": "x", "ratio": "nan"}, "variable 'ratio': expected number"),
        ({"name": "x", "ratio": False}, "variable 'ratio': expected number"),
        ({"name": "x", "flag": "maybe"}, "variable 'flag': expected boolean"),
        ({"name": "x", "flag": 1}, "variable 'flag': expected boolean"),
        ({"name": "x", "config": "[1]"}, "variable 'config': expected object"),
        ({"name": "x", "config": "{nope"}, "variable 'config': expected object as JSON"),
        ({"name": "x", "items": '{"a": 1}'}, "variable 'items': expected array"),
        ({"name": 5}, "variable 'name': expected string"),
    ],
)
def test_validate_inputs_errors(inputs_spec, raw, fragment):
    with pytest.raises(WorkflowError) as info:
        validate_inputs(inputs_spec, raw)
    assert fragment in one_line(info.value)


def test_validate_inputs_required_message_exact():
    spec = load_spec("key: r\nvariables: {x: {type: string, required: true}}\nsteps:\n" + OK_STEP)
    with pytest.raises(WorkflowError) as info:
        validate_inputs(spec, None)
    assert str(info.value) == "variable 'x': required"


def test_required_variable_with_default_uses_the_default():
    spec = load_spec("key: r\nvariables: {x: {type: string, required: true, default: d}}\nsteps:\n" + OK_STEP)
    assert validate_inputs(spec, {}) == {"x": "d"}
    assert validate_inputs(spec, {"x": "given"}) == {"x": "given"}


def test_validate_inputs_refuses_non_mapping(inputs_spec):
    with pytest.raises(WorkflowError):
        validate_inputs(inputs_spec, ["name"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# With the real registry and handlers (agents.registry)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, source",
    [
        (DAILY_INSTRUCTOR_V1, "daily_instructor_v1.yml"),
        (WEEKLY_SEED_V1, "weekly_seed_v1.yml"),
        (SEED002_TEMPLATE, "my-workflow.yaml"),
        (CANONICAL, "package-audit.yaml"),
    ],
)
def test_seed_files_load_with_the_real_registry(real_registry, settings, text, source):
    settings.ORCHESTRATOR_PYTHON_CALLABLES = [*settings.ORCHESTRATOR_PYTHON_CALLABLES, "pkg.list", "pkg.write"]
    spec = load_spec(text, source=source)
    assert spec["steps"]


def test_builtin_templates_load_with_the_real_registry(real_registry):
    from pathlib import Path

    import templates_app

    folder = Path(templates_app.__file__).resolve().parent / "builtin"
    files = sorted(folder.glob("*.yaml"))
    assert files
    for path in files:
        spec = load_spec_file(path)
        assert spec["dialect"] == "canonical"


def test_unknown_type_with_the_real_registry(real_registry):
    message = load_error("key: x\nsteps:\n  - {id: a, type: teleport}\n")
    assert "step 'a'" in message and "unknown step type 'teleport'" in message and "http" in message


@pytest.mark.parametrize(
    "when, stored",
    [
        ("x > 1", "${x > 1}"),
        ("${x > 1}", "${x > 1}"),
        (" ${x > 1}\n", "${x > 1}"),
        ("x > 1 && !false", "${x > 1 && !false}"),
        (True, "${true}"),
        (False, "${false}"),
        ("{'a': x}.a > 0", "${{'a': x}.a > 0}"),
    ],
)
def test_single_expression_fields_are_stored_braced(when, stored):
    # Given `when` written with or without ${ }, the stored value is one braced expression, which
    # both evaluate() and render() turn into the native value.
    from templates_app.expressions import evaluate, render

    doc = {"key": "k", "variables": {"x": {"type": "integer", "default": 3}}, "steps": [{"id": "a", "type": "noop"}]}
    doc["steps"][0]["when"] = when
    (step,) = load_spec(json.dumps(doc))["steps"]
    assert step["when"] == stored
    context = {"vars": {"x": 3}}
    assert evaluate(stored, context) == render(stored, context)


def test_for_each_without_braces_is_stored_braced():
    spec = load_spec(
        "key: k\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop, depends_on: [a], for_each: steps.a.output}\n"
    )
    assert spec["steps"][1]["for_each"] == "${steps.a.output}"
    assert spec["steps"][1]["refs"] == ["a"]
