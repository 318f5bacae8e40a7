"""Per-tenant token budgets: reserve before the call, settle to the real usage after it.

A tenant may have one :class:`agents.models.TokenBudget` per period (``day``, ``month``; windows
start at midnight / on the 1st in the settings' time zone). A call needing ``n`` tokens (the
estimated prompt plus ``max_tokens``) is admitted by one conditional UPDATE per budget::

    UPDATE tokenbudget SET reserved = reserved + n
     WHERE id = %s AND used + reserved + n <= "limit"

and holds ``n`` (a :class:`agents.models.TokenBudgetHold` row, written in the same transaction)
until :func:`settle` replaces the hold with the tokens really used (0 when the call failed
before any provider answered). However many workers call at once, the admitted holds never add up
to more than the limit; only a provider reporting more tokens than were held (a prompt larger
than estimated) can push ``used`` past it, and that is charged, never dropped. Holds of a worker
killed mid-call expire after ``ORCHESTRATOR_LLM_BUDGET_HOLD_SECONDS`` and are released by the next
reservation.

Refusals: a budget with policy ``fail`` raises :class:`BudgetExceeded` (permanent,
``budget_exceeded``); policy ``wait`` raises :class:`BudgetWait` with the seconds until the
window resets (or ``ORCHESTRATOR_LLM_BUDGET_RECHECK`` when only calls in flight fill it). A call
larger than the whole limit is ``BudgetExceeded`` whatever the policy (waiting cannot help).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from orchestrator_site.conf import conf

from .errors import BudgetExceeded, BudgetWait

__all__ = ["Reservation", "estimate_prompt_tokens", "reserve", "settle", "window"]

#: Characters per token assumed when reserving for a prompt (conservative: English averages ~4).
RESERVE_CHARS_PER_TOKEN = 3


def estimate_prompt_tokens(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
    """Tokens to reserve for a prompt: its JSON length / 3, rounded up (an over-estimate)."""
    size = len(json.dumps(messages, ensure_ascii=False, default=str))
    if tools:
        size += len(json.dumps(tools, ensure_ascii=False, default=str))
    return math.ceil(size / RESERVE_CHARS_PER_TOKEN)


def window(period: str, now: dt.datetime | None = None) -> tuple[dt.datetime, dt.datetime]:
    """``(start, end)`` of the ``day`` or ``month`` window holding ``now`` (settings' time zone)."""
    local = timezone.localtime(now or timezone.now())
    start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        start = start.replace(day=1)
        end = (start + dt.timedelta(days=32)).replace(day=1)
    else:
        end = start + dt.timedelta(days=1)
    tz = local.tzinfo
    # re-localize: a DST change between start and end shifts the wall clock, not the date
    return start.replace(tzinfo=tz), end.replace(tzinfo=tz)


@dataclass
class Reservation:
    """Tokens held on a tenant's budgets by one call. ``holds``: ``[(budget_id, hold_id)]``."""

    tenant_id: str
    tokens: int
    holds: list[tuple[int, int]] = field(default_factory=list)
    settled: bool = False


def _models():
    from ..models import TokenBudget, TokenBudgetHold

    return TokenBudget, TokenBudgetHold


def _roll(budget_id: int, start: dt.datetime) -> None:
    """Start a new window when the stored one is over (``used`` back to 0; holds in flight stay).

    A budget never used yet (no window) starts its first window keeping ``used`` as the operator set it.
    """
    TokenBudget, _ = _models()
    TokenBudget.objects.filter(pk=budget_id, window_start__isnull=True).update(window_start=start)
    TokenBudget.objects.filter(pk=budget_id, window_start__lt=start).update(used=0, window_start=start)


def _release(budget_id: int, hold_id: int, charge: int) -> None:
    """Delete one hold (if still there) and charge ``charge`` tokens, in one transaction."""
    TokenBudget, TokenBudgetHold = _models()
    with transaction.atomic():
        hold = TokenBudgetHold.objects.filter(pk=hold_id).values_list("tokens", flat=True).first()
        released = hold if hold is not None and TokenBudgetHold.objects.filter(pk=hold_id).delete()[0] else 0
        if released or charge:
            TokenBudget.objects.filter(pk=budget_id).update(
                reserved=F("reserved") - released, used=F("used") + max(0, charge)
            )


def _release_expired(budget_id: int, now: dt.datetime) -> None:
    _, TokenBudgetHold = _models()
    for hold_id in TokenBudgetHold.objects.filter(budget_id=budget_id, expires_at__lte=now).values_list(
        "id", flat=True
    )[:100]:
        _release(budget_id, hold_id, 0)


def reserve(tenant_id: str, tokens: int) -> Reservation:
    """Hold ``tokens`` on every budget of ``tenant_id`` (none: nothing held, always admitted).

    Raises:
        BudgetExceeded: a ``fail`` budget cannot cover the call, or the call is larger than a limit.
        BudgetWait: a ``wait`` budget cannot cover it now (``seconds`` until it may).
    Nothing stays held when it raises.
    """
    TokenBudget, TokenBudgetHold = _models()
    reservation = Reservation(tenant_id, tokens)
    budgets = list(TokenBudget.objects.filter(tenant_id=tenant_id).order_by("pk"))
    if not budgets:
        return reservation
    now = timezone.now()
    hold_for = dt.timedelta(seconds=float(conf.llm_budget_hold_seconds))
    try:
        for budget in budgets:
            start, end = window(budget.period, now)
            _roll(budget.pk, start)
            _release_expired(budget.pk, now)
            if tokens > budget.limit:
                raise BudgetExceeded(
                    f"budget_exceeded: this call needs {tokens} tokens, more than the whole {budget.period} "
                    f"budget of tenant {tenant_id!r} ({budget.limit})",
                    budget_id=budget.pk,
                    period=budget.period,
                    limit=budget.limit,
                    resets_in=(end - now).total_seconds(),
                )
            with transaction.atomic():
                admitted = (
                    TokenBudget.objects.filter(pk=budget.pk, limit__gte=F("used") + F("reserved") + tokens).update(
                        reserved=F("reserved") + tokens
                    )
                    == 1
                )
                if admitted:
                    hold = TokenBudgetHold.objects.create(budget_id=budget.pk, tokens=tokens, expires_at=now + hold_for)
            if admitted:
                reservation.holds.append((budget.pk, hold.pk))
                continue
            _refuse(tenant_id, budget.pk, tokens, now, end)
    except BaseException:
        settle(reservation, 0)
        raise
    return reservation


def _refuse(tenant_id: str, budget_id: int, tokens: int, now: dt.datetime, end: dt.datetime) -> None:
    TokenBudget, _ = _models()
    row = TokenBudget.objects.get(pk=budget_id)
    resets_in = max(0.0, (end - now).total_seconds())
    state = f"{row.used} used + {row.reserved} held of {row.limit}"
    if row.policy == "wait":
        # Only calls in flight fill it: they settle soon (usually below what they hold).
        only_holds = row.used + tokens <= row.limit
        seconds = float(conf.llm_budget_recheck) if only_holds else resets_in
        raise BudgetWait(
            f"token budget of tenant {tenant_id!r} ({row.period}: {state}) cannot cover {tokens} tokens now; "
            f"waiting {seconds:.0f} s",
            seconds=max(1.0, seconds),
            budget_id=budget_id,
            period=row.period,
        )
    raise BudgetExceeded(
        f"budget_exceeded: tenant {tenant_id!r} {row.period} token budget ({state}) cannot cover {tokens} tokens",
        budget_id=budget_id,
        period=row.period,
        limit=row.limit,
        used=row.used,
        reserved=row.reserved,
        resets_in=resets_in,
    )


def settle(reservation: Reservation, used_tokens: int) -> None:
    """Replace the call's holds with ``used_tokens`` (prompt + completion; 0 releases them).

    Idempotent: a second call does nothing.
    """
    if reservation.settled:
        return
    reservation.settled = True
    for budget_id, hold_id in reservation.holds:
        _release(budget_id, hold_id, used_tokens)
