"""Expressions: rendering, evaluation, references and the sandbox (no database needed)."""

from __future__ import annotations

import pytest

from templates_app.errors import ExpressionError, WorkflowError
from templates_app.expressions import (
    analyze,
    compile_check,
    evaluate,
    find_expressions,
    is_expression,
    namespace,
    references,
    render,
)


@pytest.fixture
def ctx():
    return {
        "vars": {"n": 3, "name": "Ada", "ratio": 0.5, "flag": True, "tags": ["a", "b"], "nothing": None},
        "steps": {
            "fetch": {
                "output": {"items": [1, 2, 3], "keys": "k", "values": "v", "count": 3, "nested": {"ok": True}},
                "status": "succeeded",
            },
            "task1": {"output": "raw text", "status": "succeeded"},
            "empty": {"output": None, "status": "skipped"},
        },
        "item": {"id": 7},
        "index": 2,
        "run": {"id": "r-1", "correlation_id": "c-1", "attempt": 1},
    }


def assert_one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and message == message.strip() and message
    return message


# --------------------------------------------------------------------------------------------
# Whole-value expressions keep their type
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, expected",
    [
        ("${n}", 3),
        ("${vars.n}", 3),
        ("${ratio}", 0.5),
        ("${flag}", True),
        ("${tags}", ["a", "b"]),
        ("${nothing}", None),
        ("${steps.fetch.output}", {"items": [1, 2, 3], "keys": "k", "values": "v", "count": 3, "nested": {"ok": True}}),
        ("${steps.fetch.output.count + 1}", 4),
        ("${steps.fetch.status}", "succeeded"),
        ("${task1.output}", "raw text"),  # seed 002: a bare step id
        ("${item.id}", 7),
        ("${index}", 2),
        ("${run.id}", "r-1"),
        ("  ${n}  ", 3),  # surrounding whitespace still counts as a whole value
        ("${n}\n", 3),  # YAML block scalars end with a newline
        ("${ {'a': n} }", {"a": 3}),
        ("${[n, name]}", [3, "Ada"]),
        ("${(1, 2)}", [1, 2]),  # tuples come back as lists (JSON)
        ("${range(3)}", [0, 1, 2]),
        ("${tags | map('upper') }", ["A", "B"]),  # generators are materialized
        ("${steps.fetch.output.items | length}", 3),
        (
            "${steps.fetch.output | json}",
            '{"items": [1, 2, 3], "keys": "k", "values": "v", "count": 3, "nested": {"ok": true}}',
        ),
        ("${'{\"a\": 1}' | fromjson}", {"a": 1}),
        ("${null}", None),
        ("${true}", True),
    ],
)
def test_whole_value_keeps_native_type(ctx, template, expected):
    assert render(template, ctx) == expected


def test_dot_access_prefers_dict_keys_over_methods(ctx):
    # Given an output with keys named like dict methods
    # Then dot access returns the values of the keys, not the bound methods
    assert render("${steps.fetch.output.items}", ctx) == [1, 2, 3]
    assert render("${steps.fetch.output.keys}", ctx) == "k"
    assert render("${steps.fetch.output.values}", ctx) == "v"
    assert evaluate("steps.fetch.output.items[0]", ctx) == 1
    assert evaluate("fetch.output.items | sum", ctx) == 6


def test_list_index_with_dot_and_brackets(ctx):
    assert render("${steps.fetch.output.items.0}", ctx) == 1
    assert render("${steps.fetch.output.items[-1]}", ctx) == 3
    assert render("${steps['fetch'].output.nested.ok}", ctx) is True


# --------------------------------------------------------------------------------------------
# Interpolation
# --------------------------------------------------------------------------------------------


def test_interpolation_in_longer_strings(ctx):
    assert render("Hello ${name}, n=${n}!", ctx) == "Hello Ada, n=3!"
    assert render("Analyze this data: ${task1.output}", ctx) == "Analyze this data: raw text"
    assert render("LIMIT ${n}", ctx) == "LIMIT 3"
    assert render("ratio ${ratio}", ctx) == "ratio 0.5"


def test_interpolation_uses_json_spelling_for_non_strings(ctx):
    assert render("tags=${tags}", ctx) == 'tags=["a", "b"]'
    assert render("out=${steps.fetch.output.nested}", ctx) == 'out={"ok": true}'
    assert render("flag=${flag} none=${nothing}", ctx) == "flag=true none=null"


def test_render_walks_containers_and_leaves_other_values(ctx):
    value = {"a": ["${n}", "x${n}", 5, None, True], "b": {"c": "${steps.fetch.output.items}"}, "d": "plain"}
    assert render(value, ctx) == {"a": [3, "x3", 5, None, True], "b": {"c": [1, 2, 3]}, "d": "plain"}
    assert value["a"][0] == "${n}"  # the input is not modified


def test_dollar_escapes_and_lone_dollars(ctx):
    assert render("echo $${HOME} costs $5", ctx) == "echo ${HOME} costs $5"
    assert render("$${n}", ctx) == "${n}"
    assert not is_expression("$${n}")
    assert is_expression("a ${n}")
    assert not is_expression("a $n")


def test_braces_and_quotes_inside_expressions(ctx):
    assert render("${ {'a': '}'}['a'] }", ctx) == "}"
    assert render("x${ {'k': {'n': n}}.k.n }y", ctx) == "x3y"
    assert render('${ "a}b" }', ctx) == "a}b"
    assert find_expressions("a ${x} b ${ {'c': '}'} } c") == ["x", " {'c': '}'} "]


def test_unclosed_expression_is_an_error(ctx):
    with pytest.raises(ExpressionError) as info:
        render("hello ${name", ctx)
    assert "unclosed" in assert_one_line(info.value)


# --------------------------------------------------------------------------------------------
# Comparisons and boolean logic
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("n > 2", True),
        ("n >= 4", False),
        ("n == 3 and name == 'Ada'", True),
        ("n == 3 && name == 'Bob'", False),
        ("n == 4 || name == 'Ada'", True),
        ("n == 4 or flag", True),
        ("not flag", False),
        ("!flag", False),
        ("!(n > 5) && flag", True),
        ("n != 3", False),
        ("name != 'x' && !false", True),
        ("nothing == null", True),
        ("nothing is none", True),
        ("'a' in tags", True),
        ("'&&' == '&&'", True),  # operators inside strings are left alone
        ("'!' ~ name", "!Ada"),
        ("steps.fetch.output.count > 0 and steps.fetch.status == 'succeeded'", True),
        ("${ratio > 0.8}", False),
        ("n if flag else 0", 3),
        ("true && false", False),
        ("true || false", True),
        ("steps.empty.output is none", True),
    ],
)
def test_comparisons_and_boolean_logic(ctx, expr, expected):
    assert evaluate(expr, ctx) == expected


def test_evaluate_with_and_without_braces(ctx):
    assert evaluate("${n * 2}", ctx) == 6
    assert evaluate("n * 2", ctx) == 6
    assert evaluate(" ${n * 2} ", ctx) == 6


def test_evaluate_passes_non_strings_through(ctx):
    assert evaluate(True, ctx) is True
    assert evaluate(None, ctx) is None
    assert evaluate([1, 2], ctx) == [1, 2]


def test_null_is_only_translated_as_a_word(ctx):
    context = {"vars": {"nullable": 5, "d": {"null": 1}}}
    assert evaluate("nullable", context) == 5
    assert evaluate("d.null", context) == 1


def test_namespace_precedence():
    ns = namespace({"vars": {"x": 1, "a": "var"}, "steps": {"a": {"output": 1}, "b": {"output": 2}}, "item": 9})
    assert ns["x"] == 1
    assert ns["a"] == "var"  # a variable wins over a step id
    assert ns["b"] == {"output": 2}
    assert ns["item"] == 9
    assert ns["steps"]["a"] == {"output": 1}


def test_custom_loop_variable_from_context():
    assert render("${pkg.name}", {"pkg": {"name": "django"}, "vars": {}}) == "django"


# --------------------------------------------------------------------------------------------
# Errors: undefined names, evaluation errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "${zz}",
        "${vars.zz}",
        "${steps.missing.output}",
        "${steps.fetch.output.missing}",
        "${steps.fetch.output.missing == 1}",
        "prefix ${zz} suffix",
        "${[zz]}",
        "${ {'a': zz} }",
        "${zz | length}",
    ],
)
def test_undefined_names_raise(ctx, template):
    with pytest.raises(ExpressionError) as info:
        render(template, ctx)
    message = assert_one_line(info.value)
    assert "undefined" in message or "no attribute" in message


@pytest.mark.parametrize(
    "expr, fragment",
    [
        ("1 / 0", "ZeroDivisionError"),
        ("name + 1", "TypeError"),
        ("n +", "syntax error"),
        ("n n", "syntax error"),
        ("", "empty"),
        ("(" * 3 + "n", "syntax error"),
        ("dict", "callable"),
    ],
)
def test_evaluation_errors_are_one_line(ctx, expr, fragment):
    with pytest.raises(ExpressionError) as info:
        evaluate(expr, ctx)
    assert fragment in assert_one_line(info.value)


def test_expression_error_is_a_workflow_error_and_value_error():
    assert issubclass(ExpressionError, WorkflowError)
    assert issubclass(WorkflowError, ValueError)


def test_multiline_expression_source_gives_one_line_error(ctx):
    with pytest.raises(ExpressionError) as info:
        evaluate("n +\n\n  zz", ctx)
    assert_one_line(info.value)


# --------------------------------------------------------------------------------------------
# The sandbox
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "${ ''.__class__.__mro__ }",
        "${ ''.__class__.__mro__[1].__subclasses__() }",
        "${ cycler.__init__.__globals__ }",
        "${ joiner.__init__.__globals__ }",
        "${ lipsum.__globals__ }",
        "${ range.__init__.__globals__ }",
        "${ dict.__init__.__globals__ }",
        "${ dict.__class__ }",
        "${ ().__class__.__bases__[0].__subclasses__() }",
        "${ steps.__class__ }",
        "${ steps.fetch.output.items.__class__ }",
        "${ run.__class__.__init__ }",
        "${ name.__class__ }",
        "${ name.format.__globals__ }",
        "${ '{0.__class__}'.format(name) }",
        "${ namespace() }",
        "${ self }",
        "${ config }",
        "${ request }",
        "${ __import__('os').system('echo pwned') }",
        "${ tags.append(1) }",
        "${ steps.fetch.output.update({'x': 1}) }",
        "${ steps.fetch.output.clear() }",
        "${ 'a' * 100000000 }",
        "${ [1] * 100000000 }",
        "${ 2 ** 100000000 }",
        "${ 'x'.ljust(1000000000) }",
        "${ '%0999999999d' % 1 }",
        "${ '{:>999999999}'.format(1) }",
        "${ range(1000000000) }",
        "${ 'x' | center(1000000000) }",
        "${ 'x' | indent(1000000000) }",
    ],
)
def test_sandbox_refuses(ctx, template):
    before = {key: list(value) for key, value in ctx["vars"].items() if isinstance(value, list)}
    with pytest.raises(ExpressionError) as info:
        render(template, ctx)
    assert_one_line(info.value)
    assert {key: list(value) for key, value in ctx["vars"].items() if isinstance(value, list)} == before
    assert "x" not in ctx["steps"]["fetch"]["output"]


def test_sandbox_allows_ordinary_string_methods(ctx):
    assert render("${ name.upper() }", ctx) == "ADA"
    assert render("${ 'a,b'.split(',') }", ctx) == ["a", "b"]
    assert render("${ '{} is {}'.format(name, n) }", ctx) == "Ada is 3"
    assert render("${ 'x' * 3 }", ctx) == "xxx"
    assert render("${ 2 ** 10 }", ctx) == 1024


# --------------------------------------------------------------------------------------------
# References and compile checks
# --------------------------------------------------------------------------------------------


def test_references_walks_values():
    names, step_ids = references(
        {
            "url": "${base_url}/x/${steps.fetch.output.id}",
            "list": ["${vars.limit}", "${steps['other-step'].output}", 3, None],
            "prompt": "Analyze: ${task1.output} for ${run.id}",
            "plain": "no expressions",
        }
    )
    assert names == {"base_url", "limit", "task1", "run"}
    assert step_ids == {"fetch", "other-step"}


def test_references_of_plain_values_are_empty():
    assert references("plain") == (set(), set())
    assert references({"a": 1, "b": [True, None]}) == (set(), set())
    assert references("$${not_a_ref}") == (set(), set())


def test_references_in_complex_expressions():
    names, step_ids = references("${ steps.a.output.x > limit and (steps.b.status == 'ok' || flag) }")
    assert names == {"limit", "flag"}
    assert step_ids == {"a", "b"}


def test_dynamic_step_lookup_is_not_reported():
    names, step_ids = references("${ steps[which].output }")
    assert names == {"which"}
    assert step_ids == set()


def test_analyze_keeps_kinds_apart():
    refs = analyze("${ vars.a + b + steps.c.output }")
    assert refs.var_names == {"a"}
    assert refs.bare_names == {"b"}
    assert refs.step_ids == {"c"}
    assert analyze("x > 1", single=True).bare_names == {"x"}


def test_references_raise_on_syntax_errors():
    with pytest.raises(ExpressionError):
        references({"a": ["${ 1 + }"]})


def test_compile_check():
    compile_check("${a > 1}")
    compile_check("a > 1 && !b")
    compile_check("steps.x.output.items | length")
    for bad in ("${a >}", "a b", "${", "", "(", 42):
        with pytest.raises(ExpressionError) as info:
            compile_check(bad)  # type: ignore[arg-type]
        assert_one_line(info.value)


def test_compiled_expressions_are_cached(ctx):
    from templates_app import expressions

    expressions._compile.cache_clear()
    for _ in range(50):
        render("${n + 1}", ctx)
    assert expressions._compile.cache_info().hits >= 49
