"""Circuit breaker per LLM provider, its state shared by every worker through one database row.

States (Nygard, "Release It!", Circuit Breaker; the row is :class:`agents.models.LLMCircuit`):

- closed: ``open_until`` empty or past and no probe taken. Calls go through; each failure
  (connection error, timeout, 5xx) adds one to ``failures``; at
  ``ORCHESTRATOR_LLM_BREAKER_FAILURES`` the circuit opens for ``ORCHESTRATOR_LLM_BREAKER_COOLDOWN``
  seconds. A success resets ``failures``.
- open: ``open_until`` in the future: every worker skips the provider. A 429 opens it until its
  Retry-After, whatever the failure count (every worker then respects the provider's wait).
- half-open: the cool-down is over and the circuit still counts failures: the first caller takes
  the probe with a conditional UPDATE that pushes ``open_until`` one cool-down forward (only one
  worker can win it); its success closes the circuit, its failure keeps it open.

Every write is a single conditional UPDATE (or an INSERT that loses a race harmlessly), so the
state is right with many workers on PostgreSQL and on the embedded SQLite alike. Rows of a
healthy provider are never written on the hot path.
"""

from __future__ import annotations

import datetime as dt

from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from orchestrator_site.conf import conf

__all__ = ["allow", "blocked_for", "record_failure", "record_success", "reset"]


def _model():
    from ..models import LLMCircuit

    return LLMCircuit


def _cooldown() -> float:
    return float(conf.llm_breaker_cooldown)


def _threshold() -> int:
    return max(1, int(conf.llm_breaker_failures))


def blocked_for(key: str, now: dt.datetime | None = None) -> float:
    """Seconds the circuit of ``key`` stays open (0.0 when closed or its cool-down is over)."""
    now = now or timezone.now()
    row = _model().objects.filter(key=key).values("open_until").first()
    if not row or row["open_until"] is None or row["open_until"] <= now:
        return 0.0
    return (row["open_until"] - now).total_seconds()


def allow(key: str) -> tuple[bool, float]:
    """May a call go to ``key``'s provider now? Returns ``(allowed, seconds_still_open)``.

    Closed: allowed. Open: not allowed, with the seconds left. Half-open (cool-down over while
    ``failures`` reached the threshold): exactly one caller wins the probe and is allowed.
    """
    Circuit = _model()
    now = timezone.now()
    row = Circuit.objects.filter(key=key).values("open_until", "failures").first()
    if row is None:
        return True, 0.0
    if row["open_until"] is not None and row["open_until"] > now:
        return False, (row["open_until"] - now).total_seconds()
    if row["failures"] < _threshold():
        return True, 0.0
    # Half-open: take the probe by pushing open_until forward; the losers see it open.
    won = (
        Circuit.objects.filter(key=key)
        .filter(Q(open_until__isnull=True) | Q(open_until__lte=now))
        .update(open_until=now + dt.timedelta(seconds=_cooldown()))
    )
    if won:
        return True, 0.0
    return False, blocked_for(key, now)


def record_success(key: str) -> None:
    """Close ``key``'s circuit (no write when it is already closed and clean)."""
    _model().objects.filter(key=key).filter(Q(failures__gt=0) | Q(open_until__isnull=False)).update(
        failures=0, open_until=None, last_error=""
    )


def record_failure(key: str, error: str, retry_after: float | None = None) -> None:
    """Count a failure of ``key``'s provider; open the circuit at the threshold or for ``retry_after``.

    Args:
        key: the provider's breaker key.
        error: one line (secret-free) kept as ``last_error``.
        retry_after: seconds the provider asked for (429 Retry-After): opens the circuit until
            then without counting a failure; None for a real failure.
    """
    Circuit = _model()
    now = timezone.now()
    _ensure(key)
    rows = Circuit.objects.filter(key=key)
    if retry_after is not None:
        until = now + dt.timedelta(seconds=max(0.0, retry_after))
        # never shorten a longer opening
        rows.filter(Q(open_until__isnull=True) | Q(open_until__lt=until)).update(
            open_until=until, last_error=error[:300]
        )
        return
    rows.update(failures=F("failures") + 1, last_error=error[:300])
    rows.filter(failures__gte=_threshold()).filter(Q(open_until__isnull=True) | Q(open_until__lte=now)).update(
        open_until=now + dt.timedelta(seconds=_cooldown())
    )


def reset(key: str) -> None:
    """Close ``key``'s circuit and forget its failures (admin action, tests)."""
    _model().objects.filter(key=key).update(failures=0, open_until=None, last_error="")


def _ensure(key: str) -> None:
    Circuit = _model()
    if Circuit.objects.filter(key=key).exists():
        return
    try:
        with transaction.atomic():
            Circuit.objects.create(key=key)
    except IntegrityError:  # another worker created it first
        pass
