"""Per-tenant token budgets (agents.llm.budgets): reserve before the call in one conditional UPDATE,
settle to the real usage after it, refuse by policy; 50 concurrent calls never overrun a budget."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from django.db import connection
from django.utils import timezone

from agents import llm
from agents.llm import budgets
from agents.models import TokenBudget, TokenBudgetHold
from agents.registry import StepContext, StepDeferred, StepError, get_handler, run_with_timeout
from tests.llm_server import Reply

ASK = [{"role": "user", "content": "Summarize the run in one line"}]
USAGE = {"prompt_tokens": 15, "completion_tokens": 30, "total_tokens": 45}


@pytest.fixture
def routed(settings, llm_server):
    settings.ORCHESTRATOR_LLM_BASE_URL = llm_server.url
    settings.ORCHESTRATOR_LLM_MODEL = "scripted-model"
    settings.ORCHESTRATOR_LLM_KIND = "openai"
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = []
    settings.GEMINI_API_KEY = ""
    llm_server.responder = lambda body: Reply(content="ok", usage=dict(USAGE))
    return llm_server


def needed(max_tokens: int = 50) -> int:
    return budgets.estimate_prompt_tokens(ASK) + max_tokens


@pytest.mark.django_db
def test_a_call_is_charged_its_real_usage_and_holds_nothing_after(routed):
    day = TokenBudget.objects.create(tenant_id="acme", period="day", limit=10_000, policy="fail")
    month = TokenBudget.objects.create(tenant_id="acme", period="month", limit=100_000, policy="fail")

    result = llm.complete(tenant_id="acme", messages=ASK, max_tokens=50)

    assert result.usage["total_tokens"] == 45
    for budget in (day, month):
        budget.refresh_from_db()
        assert (budget.used, budget.reserved) == (45, 0)
        assert budget.window_start == budgets.window(budget.period)[0]
    assert not TokenBudgetHold.objects.exists()


@pytest.mark.django_db
def test_a_failed_call_releases_its_hold_and_is_charged_nothing(routed):
    routed.responder = None
    routed.script(Reply.server_error())
    budget = TokenBudget.objects.create(tenant_id="acme", period="day", limit=10_000)

    with pytest.raises(llm.LLMError):
        llm.complete(tenant_id="acme", messages=ASK, max_tokens=50)

    budget.refresh_from_db()
    assert (budget.used, budget.reserved) == (0, 0)
    assert not TokenBudgetHold.objects.exists()


@pytest.mark.django_db
def test_an_answer_failing_its_schema_is_still_charged(routed):
    routed.responder = lambda body: Reply(content='{"wrong": true}', usage=dict(USAGE))
    budget = TokenBudget.objects.create(tenant_id="acme", period="day", limit=10_000)
    schema = {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "string"}}}

    with pytest.raises(llm.LLMSchemaError):
        llm.complete(tenant_id="acme", messages=ASK, schema=schema, max_tokens=50)

    budget.refresh_from_db()
    assert (budget.used, budget.reserved) == (45, 0)


@pytest.mark.django_db
def test_policy_fail_refuses_with_budget_exceeded_and_sends_nothing(routed):
    TokenBudget.objects.create(tenant_id="acme", period="day", limit=needed() + 10, used=20, policy="fail")

    with pytest.raises(llm.BudgetExceeded) as caught:
        llm.complete(tenant_id="acme", messages=ASK, max_tokens=50)

    assert caught.value.permanent
    assert str(caught.value).startswith("budget_exceeded: tenant 'acme' day token budget (20 used + 0 held of ")
    assert routed.calls() == []


@pytest.mark.django_db
def test_policy_wait_says_how_long_until_the_window_resets(routed):
    TokenBudget.objects.create(tenant_id="acme", period="month", limit=needed() + 10, used=20, policy="wait")

    _, end = budgets.window("month")
    longest = (end - timezone.now()).total_seconds()
    with pytest.raises(llm.BudgetWait) as caught:
        llm.complete(tenant_id="acme", messages=ASK, max_tokens=50)
    shortest = (end - timezone.now()).total_seconds()

    assert not caught.value.permanent
    assert shortest <= caught.value.seconds <= longest
    assert caught.value.retry_after == caught.value.seconds
    assert routed.calls() == []


@pytest.mark.django_db
def test_policy_wait_filled_only_by_calls_in_flight_waits_a_short_while(routed, settings):
    settings.ORCHESTRATOR_LLM_BUDGET_RECHECK = 4.0
    budget = TokenBudget.objects.create(tenant_id="acme", period="day", limit=needed() + 10, policy="wait")
    held = budgets.reserve("acme", 30)  # another call in flight

    with pytest.raises(llm.BudgetWait) as caught:
        llm.complete(tenant_id="acme", messages=ASK, max_tokens=50)
    assert caught.value.seconds == 4.0

    budgets.settle(held, 5)
    llm.complete(tenant_id="acme", messages=ASK, max_tokens=50)
    budget.refresh_from_db()
    assert (budget.used, budget.reserved) == (5 + 45, 0)


@pytest.mark.django_db
def test_a_call_larger_than_the_whole_budget_fails_even_with_policy_wait(routed):
    TokenBudget.objects.create(tenant_id="acme", period="day", limit=10, policy="wait")
    with pytest.raises(llm.BudgetExceeded, match="more than the whole day budget of tenant 'acme' \\(10\\)"):
        llm.complete(tenant_id="acme", messages=ASK, max_tokens=50)


@pytest.mark.django_db
def test_a_new_window_starts_from_zero(routed):
    yesterday = budgets.window("day")[0] - dt.timedelta(days=1)
    budget = TokenBudget.objects.create(
        tenant_id="acme", period="day", limit=1_000, used=1_000, policy="fail", window_start=yesterday
    )

    llm.complete(tenant_id="acme", messages=ASK, max_tokens=50)

    budget.refresh_from_db()
    assert budget.used == 45 and budget.window_start == budgets.window("day")[0]


@pytest.mark.django_db
def test_holds_of_a_killed_worker_expire(routed):
    budget = TokenBudget.objects.create(tenant_id="acme", period="day", limit=needed() + 10, policy="fail")
    budgets.reserve("acme", 40)  # never settled: its worker died
    TokenBudgetHold.objects.update(expires_at=timezone.now() - dt.timedelta(seconds=1))

    llm.complete(tenant_id="acme", messages=ASK, max_tokens=50)

    budget.refresh_from_db()
    assert (budget.used, budget.reserved) == (45, 0)


@pytest.mark.django_db
def test_another_tenants_budget_is_not_charged(routed):
    other = TokenBudget.objects.create(tenant_id="other", period="day", limit=1, policy="fail")
    llm.complete(tenant_id="acme", messages=ASK, max_tokens=50)
    other.refresh_from_db()
    assert other.used == 0


@pytest.mark.django_db(transaction=True)
def test_fifty_concurrent_calls_never_overrun_the_budget(routed):
    # Given a budget room for about 20 calls' reservations and 50 threads, each with its own
    # database connection, calling at the same moment
    limit = needed() * 20
    budget = TokenBudget.objects.create(tenant_id="busy", period="day", limit=limit, policy="fail")
    start = threading.Barrier(50)
    results: list[str] = []
    lock = threading.Lock()

    def call() -> None:
        try:
            start.wait()
            try:
                llm.complete(tenant_id="busy", messages=ASK, max_tokens=50, timeout=60)
                outcome = "ok"
            except llm.BudgetExceeded:
                outcome = "refused"
            with lock:
                results.append(outcome)
        finally:
            connection.close()

    threads = [threading.Thread(target=call) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    budget.refresh_from_db()
    succeeded = results.count("ok")
    assert len(results) == 50
    # Then the tokens recorded never pass the limit, and every answered call was charged
    assert budget.used == 45 * succeeded <= limit
    assert budget.reserved == 0 and not TokenBudgetHold.objects.exists()
    assert succeeded >= 20 and results.count("refused") > 0  # the budget really was contended
    assert len(routed.calls()) == succeeded


def make_ctx(params: dict, tenant: str = "acme") -> StepContext:
    return StepContext(
        run_id="run-1",
        step_id="ask",
        step_pk=1,
        attempt=1,
        params=params,
        timeout=30,
        idempotency_key="run-1:ask",
        tenant_id=tenant,
    )


@pytest.mark.django_db
def test_an_llm_step_over_a_wait_budget_is_deferred_not_failed(routed):
    TokenBudget.objects.create(tenant_id="acme", period="day", limit=needed() + 10, used=20, policy="wait")

    with pytest.raises(StepDeferred) as caught:
        run_with_timeout(get_handler("llm"), make_ctx({"prompt": "Summarize the run in one line", "max_tokens": 50}))

    assert caught.value.seconds > 0 and "token budget of tenant 'acme'" in caught.value.reason


@pytest.mark.django_db
def test_an_llm_step_over_a_fail_budget_is_a_permanent_budget_exceeded(routed):
    TokenBudget.objects.create(tenant_id="acme", period="day", limit=needed() + 10, used=20, policy="fail")

    with pytest.raises(StepError) as caught:
        run_with_timeout(get_handler("llm"), make_ctx({"prompt": "Summarize the run in one line", "max_tokens": 50}))

    assert caught.value.permanent and caught.value.message.startswith("budget_exceeded")
