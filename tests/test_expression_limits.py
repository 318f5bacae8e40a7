"""Limits of expressions (templates_app/expressions.py): size of everything an expression builds,
work per evaluation, time. Each reproduction from issue 10 fails fast with a one-line error
naming the limit's setting; the API and a real worker refuse them the same way."""

from __future__ import annotations

import time

import pytest

from templates_app import expressions
from templates_app.errors import ExpressionError, WorkflowError
from templates_app.expressions import evaluate, render
from templates_app.spec import load_spec, validate_inputs


@pytest.fixture(autouse=True)
def _no_wall_clock(settings):
    """Work and size limits are what these tests show: the wall-clock bound (0 = off) would make
    them depend on the machine's load. The deadline has its own test."""
    settings.ORCHESTRATOR_EXPRESSION_MAX_SECONDS = 0


SIZE = "ORCHESTRATOR_EXPRESSION_MAX_LENGTH"
WORK = "ORCHESTRATOR_EXPRESSION_MAX_WORK"


def refused(expr: str, setting: str = SIZE, context: dict | None = None) -> str:
    with pytest.raises(ExpressionError) as info:
        evaluate(expr, context or {})
    message = str(info.value)
    assert "\n" not in message and setting in message, message
    return message


# --- the reproductions of issue 10 ------------------------------------------------------------------


def test_replace_building_300_million_characters_is_refused_before_it_is_built():
    # the filter and the str method alike
    assert "300000000" in refused("${ ('x' * 1000000) | replace('x', 'x' * 300) | length }")
    assert "300000000" in refused("${ ('x' * 1000000).replace('x', 'x' * 300) | length }")


def test_join_building_101_mb_is_refused():
    assert "101000000" in refused("${ (['y' * 1000000] * 101) | join | length }")
    refused("${ '-'.join(['y' * 1000000] * 2) }")
    refused("${ (['y' * 600000] * 2) | join(',') }")


def test_quadratic_select_in_runs_out_of_work():
    # 100,000 x 100,000 membership tests took 50 s; the work budget stops it after a few million
    refused("${ range(100000) | select('in', range(100000) | list) | list | length }", WORK)
    refused("${ range(50000) | reject('in', range(50000) | list) | list | length }", WORK)


# --- every other way to build something big ---------------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    [
        "${ 'z' * 1000001 }",
        "${ ['z'] * 1000001 }",
        "${ ('z' * 600000) + ('z' * 600000) }",
        "${ (['z'] * 600000) + (['z'] * 600000) }",
        "${ ('z' * 600000) ~ ('z' * 600000) }",
        "${ '%s%s' | format('a' * 600000, 'b' * 600000) }",
        "${ '%s%s' % ('a' * 600000, 'b' * 600000) }",
        "${ '{}{}'.format('a' * 600000, 'b' * 600000) }",
        "${ range(1000001) }",
        "${ (['x' * 100000] * 11) | tojson }",
        "${ (['x' * 100000] * 11) | string }",
        "${ (['x' * 100000] * 11) | json }",
        "${ ('x' * 1000) | replace('', 'y' * 1000) }",
        "${ ('\t' * 100000).expandtabs(100) }",
        "${ 'a'.ljust(1000001) }",
        "${ ([['a'] * 1000] * 1001) | sum(start=[]) }",
    ],
)
def test_values_over_the_size_cap_are_refused(expr):
    refused(expr, "ORCHESTRATOR_EXPRESSION_")


@pytest.mark.parametrize(
    "expr",
    [
        "${ '{0:{1}}'.format('a', 1000000000) }",  # width from an argument
        "${ '%*s' % (1000000000, 'a') }",
        "${ '{:100000}'.format('a') }",
    ],
)
def test_format_widths_are_refused(expr):
    with pytest.raises(ExpressionError, match="format"):
        evaluate(expr, {})


def test_interpolating_many_large_values_is_refused():
    big = "q" * 400_000
    with pytest.raises(ExpressionError, match=SIZE):
        render("a ${x} b ${x} c ${x}", {"x": big})
    # one whole-value expression passes a large value through unchanged (nothing is built)
    assert render("${x}", {"x": big}) is big


def test_lazy_filters_count_their_items():
    refused("${ range(1000000) | map('string') | map('upper') | map('lower') | list | length }", WORK)


def test_ordinary_expressions_still_work():
    assert evaluate("${ range(5) | map('string') | join('-') }", {}) == "0-1-2-3-4"
    assert evaluate("${ '-'.join(range(3) | map('string')) }", {}) == "0-1-2"
    assert evaluate("${ 'ab' ~ 1 ~ none }", {}) == "ab1None"
    assert evaluate("${ '%s=%d' % ('n', 3) }", {}) == "n=3"
    assert evaluate("${ '{}:{:>5}'.format('a', 'b') }", {}) == "a:    b"
    assert evaluate("${ [1, 2] + [3] }", {}) == [1, 2, 3]
    assert evaluate("${ ([[1], [2]]) | sum(start=[]) }", {}) == [1, 2]
    assert evaluate("${ items | select('in', [2, 3]) | list }", {"items": [1, 2, 3]}) == [2, 3]
    assert evaluate("${ ('x' * 999999) | length }", {}) == 999999


def test_caps_come_from_the_settings(settings):
    settings.ORCHESTRATOR_EXPRESSION_MAX_LENGTH = 100
    refused("${ 'x' * 101 }")
    assert evaluate("${ 'x' * 100 }", {}) == "x" * 100
    settings.ORCHESTRATOR_EXPRESSION_MAX_WORK = 100
    refused("${ range(100) | select('in', range(100) | list) | list }", WORK)


def test_a_past_deadline_stops_the_evaluation():
    # the engine renders a step's params under limits(deadline=<the step's deadline>)
    with expressions.limits(deadline=time.monotonic() - 1):
        with pytest.raises(ExpressionError, match="out of time"):
            evaluate("${ range(10) | map('string') | list }", {})


def test_the_budget_covers_one_whole_render_call(settings):
    settings.ORCHESTRATOR_EXPRESSION_MAX_WORK = 2000
    params = {f"p{i}": "${ range(200) | map('string') | list | length }" for i in range(10)}
    with pytest.raises(ExpressionError, match=WORK):
        render(params, {})
    assert render({"p": params["p0"]}, {}) == {"p": 200}  # one alone fits


def test_render_names_the_field():
    with pytest.raises(ExpressionError) as info:
        render({"body": {"text": ["ok", "${ 'x' * 2000000 }"]}}, {}, field="params")
    assert str(info.value).startswith("params.body.text[1]: expression ")


# --- computed variables (web process) and a real worker ----------------------------------------------

COMPUTED = """
id: computed
variables:
  - {name: n, type: integer, default: 300}
workflow:
  variables:
    blob: "${ ('x' * 1000000) | replace('x', 'x' * n) }"
  tasks:
    - {id: a, type: noop}
"""


def test_computed_variable_cannot_build_a_huge_string():
    spec = load_spec(COMPUTED, source="computed.yaml")
    with pytest.raises(WorkflowError) as info:
        validate_inputs(spec, {})
    assert str(info.value).startswith("variable 'blob': ") and SIZE in str(info.value)


def test_post_run_with_a_huge_computed_variable_is_a_400(owner):
    from tests.conftest import api_client_for

    api = api_client_for(owner)
    assert api.post("/api/v1/templates", {"source": COMPUTED}, format="json").status_code in (200, 201)
    response = api.post("/api/v1/runs", {"template": "computed", "variables": {}}, format="json")
    assert response.status_code == 400 and SIZE in response.content.decode()


def test_a_step_with_a_quadratic_expression_fails_with_a_clear_error(worker):
    from tests.conftest import run_to_end

    run, steps = run_to_end(
        """
key: quadratic
steps:
  - id: slow
    type: noop
    timeout: 2s
    params: {output: "${ range(100000) | select('in', range(100000) | list) | list | length }"}
"""
    )
    assert run.status == "failed"
    assert steps["slow"].status in ("dead", "failed") and WORK in steps["slow"].error


def test_no_budget_is_left_behind_between_evaluations(settings):
    settings.ORCHESTRATOR_EXPRESSION_MAX_WORK = 500
    for _ in range(20):  # each call has its own budget: 20 x 100 units never add up
        assert len(evaluate("${ range(100) | map('string') | list }", {})) == 100
    assert expressions._budget.get() is None


def test_all_computed_variables_of_a_run_share_one_budget(settings):
    settings.ORCHESTRATOR_EXPRESSION_MAX_WORK = 2000
    names = [f"v{i}" for i in range(10)]
    computed = "".join(f"    {n}: \"${{ range(200) | map('string') | list | length }}\"\n" for n in names)
    spec = load_spec(f"id: many\nworkflow:\n  variables:\n{computed}  tasks:\n    - {{id: a, type: noop}}\n")
    with pytest.raises(WorkflowError, match=WORK):
        validate_inputs(spec, {})
