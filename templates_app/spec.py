"""Loading workflow files: YAML -> dialect detection -> ONE normalized spec, validated.

Three dialects load into the same normalized shape (docs/spec-contract.md):

- ``canonical``: the format README.md documents (``key``, ``steps`` with ``type``/``params``);
- ``seed002``: seed 002's template files (``id``, ``variables`` list, ``workflow: {timeout,
  variables, tasks}``, tasks with ``parameters``, ``retry_policy``, ``condition``/``on_success``/
  ``on_failure``, ``type: ai|data``, ``${task1.output}``);
- ``seed004``: seed 004's workflow files (``key``, ``trigger``, steps with ``call``, ``method``,
  ``timeout_ms``, ``depends_on``).

Every problem is a :class:`WorkflowError` whose message is one line naming the file, the step and
the problem (``"bad.yaml: step 'b': depends_on references unknown step 'zz'"``); nothing is
half-loaded. Step types come from ``agents.registry`` (imported lazily: the registry imports
handlers, which may import Django models).
"""

from __future__ import annotations

import copy
import datetime
import difflib
import json
import math
import re
from collections.abc import Iterator, Mapping
from os import PathLike
from typing import Any

import yaml

from . import expressions
from .durations import parse_duration
from .errors import ExpressionError, WorkflowError, one_line

__all__ = [
    "BACKOFFS",
    "DIALECTS",
    "ENGINE_TYPES",
    "TRIGGER_RULES",
    "TRIGGER_TYPES",
    "VARIABLE_TYPES",
    "WorkflowError",
    "check_for_each_items",
    "load_spec",
    "load_spec_file",
    "parse_duration",
    "validate_inputs",
]

DIALECTS = ("canonical", "seed002", "seed004")
VARIABLE_TYPES = ("string", "integer", "number", "boolean", "object", "array", "any")
TRIGGER_RULES = ("all_success", "none_failed", "all_done")
TRIGGER_TYPES = ("manual", "cron", "event", "cron_or_event", "interval")
BACKOFFS = ("exponential", "linear", "fixed")
#: Types the engine itself runs (expansion, branching): accepted even if no handler registers them.
ENGINE_TYPES = frozenset({"condition", "parallel"})

_TYPE_ALIASES = {
    "str": "string",
    "text": "string",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
    "dict": "object",
    "map": "object",
    "list": "array",
}
_BACKOFF_ALIASES = {"constant": "fixed", "exp": "exponential"}

_SLUG = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_STEP_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_CHILD_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INTEGER = re.compile(r"[+-]?\d+")

# Words a variable cannot be called: the context's own names, sandbox globals, Jinja keywords.
_RESERVED_NAMES = (
    expressions.CONTEXT_NAMES
    | expressions.GLOBAL_NAMES
    | {"and", "or", "not", "in", "is", "if", "else", "true", "false", "none", "null", "True", "False", "None"}
)
_LOOP_RESERVED = frozenset({"steps", "vars", "run", "index"})

# Harmless metadata accepted at the top of any file (and dropped); ``x-...`` keys too.
_META_KEYS = frozenset({"tags", "author", "owner", "labels", "metadata"})
_TOP_KEYS = frozenset(
    {"key", "version", "name", "description", "category", "timeout", "variables", "defaults", "trigger"}
    | {"outputs", "steps", "max_active_runs"}
)
_TOP_KEYS_SEED002 = (_TOP_KEYS - {"key", "steps"}) | {"id", "workflow"}
_WORKFLOW_KEYS_SEED002 = frozenset({"id", "name", "description", "timeout", "variables", "tasks"})
_STEP_KEYS = frozenset(
    {"id", "name", "description", "type", "params", "parameters", "depends_on", "retry", "retry_policy"}
    | {"timeout", "timeout_ms", "when", "trigger_rule", "for_each", "as", "condition", "on_success"}
    | {"on_failure", "call", "method", "credential", "rate_limit", "concurrency", "queue"}
)
#: An executor queue's name (step ``queue``).
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_CHILD_KEYS = frozenset(
    {"id", "name", "type", "params", "parameters", "retry", "retry_policy", "timeout", "timeout_ms"}
)
_DEFAULT_KEYS = frozenset(
    {"retry", "retry_policy", "timeout", "timeout_ms", "trigger_rule", "rate_limit", "concurrency"}
)
_RETRY_KEYS = frozenset(
    {"max_attempts", "max_retries", "backoff", "backoff_type", "initial_delay", "max_delay", "jitter"}
)
_VARIABLE_KEYS = frozenset({"type", "required", "default", "description"})
_TRIGGER_KEYS = frozenset({"type", "cron", "event_types", "interval", "variables"})
_RATE_LIMIT_KEYS = frozenset({"key", "capacity", "refill_rate", "rate"})
_CONCURRENCY_KEYS = frozenset({"key", "limit"})
#: Names a flow-control key expression may use besides variables (runs.engine.gate.key_context).
_FLOW_KEY_NAMES = frozenset({"run", "step"})
#: Shortest interval schedule (seconds): django-celery-beat counts intervals in whole seconds.
MIN_INTERVAL = 1.0

# Limits on the loaded document (alias bombs expand in the walk, not in the parser).
MAX_NODES = 200_000
MAX_DEPTH = 100

# --- Caps on what a workflow file may ask for ---------------------------------------------------
# Every size and time a workflow chooses has a cap. The ones an operator may want to move are
# settings (read at load time; README "Limits"); the rest are constants here.
#: Settings and their defaults: seconds, counts.
LIMIT_DEFAULTS = {
    "ORCHESTRATOR_MAX_STEP_TIMEOUT": 7200.0,  # seconds; keep below ORCHESTRATOR_VISIBILITY_TIMEOUT
    "ORCHESTRATOR_MAX_RUN_TIMEOUT": 7 * 86400.0,  # seconds, the workflow's own timeout
    "ORCHESTRATOR_MAX_ATTEMPTS": 100,
    "ORCHESTRATOR_MAX_RETRY_DELAY": 86400.0,  # seconds, initial_delay and max_delay
    "ORCHESTRATOR_MAX_STEPS_PER_RUN": 5000,  # steps a file declares, parallel branches included
    "ORCHESTRATOR_MAX_FOR_EACH_ITEMS": 10_000,  # items one for_each may expand to
}
#: Flow control: largest concurrency limit, bucket capacity and refill rate (tokens/second), and
#: smallest refill rate (one token a day: a step never waits longer than that for a token).
MAX_CONCURRENCY_LIMIT = 100_000
MAX_RATE_CAPACITY = 1_000_000
MAX_REFILL_RATE = 1_000_000.0
MIN_REFILL_RATE = 1 / 86400
#: Most runs of one template at once (``max_active_runs``), longest schedule interval (seconds),
#: most event types a trigger lists, largest ``max_tokens`` of an llm step.
MAX_ACTIVE_RUNS = 100_000
MAX_INTERVAL = 366 * 86400.0
MAX_EVENT_TYPES = 100
MAX_LLM_TOKENS = 1_000_000
#: Params that are durations in seconds (``timeout_ms``: milliseconds), by step type: capped by
#: ORCHESTRATOR_MAX_STEP_TIMEOUT when written as literals (the handlers cap them by the step's
#: timeout at run time anyway).
_DURATION_PARAMS = {
    "sleep": ("seconds",),
    "http": ("timeout", "timeout_ms"),
    "exec": ("timeout",),
    "llm": ("timeout",),
}


def cap_of(name: str) -> Any:
    """The value of the cap setting ``name`` (one of :data:`LIMIT_DEFAULTS`), typed like its default."""
    default = LIMIT_DEFAULTS[name]
    return type(default)(_setting(name, default))


def _number(value: float) -> str:
    """``864000000`` rather than ``8.64e+08`` for whole numbers a user typed."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e18 else f"{value:g}"


def check_for_each_items(step_id: str, items: Any) -> None:
    """Refuse a for_each list longer than ``ORCHESTRATOR_MAX_FOR_EACH_ITEMS`` (default 10,000).

    For the loader (a literal list, or an expression that needs no run data) and for the engine
    when it expands a step at run time. ``items`` is the list (anything else is left to the
    caller's own type check).

    Raises:
        WorkflowError: one line naming the step, the count and the setting.
    """
    cap = cap_of("ORCHESTRATOR_MAX_FOR_EACH_ITEMS")
    if isinstance(items, (list, tuple)) and len(items) > cap:
        raise WorkflowError(
            f"for_each: {len(items)} items, more than {cap} (ORCHESTRATOR_MAX_FOR_EACH_ITEMS)", step=step_id
        )


_STEP_LIST_PATHS = (("steps",), ("workflow", "tasks"))


def _early_step_count(text: str, cap: int) -> int:
    """Items of the top-level step list (``steps``, or seed 002's ``workflow.tasks``), counted from
    the YAML parser's events and stopping at ``cap + 1``: a file with far too many steps is
    refused before it is built into objects, let alone validated. 0 when there is no such list.

    Raises yaml.YAMLError for a syntax error met on the way (the full load reports it better).
    """
    stack: list[list[Any]] = []  # [kind, path, expect_key, current_key]
    target: list[Any] | None = None
    count = 0
    for event in yaml.parse(text, Loader=_YAML_BASE):
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            ended = stack.pop()
            if ended is target:
                return count
            continue
        if not isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            continue
        path: tuple[str, ...] = ()
        if stack:
            parent = stack[-1]
            if parent is target:
                count += 1
                if count > cap:
                    return count
            if parent[0] == "map":
                is_key = parent[2]
                parent[2] = not is_key
                if is_key:
                    parent[3] = event.value if isinstance(event, yaml.ScalarEvent) else None
                    if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                        stack.append(["map" if isinstance(event, yaml.MappingStartEvent) else "seq", None, True, None])
                    continue
                path = (*parent[1], str(parent[3])) if parent[1] is not None and len(parent[1]) < 2 else None
            else:
                path = None
        if isinstance(event, yaml.MappingStartEvent):
            stack.append(["map", path, True, None])
        elif isinstance(event, yaml.SequenceStartEvent):
            entry = ["seq", path, False, None]
            stack.append(entry)
            if target is None and path in _STEP_LIST_PATHS:
                target = entry
    return count


_YAML_BASE: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _YamlLoader(_YAML_BASE):  # type: ignore[misc,valid-type]
    """Safe loader (C speed when libyaml is there) that refuses duplicate keys in a mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[tuple[str, str]] = set()
            for key_node, _value in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                    ident = (key_node.tag, key_node.value)
                    if ident in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                        )
                    seen.add(ident)
        return super().construct_mapping(node, deep=deep)


def _setting(name: str, fallback: Any) -> Any:
    """A Django setting, or ``fallback`` when absent or when settings are not configured."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    try:
        return getattr(settings, name, fallback)
    except ImproperlyConfigured:
        return fallback


def _registry() -> Any:
    """The step-handler registry (``agents.registry``), imported on first use."""
    from agents import registry

    return registry


def _short(value: Any, limit: int = 60) -> str:
    """A value for an error message: repr, one line, cut."""
    return one_line(repr(value), limit)


def _type_name(value: Any) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        dict: "object",
        list: "array",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _hint(key: str, allowed: frozenset[str] | set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_type(value: Any, type_name: str) -> str | None:
    """None when ``value`` is of the variable type ``type_name``, else what was expected."""
    if type_name == "any" or value is None:
        return None
    ok = {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "boolean": isinstance(value, bool),
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
    }[type_name]
    return None if ok else f"expected {type_name}, got {_type_name(value)} {_short(value)}"


def _iter_strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """(path, string) for every string in ``value`` holding ``${``; paths like ``params.a[0].b``."""
    if isinstance(value, str):
        if "${" in value:
            yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _iter_strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _iter_strings(item, f"{path}[{index}]")


class _SpecLoader:
    """One load of one file: holds the source name for error messages."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._nodes = 0

    def fail(self, problem: str, step: str | None = None) -> WorkflowError:
        """The error to raise: ``raise self.fail("...", step)``."""
        return WorkflowError(problem, source=self.source, step=step)

    # ---------------------------------------------------------------------------------------
    # Parsing
    # ---------------------------------------------------------------------------------------

    def parse(self, text: str | bytes) -> dict[str, Any]:
        limit = int(_setting("ORCHESTRATOR_MAX_SPEC_BYTES", 1_000_000))
        if isinstance(text, (bytes, bytearray, memoryview)):
            raw = bytes(text)
            if len(raw) > limit:
                raise self.fail(f"file too large ({len(raw)} bytes, limit {limit})")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self.fail(f"not valid UTF-8 (byte {exc.start})")
        elif not isinstance(text, str):
            raise self.fail(f"expected YAML text, got {type(text).__name__}")
        elif len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
            raise self.fail(f"file too large (more than {limit} bytes)")
        if text.startswith("\ufeff"):
            text = text[1:]
        cap = cap_of("ORCHESTRATOR_MAX_STEPS_PER_RUN")
        try:
            early = _early_step_count(text, cap)
        except yaml.YAMLError:
            early = 0  # the load below reports the syntax error with its line
        if early > cap:
            raise self.fail(f"too many steps: more than {cap} (ORCHESTRATOR_MAX_STEPS_PER_RUN)")
        try:
            doc = yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            problem = getattr(exc, "problem", None) or str(exc)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            raise self.fail(f"{where}YAML syntax error: {problem}")
        except RecursionError:
            raise self.fail(f"YAML syntax error: document nested too deeply (limit {MAX_DEPTH})")
        if doc is None:
            raise self.fail("document is empty")
        if not isinstance(doc, dict):
            raise self.fail(f"document must be a mapping, got {_type_name(doc)}")
        self._nodes = 0
        return self._clean(doc, 0)

    def _clean(self, value: Any, depth: int) -> Any:
        """A JSON-safe copy of the loaded document, within MAX_NODES and MAX_DEPTH.

        Aliases become copies here, so an alias bomb is stopped by the node budget; dates become
        ISO strings; keys become strings the way ``json.dumps`` would write them.
        """
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise self.fail(f"document too large: more than {MAX_NODES} values once aliases are expanded")
        if depth > MAX_DEPTH:
            raise self.fail(f"document nested too deeply (limit {MAX_DEPTH} levels)")
        if value is None or isinstance(value, (str, bool, int)):
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise self.fail(f"{value} is not allowed (only finite numbers)")
            return value
        if isinstance(value, dict):
            return {self._key(key): self._clean(item, depth + 1) for key, item in value.items()}
        if isinstance(value, list):
            return [self._clean(item, depth + 1) for item in value]
        if isinstance(value, (datetime.date, datetime.datetime)):
            return value.isoformat()
        if isinstance(value, bytes):
            raise self.fail("binary values (!!binary) are not supported")
        raise self.fail(f"values of type {type(value).__name__} are not supported")

    def _key(self, key: Any) -> str:
        if isinstance(key, str):
            return key
        if isinstance(key, (bool, int, float)) or key is None:
            return json.dumps(key)
        if isinstance(key, (datetime.date, datetime.datetime)):
            return key.isoformat()
        raise self.fail(f"mapping keys must be strings, got {_short(key)}")

    # ---------------------------------------------------------------------------------------
    # Top level
    # ---------------------------------------------------------------------------------------

    @staticmethod
    def detect(doc: Mapping[str, Any]) -> str:
        """``seed002`` (a ``workflow:`` section), ``seed004`` (a step with ``call``) or ``canonical``."""
        if "workflow" in doc and "steps" not in doc:
            return "seed002"
        steps = doc.get("steps")
        if isinstance(steps, list) and any(isinstance(step, dict) and "call" in step for step in steps):
            return "seed004"
        return "canonical"

    def _check_keys(
        self,
        mapping: Mapping[str, Any],
        allowed: frozenset[str],
        where: str,
        step: str | None = None,
        metadata: bool = False,
    ) -> None:
        """Refuse keys outside ``allowed`` (``metadata``: also pass tags, author... and ``x-...``)."""
        for key in mapping:
            if key in allowed:
                continue
            if metadata and (key in _META_KEYS or key.startswith(("x-", "x_"))):
                continue
            raise self.fail(f"{where}unknown key {key!r}{_hint(key, allowed)}", step)

    def _string(self, value: Any, field: str, default: str = "", step: str | None = None) -> str:
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.fail(f"{field!r} must be a string, got {_type_name(value)}", step)
        return value

    def normalize(self, doc: dict[str, Any]) -> dict[str, Any]:
        dialect = self.detect(doc)
        derived: Any = None
        if dialect == "seed002":
            self._check_keys(doc, _TOP_KEYS_SEED002, "", metadata=True)
            workflow = doc["workflow"]
            if not isinstance(workflow, dict):
                raise self.fail(f"'workflow' must be a mapping, got {_type_name(workflow)}")
            self._check_keys(workflow, _WORKFLOW_KEYS_SEED002, "workflow: ", metadata=True)
            key_field, steps_field = "id", "workflow.tasks"
            raw_steps = workflow.get("tasks")
            if "timeout" in workflow and "timeout" in doc:
                raise self.fail("'timeout' is given both at the top and in 'workflow'")
            timeout = workflow.get("timeout", doc.get("timeout"))
            derived = workflow.get("variables")
        else:
            self._check_keys(doc, _TOP_KEYS, "", metadata=True)
            key_field, steps_field = "key", "steps"
            raw_steps = doc.get("steps")
            timeout = doc.get("timeout")

        key = doc.get(key_field)
        if key is None:
            raise self.fail(f"missing {key_field!r}")
        if not isinstance(key, str) or not _SLUG.fullmatch(key):
            raise self.fail(
                f"invalid {key_field!r} {_short(key)}: use lowercase letters, digits, '_', '.' and '-', "
                "starting with a letter or digit"
            )
        label = doc.get("version")
        if isinstance(label, bool) or not isinstance(label, (str, int, float, type(None))):
            raise self.fail(f"'version' must be a string or a number, got {_type_name(label)}")

        variables = self._variables(doc.get("variables"))
        if derived is not None:
            self._derived_variables(derived, variables)

        spec: dict[str, Any] = {
            "key": key,
            "label": None if label is None else str(label),
            "name": self._string(doc.get("name"), "name", default=key),
            "description": self._string(doc.get("description"), "description"),
            "category": self._string(doc.get("category"), "category"),
            "dialect": dialect,
            "timeout": None
            if timeout is None
            else self._capped(self._duration(timeout, "timeout"), "timeout", None, "ORCHESTRATOR_MAX_RUN_TIMEOUT"),
            "variables": variables,
            "trigger": self._trigger(doc.get("trigger")),
            "outputs": None,
            "steps": [],
        }
        if doc.get("max_active_runs") is not None:
            spec["max_active_runs"] = self._positive_int(doc["max_active_runs"], "max_active_runs", cap=MAX_ACTIVE_RUNS)
        defaults = self._defaults(doc.get("defaults"))
        spec["steps"] = self._steps(raw_steps, steps_field, defaults, variables)
        spec["outputs"] = self._outputs(doc.get("outputs"), variables, {step["id"] for step in spec["steps"]})
        self._trigger_variables(spec)
        return spec

    def _positive_int(self, value: Any, field: str, step: str | None = None, cap: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(f"{field}: must be an integer >= 1, got {_short(value)}", step)
        if cap is not None and value > cap:
            raise self.fail(f"{field}: {value} is more than the limit {cap}", step)
        return value

    def _capped(self, value: float, field: str, step: str | None, setting: str, unit: str = "s") -> float:
        """``value`` unless it is over the cap setting ``setting`` (one line naming both)."""
        cap = cap_of(setting)
        if value > cap:
            raise self.fail(
                f"{field}: {_number(value)}{unit} is more than the limit {_number(cap)}{unit} ({setting})", step
            )
        return value

    def _trigger_variables(self, spec: dict[str, Any]) -> None:
        """``trigger.variables`` (the variables of scheduled runs) name declared variables, typed.

        Required variables left out are not an error here: the schedule made from the trigger
        is created disabled until an operator gives them (scheduler.services).
        """
        given = spec["trigger"].get("variables")
        if not given:
            return
        declared = spec["variables"]
        for name, value in given.items():
            decl = declared.get(name)
            if decl is None or "expr" in decl:
                known = ", ".join(sorted(n for n, d in declared.items() if "expr" not in d)) or "none"
                raise self.fail(f"trigger: variables: unknown variable {name!r} (known: {known})")
            try:
                given[name] = _coerce(name, decl.get("type", "any"), value)
            except WorkflowError as exc:
                raise self.fail(f"trigger: variables: {exc.problem}")

    def _duration(self, value: Any, field: str, step: str | None = None, positive: bool = True) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise self.fail(f"{field}: {exc}", step)
        if positive and seconds <= 0:
            raise self.fail(f"{field}: must be greater than zero, got {_short(value)}", step)
        return seconds

    # ---------------------------------------------------------------------------------------
    # Variables
    # ---------------------------------------------------------------------------------------

    def _variables(self, raw: Any) -> dict[str, dict[str, Any]]:
        entries: list[tuple[Any, Any, str]] = []
        if raw is None:
            return {}
        if isinstance(raw, dict):
            for name, decl in raw.items():
                entries.append((name, decl, f"variables.{name}"))
        elif isinstance(raw, list):
            for index, decl in enumerate(raw):
                where = f"variables[{index}]"
                if not isinstance(decl, dict):
                    raise self.fail(f"{where}: must be a mapping with 'name', got {_type_name(decl)}")
                if "name" not in decl:
                    raise self.fail(f"{where}: missing 'name'")
                decl = dict(decl)
                entries.append((decl.pop("name"), decl, where))
        else:
            raise self.fail(f"'variables' must be a mapping or a list, got {_type_name(raw)}")

        out: dict[str, dict[str, Any]] = {}
        for name, decl, where in entries:
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise self.fail(f"{where}: invalid variable name {_short(name)} (letters, digits and '_')")
            if name in _RESERVED_NAMES:
                raise self.fail(f"variable {name!r}: the name is reserved")
            if name in out:
                raise self.fail(f"variable {name!r}: declared twice")
            out[name] = self._variable(name, decl)
        return out

    def _variable(self, name: str, decl: Any) -> dict[str, Any]:
        where = f"variable {name!r}"
        if decl is None:
            decl = {}
        elif not isinstance(decl, dict):
            decl = {"default": decl}  # shorthand: `batch_size: 40`
        self._check_keys(decl, _VARIABLE_KEYS, f"{where}: ")
        type_name = decl.get("type")
        if type_name is None:
            type_name = "string" if "default" not in decl else _INFERRED.get(type(decl["default"]), "any")
        if not isinstance(type_name, str):
            raise self.fail(f"{where}: 'type' must be a string")
        type_name = _TYPE_ALIASES.get(type_name.strip().lower(), type_name.strip().lower())
        if type_name not in VARIABLE_TYPES:
            raise self.fail(f"{where}: unknown type {decl.get('type')!r} (known: {', '.join(VARIABLE_TYPES)})")
        required = decl.get("required", False)
        if not isinstance(required, bool):
            raise self.fail(f"{where}: 'required' must be true or false")
        out: dict[str, Any] = {
            "type": type_name,
            "required": required,
            "description": self._string(decl.get("description"), "description"),
        }
        if "default" in decl:
            problem = _check_type(decl["default"], type_name)
            if problem:
                raise self.fail(f"{where}: default does not match type {type_name}: {problem}")
            out["default"] = decl["default"]
        return out

    def _derived_variables(self, raw: Any, variables: dict[str, dict[str, Any]]) -> None:
        """Seed 002's ``workflow.variables``: names computed from the template variables.

        ``input_param: ${input_param}`` (the usual case) changes nothing; any other entry becomes
        a variable of type ``any`` with an ``expr`` that :func:`validate_inputs` renders.
        """
        if not isinstance(raw, dict):
            raise self.fail(f"'workflow.variables' must be a mapping, got {_type_name(raw)}")
        for name, value in raw.items():
            where = f"workflow.variables.{name}"
            if not _NAME.fullmatch(name) or name in _RESERVED_NAMES:
                raise self.fail(f"{where}: invalid variable name")
            if name in variables:
                if isinstance(value, str) and value.strip().replace(" ", "") == f"${{{name}}}":
                    continue  # the identity, as in seed 002's example
                raise self.fail(f"{where}: {name!r} is also a template variable")
            try:
                refs = expressions.analyze(value)
            except ExpressionError as exc:
                raise self.fail(f"{where}: {exc.problem}")
            for ref in sorted(refs.bare_names | refs.var_names):
                if ref not in variables and ref not in expressions.GLOBAL_NAMES:
                    raise self.fail(f"{where}: references undefined variable {ref!r}")
            if refs.step_ids:
                raise self.fail(f"{where}: variables cannot reference steps")
            variables[name] = {"type": "any", "required": False, "description": "", "expr": value}

    # ---------------------------------------------------------------------------------------
    # Trigger, defaults, outputs
    # ---------------------------------------------------------------------------------------

    def _trigger(self, raw: Any) -> dict[str, Any]:
        if raw is None:
            raw = {}
        elif isinstance(raw, str):
            raw = {"type": raw}
        elif not isinstance(raw, dict):
            raise self.fail(f"'trigger' must be a mapping, got {_type_name(raw)}")
        self._check_keys(raw, _TRIGGER_KEYS, "trigger: ")
        cron = raw.get("cron")
        if cron is not None:
            if not isinstance(cron, str):
                raise self.fail("trigger: 'cron' must be a string like '0 7 * * *'")
            self._check_cron(cron)
        events = raw.get("event_types")
        if events is None:
            events = []
        elif isinstance(events, str):
            events = [events]
        if not isinstance(events, list) or not all(isinstance(e, str) and e for e in events):
            raise self.fail("trigger: 'event_types' must be a list of event type names")
        interval = raw.get("interval")
        if interval is not None:
            interval = self._duration(interval, "trigger: interval")
        kind = raw.get("type")
        if kind is None:
            kind = (
                "cron_or_event"
                if cron and events
                else "cron"
                if cron
                else "event"
                if events
                else "interval"
                if interval
                else "manual"
            )
        if kind not in TRIGGER_TYPES:
            raise self.fail(f"trigger: unknown type {_short(kind)} (known: {', '.join(TRIGGER_TYPES)})")
        if kind == "cron" and not cron:
            raise self.fail("trigger: type cron needs 'cron'")
        if kind == "event" and not events:
            raise self.fail("trigger: type event needs 'event_types'")
        if kind == "cron_or_event" and not (cron or events):
            raise self.fail("trigger: type cron_or_event needs 'cron' or 'event_types'")
        if kind == "interval" and interval is None:
            raise self.fail("trigger: type interval needs 'interval'")
        if len(events) > MAX_EVENT_TYPES:
            raise self.fail(f"trigger: 'event_types' lists {len(events)} types, more than {MAX_EVENT_TYPES}")
        if interval is not None and interval > MAX_INTERVAL:
            raise self.fail(
                f"trigger: interval: must be at most {MAX_INTERVAL / 86400:g} days, got {_short(raw.get('interval'))}"
            )
        if interval is not None and interval < MIN_INTERVAL:
            raise self.fail(f"trigger: interval: must be at least {MIN_INTERVAL:g}s, got {_short(raw.get('interval'))}")
        out = {"type": kind, "cron": cron, "event_types": list(events), "interval": interval}
        variables = raw.get("variables")
        if variables is not None:
            if not isinstance(variables, dict):
                raise self.fail(f"trigger: 'variables' must be a mapping, got {_type_name(variables)}")
            if variables:
                out["variables"] = dict(variables)  # checked against the declared variables later
        return out

    def _check_cron(self, cron: str) -> None:
        fields = cron.split()
        if len(fields) != 5:
            raise self.fail(f"trigger: cron {cron!r} must have 5 fields (minute hour day month weekday)")
        try:
            from celery.schedules import crontab
        except ImportError:  # pragma: no cover - celery is a dependency
            return
        minute, hour, day_of_month, month_of_year, day_of_week = fields
        try:
            crontab(
                minute=minute,
                hour=hour,
                day_of_month=day_of_month,
                month_of_year=month_of_year,
                day_of_week=day_of_week,
            )
        except Exception as exc:  # celery raises ValueError and its own ParseException
            raise self.fail(f"trigger: invalid cron {cron!r}: {exc}")

    def _defaults(self, raw: Any) -> dict[str, Any]:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise self.fail(f"'defaults' must be a mapping, got {_type_name(raw)}")
        self._check_keys(raw, _DEFAULT_KEYS, "defaults: ")
        out: dict[str, Any] = {
            "retry": {
                "max_attempts": int(_setting("ORCHESTRATOR_DEFAULT_MAX_ATTEMPTS", 3)),
                "backoff": "exponential",
                "initial_delay": 1.0,
                "max_delay": 60.0,
                "jitter": True,
            },
            "timeout": float(_setting("ORCHESTRATOR_DEFAULT_STEP_TIMEOUT", 300.0)),
            "trigger_rule": "all_success",
        }
        out["retry"].update(self._retry_of(raw, "defaults.", None))
        timeout = self._timeout_of(raw, "defaults.", None)
        if timeout is not None:
            out["timeout"] = timeout
        if "trigger_rule" in raw:
            out["trigger_rule"] = self._trigger_rule(raw["trigger_rule"], "defaults.", None)
        out["rate_limit"] = self._rate_limit(raw.get("rate_limit"), "defaults.rate_limit", None)
        out["concurrency"] = self._concurrency(raw.get("concurrency"), "defaults.concurrency", None)
        return out

    # ---------------------------------------------------------------------------------------
    # Flow control: rate_limit, concurrency (runs.engine.gate)
    # ---------------------------------------------------------------------------------------

    def _flow_key(self, value: Any, field: str, step: str | None) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{field}: must be a non-empty string such as 'user:${{run.user_id}}:agent:clo'", step)
        if len(value) > 200:
            raise self.fail(f"{field}: longer than 200 characters", step)
        try:
            expressions.analyze(value)
        except ExpressionError as exc:
            raise self.fail(f"{field}: {exc.problem}", step)
        return value

    def _rate_limit(self, raw: Any, field: str, step: str | None) -> dict[str, Any] | None:
        """``rate_limit``: ``{key, capacity, refill_rate | rate}``; ``"10/m"`` or ``"<key>"`` shorthand.

        Normalized: ``{"key": str | None, "capacity": int | None, "refill_rate": float | None}``
        (tokens per second). Without numbers the bucket must exist in the admin.
        """
        from agents.rates import parse_rate

        if raw is None:
            return None
        if isinstance(raw, str):
            try:
                raw = {"rate": raw} if "/" in raw and parse_rate(raw) else {"key": raw}
            except ValueError:
                raw = {"key": raw}
        if not isinstance(raw, dict):
            raise self.fail(f"{field}: must be a mapping such as {{key: ..., capacity: 5, rate: 10/m}}", step)
        self._check_keys(raw, _RATE_LIMIT_KEYS, f"{field}: ", step)
        out: dict[str, Any] = {"key": None, "capacity": None, "refill_rate": None}
        if raw.get("key") is not None:
            out["key"] = self._flow_key(raw["key"], f"{field}.key", step)
        if "refill_rate" in raw and "rate" in raw:
            raise self.fail(f"{field}: give refill_rate or rate, not both", step)
        for name in ("refill_rate", "rate"):
            if raw.get(name) is not None:
                value = raw[name]
                if name == "refill_rate" and not isinstance(value, (int, float)):
                    raise self.fail(f"{field}.refill_rate: must be tokens per second, got {_short(value)}", step)
                try:
                    out["refill_rate"] = parse_rate(value)
                except ValueError as exc:
                    raise self.fail(f"{field}.{name}: {exc}", step)
        rate = out["refill_rate"]
        if rate is not None and not MIN_REFILL_RATE <= rate <= MAX_REFILL_RATE:
            raise self.fail(
                f"{field}: a rate of {rate:g} tokens per second is outside the limits "
                f"(at least one token a day, at most {MAX_REFILL_RATE:g}/s)",
                step,
            )
        if raw.get("capacity") is not None:
            out["capacity"] = self._positive_int(raw["capacity"], f"{field}.capacity", step, cap=MAX_RATE_CAPACITY)
            if out["refill_rate"] is None:
                raise self.fail(f"{field}: capacity needs a rate (refill_rate or rate)", step)
        elif out["refill_rate"] is not None:
            out["capacity"] = 1  # no burst unless asked for
        if out["key"] is None and out["refill_rate"] is None:
            raise self.fail(f"{field}: give a rate (and capacity), or the key of a bucket defined in the admin", step)
        return out

    def _concurrency(self, raw: Any, field: str, step: str | None) -> dict[str, Any] | None:
        """``concurrency``: ``{key, limit}``; ``2`` (limit) or ``"<key>"`` shorthand.

        Normalized: ``{"key": str | None, "limit": int | None}``; without a limit the key must be
        defined in the admin.
        """
        if raw is None:
            return None
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = {"limit": raw}
        elif isinstance(raw, str):
            raw = {"key": raw}
        if not isinstance(raw, dict):
            raise self.fail(f"{field}: must be a mapping such as {{key: ..., limit: 2}}", step)
        self._check_keys(raw, _CONCURRENCY_KEYS, f"{field}: ", step)
        out: dict[str, Any] = {"key": None, "limit": None}
        if raw.get("key") is not None:
            out["key"] = self._flow_key(raw["key"], f"{field}.key", step)
        if raw.get("limit") is not None:
            out["limit"] = self._positive_int(raw["limit"], f"{field}.limit", step, cap=MAX_CONCURRENCY_LIMIT)
        if out["key"] is None and out["limit"] is None:
            raise self.fail(f"{field}: give a limit, or the key of a limit defined in the admin", step)
        return out

    def _check_flow_keys(self, step: dict[str, Any], variables: Mapping[str, Any]) -> None:
        """Key expressions may use variables, ``run.*``, ``step.*`` and, in a for_each, the loop names."""
        loop = {step["as"], "item", "index"} if step["for_each"] is not None else set()
        for what in ("rate_limit", "concurrency"):
            declared = step.get(what)
            if not declared or not declared.get("key"):
                continue
            found = expressions.analyze(declared["key"])
            if found.step_ids:
                raise self.fail(f"{what}.key: may not use step outputs (steps.{sorted(found.step_ids)[0]})", step["id"])
            for name in sorted(found.var_names | found.bare_names):
                if name in variables or name in _FLOW_KEY_NAMES or name in loop or name in expressions.GLOBAL_NAMES:
                    continue
                raise self.fail(f"{what}.key references undefined name {name!r}", step["id"])

    def _outputs(self, raw: Any, variables: Mapping[str, Any], step_ids: set[str]) -> dict[str, Any] | None:
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise self.fail(f"'outputs' must be a mapping of names to expressions, got {_type_name(raw)}")
        for name, value in raw.items():
            where = f"outputs.{name}"
            if not isinstance(value, str):
                raise self.fail(f"{where}: must be a string such as '${{steps.x.output}}'")
            try:
                refs = expressions.analyze(value)
            except ExpressionError as exc:
                raise self.fail(f"{where}: {exc.problem}")
            for ref in sorted(refs.var_names):
                if ref not in variables:
                    raise self.fail(f"{where}: references undefined variable {ref!r}")
            for ref in sorted(refs.bare_names):
                if ref not in variables and ref not in step_ids and ref not in {"run", *expressions.GLOBAL_NAMES}:
                    raise self.fail(f"{where}: references undefined variable {ref!r}")
            for ref in sorted(refs.step_ids):
                if ref not in step_ids:
                    raise self.fail(f"{where}: references unknown step {ref!r}{_dash_hint(ref, step_ids)}")
        return dict(raw)

    # ---------------------------------------------------------------------------------------
    # Pieces of a step
    # ---------------------------------------------------------------------------------------

    def _retry_layer(self, raw: Any, field: str, step: str | None) -> dict[str, Any]:
        """One ``retry``/``retry_policy`` mapping in canonical keys (only the keys given)."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.fail(f"{field}: must be a mapping, got {_type_name(raw)}", step)
        self._check_keys(raw, _RETRY_KEYS, f"{field}: ", step)
        out: dict[str, Any] = {}
        if "max_attempts" in raw and "max_retries" in raw:
            raise self.fail(f"{field}: give max_attempts or max_retries, not both", step)
        if "max_attempts" in raw:
            value = raw["max_attempts"]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise self.fail(f"{field}.max_attempts: must be an integer >= 1, got {_short(value)}", step)
            self._capped(value, f"{field}.max_attempts", step, "ORCHESTRATOR_MAX_ATTEMPTS", unit="")
            out["max_attempts"] = value
        if "max_retries" in raw:
            value = raw["max_retries"]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise self.fail(f"{field}.max_retries: must be an integer >= 0, got {_short(value)}", step)
            if value + 1 > cap_of("ORCHESTRATOR_MAX_ATTEMPTS"):
                raise self.fail(
                    f"{field}.max_retries: {value} retries make more attempts than the limit "
                    f"{cap_of('ORCHESTRATOR_MAX_ATTEMPTS')} (ORCHESTRATOR_MAX_ATTEMPTS)",
                    step,
                )
            out["max_attempts"] = value + 1
        if "backoff" in raw and "backoff_type" in raw:
            raise self.fail(f"{field}: give backoff or backoff_type, not both", step)
        for name in ("backoff", "backoff_type"):
            if name in raw:
                value = raw[name]
                backoff = _BACKOFF_ALIASES.get(value, value) if isinstance(value, str) else value
                if backoff not in BACKOFFS:
                    raise self.fail(
                        f"{field}.{name}: unknown backoff {_short(value)} (known: {', '.join(BACKOFFS)})", step
                    )
                out["backoff"] = backoff
        for name in ("initial_delay", "max_delay"):
            if name in raw:
                out[name] = self._capped(
                    self._duration(raw[name], f"{field}.{name}", step, positive=False),
                    f"{field}.{name}",
                    step,
                    "ORCHESTRATOR_MAX_RETRY_DELAY",
                )
        if "jitter" in raw:
            if not isinstance(raw["jitter"], bool):
                raise self.fail(f"{field}.jitter: must be true or false", step)
            out["jitter"] = raw["jitter"]
        return out

    def _retry_of(self, raw: Mapping[str, Any], prefix: str, step: str | None) -> dict[str, Any]:
        if "retry" in raw and "retry_policy" in raw:
            raise self.fail(f"{prefix}retry and {prefix}retry_policy: give one of them", step)
        name = "retry_policy" if "retry_policy" in raw else "retry"
        return self._retry_layer(raw.get(name), f"{prefix}{name}", step)

    def _timeout_of(self, raw: Mapping[str, Any], prefix: str, step: str | None) -> float | None:
        if "timeout" in raw and "timeout_ms" in raw:
            raise self.fail(f"{prefix}timeout and {prefix}timeout_ms: give one of them", step)
        if "timeout_ms" in raw:
            value = raw["timeout_ms"]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise self.fail(f"{prefix}timeout_ms: must be a number of milliseconds > 0, got {_short(value)}", step)
            return self._capped(float(value) / 1000.0, f"{prefix}timeout_ms", step, "ORCHESTRATOR_MAX_STEP_TIMEOUT")
        if raw.get("timeout") is not None:
            seconds = self._duration(raw["timeout"], f"{prefix}timeout", step)
            return self._capped(seconds, f"{prefix}timeout", step, "ORCHESTRATOR_MAX_STEP_TIMEOUT")
        return None

    def _trigger_rule(self, value: Any, prefix: str, step: str | None) -> str:
        if value not in TRIGGER_RULES:
            known = ", ".join(TRIGGER_RULES)
            raise self.fail(f"{prefix}trigger_rule: unknown rule {_short(value)} (known: {known})", step)
        return value

    def _params_of(self, raw: Mapping[str, Any], prefix: str, step: str) -> dict[str, Any]:
        if "params" in raw and "parameters" in raw:
            raise self.fail(f"{prefix}params and {prefix}parameters: give one of them", step)
        name = "parameters" if "parameters" in raw else "params"
        params = raw.get(name)
        if params is None:
            return {}
        if not isinstance(params, dict):
            raise self.fail(f"{prefix}{name}: must be a mapping, got {_type_name(params)}", step)
        return params

    def _id_list(self, value: Any, field: str, step: str) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.fail(f"{field}: must be a list of step ids, got {_type_name(value)}", step)
        out: list[str] = []
        for item in value:
            if not isinstance(item, str):
                raise self.fail(f"{field}: step ids must be strings, got {_short(item)}", step)
            if item not in out:
                out.append(item)
        return out

    def _type(self, value: Any, field: str, step: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{field}: must be a step type name, got {_short(value)}", step)
        registry = _registry()
        try:
            return registry.canonical_type(value)
        except KeyError:
            name = value.strip().lower()
            if name in ENGINE_TYPES:
                return name
            try:
                known = sorted(set(registry.handler_types()) | ENGINE_TYPES)
            except Exception:  # a broken registry must not hide the user's mistake
                known = sorted(ENGINE_TYPES)
            raise self.fail(f"{field}: unknown step type {value!r} (known: {', '.join(known)})", step)

    def _validate_params(self, type_name: str, params: dict[str, Any], field: str, step: str) -> None:
        for name in _DURATION_PARAMS.get(type_name, ()):
            value = params.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                seconds = value / 1000.0 if name.endswith("_ms") else float(value)
                self._capped(seconds, f"{field}.{name}", step, "ORCHESTRATOR_MAX_STEP_TIMEOUT")
        tokens = params.get("max_tokens") if type_name == "llm" else None
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > MAX_LLM_TOKENS:
            raise self.fail(f"{field}.max_tokens: {tokens} is more than the limit {MAX_LLM_TOKENS}", step)
        try:
            handler = _registry().get_handler(type_name)
        except KeyError:
            return  # an engine-level type (condition, parallel) without a handler class
        try:
            handler.validate_params(params)
        except (ValueError, TypeError) as exc:
            raise self.fail(f"{field}: {one_line(exc)}", step)

    def _expression_field(self, value: Any, field: str, step: str) -> str | None:
        """``when``/``condition``/``for_each``: one expression, stored as ``"${...}"``.

        ``x > 1`` and ``${x > 1}`` are both accepted and stored as the latter, so the engine can
        hand the value to either ``evaluate`` or ``render``; YAML booleans become ``${true}`` /
        ``${false}``.
        """
        if value is None:
            return None
        if isinstance(value, bool):
            return "${true}" if value else "${false}"
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{field}: must be an expression string such as '${{steps.a.output.ok}}'", step)
        try:
            expressions.compile_check(value)
        except ExpressionError as exc:
            raise self.fail(f"{field}: {exc.problem}", step)
        stripped = value.strip()
        if expressions.find_expressions(stripped) == [stripped[2:-1]] and stripped.startswith("${"):
            return stripped
        return f"${{{stripped}}}"

    # ---------------------------------------------------------------------------------------
    # Steps
    # ---------------------------------------------------------------------------------------

    def _steps(
        self, raw: Any, field: str, defaults: dict[str, Any], variables: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        if raw is None:
            raise self.fail(f"no steps: {field!r} is missing")
        if not isinstance(raw, list):
            raise self.fail(f"{field!r} must be a list of steps, got {_type_name(raw)}")
        if not raw:
            raise self.fail(f"no steps: {field!r} is empty")
        cap = cap_of("ORCHESTRATOR_MAX_STEPS_PER_RUN")
        if len(raw) > cap:
            raise self.fail(f"too many steps: {len(raw)}, more than {cap} (ORCHESTRATOR_MAX_STEPS_PER_RUN)")
        declared = 0
        steps: list[dict[str, Any]] = []
        by_id: dict[str, dict[str, Any]] = {}
        for index, item in enumerate(raw):
            step = self._step(item, f"{field}[{index}]", defaults)
            if step["id"] in by_id:
                raise self.fail("duplicate step id", step["id"])
            if step["id"] in variables:
                raise self.fail(f"step id collides with variable {step['id']!r}", step["id"])
            by_id[step["id"]] = step
            steps.append(step)
            declared += 1 + len(step["params"].get("tasks", [])) if step["type"] == "parallel" else 1
            if declared > cap:
                raise self.fail(
                    f"too many steps: more than {cap} with the branches of parallel steps "
                    "(ORCHESTRATOR_MAX_STEPS_PER_RUN)"
                )

        for step in steps:
            for dep in step["depends_on"]:
                if dep == step["id"]:
                    raise self.fail("depends_on references the step itself", step["id"])
                if dep not in by_id:
                    raise self.fail(f"depends_on references unknown step {dep!r}", step["id"])
        self._branches(steps, by_id)
        self._check_cycles(steps, by_id)
        for step in steps:
            self._check_references(step, by_id, variables)
            self._check_flow_keys(step, variables)
        return steps

    def _step(self, raw: Any, where: str, defaults: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise self.fail(f"{where}: a step must be a mapping, got {_type_name(raw)}")
        if "id" not in raw or raw["id"] is None:
            raise self.fail(f"{where}: missing 'id'")
        sid = raw["id"]
        if not isinstance(sid, str) or not _STEP_ID.fullmatch(sid):
            raise self.fail(
                f"{where}: invalid step id {_short(sid)} (letters, digits, '_' and '-', starting with a letter or '_')"
            )
        for key in raw:
            if key not in _STEP_KEYS:
                raise self.fail(f"unknown key {key!r}{_hint(key, _STEP_KEYS)}", sid)

        params = copy.copy(self._params_of(raw, "", sid))
        if "call" in raw:
            call = raw["call"]
            if not isinstance(call, str) or not call.strip():
                raise self.fail("call: must be a path such as '/functions/v1/agent-proxy/notify'", sid)
            method = raw.get("method", "POST")
            if not isinstance(method, str) or not method.strip():
                raise self.fail("method: must be an HTTP method such as GET or POST", sid)
            for name in ("call", "method"):
                if name in params:
                    raise self.fail(f"{name!r} is given both on the step and in its params", sid)
            params = {"call": call, "method": method.strip().upper(), **params}
            type_name = self._type(raw["type"], "type", sid) if raw.get("type") is not None else "http"
            if type_name != "http":
                raise self.fail(f"a step with 'call' is an http step, not {raw['type']!r}", sid)
        else:
            if "method" in raw:
                raise self.fail("'method' is only valid together with 'call'", sid)
            if raw.get("type") is None:
                raise self.fail("missing 'type'", sid)
            type_name = self._type(raw["type"], "type", sid)
        if "credential" in raw:
            # `credential: <alias>` beside `call` (seed 004 style) is the http param of that name
            if type_name != "http":
                raise self.fail(f"'credential' is only valid on http steps, not {type_name}", sid)
            if "credential" in params:
                raise self.fail("'credential' is given both on the step and in its params", sid)
            params = {**params, "credential": raw["credential"]}

        retry = dict(defaults["retry"])
        retry.update(self._retry_of(raw, "", sid))
        timeout = self._timeout_of(raw, "", sid)
        if timeout is None:
            timeout = defaults["timeout"]
        trigger_rule = (
            self._trigger_rule(raw["trigger_rule"], "", sid) if "trigger_rule" in raw else defaults["trigger_rule"]
        )

        for_each = raw.get("for_each")
        if for_each is not None:
            if isinstance(for_each, str):
                for_each = self._expression_field(for_each, "for_each", sid)
            elif not isinstance(for_each, list):
                raise self.fail(f"for_each: must be an expression string or a list, got {_type_name(for_each)}", sid)
            self._check_for_each_at_load(for_each, sid)
            if type_name in ENGINE_TYPES:
                raise self.fail(f"for_each is not supported on {type_name} steps", sid)
        loop_name = raw.get("as")
        if loop_name is not None:
            if for_each is None:
                raise self.fail("'as' is only valid together with 'for_each'", sid)
            if not isinstance(loop_name, str) or not _NAME.fullmatch(loop_name) or loop_name in _LOOP_RESERVED:
                raise self.fail(f"as: invalid loop variable name {_short(loop_name)}", sid)

        condition = None
        on_success: list[str] = []
        on_failure: list[str] = []
        if type_name == "condition":
            if raw.get("condition") is None:
                raise self.fail("a condition step needs 'condition'", sid)
            condition = self._expression_field(raw["condition"], "condition", sid)
            on_success = self._id_list(raw.get("on_success"), "on_success", sid)
            on_failure = self._id_list(raw.get("on_failure"), "on_failure", sid)
        else:
            for name in ("condition", "on_success", "on_failure"):
                if name in raw:
                    raise self.fail(f"{name!r} is only valid for steps of type condition", sid)

        if type_name == "parallel":
            params = self._parallel_params(params, sid, retry, timeout)
        self._validate_params(type_name, params, "params", sid)

        # flow control: the step's own declaration wins over defaults (`rate_limit: null` opts out)
        flow: dict[str, Any] = {}
        for name, parse in (("rate_limit", self._rate_limit), ("concurrency", self._concurrency)):
            value = parse(raw[name], name, sid) if name in raw else defaults.get(name)
            if value is not None and type_name == "condition":
                if name in raw:
                    raise self.fail(f"{name} does not apply to condition steps (they run inside the engine)", sid)
                continue  # a default does not apply to steps the engine runs itself
            if value is not None:
                flow[name] = copy.deepcopy(value)

        # an executor queue: the step is done outside Celery (POST /api/v1/executors/poll)
        if "queue" in raw:
            queue = raw["queue"]
            if not isinstance(queue, str) or not _QUEUE_NAME.match(queue):
                raise self.fail(
                    f"queue: expected a name of letters, digits, '.', '_' or '-' (at most 100), got {queue!r}", sid
                )
            if type_name in ("condition", "parallel"):
                raise self.fail(f"queue does not apply to {type_name} steps (the engine runs them itself)", sid)
            if flow:
                raise self.fail("queue: an executor's step takes no rate_limit or concurrency", sid)
            flow["queue"] = queue
        elif type_name == "external":
            raise self.fail("an external step needs a `queue` its executors poll", sid)

        return {
            "id": sid,
            "name": self._string(raw.get("name"), "name", default=sid, step=sid),
            "type": type_name,
            "params": params,
            "depends_on": self._id_list(raw.get("depends_on"), "depends_on", sid),
            "retry": retry,
            "timeout": timeout,
            "when": self._expression_field(raw.get("when"), "when", sid),
            "trigger_rule": trigger_rule,
            "for_each": for_each,
            "as": loop_name or "item",
            "condition": condition,
            "on_success": on_success,
            "on_failure": on_failure,
            "branch_of": None,
            "refs": [],
            **flow,  # rate_limit / concurrency / queue, present only when declared
        }

    def _check_for_each_at_load(self, for_each: Any, sid: str) -> None:
        """The item count of a for_each known before any run (a literal list, or an expression
        such as ``${range(100000)}`` that uses no names) against ORCHESTRATOR_MAX_FOR_EACH_ITEMS."""
        items = for_each
        if isinstance(for_each, str):
            refs = expressions.analyze(for_each, single=True)
            if refs.step_ids or refs.var_names or (refs.bare_names - expressions.GLOBAL_NAMES):
                return  # known at run time only: the engine checks it at expansion
            try:
                items = expressions.evaluate(for_each, {})
            except ExpressionError as exc:
                raise self.fail(f"for_each: {exc.problem}", sid)
        try:
            check_for_each_items(sid, items)
        except WorkflowError as exc:
            raise self.fail(exc.problem, sid)

    def _parallel_params(
        self, params: dict[str, Any], sid: str, retry: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        tasks = params.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise self.fail("params.tasks: a parallel step needs a non-empty list of tasks", sid)
        children: list[dict[str, Any]] = []
        seen: set[str] = set()
        for index, raw in enumerate(tasks):
            where = f"params.tasks[{index}]"
            if not isinstance(raw, dict):
                raise self.fail(f"{where}: must be a mapping, got {_type_name(raw)}", sid)
            for key in raw:
                if key not in _CHILD_KEYS:
                    raise self.fail(f"{where}: unknown key {key!r}{_hint(key, _CHILD_KEYS)}", sid)
            child_id = raw.get("id", str(index))
            if not isinstance(child_id, str) or not _CHILD_ID.fullmatch(child_id):
                raise self.fail(f"{where}: invalid task id {_short(child_id)}", sid)
            if child_id in seen:
                raise self.fail(f"{where}: duplicate task id {child_id!r}", sid)
            seen.add(child_id)
            if raw.get("type") is None:
                raise self.fail(f"{where}: missing 'type'", sid)
            child_type = self._type(raw["type"], f"{where}.type", sid)
            if child_type in ENGINE_TYPES:
                raise self.fail(f"{where}.type: {child_type} steps cannot be nested in a parallel step", sid)
            child_params = self._params_of(raw, f"{where}.", sid)
            child_retry = dict(retry)
            child_retry.update(self._retry_of(raw, f"{where}.", sid))
            child_timeout = self._timeout_of(raw, f"{where}.", sid)
            self._validate_params(child_type, child_params, f"{where}.params", sid)
            children.append(
                {
                    "id": child_id,
                    "name": self._string(raw.get("name"), f"{where}.name", default=child_id, step=sid),
                    "type": child_type,
                    "params": child_params,
                    "retry": child_retry,
                    "timeout": timeout if child_timeout is None else child_timeout,
                }
            )
        return {**params, "tasks": children}

    def _branches(self, steps: list[dict[str, Any]], by_id: dict[str, dict[str, Any]]) -> None:
        """Condition steps: mark their targets with ``branch_of`` and add the implied edge."""
        for step in steps:
            if step["type"] != "condition":
                continue
            sid = step["id"]
            both = set(step["on_success"]) & set(step["on_failure"])
            if both:
                raise self.fail(f"{sorted(both)[0]!r} is in both on_success and on_failure", sid)
            for field, when in (("on_success", True), ("on_failure", False)):
                for target_id in step[field]:
                    if target_id == sid:
                        raise self.fail(f"{field} cannot target the condition step itself", sid)
                    target = by_id.get(target_id)
                    if target is None:
                        raise self.fail(f"{field} references unknown step {target_id!r}", sid)
                    if target["branch_of"] is not None:
                        raise self.fail(
                            f"{field}: step {target_id!r} is already a branch of condition step "
                            f"{target['branch_of']['step']!r}",
                            sid,
                        )
                    target["branch_of"] = {"step": sid, "when": when}
                    if sid not in target["depends_on"]:
                        target["depends_on"].append(sid)

    def _check_cycles(self, steps: list[dict[str, Any]], by_id: dict[str, dict[str, Any]]) -> None:
        """Iterative depth-first search; a back edge is a cycle, reported as ``a -> b -> a``."""
        state: dict[str, int] = {}  # 1 = on the stack, 2 = done
        for root in steps:
            if root["id"] in state:
                continue
            stack: list[tuple[str, Iterator[str]]] = [(root["id"], iter(root["depends_on"]))]
            path = [root["id"]]
            state[root["id"]] = 1
            while stack:
                node, deps = stack[-1]
                for dep in deps:
                    if state.get(dep) == 1:
                        cycle = path[path.index(dep) :] + [dep]
                        raise self.fail(f"dependency cycle: {' -> '.join(cycle)}", cycle[0])
                    if dep not in state:
                        state[dep] = 1
                        path.append(dep)
                        stack.append((dep, iter(by_id[dep]["depends_on"])))
                        break
                else:
                    state[node] = 2
                    stack.pop()
                    path.pop()

    def _is_upstream(self, ref: str, step: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> bool:
        if ref in step["depends_on"]:
            return True
        seen: set[str] = set()
        todo = list(step["depends_on"])
        while todo:
            current = todo.pop()
            if current == ref:
                return True
            if current not in seen:
                seen.add(current)
                todo.extend(by_id[current]["depends_on"])
        return False

    def _check_references(
        self, step: dict[str, Any], by_id: dict[str, dict[str, Any]], variables: Mapping[str, Any]
    ) -> None:
        sid = step["id"]
        fields: list[tuple[str, Any, bool]] = list(
            (path, text, False) for path, text in _iter_strings(step["params"], "params")
        )
        for name in ("when", "condition"):
            if step[name] is not None:
                fields.append((name, step[name], True))
        if isinstance(step["for_each"], str):
            fields.append(("for_each", step["for_each"], True))
        elif isinstance(step["for_each"], list):
            fields.extend((path, text, False) for path, text in _iter_strings(step["for_each"], "for_each"))

        loop_names = {step["as"], "index"} if step["for_each"] is not None else set()
        refs: set[str] = set()
        for field, text, single in fields:
            try:
                found = expressions.analyze(text, single=single)
            except ExpressionError as exc:
                raise self.fail(f"{field}: {exc.problem}", sid)
            field_refs: set[str] = set()
            for name in sorted(found.var_names):
                if name not in variables:
                    raise self.fail(f"{field} references undefined variable {name!r}", sid)
            # step ids first: `steps.my-step` parses as `steps.my - step`, the hint is on the step
            for ref in sorted(found.step_ids):
                if ref not in by_id:
                    raise self.fail(f"{field} references unknown step {ref!r}{_dash_hint(ref, by_id)}", sid)
                field_refs.add(ref)
            for name in sorted(found.bare_names):
                if name in variables or name == "run" or name in expressions.GLOBAL_NAMES:
                    continue
                if name in loop_names and field.startswith("params"):
                    continue
                if name in by_id:
                    field_refs.add(name)  # seed 002: ${task1.output}
                elif name in loop_names or name in {"item", "index"}:
                    raise self.fail(
                        f"{field} references loop variable {name!r}, only available in the params of a step "
                        "with for_each",
                        sid,
                    )
                else:
                    raise self.fail(f"{field} references undefined variable {name!r}", sid)
            for ref in sorted(field_refs):
                if ref == sid:
                    raise self.fail(f"{field} references the step itself", sid)
                if not self._is_upstream(ref, step, by_id):
                    raise self.fail(
                        f"{field} references step {ref!r}, which is not upstream of this step (add it to depends_on)",
                        sid,
                    )
            refs |= field_refs
        step["refs"] = sorted(refs)


_INFERRED: dict[type, str] = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    dict: "object",
    list: "array",
}


def _dash_hint(ref: str, step_ids: Mapping[str, Any] | set[str]) -> str:
    """``steps.my-step`` parses as ``steps.my - step``: point at the subscript spelling."""
    for sid in step_ids:
        if sid.startswith(f"{ref}-"):
            return f" (write steps['{sid}'] for ids with '-')"
    return ""


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_spec(text: str | bytes, source: str = "<string>") -> dict[str, Any]:
    """Parse a workflow file, detect its dialect, normalize and validate it.

    ``text`` is the YAML (str, or bytes that must be UTF-8); ``source`` names it in messages.
    Returns the normalized spec (a JSON-serializable dict) described in docs/spec-contract.md:
    ``key, label, name, description, category, dialect, timeout, variables, trigger, outputs,
    steps``; durations in seconds (float). Seed 002's computed ``workflow.variables`` appear as
    variables of type ``any`` carrying an extra ``expr`` key (see :func:`validate_inputs`).

    Raises:
        WorkflowError: one line ``"<source>: step '<id>': <problem>"`` for any problem: size
            (``ORCHESTRATOR_MAX_SPEC_BYTES``), encoding, YAML syntax (with its line), unknown
            keys, step types or dependencies, cycles, bad durations, variables or expressions.
    """
    loader = _SpecLoader(source)
    return loader.normalize(loader.parse(text))


def load_spec_file(path: str | PathLike[str]) -> dict[str, Any]:
    """:func:`load_spec` on the file at ``path`` (the path names the source in messages).

    Raises:
        WorkflowError: the file cannot be read, is too large, or is not a valid workflow.
    """
    source = str(path)
    limit = int(_setting("ORCHESTRATOR_MAX_SPEC_BYTES", 1_000_000))
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise WorkflowError(f"cannot read the file: {exc.strerror or exc}", source=source)
    return load_spec(data, source=source)


_TRUE = frozenset({"true", "1", "yes", "on", "y"})
_FALSE = frozenset({"false", "0", "no", "off", "n"})


def _coerce(name: str, type_name: str, value: Any) -> Any:
    """``value`` converted to ``type_name``: strings (from a CLI) are parsed, others checked."""
    where = f"variable {name!r}"
    if isinstance(value, str) and type_name not in ("string", "any"):
        text = value.strip()
        if type_name == "integer":
            if not _INTEGER.fullmatch(text):
                raise WorkflowError(f"{where}: expected integer, got {_short(value)}")
            return int(text)
        if type_name == "number":
            if _INTEGER.fullmatch(text):
                return int(text)
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise WorkflowError(f"{where}: expected number, got {_short(value)}")
            return number
        if type_name == "boolean":
            lowered = text.lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise WorkflowError(f"{where}: expected boolean (true/false, yes/no, 1/0), got {_short(value)}")
        try:
            parsed = json.loads(text)
        except ValueError:
            raise WorkflowError(f"{where}: expected {type_name} as JSON, got {_short(value)}")
        value = parsed
    if isinstance(value, tuple):
        value = list(value)
    problem = _check_type(value, type_name)
    if problem:
        raise WorkflowError(f"{where}: {problem}")
    return value


def validate_inputs(spec: Mapping[str, Any], raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run's variables: ``raw`` checked against ``spec["variables"]``, defaults applied.

    ``raw`` maps names to values; strings (``--var n=3`` on the CLI) are converted to the declared
    type: integer ``"3"``, number ``"2.5"``, boolean ``true/false/yes/no/1/0``, object and array
    as JSON. Other values are type-checked (a bool is not an integer). ``None`` counts as not
    given. An optional variable with no default is present with the value ``None``, so
    ``${name}`` resolves. Computed variables (seed 002's ``workflow.variables``, an ``expr``
    key) are rendered last, from the others, under one expression budget (size, work and time:
    ``templates_app.expressions.limits``). Returns a new dict; ``raw`` is not modified.

    Raises:
        WorkflowError: ``"variable 'x': required"``, an unknown name, a value of the wrong type,
            or a computed variable that fails to render. One line.
    """
    declared: Mapping[str, Any] = spec.get("variables") or {}
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise WorkflowError(f"variables must be a mapping of names to values, got {_type_name(raw)}")
    for name in raw:
        if name not in declared:
            known = ", ".join(sorted(n for n, d in declared.items() if "expr" not in d)) or "none"
            raise WorkflowError(f"variable {name!r}: unknown variable (known: {known})")
        if "expr" in declared[name]:
            raise WorkflowError(f"variable {name!r}: computed by the workflow, cannot be set")

    values: dict[str, Any] = {}
    for name, decl in declared.items():
        if "expr" in decl:
            continue
        given = raw.get(name)
        if given is not None:
            values[name] = _coerce(name, decl.get("type", "any"), given)
        elif "default" in decl:
            values[name] = copy.deepcopy(decl["default"])
        elif decl.get("required"):
            raise WorkflowError(f"variable {name!r}: required")
        else:
            values[name] = None
    # one budget for all the computed variables of the run (this runs in the web process)
    with expressions.limits():
        for name, decl in declared.items():
            if "expr" in decl:
                try:
                    values[name] = expressions.render(decl["expr"], {"vars": values})
                except ExpressionError as exc:
                    raise WorkflowError(f"variable {name!r}: {exc.problem}")
    return values


# --------------------------------------------------------------------------------------------
# The canonical format as a JSON Schema (for LLM structured output: templates_app.generation)
# --------------------------------------------------------------------------------------------

#: Canonical step keys the JSON Schema offers (a subset of the loader's _STEP_KEYS: the other
#: keys are dialect spellings and flow-control options a generated workflow does not need).
SCHEMA_STEP_KEYS = (
    "id",
    "name",
    "type",
    "depends_on",
    "params",
    "when",
    "trigger_rule",
    "for_each",
    "as",
    "condition",
    "on_success",
    "on_failure",
    "timeout",
    "retry",
)
#: Canonical top-level keys the JSON Schema offers (a subset of _TOP_KEYS).
SCHEMA_TOP_KEYS = ("key", "name", "description", "category", "variables", "outputs", "steps")


def json_schema(
    step_types: list[str] | None = None, params: Mapping[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The canonical workflow format as a JSON Schema (draft 2020-12), built from this loader's rules.

    Names, patterns and enums come from the loader itself: the slug and step id patterns, the
    variable types (:data:`VARIABLE_TYPES`), trigger rules, backoffs, and the step types
    (``step_types``, default: every registered handler type plus :data:`ENGINE_TYPES`). Durations
    are numbers of seconds. The schema describes shape only: dependencies, cycles and
    expressions are checked by :func:`load_spec` on the answer, as for a hand-written file.

    ``params``: ``{step type: JSON Schema of its params}``; when given, a step is ``anyOf`` one
    variant per type (``type`` a const, ``params`` that type's schema), so schema-constrained
    decoding cannot pair a type with another type's params. Types without an entry keep free-form
    params.

    Returns a dict; every object has ``additionalProperties: false`` except free-form ``params``
    and the ``outputs`` mapping.
    """
    if step_types is None:
        step_types = sorted(set(_registry().handler_types()) | ENGINE_TYPES)
    ids = {"type": "array", "items": {"type": "string", "pattern": f"^{_STEP_ID.pattern}$"}}
    expression = {"type": "string", "description": "an expression such as ${steps.a.output.ok}"}
    step_properties: dict[str, Any] = {
        "id": {"type": "string", "pattern": f"^{_STEP_ID.pattern}$"},
        "name": {"type": "string"},
        "type": {"type": "string", "enum": list(step_types)},
        "depends_on": ids,
        "params": {"type": "object", "description": "the step type's parameters; values may hold ${...}"},
        "when": expression,
        "trigger_rule": {"type": "string", "enum": list(TRIGGER_RULES)},
        "for_each": expression,
        "as": {"type": "string", "pattern": f"^{_NAME.pattern}$"},
        "condition": expression,
        "on_success": ids,
        "on_failure": ids,
        "timeout": {"type": "number", "exclusiveMinimum": 0, "description": "seconds"},
        "retry": {
            "type": "object",
            "properties": {
                "max_attempts": {"type": "integer", "minimum": 1},
                "backoff": {"type": "string", "enum": list(BACKOFFS)},
                "initial_delay": {"type": "number", "minimum": 0},
                "max_delay": {"type": "number", "minimum": 0},
                "jitter": {"type": "boolean"},
            },
            "additionalProperties": False,
        },
    }
    assert set(step_properties) == set(SCHEMA_STEP_KEYS) and set(SCHEMA_STEP_KEYS) <= _STEP_KEYS
    assert set(SCHEMA_TOP_KEYS) <= _TOP_KEYS
    variable = {
        "type": "object",
        "properties": {
            "type": {"type": "string", "enum": list(VARIABLE_TYPES)},
            "required": {"type": "boolean"},
            "default": {},
            "description": {"type": "string"},
        },
        "required": ["type"],
        "additionalProperties": False,
    }
    assert set(variable["properties"]) == _VARIABLE_KEYS
    step: dict[str, Any] = {
        "type": "object",
        "properties": step_properties,
        "required": ["id", "type", "depends_on", "params"],
        "additionalProperties": False,
    }
    if params:
        variants = []
        for name in step_types:
            props = dict(step_properties)
            props["type"] = {"type": "string", "const": name}
            if name in params:
                props["params"] = params[name]
            if name != "condition":  # only condition steps take condition / on_success / on_failure
                for key in ("condition", "on_success", "on_failure"):
                    props.pop(key)
            required = [*step["required"], "condition"] if name == "condition" else step["required"]
            variants.append({**step, "properties": props, "required": required})
        step = {"anyOf": variants}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "workflow",
        "type": "object",
        "properties": {
            "key": {"type": "string", "pattern": f"^{_SLUG.pattern}$", "maxLength": 200},
            "name": {"type": "string", "maxLength": 200},
            "description": {"type": "string"},
            "category": {"type": "string", "maxLength": 100},
            "variables": {
                "type": "object",
                "propertyNames": {"pattern": f"^{_NAME.pattern}$"},
                "additionalProperties": variable,
            },
            "outputs": {"type": "object", "additionalProperties": {"type": "string"}},
            "steps": {"type": "array", "minItems": 1, "items": step},
        },
        "required": ["key", "name", "description", "variables", "steps"],
        "additionalProperties": False,
    }
