"""Caps on what a workflow file may ask for (templates_app/spec.py): every size and time a user
chooses has a cap, refused at load with one line naming the file, the step, the field and the
setting; nothing saved."""

from __future__ import annotations

import pytest

from templates_app.spec import LIMIT_DEFAULTS, WorkflowError, check_for_each_items, load_spec


def refused(yaml_text: str, *needles: str) -> str:
    with pytest.raises(WorkflowError) as info:
        load_spec(yaml_text, source="capped.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("capped.yaml: "), message
    for needle in needles:
        assert needle in message, message
    return message


def step(extra: str, type_: str = "noop") -> str:
    return f"key: capped\nsteps:\n  - {{id: s, type: {type_}, {extra}}}\n"


# --- the reproductions of issue 10 ------------------------------------------------------------------


def test_a_ten_thousand_day_timeout_is_refused():
    refused(step("timeout: 10000d"), "step 's'", "timeout: 864000000s", "ORCHESTRATOR_MAX_STEP_TIMEOUT")
    refused(step("timeout_ms: 864000000000"), "timeout_ms", "ORCHESTRATOR_MAX_STEP_TIMEOUT")


def test_a_billion_attempts_are_refused():
    refused(step("retry: {max_attempts: 1000000000}"), "retry.max_attempts", "ORCHESTRATOR_MAX_ATTEMPTS")
    refused(step("retry: {max_retries: 1000000000}"), "retry.max_retries", "ORCHESTRATOR_MAX_ATTEMPTS")


def test_a_thirty_thousand_step_file_is_refused_before_it_is_built(monkeypatch):
    text = "key: big\nsteps:\n" + "".join(f"- {{id: s{i}, type: noop}}\n" for i in range(30_000))
    # Given a loader that would notice any step being normalized ...
    from templates_app import spec

    def no_heavy_work(*args, **kwargs):
        raise AssertionError("a step was normalized: the count should have stopped the load first")

    monkeypatch.setattr(spec._SpecLoader, "_step", no_heavy_work)
    # ... the file is refused from the parser's events, before any of it is built
    refused(text, "too many steps", "ORCHESTRATOR_MAX_STEPS_PER_RUN")
    # the same through the seed-002 spelling
    seed002 = "id: big\nworkflow:\n  tasks:\n" + "".join(f"  - {{id: s{i}, type: noop}}\n" for i in range(6_000))
    refused(seed002, "too many steps")


def test_the_step_cap_counts_parallel_branches(settings):
    settings.ORCHESTRATOR_MAX_STEPS_PER_RUN = 5
    tasks = ", ".join(f"{{id: t{i}, type: noop}}" for i in range(5))
    refused(f"key: p\nsteps:\n  - {{id: p, type: parallel, params: {{tasks: [{tasks}]}}}}\n", "parallel")
    load_spec("key: p\nsteps:\n" + "".join(f"  - {{id: s{i}, type: noop}}\n" for i in range(5)))


def test_for_each_known_at_load_is_capped():
    refused(step("for_each: '${range(100000)}'"), "for_each: 100000 items", "ORCHESTRATOR_MAX_FOR_EACH_ITEMS")
    items = ", ".join(str(i) for i in range(10_001))
    refused(step(f"for_each: [{items}]"), "for_each: 10001 items")
    # an expression of run data is only known at run time (the engine checks it at expansion)
    load_spec("key: v\nvariables: {n: 100000}\nsteps:\n  - {id: s, type: noop, for_each: '${range(n)}'}\n")
    load_spec(step("for_each: '${range(10000)}'"))


def test_check_for_each_items_is_the_engines_runtime_check(settings):
    check_for_each_items("s", list(range(10_000)))
    with pytest.raises(WorkflowError) as info:
        check_for_each_items("fan", list(range(10_001)))
    assert str(info.value) == "step 'fan': for_each: 10001 items, more than 10000 (ORCHESTRATOR_MAX_FOR_EACH_ITEMS)"
    settings.ORCHESTRATOR_MAX_FOR_EACH_ITEMS = 3
    with pytest.raises(WorkflowError):
        check_for_each_items("fan", [1, 2, 3, 4])


# --- every other number a file chooses ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "needles"),
    [
        ("key: t\ntimeout: 100000d\nsteps: [{id: a, type: noop}]\n", ("timeout:", "ORCHESTRATOR_MAX_RUN_TIMEOUT")),
        (step("retry: {initial_delay: 1000000d}"), ("retry.initial_delay", "ORCHESTRATOR_MAX_RETRY_DELAY")),
        (step("retry: {max_delay: 1000000d}"), ("retry.max_delay", "ORCHESTRATOR_MAX_RETRY_DELAY")),
        (step("params: {seconds: 100000000}", "sleep"), ("params.seconds", "ORCHESTRATOR_MAX_STEP_TIMEOUT")),
        (step("params: {url: 'https://x.test', timeout: 1000000}", "http"), ("params.timeout",)),
        (step("params: {url: 'https://x.test', timeout_ms: 1000000000}", "http"), ("params.timeout_ms",)),
        (step("params: {command: [echo], timeout: 1000000}", "exec"), ("params.timeout",)),
        (step("params: {prompt: hi, max_tokens: 1000000000}", "llm"), ("params.max_tokens",)),
        (step("concurrency: {key: k, limit: 1000000000}"), ("concurrency.limit", "100000")),
        (step("rate_limit: {key: k, capacity: 1000000000, rate: 10/s}"), ("rate_limit.capacity",)),
        (step("rate_limit: {key: k, rate: 1000000000/s}"), ("rate_limit", "tokens per second")),
        (step("rate_limit: {key: k, refill_rate: 0.000000001}"), ("rate_limit", "at least one token a day")),
        ("key: t\nmax_active_runs: 1000000000\nsteps: [{id: a, type: noop}]\n", ("max_active_runs",)),
        ("key: t\ntrigger: {interval: 1000d}\nsteps: [{id: a, type: noop}]\n", ("trigger: interval",)),
        (
            "key: t\ntrigger: {event_types: ["
            + ", ".join(f"e{i}" for i in range(101))
            + "]}\nsteps: [{id: a, type: noop}]\n",
            ("event_types",),
        ),
        ("key: t\ndefaults: {timeout: 100d}\nsteps: [{id: a, type: noop}]\n", ("defaults.timeout",)),
        (
            "key: t\nsteps: [{id: p, type: parallel, params: {tasks: [{id: x, type: noop, timeout: 100d}]}}]\n",
            ("params.tasks[0].timeout",),
        ),
    ],
)
def test_every_chosen_number_has_a_cap(yaml_text, needles):
    refused(yaml_text, *needles)


def test_values_at_the_caps_load():
    load_spec(step("timeout: 2h, retry: {max_attempts: 100, initial_delay: 1d, max_delay: 1d}"))
    load_spec("key: t\ntimeout: 7d\nsteps: [{id: a, type: noop}]\n")
    load_spec(step("rate_limit: {key: k, capacity: 1000000, refill_rate: 0.0000116}"))


def test_caps_come_from_the_settings(settings):
    settings.ORCHESTRATOR_MAX_STEP_TIMEOUT = 10.0
    settings.ORCHESTRATOR_MAX_ATTEMPTS = 2
    refused(step("timeout: 11s"), "limit 10s")
    refused(step("retry: {max_attempts: 3}"), "limit 2")
    load_spec(step("timeout: 10s, retry: {max_attempts: 2}"))
    assert set(LIMIT_DEFAULTS) >= {"ORCHESTRATOR_MAX_STEP_TIMEOUT", "ORCHESTRATOR_MAX_STEPS_PER_RUN"}


def test_post_template_with_a_capped_value_is_a_400_and_saves_nothing(owner):
    from templates_app.models import WorkflowTemplate
    from tests.conftest import api_client_for

    response = api_client_for(owner).post("/api/v1/templates", {"source": step("timeout: 10000d")}, format="json")
    assert response.status_code == 400 and "ORCHESTRATOR_MAX_STEP_TIMEOUT" in response.content.decode()
    assert not WorkflowTemplate.objects.filter(key="capped").exists()
