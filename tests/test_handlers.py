"""Step handler registry, the simple handlers, python callables, run_with_timeout, redaction.

No database needed. HTTP/LLM handlers: test_handlers_http.py; exec: test_handlers_exec.py.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from agents import testing
from agents.redaction import known_secrets, redact, redact_headers
from agents.registry import (
    StepContext,
    StepError,
    StepHandler,
    StepTimeout,
    canonical_type,
    get_handler,
    handler_types,
    register,
    run_with_timeout,
)


def make_ctx(params: dict[str, Any], timeout: float = 5.0, **extra: Any) -> StepContext:
    """A StepContext whose trace events land in ``ctx.events``."""
    events: list[tuple[str, str, dict[str, Any] | None]] = []
    ctx = StepContext(
        run_id="00000000-0000-0000-0000-000000000001",
        step_id=extra.pop("step_id", "s1"),
        step_pk=1,
        attempt=extra.pop("attempt", 1),
        params=params,
        timeout=timeout,
        idempotency_key="run-1:s1",
        tenant_id="t1",
        correlation_id="corr-1",
        trace=lambda kind, message, data=None: events.append((kind, message, data)),
        **extra,
    )
    ctx.events = events  # type: ignore[attr-defined]
    return ctx


# Callables allow-listed by the tests that need them.


def returns_set() -> Any:
    return {1, 2}


def wants_ctx(ctx: StepContext, x: int) -> dict[str, Any]:
    return {"step": ctx.step_id, "attempt": ctx.attempt, "x": x}


def positional(a: int, b: int, scale: int = 1) -> int:
    return (a + b) * scale


@pytest.fixture
def allow(settings):
    """Add dotted paths to the python allow-list for one test."""

    def _allow(*paths: str) -> None:
        settings.ORCHESTRATOR_PYTHON_CALLABLES = [*settings.ORCHESTRATOR_PYTHON_CALLABLES, *paths]

    return _allow


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_all_types_registered():
    assert handler_types() == {"http", "llm", "exec", "python", "noop", "sleep", "condition", "parallel", "external"}


@pytest.mark.parametrize(
    ("name", "canonical"),
    [("ai", "llm"), ("data", "http"), ("http", "http"), ("LLM", "llm"), (" noop ", "noop")],
)
def test_canonical_type_resolves_aliases(name, canonical):
    assert canonical_type(name) == canonical


def test_unknown_type_is_a_key_error():
    with pytest.raises(KeyError, match="nope"):
        canonical_type("nope")
    with pytest.raises(KeyError):
        get_handler("nope")


def test_get_handler_is_cached_and_follows_aliases():
    assert get_handler("ai") is get_handler("llm")
    assert get_handler("data").type_name == "http"


def test_register_refuses_a_taken_name():
    class Impostor(StepHandler):
        type_name = "http"

        def run(self, ctx):
            return None

    with pytest.raises(ValueError, match="already registered"):
        register(Impostor)
    assert type(get_handler("http")).__name__ == "HttpHandler"


def test_step_error_carries_its_fields():
    err = StepError("nope", permanent=True, retry_after=2.5, http_status=404, output={"a": 1})
    assert (str(err), err.permanent, err.retry_after, err.http_status, err.output) == (
        "nope",
        True,
        2.5,
        404,
        {"a": 1},
    )
    assert isinstance(StepTimeout("late"), StepError)
    assert StepTimeout("late").permanent is False


def test_context_deadline_defaults_to_now_plus_timeout():
    ctx = make_ctx({}, timeout=2.0)
    assert 1.5 < ctx.remaining() <= 2.0
    assert ctx.remaining(cap=0.5) == 0.5


# --------------------------------------------------------------------------------------------
# noop, condition, parallel, sleep
# --------------------------------------------------------------------------------------------


def test_noop_echoes_output_or_params():
    noop = get_handler("noop")
    assert noop.run(make_ctx({"output": {"flagged": [1]}})) == {"flagged": [1]}
    assert noop.run(make_ctx({"x": 1})) == {"x": 1}
    assert noop.run(make_ctx({})) == {}


@pytest.mark.parametrize(
    ("value", "result"),
    [(True, True), (False, False), (1, True), (0, False), ("false", False), ("False ", False),
     ("0", False), ("", False), ("yes", True), ([], False), ([0], True), (None, False)],
)  # fmt: skip
def test_condition_coerces_the_resolved_value(value, result):
    assert get_handler("condition").run(make_ctx({"expression": value})) == {"result": result}


def test_condition_without_value_is_permanent():
    with pytest.raises(StepError) as info:
        get_handler("condition").run(make_ctx({}))
    assert info.value.permanent


def test_parallel_validates_each_task():
    parallel = get_handler("parallel")
    # seed 002 spelling: type data/ai, parameters
    parallel.validate_params(
        {
            "tasks": [
                {"type": "data", "parameters": {"operation": "search"}},
                {"type": "ai", "parameters": {"prompt": "x"}},
            ]
        }
    )
    parallel.validate_params({"tasks": [{"id": "b", "type": "sleep", "params": {"seconds": 1}}]})
    parallel.validate_params({"tasks": "${steps.plan.output}"})
    with pytest.raises(ValueError, match="non-empty list"):
        parallel.validate_params({"tasks": []})
    with pytest.raises(ValueError, match=r"tasks\[1\].type: unknown step type 'bogus'"):
        parallel.validate_params({"tasks": [{"type": "noop"}, {"type": "bogus"}]})
    with pytest.raises(ValueError, match=r"tasks\[0\]: seconds must be a number >= 0"):
        parallel.validate_params({"tasks": [{"type": "sleep", "params": {"seconds": -1}}]})


def test_parallel_run_is_refused():
    with pytest.raises(StepError, match="expanded by the engine") as info:
        get_handler("parallel").run(make_ctx({"tasks": [{"type": "noop"}]}))
    assert info.value.permanent


def test_sleep_sleeps_and_validates():
    sleep = get_handler("sleep")
    assert sleep.run(make_ctx({"seconds": 0.05})) == {"slept": 0.05}
    sleep.validate_params({"seconds": "${vars.delay}"})  # expression: not type-checked
    for bad, message in [({}, "seconds is required"), ({"seconds": -1}, ">= 0"), ({"seconds": "x"}, ">= 0")]:
        with pytest.raises(ValueError, match=message):
            sleep.validate_params(bad)


def test_sleep_is_cut_short_by_the_deadline():
    started = time.monotonic()
    with pytest.raises(StepTimeout) as info:
        run_with_timeout(get_handler("sleep"), make_ctx({"seconds": 30}, timeout=0.3))
    assert time.monotonic() - started < 2
    assert not info.value.permanent


# --------------------------------------------------------------------------------------------
# python
# --------------------------------------------------------------------------------------------


def test_python_calls_an_allow_listed_callable():
    python = get_handler("python")
    params = {"callable": "agents.testing.echo", "kwargs": {"a": 1, "b": [2]}}
    python.validate_params(params)
    assert python.run(make_ctx(params)) == {"a": 1, "b": [2]}
    # other params are keyword arguments too
    assert python.run(make_ctx({"callable": "agents.testing.echo", "x": 1})) == {"x": 1}


def test_python_refuses_a_callable_not_allow_listed():
    python = get_handler("python")
    params = {"callable": "os.system", "args": ["true"]}
    with pytest.raises(ValueError, match="not allowed"):
        python.validate_params(params)
    with pytest.raises(StepError, match="not allowed") as info:
        python.run(make_ctx(params))
    assert info.value.permanent


def test_python_validate_params_shapes():
    python = get_handler("python")
    with pytest.raises(ValueError, match="callable is required"):
        python.validate_params({})
    with pytest.raises(ValueError, match="args must be a list"):
        python.validate_params({"callable": "agents.testing.echo", "args": "x"})
    with pytest.raises(ValueError, match="kwargs must be a mapping"):
        python.validate_params({"callable": "agents.testing.echo", "kwargs": [1]})
    python.validate_params({"callable": "${vars.fn}", "kwargs": "${steps.a.output}"})


def test_python_exception_is_transient_with_type_and_message():
    with pytest.raises(StepError) as info:
        get_handler("python").run(make_ctx({"callable": "agents.testing.fail", "kwargs": {"message": "kaput"}}))
    assert str(info.value) == "RuntimeError: kaput"
    assert not info.value.permanent


def test_python_result_must_be_json_serializable(allow):
    allow("tests.test_handlers.returns_set")
    with pytest.raises(StepError, match="not JSON-serializable") as info:
        get_handler("python").run(make_ctx({"callable": "tests.test_handlers.returns_set"}))
    assert info.value.permanent


def test_python_passes_ctx_and_positional_args(allow):
    allow("tests.test_handlers.wants_ctx", "tests.test_handlers.positional")
    python = get_handler("python")
    out = python.run(make_ctx({"callable": "tests.test_handlers.wants_ctx", "kwargs": {"x": 3}}, attempt=2))
    assert out == {"step": "s1", "attempt": 2, "x": 3}
    assert (
        python.run(make_ctx({"callable": "tests.test_handlers.positional", "args": [1, 2], "kwargs": {"scale": 10}}))
        == 30
    )


def test_python_wrong_signature_is_permanent(allow):
    allow("tests.test_handlers.positional")
    with pytest.raises(StepError) as info:
        get_handler("python").run(make_ctx({"callable": "tests.test_handlers.positional", "args": [1]}))
    assert info.value.permanent
    assert "missing" in str(info.value)


def test_python_unimportable_callable_is_permanent(allow):
    allow("agents.testing.does_not_exist", "no_such_module.fn")
    for path in ("agents.testing.does_not_exist", "no_such_module.fn"):
        with pytest.raises(StepError, match="cannot import") as info:
            get_handler("python").run(make_ctx({"callable": path}))
        assert info.value.permanent


def test_flaky_fails_then_succeeds(tmp_path):
    counter = str(tmp_path / "flaky.count")
    python = get_handler("python")
    params = {"callable": "agents.testing.flaky", "kwargs": {"key": "k1", "failures": 2, "counter_path": counter}}
    for call in (1, 2):
        with pytest.raises(StepError, match=f"call {call} fails"):
            python.run(make_ctx(params))
    assert python.run(make_ctx(params)) == {"calls": 3}
    # counted per key in the same file
    assert testing.flaky("k2", 0, counter_path=counter) == {"calls": 1}


# --------------------------------------------------------------------------------------------
# run_with_timeout
# --------------------------------------------------------------------------------------------


def test_run_with_timeout_abandons_a_slow_callable(allow):
    allow("agents.testing.slow")
    ctx = make_ctx({"callable": "agents.testing.slow", "kwargs": {"seconds": 5}}, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(StepTimeout, match="timed out") as info:
        run_with_timeout(get_handler("python"), ctx)
    assert time.monotonic() - started < 1.5
    assert not info.value.permanent


def test_run_with_timeout_returns_and_reraises(allow):
    allow("agents.testing.slow")
    python = get_handler("python")
    ctx = make_ctx({"callable": "agents.testing.slow", "kwargs": {"seconds": 0.01}}, timeout=2)
    assert run_with_timeout(python, ctx) == {"slept": 0.01}
    with pytest.raises(StepError, match="RuntimeError: boom"):
        run_with_timeout(python, make_ctx({"callable": "agents.testing.fail"}))


def test_run_with_timeout_does_not_start_past_the_deadline():
    ctx = make_ctx({"callable": "agents.testing.fail"}, deadline=time.monotonic() - 1)
    with pytest.raises(StepTimeout, match="before it started"):
        run_with_timeout(get_handler("python"), ctx)


def test_run_with_timeout_runs_self_timing_handlers_inline():
    import threading

    seen = []

    class Probe(StepHandler):
        type_name = "probe-inline"
        enforces_timeout = True

        def run(self, ctx):
            seen.append(threading.current_thread())
            return 1

    assert run_with_timeout(Probe(), make_ctx({})) == 1
    assert seen == [threading.current_thread()]


# --------------------------------------------------------------------------------------------
# Redaction
# --------------------------------------------------------------------------------------------


def test_redact_headers_masks_sensitive_names():
    headers = {
        "Authorization": "Bearer abc",
        "X-Api-Key": "k",
        "Cookie": "a=b",
        "X-Auth-Token": "t",
        "X-Client-Secret": "s",
        "X-Idempotency-Key": "run:step",
        "Accept": "application/json",
    }
    assert redact_headers(headers) == {
        "Authorization": "***",
        "X-Api-Key": "***",
        "Cookie": "***",
        "X-Auth-Token": "***",
        "X-Client-Secret": "***",
        "X-Idempotency-Key": "run:step",
        "Accept": "application/json",
    }


def test_redact_walks_nested_values():
    value = {"a": ["x supersecret y", {"supersecret": 1}], "b": ("abcd",), "n": 3, "short": "abcd"}
    assert redact(value, ["supersecret", "abcd"]) == {
        "a": ["x *** y", {"***": 1}],
        "b": ["***"],
        "n": 3,
        "short": "***",
    }
    assert redact("ab", ["ab"]) == "ab"  # secrets shorter than 4 characters are ignored
    assert redact("tok-long", ["tok", "tok-long"]) == "***"


def test_known_secrets_come_from_settings(settings):
    settings.ORCHESTRATOR_SERVICE_TOKEN = "service-token-1"
    settings.ORCHESTRATOR_LLM_API_KEY = ""
    assert known_secrets() == ["service-token-1"]
    settings.ORCHESTRATOR_LLM_API_KEY = "llm-key-2"
    assert known_secrets() == ["service-token-1", "llm-key-2"]


def test_handler_trace_redacts_known_secrets(settings):
    settings.ORCHESTRATOR_SERVICE_TOKEN = "service-token-1"
    ctx = make_ctx({"output": 1})
    get_handler("noop").trace(ctx, "x", "saw service-token-1", {"h": "Bearer service-token-1"})
    assert "service-token-1" not in json.dumps(ctx.events)


def test_flaky_key_defaults(tmp_path):
    counter = str(tmp_path / "c")
    params = {"callable": "agents.testing.flaky", "kwargs": {"counter_path": counter, "failures": 1}}
    with pytest.raises(StepError, match="call 1 fails"):
        get_handler("python").run(make_ctx(params))
    assert get_handler("python").run(make_ctx(params)) == {"calls": 2}
