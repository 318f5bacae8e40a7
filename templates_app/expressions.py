"""``${...}`` expressions in workflow files, evaluated in Jinja2's immutable sandbox (never ``eval``).

Syntax is a Jinja2 expression (``steps.fetch.output.items | length > 0``) with a few spellings
that workflow files from other systems use translated first: ``&&`` -> ``and``, ``||`` -> ``or``,
a lone ``!`` -> ``not`` (``!=`` is kept), ``null`` -> ``none`` (``true``/``false`` are native).

Rendering rules (:func:`render`):

- a string that is exactly one ``${...}`` (surrounding whitespace allowed) returns the native
  value of the expression: ``"${vars.n}"`` -> ``3``, ``"${steps.a.output}"`` -> a dict;
- inside a longer string each expression is interpolated: strings as they are, ``None`` as
  ``null``, booleans as ``true``/``false``, numbers with ``str()``, dicts and lists as JSON;
  (the JSON spelling, so a value reads the same in a URL, a prompt or a JSON body);
- ``$${`` writes a literal ``${`` (for shell snippets such as ``$${HOME}``);
- dicts and lists are walked, other values are returned unchanged.

Names (the context, see :func:`namespace`): ``vars``, ``steps``, ``item``, ``index``, ``run`` and
anything else the caller puts in the context, plus every variable and every step id as a bare
name (``${report_path}``, seed 002's ``${task1.output}``). Dot access on a mapping prefers the
key: ``steps.fetch.output.items`` is the value of the key ``"items"``, not ``dict.items``.
Undefined names raise :class:`ExpressionError` when evaluated (``StrictUndefined``).

Sandbox: ``ImmutableSandboxedEnvironment`` refuses private and internal attributes
(``__class__``, ``__globals__``, ...) and methods that mutate lists and dicts; the globals are cut
to ``range`` and ``dict``; filters that can blow up memory are removed and a few operators are
bounded (``**``, ``*`` on sequences, ``%`` and ``str`` methods with huge widths).
Compiled expressions are cached (``functools.lru_cache``): the engine evaluates them on a hot path.
"""

from __future__ import annotations

import contextvars
import json
import math
import re
import types
from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from functools import lru_cache
from typing import Any, NamedTuple

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.environment import TemplateExpression
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.parser import Parser
from jinja2.runtime import Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ExpressionError, one_line

__all__ = [
    "CONTEXT_NAMES",
    "GLOBAL_NAMES",
    "Refs",
    "analyze",
    "compile_check",
    "evaluate",
    "find_expressions",
    "is_expression",
    "namespace",
    "references",
    "render",
]

#: Names the engine's context provides besides variables and step ids.
CONTEXT_NAMES = frozenset({"vars", "steps", "item", "index", "run"})
#: Jinja globals left in the sandbox.
GLOBAL_NAMES = frozenset({"range", "dict"})

_MAX_EXPRESSION = 10_000  # characters of one expression
_MAX_SIZE = 1_000_000  # items/characters an operator may build at once
_MAX_EXPONENT_BITS = 100_000
_FORMAT_WIDTH = re.compile(r"%[-#0 +]*(\*|\d{5,})|\{[^{}]*:[^{}]*(\*|\d{5,})")


# --------------------------------------------------------------------------------------------
# The sandbox
# --------------------------------------------------------------------------------------------


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with mapping keys winning over attributes and bounded operators."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        # ``output.items`` must be the key "items" of a step output, not the dict method.
        if isinstance(obj, Mapping):
            try:
                return _opened(obj[attribute])
            except (KeyError, TypeError):
                if _is_open_placeholder(obj):
                    return _OpenPlaceholder(placeholder(f"{obj[PLACEHOLDER_KEY]}.{attribute}"))
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if _is_open_placeholder(obj) and isinstance(argument, (str, int)) and argument not in obj:
            return _OpenPlaceholder(placeholder(f"{obj[PLACEHOLDER_KEY]}[{argument!r}]"))
        return _opened(super().getitem(obj, argument))


#: Key of a dry-run placeholder: a JSON object ``{"$placeholder": "<where it stands>"}`` that a
#: stubbed step returns for a value whose shape nobody declared (an HTTP body, a callable's
#: result). Only while :data:`open_placeholders` is true does any key of it resolve (to a
#: placeholder again), so a dry run does not fail on what it cannot know; elsewhere it is a
#: plain mapping.
PLACEHOLDER_KEY = "$placeholder"

#: True inside a dry run (templates_app.generation.dryrun): placeholders answer every key.
open_placeholders: contextvars.ContextVar[bool] = contextvars.ContextVar("open_placeholders", default=False)


def placeholder(where: str) -> dict[str, str]:
    """A dry-run placeholder for an unknown value found at ``where`` (``steps.fetch.output.body``)."""
    return {PLACEHOLDER_KEY: where[:200]}


def _is_open_placeholder(obj: Any) -> bool:
    return isinstance(obj, Mapping) and PLACEHOLDER_KEY in obj and open_placeholders.get()


class _OpenPlaceholder(dict):
    """A placeholder inside a dry run: any key gives a placeholder, an ordering comparison is
    false, arithmetic gives the placeholder back. Still a dict, so it leaves the sandbox as JSON."""

    __hash__ = None  # type: ignore[assignment]

    def _false(self, other: Any) -> bool:
        return False

    __lt__ = __le__ = __gt__ = __ge__ = _false  # type: ignore[assignment]

    def _same(self, other: Any) -> _OpenPlaceholder:
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _same
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = _same


def _opened(value: Any) -> Any:
    """``value``, as an :class:`_OpenPlaceholder` when it is a placeholder and a dry run is on."""
    if type(value) is dict and PLACEHOLDER_KEY in value and open_placeholders.get():
        return _OpenPlaceholder(value)
    return value

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
                if left.bit_length() * right > _MAX_EXPONENT_BITS:
                    raise SecurityError("the result of '**' would be too large")
        elif operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    if len(seq) * count > _MAX_SIZE:
                        raise SecurityError("the result of '*' would be too large")
        elif operator == "%" and isinstance(left, str) and _FORMAT_WIDTH.search(left):
            raise SecurityError("format widths this large are not allowed")
        return super().call_binop(context, operator, left, right)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        # str methods take widths (ljust, center, zfill, expandtabs...): keep them bounded.
        bound = getattr(obj, "__self__", None)
        wrapped = getattr(obj, "__wrapped__", None)  # the sandbox's str.format wrapper
        if wrapped is not None:
            bound = getattr(wrapped, "__self__", bound)
        if isinstance(bound, str):
            if any(isinstance(a, int) and a > _MAX_SIZE for a in (*args, *kwargs.values())):
                raise SecurityError("string sizes this large are not allowed")
            if _FORMAT_WIDTH.search(bound) and getattr(obj, "__name__", "") in ("format", "format_map"):
                raise SecurityError("format widths this large are not allowed")
        return super().call(context, obj, *args, **kwargs)


def _from_json(value: Any) -> Any:
    if not isinstance(value, (str, bytes)):
        raise TypeError("fromjson expects a string")
    return json.loads(value)


def _to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _make_env() -> _Sandbox:
    env = _Sandbox(undefined=StrictUndefined, autoescape=False)
    env.globals = {name: env.globals[name] for name in GLOBAL_NAMES}
    for name in ("center", "indent", "wordwrap", "slice", "batch", "random", "xmlattr", "urlize"):
        env.filters.pop(name, None)
    env.filters["json"] = _to_json
    env.filters["fromjson"] = _from_json
    return env


_env = _make_env()


# --------------------------------------------------------------------------------------------
# Finding and translating expressions
# --------------------------------------------------------------------------------------------


def _skip_string(text: str, pos: int) -> int:
    """Index just past the quoted string starting at ``text[pos]`` (or len(text) if unclosed)."""
    quote = text[pos]
    pos += 1
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            pos += 2
            continue
        if char == quote:
            return pos + 1
        pos += 1
    return pos


@lru_cache(maxsize=8192)
def _segments(text: str) -> tuple[str | tuple[str], ...]:
    """Split a template string into literal parts (str) and expressions (1-tuples of source).

    ``${`` opens an expression, closed by the ``}`` that brings the brace depth back to zero
    (quoted strings inside are skipped, so ``${ {'a': '}'}['a'] }`` works); ``$${`` is a
    literal ``${``. Raises ExpressionError for an unclosed ``${``.
    """
    parts: list[str | tuple[str]] = []
    literal: list[str] = []
    pos = 0
    length = len(text)
    while pos < length:
        start = text.find("$", pos)
        if start < 0:
            literal.append(text[pos:])
            break
        literal.append(text[pos:start])
        if text.startswith("$${", start):
            literal.append("${")
            pos = start + 3
            continue
        if not text.startswith("${", start):
            literal.append("$")
            pos = start + 1
            continue
        depth = 1
        cur = start + 2
        while cur < length:
            char = text[cur]
            if char in "'\"":
                cur = _skip_string(text, cur)
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    break
            cur += 1
        if depth != 0:
            raise ExpressionError(f"unclosed '${{' in {_quote(text)}")
        if literal:
            joined = "".join(literal)
            if joined:
                parts.append(joined)
            literal = []
        parts.append((text[start + 2 : cur],))
        pos = cur + 1
    joined = "".join(literal)
    if joined:
        parts.append(joined)
    return tuple(parts)


def find_expressions(text: str) -> list[str]:
    """The sources of the ``${...}`` expressions in ``text``, in order (without ``${`` and ``}``).

    Raises ExpressionError for an unclosed ``${``.
    """
    return [part[0] for part in _segments(text) if isinstance(part, tuple)]


def is_expression(value: Any) -> bool:
    """True for a string that holds at least one ``${...}`` (``$${`` escapes do not count)."""
    if not isinstance(value, str) or "${" not in value:
        return False
    try:
        return any(isinstance(part, tuple) for part in _segments(value))
    except ExpressionError:
        return True


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _translate(source: str) -> str:
    """Rewrite the C/JS-style spellings into Jinja's, outside string literals."""
    out: list[str] = []
    pos = 0
    length = len(source)
    while pos < length:
        char = source[pos]
        if char in "'\"":
            end = _skip_string(source, pos)
            out.append(source[pos:end])
            pos = end
        elif source.startswith("&&", pos):
            out.append(" and ")
            pos += 2
        elif source.startswith("||", pos):
            out.append(" or ")
            pos += 2
        elif char == "!" and not source.startswith("!=", pos):
            out.append(" not ")
            pos += 1
        elif char.isalpha() or char == "_":
            match = _WORD.match(source, pos)
            assert match is not None
            word = match.group(0)
            back = pos - 1
            while back >= 0 and source[back].isspace():
                back -= 1
            after_dot = back >= 0 and source[back] == "."
            out.append("none" if word == "null" and not after_dot else word)
            pos = match.end()
        elif char.isdigit():
            # keep number literals (and anything glued to them) as they are: 1e5, 0x1f
            end = pos
            while end < length and (source[end].isalnum() or source[end] in "._"):
                end += 1
            out.append(source[pos:end])
            pos = end
        else:
            out.append(char)
            pos += 1
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Compiling (cached)
# --------------------------------------------------------------------------------------------


class Refs(NamedTuple):
    """What expressions refer to (see :func:`analyze`)."""

    bare_names: frozenset[str]  # ${x}: a variable, a step id (seed 002), a context name or a global
    var_names: frozenset[str]  # ${vars.x}, ${vars['x']}
    step_ids: frozenset[str]  # ${steps.x...}, ${steps['x']...}


class _Compiled(NamedTuple):
    source: str
    function: TemplateExpression
    refs: Refs
    builds_containers: bool


def _quote(source: str) -> str:
    return repr(one_line(source, 120))


def _strip_braces(expr: str) -> str:
    """``"${x > 1}"`` -> ``"x > 1"``; a bare expression is returned unchanged."""
    stripped = expr.strip()
    if stripped.startswith("${"):
        parts = _segments(stripped)
        if len(parts) == 1 and isinstance(parts[0], tuple):
            return parts[0][0]
    return expr


@lru_cache(maxsize=8192)
def _compile(source: str) -> _Compiled:
    """Parse, check and compile one expression source (without ``${ }``)."""
    if not source.strip():
        raise ExpressionError("empty expression '${}'")
    if len(source) > _MAX_EXPRESSION:
        raise ExpressionError(f"expression too long ({len(source)} characters, limit {_MAX_EXPRESSION})")
    translated = _translate(source)
    try:
        parser = Parser(_env, translated, state="variable")
        expr = parser.parse_expression()
        if not parser.stream.eos:
            raise TemplateSyntaxError("unexpected text after the expression", parser.stream.current.lineno)
        expr.set_environment(_env)
        body = [nodes.Assign(nodes.Name("result", "store"), expr, lineno=1)]
        template = _env.from_string(nodes.Template(body, lineno=1))
    except TemplateSyntaxError as exc:
        raise ExpressionError(f"expression {_quote(source)}: syntax error: {exc.message}") from None
    except RecursionError:
        raise ExpressionError(f"expression {_quote(source)}: nested too deeply") from None
    except SecurityError as exc:
        raise ExpressionError(f"expression {_quote(source)}: refused by the sandbox: {exc}") from None

    bare: set[str] = set()
    var_names: set[str] = set()
    step_ids: set[str] = set()
    # find_all() yields descendants only: the root (``${x}``, ``${vars.y}``) is added by hand.
    for node in (expr, *expr.find_all((nodes.Name, nodes.Getattr, nodes.Getitem))):
        if not isinstance(node, (nodes.Name, nodes.Getattr, nodes.Getitem)):
            continue
        if isinstance(node, nodes.Name):
            if node.ctx == "load" and node.name not in ("steps", "vars"):
                bare.add(node.name)
            continue
        owner = node.node
        if not isinstance(owner, nodes.Name) or owner.name not in ("steps", "vars"):
            continue
        if isinstance(node, nodes.Getattr):
            key: Any = node.attr
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            key = node.arg.value
        else:
            continue  # steps[some_expression]: not known before run time
        (step_ids if owner.name == "steps" else var_names).add(key)
    containers = (nodes.List, nodes.Dict, nodes.Tuple)
    builds = isinstance(expr, containers) or any(True for _ in expr.find_all(containers))
    refs = Refs(frozenset(bare), frozenset(var_names), frozenset(step_ids))
    return _Compiled(source, TemplateExpression(template, False), refs, builds)


def compile_check(expr: str) -> None:
    """Check that ``expr`` (one expression, with or without ``${ }``) compiles.

    Raises:
        ExpressionError: syntax error, unclosed ``${``, empty or too long expression.
    """
    if not isinstance(expr, str):
        raise ExpressionError(f"expression must be a string, got {type(expr).__name__}")
    _compile(_strip_braces(expr))


# --------------------------------------------------------------------------------------------
# Evaluating
# --------------------------------------------------------------------------------------------


def namespace(context: Mapping[str, Any]) -> dict[str, Any]:
    """The flat name space expressions see, built from the engine's context.

    ``context`` is ``{"vars": {...}, "steps": {id: {"output": ..., "status": ...}}, "item": ...,
    "index": int, "run": {...}}`` (every key optional; other keys are passed through, e.g. a
    custom ``as`` loop name). Precedence, lowest first: step ids as bare names, variables as bare
    names, then the context keys themselves (``vars``, ``steps``, ``item``, ...).
    """
    ns: dict[str, Any] = {}
    steps = context.get("steps")
    if isinstance(steps, Mapping):
        ns.update(steps)
    variables = context.get("vars")
    if isinstance(variables, Mapping):
        ns.update(variables)
    ns.update(context)
    return ns


def _undefined_error(value: Undefined) -> str:
    try:
        value._fail_with_undefined_error()
    except (UndefinedError, SecurityError) as exc:
        return str(exc)
    return "undefined value"  # pragma: no cover - StrictUndefined always raises


def _contains_undefined(value: Any, depth: int = 0) -> Undefined | None:
    if isinstance(value, Undefined):
        return value
    if depth > 20:
        return None
    if isinstance(value, Mapping):
        values: Any = value.values()
    elif isinstance(value, (list, tuple)):
        values = value
    else:
        return None
    for item in values:
        found = _contains_undefined(item, depth + 1)
        if found is not None:
            return found
    return None


_JSON_TYPES = (str, int, float, bool, type(None), Mapping, list)


def _native(compiled: _Compiled, value: Any) -> Any:
    """Turn lazy results into plain values and refuse what cannot leave the sandbox."""
    if isinstance(value, Undefined):
        raise ExpressionError(f"expression {_quote(compiled.source)}: {_undefined_error(value)}")
    if isinstance(value, (range, types.GeneratorType, KeysView, ValuesView, ItemsView, Iterator)):
        value = list(value)
    elif isinstance(value, tuple):
        value = list(value)
    elif not isinstance(value, _JSON_TYPES):
        # callables, classes, Jinja's ``self`` template reference...: nothing a step can use
        kind = "a callable" if callable(value) else f"a {type(value).__name__}"
        raise ExpressionError(f"expression {_quote(compiled.source)}: evaluates to {kind}, not a JSON value")
    if isinstance(value, str) and type(value) is not str:
        value = str(value)  # Markup from filters such as tojson: a plain string from here on
    if isinstance(value, float) and not math.isfinite(value):
        raise ExpressionError(f"expression {_quote(compiled.source)}: evaluates to {value}, not a JSON number")
    if compiled.builds_containers:
        found = _contains_undefined(value)
        if found is not None:
            raise ExpressionError(f"expression {_quote(compiled.source)}: {_undefined_error(found)}")
    return value


def _run(compiled: _Compiled, ns: Mapping[str, Any]) -> Any:
    try:
        value = compiled.function(ns)
        return _native(compiled, value)
    except ExpressionError:
        raise
    except SecurityError as exc:
        raise ExpressionError(f"expression {_quote(compiled.source)}: refused by the sandbox: {exc}") from None
    except UndefinedError as exc:
        raise ExpressionError(f"expression {_quote(compiled.source)}: {exc}") from None
    except RecursionError:
        raise ExpressionError(f"expression {_quote(compiled.source)}: nested too deeply") from None
    except MemoryError:
        raise ExpressionError(f"expression {_quote(compiled.source)}: out of memory") from None
    except Exception as exc:  # TypeError, ZeroDivisionError, ValueError, ... from user expressions
        raise ExpressionError(f"expression {_quote(compiled.source)}: {type(exc).__name__}: {exc}") from None


def evaluate(expr: Any, context: Mapping[str, Any]) -> Any:
    """Evaluate one expression (``"a > 1"`` or ``"${a > 1}"``) and return its native value.

    Non-string values (``True`` from ``when: true``) are returned unchanged. ``context`` has the
    shape described in :func:`namespace`. Generators, ranges and tuples come back as lists.

    Raises:
        ExpressionError: syntax error, undefined name, sandbox refusal or an error while
            evaluating (type error, division by zero...), one line naming the expression.
    """
    if not isinstance(expr, str):
        return expr
    return _run(_compile(_strip_braces(expr)), namespace(context))


def _interpolate(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _render(value: Any, ns: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        if "$" not in value:
            return value
        parts = _segments(value)
        expressions = [part for part in parts if isinstance(part, tuple)]
        if not expressions:
            return "".join(parts)  # type: ignore[arg-type]  # only $${ escapes
        if len(expressions) == 1 and all(isinstance(p, tuple) or not p.strip() for p in parts):
            return _run(_compile(expressions[0][0]), ns)
        return "".join(_interpolate(_run(_compile(part[0]), ns)) if isinstance(part, tuple) else part for part in parts)
    if isinstance(value, dict):
        return {key: _render(item, ns) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_render(item, ns) for item in value]
    return value


def render(value: Any, context: Mapping[str, Any]) -> Any:
    """Resolve every ``${...}`` in ``value`` (a str, or dicts/lists walked recursively).

    A string that is exactly one expression (surrounding whitespace allowed) becomes the
    expression's native value; in longer strings values are interpolated (strings as is,
    ``None`` -> ``null``, booleans -> ``true``/``false``, dicts/lists -> JSON). Returns new
    containers; non-string scalars are returned unchanged. ``context``: see :func:`namespace`.

    Raises:
        ExpressionError: as :func:`evaluate`, or for an unclosed ``${``.
    """
    return _render(value, namespace(context))


# --------------------------------------------------------------------------------------------
# References (load-time analysis)
# --------------------------------------------------------------------------------------------


def _walk_sources(value: Any, out: list[str], depth: int = 0) -> None:
    if depth > 200:
        raise ExpressionError("value nested too deeply")
    if isinstance(value, str):
        if "${" in value:
            out.extend(find_expressions(value))
    elif isinstance(value, Mapping):
        for item in value.values():
            _walk_sources(item, out, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _walk_sources(item, out, depth + 1)


def analyze(value: Any, single: bool = False) -> Refs:
    """Compile the expressions in ``value`` and return what they refer to, kept apart by kind.

    ``single=True``: ``value`` is ONE expression with or without ``${ }`` (``when``,
    ``condition``, ``for_each``); otherwise dicts, lists and strings are walked and only the
    ``${...}`` parts count, like :func:`render`.

    Raises:
        ExpressionError: an expression does not compile.
    """
    if single and isinstance(value, str):
        return _compile(_strip_braces(value)).refs
    sources: list[str] = []
    _walk_sources(value, sources)
    bare: set[str] = set()
    var_names: set[str] = set()
    step_ids: set[str] = set()
    for source in sources:
        refs = _compile(source).refs
        bare |= refs.bare_names
        var_names |= refs.var_names
        step_ids |= refs.step_ids
    return Refs(frozenset(bare), frozenset(var_names), frozenset(step_ids))


def references(value: Any) -> tuple[set[str], set[str]]:
    """The names and step ids the ``${...}`` expressions in ``value`` refer to.

    Walks dicts, lists and strings like :func:`render`. Returns ``(names, step_ids)``:

    - ``step_ids``: ``x`` for ``steps.x`` and ``steps['x']``;
    - ``names``: ``x`` for ``vars.x`` / ``vars['x']`` and every other bare name (``${x}``).
      A bare name may be a variable, a step id (seed 002's ``${task1.output}``), a context name
      (``run``, ``item``, ``index``, see :data:`CONTEXT_NAMES`) or a sandbox global
      (:data:`GLOBAL_NAMES`): the caller, who knows the workflow, tells them apart
      (:func:`analyze` keeps the kinds apart).

    Dynamic lookups (``steps[name]``) cannot be known before run time and are not reported.
    Every expression is compiled on the way, so this also checks syntax.

    Raises:
        ExpressionError: an expression does not compile.
    """
    refs = analyze(value)
    return set(refs.bare_names | refs.var_names), set(refs.step_ids)
