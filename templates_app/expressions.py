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
to ``range`` and ``dict``; filters that can blow up memory are removed.
Compiled expressions are cached (``functools.lru_cache``): the engine evaluates them on a hot path.

Limits (everything a workflow author writes is hostile; see :func:`limits`):

- size: no string or list an expression builds may exceed ``ORCHESTRATOR_EXPRESSION_MAX_LENGTH``
  characters or items (default 1,000,000). Where the size is known in advance it is checked
  BEFORE the value is built: ``replace`` (filter and method), ``join``, ``format`` and ``%``,
  ``*`` and ``+`` on strings and lists, ``~``, ``range``, the width arguments of ``str`` methods,
  the serializing filters (``string``, ``tojson``, ``json``, ``pprint``, ``urlencode``...) and a
  string interpolating several expressions; anything else is checked as it is produced (lazy
  filters such as ``map`` and ``select`` count their items one by one).
- work: every filter and test call, method call and every item a lazy filter yields costs one
  unit; a C-level scan (``in``, a ``str`` method, a filter over a list, concatenation) one unit
  per 64 elements. One evaluation (one :func:`render` or :func:`evaluate` call: all the params
  of a step, all the computed variables of a run) may spend ``ORCHESTRATOR_EXPRESSION_MAX_WORK``
  (default 1,000,000, about a second), so a quadratic ``select('in', big_list)`` stops within
  that, not after minutes. A counter, not a thread or a signal: it works in a web request and in
  a worker alike.
- time: the same evaluation stops past ``ORCHESTRATOR_EXPRESSION_MAX_SECONDS`` (default 2) or
  the deadline given to :func:`limits` (the step's), checked at every unit charged.

Going past a limit raises :class:`ExpressionError`: one line naming the expression, the limit and
its setting; :func:`render` adds the field (``url``, ``body.text``) it was rendering.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import math
import re
import time
import types
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from contextvars import ContextVar
from functools import lru_cache
from typing import Any, NamedTuple

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.environment import TemplateExpression
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.parser import Parser
from jinja2.runtime import Undefined, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg

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
    "limits",
    "namespace",
    "references",
    "render",
]

#: Names the engine's context provides besides variables and step ids.
CONTEXT_NAMES = frozenset({"vars", "steps", "item", "index", "run"})
#: Jinja globals left in the sandbox.
GLOBAL_NAMES = frozenset({"range", "dict"})

_MAX_EXPRESSION = 10_000  # characters of one expression
_MAX_EXPONENT_BITS = 100_000
_FORMAT_WIDTH = re.compile(r"%[-#0 +]*(\*|\d{5,})|\{[^{}]*:[^{}]*(\*|\d{5,})")
_PERCENT_WIDTH = re.compile(r"%[-#0 +]*(\d+)")
_NESTED_FIELD = re.compile(r"\{[^{}]*:[^{}]*\{")
_BRACE_WIDTH = re.compile(r"\{[^{}]*:[^{}]*?(\d+)[^{}]*\}")

#: Defaults of the limits (settings of the same names without ``DEFAULT_``).
DEFAULT_MAX_LENGTH = 1_000_000
DEFAULT_MAX_WORK = 1_000_000
#: Elements a C-level scan (``in``, a ``str`` method, concatenation, a filter over a list) walks
#: per unit of work: measured ~5 ns each against ~700 ns for one Python-level step (a filter
#: call, one item of ``map``/``select``), which costs one unit.
_SCAN_PER_UNIT = 64
DEFAULT_MAX_SECONDS = 2.0


# --------------------------------------------------------------------------------------------
# Limits: one budget per evaluation
# --------------------------------------------------------------------------------------------


class LimitExceeded(SecurityError):
    """An expression went past a size, work or time limit (reported as an ExpressionError)."""


def _setting(name: str, default: Any) -> Any:
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    try:
        return getattr(settings, name, default)
    except ImproperlyConfigured:  # settings not configured (a library use): the defaults
        return default


class _Budget:
    """What one evaluation may still spend: work units, a deadline, and the size cap."""

    __slots__ = ("max_length", "max_work", "work", "deadline", "seconds")

    def __init__(self, max_length: int, max_work: int, seconds: float, deadline: float | None) -> None:
        self.max_length = max_length
        self.max_work = max_work
        self.work = 0
        self.seconds = seconds
        own = time.monotonic() + seconds if seconds > 0 else None
        self.deadline = min(d for d in (own, deadline) if d is not None) if (own or deadline) else None

    def charge(self, units: int = 1) -> None:
        self.work += units
        if self.work > self.max_work:
            raise LimitExceeded(
                f"too much work (more than {self.max_work} operations, ORCHESTRATOR_EXPRESSION_MAX_WORK)"
            )
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise LimitExceeded(
                f"out of time (more than {self.seconds:g} s, ORCHESTRATOR_EXPRESSION_MAX_SECONDS, "
                "or past the step's timeout)"
            )

    def check_size(self, size: int, what: str) -> None:
        if size > self.max_length:
            raise LimitExceeded(
                f"{what} would have {size} characters or items, more than {self.max_length} "
                f"(ORCHESTRATOR_EXPRESSION_MAX_LENGTH)"
            )

    def checked(self, value: Any, what: str) -> Any:
        """``value`` after a size check; iterators come back wrapped so their items are counted."""
        if isinstance(value, (str, list, tuple, dict)):
            self.check_size(len(value), f"the result of {what}")
            return value
        if isinstance(value, (types.GeneratorType, Iterator)) and not isinstance(value, (str, bytes)):
            return self._counted(value, what)
        return value

    def _counted(self, items: Iterable[Any], what: str) -> Iterator[Any]:
        count = 0
        for item in items:
            count += 1
            self.charge()
            if count > self.max_length:
                self.check_size(count, f"the result of {what}")
            yield item


_budget: ContextVar[_Budget | None] = ContextVar("expression_budget", default=None)


def _new_budget(deadline: float | None = None, max_seconds: float | None = None) -> _Budget:
    seconds = float(_setting("ORCHESTRATOR_EXPRESSION_MAX_SECONDS", DEFAULT_MAX_SECONDS))
    if max_seconds is not None:
        seconds = min(seconds, max_seconds) if seconds > 0 else max_seconds
    return _Budget(
        int(_setting("ORCHESTRATOR_EXPRESSION_MAX_LENGTH", DEFAULT_MAX_LENGTH)),
        int(_setting("ORCHESTRATOR_EXPRESSION_MAX_WORK", DEFAULT_MAX_WORK)),
        seconds,
        deadline,
    )


@contextlib.contextmanager
def limits(deadline: float | None = None, max_seconds: float | None = None) -> Iterator[None]:
    """One budget for every :func:`render` / :func:`evaluate` inside the block.

    ``deadline``: a ``time.monotonic()`` value (the step's deadline) past which evaluation stops;
    ``max_seconds``: a tighter bound in seconds than ``ORCHESTRATOR_EXPRESSION_MAX_SECONDS``.
    Without this block each top-level call gets its own budget from the settings. Nested blocks
    reuse the outer budget. The engine wraps the rendering of a step's params in
    ``limits(deadline=<the step's deadline>)`` so they run under the step's timeout.
    """
    if _budget.get() is not None:
        yield
        return
    token = _budget.set(_new_budget(deadline, max_seconds))
    try:
        yield
    finally:
        _budget.reset(token)


def _current() -> _Budget:
    budget = _budget.get()
    if budget is None:
        # called outside evaluate/render (a compiled expression run by hand): a budget for this
        # call alone, never left behind in the context where a later evaluation would reuse it
        budget = _new_budget()
    return budget


def _measure(value: Any, limit: int) -> int:
    """About how many characters ``value`` takes once turned into text (JSON or str()), walking at
    most until the count passes ``limit`` (so measuring costs no more than the cap)."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, Mapping):
            total += 2 + 2 * len(item)
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            total += 2 + len(item)
            if total <= limit:
                stack.extend(item)
        else:
            total += 8
        if total > limit:
            return total
    return total


def _scan(size: int) -> int:
    """Units of work for a C-level scan over ``size`` elements."""
    return size // _SCAN_PER_UNIT


def _sized(value: Any) -> int:
    try:
        return len(value) if isinstance(value, (str, list, tuple, dict, range)) else 1
    except TypeError:  # pragma: no cover
        return 1


def _replace_size(text: str, old: str, new: str, count: Any = None) -> int:
    hits = len(text) + 1 if old == "" else text.count(old)
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * (len(new) - len(old))


def _format_size(template: str, values: Iterable[Any], budget: _Budget, braces: bool) -> int:
    """An upper bound of ``template % values`` / ``template.format(*values)``."""
    slots = template.count("{") if braces else template.count("%")
    widest = max((_measure(v, budget.max_length) for v in values), default=0)
    widths = _BRACE_WIDTH if braces else _PERCENT_WIDTH
    return len(template) + slots * (widest + 32) + sum(int(w) for w in widths.findall(template))


def _str_method_check(budget: _Budget, text: str, name: str, args: tuple, kwargs: dict) -> None:
    """Refuse a ``str`` method call whose result would be too large, before it runs."""
    values = (*args, *kwargs.values())
    if name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        budget.check_size(_replace_size(text, args[0], args[1], args[2] if len(args) > 2 else None), "replace")
    elif name == "join" and args:
        items = args[0]
        if not isinstance(items, (list, tuple, str)):
            raise LimitExceeded("str.join takes a list here (use the join filter on other values)")
        size = sum(_measure(i, budget.max_length) for i in items) + len(text) * max(0, len(items) - 1)
        budget.check_size(size, "join")
    elif name in ("format", "format_map"):
        if _FORMAT_WIDTH.search(text):
            raise LimitExceeded("format widths this large are not allowed")
        if _NESTED_FIELD.search(text):
            raise LimitExceeded("nested replacement fields in a format spec are not allowed")
        spread = [v for a in values for v in (a.values() if isinstance(a, Mapping) else (a,))]
        budget.check_size(_format_size(text, spread, budget, braces=True), "format")
    elif name == "expandtabs":
        size = args[0] if args and isinstance(args[0], int) else 8
        budget.check_size(len(text) + text.count("\t") * max(0, size), "expandtabs")
    elif any(isinstance(a, int) and not isinstance(a, bool) and a > budget.max_length for a in values):
        budget.check_size(max(a for a in values if isinstance(a, int)), name)


class _Generator(CodeGenerator):
    """Jinja's code generator with ``~`` routed through the sandbox (Jinja joins it inline)."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:  # noqa: N802 - Jinja's name
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


# --------------------------------------------------------------------------------------------
# The sandbox
# --------------------------------------------------------------------------------------------


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with mapping keys winning over attributes and bounded operators."""

    code_generator_class = _Generator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

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

    def concat(self, values: tuple[Any, ...]) -> str:
        """``a ~ b ~ c``: the joined length is checked before joining."""
        budget = _current()
        budget.charge(1)
        budget.check_size(sum(_measure(v, budget.max_length) for v in values), "'~'")
        return str_join(values)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _current()
        budget.charge()
        if operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
                if left.bit_length() * right > _MAX_EXPONENT_BITS:
                    raise LimitExceeded("the result of '**' would be too large")
        elif operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    budget.check_size(len(seq) * count, "'*'")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                budget.check_size(len(left) + len(right), "'+'")
                budget.charge(_scan(len(left) + len(right)))
        elif operator == "%" and isinstance(left, str):
            if _FORMAT_WIDTH.search(left):
                raise LimitExceeded("format widths this large are not allowed")
            values = right.values() if isinstance(right, Mapping) else right if isinstance(right, tuple) else (right,)
            budget.check_size(_format_size(left, values, budget, braces=False), "'%'")
        return budget.checked(super().call_binop(context, operator, left, right), f"'{operator}'")

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _current()
        budget.charge()
        # str methods take widths (ljust, center, zfill, expandtabs...) and build strings
        bound = getattr(obj, "__self__", None)
        wrapped = getattr(obj, "__wrapped__", None)  # the sandbox's str.format wrapper
        if wrapped is not None:
            bound = getattr(wrapped, "__self__", bound)
        name = getattr(wrapped or obj, "__name__", "")
        if isinstance(bound, str):
            budget.charge(_scan(len(bound)))
            if name == "join" and args and not isinstance(args[0], (list, tuple, str)):
                args = (list(budget.checked(iter(args[0]), "join")), *args[1:])
            _str_method_check(budget, bound, name, args, kwargs)
        elif isinstance(bound, (list, tuple, dict)):
            budget.charge(_scan(len(bound)))
        return budget.checked(super().call(context, obj, *args, **kwargs), name or "a call")


#: Filters whose result is their input turned into text: the input's size is checked first.
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


_SERIALIZING = frozenset(
    {"string", "tojson", "json", "pprint", "urlencode", "e", "escape", "forceescape", "list", "title", "upper"}
)


def _guard_filter(name: str, func: Any) -> Any:
    """``func`` (a Jinja filter) charged to the budget, with its result size checked (before it
    is built for ``replace``, ``join``, ``format`` and the serializing filters)."""
    pass_arg = _PassArg.from_obj(func)
    skip = 1 if pass_arg is not None else 0

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _current()
        value = args[skip] if len(args) > skip else None
        budget.charge(1 + _scan(_sized(value)))
        rest = args[skip + 1 :]
        if name == "replace" and isinstance(value, str) and len(rest) >= 2:
            old, new = str(rest[0]), str(rest[1])
            budget.check_size(_replace_size(value, old, new, rest[2] if len(rest) > 2 else kwargs.get("count")), name)
        elif name == "join" and value is not None and "attribute" not in kwargs and len(rest) < 2:
            items = value if isinstance(value, (list, tuple)) else list(budget.checked(iter(value), name))
            sep = rest[0] if rest else kwargs.get("d", "")
            budget.charge(_scan(len(items)))
            size = sum(_measure(i, budget.max_length) for i in items) + len(str(sep)) * max(0, len(items) - 1)
            budget.check_size(size, name)
            args = (*args[:skip], items, *rest)
        elif name == "format" and isinstance(value, str):
            if _FORMAT_WIDTH.search(value):
                raise LimitExceeded("format widths this large are not allowed")
            budget.check_size(_format_size(value, (*rest, *kwargs.values()), budget, braces=False), name)
        elif name in _SERIALIZING:
            # the text may still grow by escaping (at most a few times): the result is checked too
            budget.check_size(_measure(value, budget.max_length), name)
        elif name == "sum" and value is not None:
            start = rest[1] if len(rest) > 1 else kwargs.get("start", 0)
            if isinstance(start, (list, tuple, str)):  # concatenation: every partial sum is copied
                items = value if isinstance(value, (list, tuple)) else list(budget.checked(iter(value), name))
                total = len(start) + sum(_sized(i) for i in items)
                budget.check_size(total, name)
                budget.charge(_scan(total * len(items)))
                args = (*args[:skip], items, *rest)
        elif name in ("sort", "unique", "groupby", "dictsort") and value is not None:
            size = _sized(value)
            budget.charge(_scan(size * max(1, size.bit_length())))
        return budget.checked(func(*args, **kwargs), f"the {name} filter")

    return guarded


def _guard_test(name: str, func: Any) -> Any:
    """``func`` (a Jinja test) charged to the budget: ``in`` costs the length of what it searches."""
    pass_arg = _PassArg.from_obj(func)
    skip = 1 if pass_arg is not None else 0

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _current()
        rest = args[skip + 1 :]
        budget.charge(1 + _scan(sum(_sized(a) for a in rest)))
        return func(*args, **kwargs)

    return guarded


def _range(*args: int) -> range:
    """``range`` of at most ORCHESTRATOR_EXPRESSION_MAX_LENGTH items (lazy: the size is known first)."""
    items = range(*args)
    _current().check_size(len(items), "range")
    return items


def _from_json(value: Any) -> Any:
    if not isinstance(value, (str, bytes)):
        raise TypeError("fromjson expects a string")
    return json.loads(value)


def _to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _make_env() -> _Sandbox:
    env = _Sandbox(undefined=StrictUndefined, autoescape=False)
    env.globals = {name: env.globals[name] for name in GLOBAL_NAMES}
    env.globals["range"] = _range
    for name in ("center", "indent", "wordwrap", "slice", "batch", "random", "xmlattr", "urlize"):
        env.filters.pop(name, None)
    env.filters["json"] = _to_json
    env.filters["fromjson"] = _from_json
    env.filters = {name: _guard_filter(name, func) for name, func in env.filters.items()}
    env.tests = {name: _guard_test(name, func) for name, func in env.tests.items()}
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
    with limits():
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


def _render(value: Any, ns: Mapping[str, Any], path: str = "") -> Any:
    if isinstance(value, str):
        if "$" not in value:
            return value
        try:
            parts = _segments(value)
            expressions = [part for part in parts if isinstance(part, tuple)]
            if not expressions:
                return "".join(parts)  # type: ignore[arg-type]  # only $${ escapes
            if len(expressions) == 1 and all(isinstance(p, tuple) or not p.strip() for p in parts):
                return _run(_compile(expressions[0][0]), ns)
            budget = _current()
            pieces: list[str] = []
            size = 0
            for part in parts:
                if isinstance(part, tuple):
                    result = _run(_compile(part[0]), ns)
                    size += _measure(result, budget.max_length)
                    try:
                        budget.check_size(size, "the interpolated string")
                    except LimitExceeded as exc:
                        raise ExpressionError(f"expression {_quote(part[0])}: refused by the sandbox: {exc}") from None
                    piece = _interpolate(result)
                else:
                    piece = part
                    size += len(piece)
                pieces.append(piece)
            return "".join(pieces)
        except ExpressionError as exc:
            if not path:
                raise
            raise ExpressionError(f"{path}: {exc.problem}") from None
    if isinstance(value, dict):
        return {key: _render(item, ns, f"{path}.{key}" if path else str(key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_render(item, ns, f"{path}[{index}]") for index, item in enumerate(value)]
    return value


def render(value: Any, context: Mapping[str, Any], field: str = "") -> Any:
    """Resolve every ``${...}`` in ``value`` (a str, or dicts/lists walked recursively).

    A string that is exactly one expression (surrounding whitespace allowed) becomes the
    expression's native value; in longer strings values are interpolated (strings as is,
    ``None`` -> ``null``, booleans -> ``true``/``false``, dicts/lists -> JSON). Returns new
    containers; non-string scalars are returned unchanged. ``context``: see :func:`namespace`.
    ``field`` names ``value`` in errors (``"params"`` gives ``params.body.text: ...``); the keys
    walked below it are added either way. One budget (see :func:`limits`) covers the whole call.

    Raises:
        ExpressionError: as :func:`evaluate`, or for an unclosed ``${``, one line naming the
            field; or a limit passed (size, work, time: the module docstring).
    """
    with limits():
        return _render(value, namespace(context), field)


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
