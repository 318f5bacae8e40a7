"""Token usage on the Attempt: ``agents.llm.usage.record_attempt_usage`` (needs ``Attempt.usage``,
the JSONField the engine package adds)."""

from __future__ import annotations

import pytest

from agents.llm.usage import add, normalize
from runs.models import Attempt


def test_normalize_keeps_reported_usage_and_estimates_missing_usage():
    assert normalize({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}, "p", "c") == {
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "total_tokens": 10,
        "estimated": False,
    }
    assert normalize(None, "x" * 40, "y" * 9) == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "estimated": True,
    }


def test_add_sums_calls_and_keeps_the_estimated_flag():
    total = add(None, {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6, "estimated": False})
    total = add(
        total, {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4, "estimated": True, "provider": "local"}
    )
    assert total == {
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "total_tokens": 10,
        "estimated": True,
        "calls": 2,
        "provider": "local",
    }


@pytest.mark.django_db
def test_record_attempt_usage_sums_the_calls_of_one_attempt():
    import uuid

    from django.utils import timezone

    from agents.llm.usage import record_attempt_usage
    from tests.conftest import start

    run = start("key: usage\nsteps:\n  - {id: ask, type: noop}\n")
    step = run.steps.get(step_id="ask")
    Attempt.objects.create(step=step, run=run, number=1, lease_token=uuid.uuid4(), started_at=timezone.now())
    call = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "estimated": False, "provider": "local"}

    assert record_attempt_usage(step.pk, 1, call) is True
    assert record_attempt_usage(step.pk, 1, call) is True
    assert record_attempt_usage(step.pk, 2, call) is False

    usage = Attempt.objects.get(step=step, number=1).usage
    assert usage["total_tokens"] == 30 and usage["calls"] == 2 and usage["provider"] == "local"
