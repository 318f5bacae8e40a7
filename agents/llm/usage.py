"""Token usage: normalizing what providers report, estimating what they do not, recording it.

Usage shape everywhere (LLMResult, step outputs, traces, ``Attempt.usage``)::

    {"prompt_tokens": int, "completion_tokens": int, "total_tokens": int, "estimated": bool}

plus, on an Attempt, ``"provider"``, ``"model"`` and ``"calls"`` (the LLM calls summed into it).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["estimate", "normalize", "record_attempt_usage"]

#: Characters per token assumed when a provider reports no usage (English averages about 4).
CHARS_PER_TOKEN = 4


def _count(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


def estimate(prompt_text: str, completion_text: str) -> dict[str, Any]:
    """Usage counted from the text (``estimated: True``): one token per 4 characters, rounded up."""
    prompt, completion = _count(prompt_text), _count(completion_text)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "estimated": True,
    }


def normalize(reported: Any, prompt_text: str, completion_text: str) -> dict[str, Any]:
    """The provider's usage object as our shape; estimated from the text when it is missing."""
    if reported is not None and not isinstance(reported, dict):
        reported = getattr(reported, "model_dump", lambda: None)()
    if not isinstance(reported, dict):
        return estimate(prompt_text, completion_text)
    try:
        prompt = int(reported.get("prompt_tokens") or 0)
        completion = int(reported.get("completion_tokens") or 0)
        total = int(reported.get("total_tokens") or (prompt + completion))
    except (TypeError, ValueError):
        return estimate(prompt_text, completion_text)
    if prompt == 0 and completion == 0 and total == 0:
        return estimate(prompt_text, completion_text)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total, "estimated": False}


def add(total: dict[str, Any] | None, usage: dict[str, Any]) -> dict[str, Any]:
    """``total`` + ``usage`` (token counts summed, ``estimated`` if either is, ``calls`` counted)."""
    total = dict(total or {})
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        total[key] = int(total.get(key) or 0) + int(usage.get(key) or 0)
    total["estimated"] = bool(total.get("estimated")) or bool(usage.get("estimated"))
    total["calls"] = int(total.get("calls") or 0) + 1
    for key in ("provider", "model"):
        if usage.get(key):
            total[key] = usage[key]
    return total


def record_attempt_usage(step_pk: int, attempt_number: int, usage: dict[str, Any]) -> bool:
    """Add one LLM call's usage to ``Attempt.usage`` of step ``step_pk``, attempt ``attempt_number``.

    ``usage``: ``{"prompt_tokens", "completion_tokens", "total_tokens", "estimated", "provider"?,
    "model"?}``. Several calls in one attempt are summed (``calls`` counts them; ``provider`` and
    ``model`` are the last call's). Read-modify-write under ``select_for_update`` so concurrent
    writers do not lose a call. Returns False when the attempt row does not exist.

    Needs the JSONField ``runs.models.Attempt.usage`` (default dict / null).
    """
    from django.db import transaction

    from runs.models import Attempt

    with transaction.atomic():
        row = (
            Attempt.objects.select_for_update()
            .filter(step_id=step_pk, number=attempt_number)
            .only("pk", "usage")
            .first()
        )
        if row is None:
            return False
        Attempt.objects.filter(pk=row.pk).update(usage=add(row.usage, usage))
    return True
