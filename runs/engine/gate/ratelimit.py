"""Token buckets shared by every worker process and machine, kept in the database.

Algorithm: the token bucket (e.g. Tanenbaum, "Computer Networks", 5th ed., 5.4.2): a bucket holds
at most ``capacity`` tokens and gains ``refill_rate`` tokens per second; a step takes one token
when it starts. The refill is computed lazily from ``last_refill`` whenever the bucket is used,
inside one transaction holding its row lock (``SELECT ... FOR UPDATE``), so every process sees
one bucket and two takers never both spend the last token. A step starts only on a real token,
taken at the moment it starts: over any window of ``t`` seconds at most
``capacity + refill_rate * t`` steps start, however late or bunched their messages arrive.

Waiting in line instead of polling: a step that finds no token gets a
:class:`~agents.models.TokenReservation`, a place in the bucket's line, and is told to come back
exactly when the refill will have made a token for everyone ahead of it and for itself
(``(place - tokens) / refill_rate`` seconds). Newcomers do not jump the line (they take a token
only when more are there than steps waiting), and a step that comes back takes the next token
as soon as there is one, so each waits about once. Reservations older than ``STALE_AFTER`` no
longer hold anyone back (their step was lost); cancelling a run drops its places.

Rows are created on first use from the workflow's declaration (``managed_by=workflow``, and they
follow later changes of the declaration); a bucket edited in the admin (``managed_by=admin``)
keeps the operator's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from agents.models import ManagedBy, RateLimit, TokenReservation
from agents.rates import parse_rate  # noqa: F401 - part of this module's API


class RateLimitNotConfigured(Exception):
    """A step names a bucket that neither it nor the admin gives a capacity and a rate.

    ``key`` is the stored key; :meth:`describe` words the error for the key a user should see
    (the gate shows a tenant its own key, without the ``<tenant>/`` scope).
    """

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(self.describe(key))

    @staticmethod
    def describe(shown_key: str) -> str:
        return f"rate limit {shown_key!r} is not configured: declare capacity and rate, or create it in the admin"


@dataclass(frozen=True)
class Bucket:
    """A bucket as a step declares it: ``capacity`` tokens, ``refill_rate`` per second (None: admin's)."""

    key: str
    capacity: int | None = None
    refill_rate: float | None = None


@dataclass(frozen=True)
class Take:
    """Result of taking one token: ``wait`` seconds until it is due (0.0 = now), balance after."""

    wait: float
    tokens: float

    @property
    def granted(self) -> bool:
        return self.wait <= 0.0


def _refilled(row: RateLimit, now: datetime) -> float:
    elapsed = max(0.0, (now - row.last_refill).total_seconds())
    return min(float(row.capacity), row.tokens + elapsed * row.refill_rate)


def current_tokens(row: RateLimit, now: datetime | None = None) -> float:
    """The balance of ``row`` at ``now`` without taking anything (admin display)."""
    return _refilled(row, now or timezone.now())


def _locked_row(bucket: Bucket, now: datetime) -> RateLimit:
    row = RateLimit.objects.select_for_update().filter(key=bucket.key).first()
    if row is None:
        if bucket.capacity is None or bucket.refill_rate is None:
            raise RateLimitNotConfigured(bucket.key)
        try:
            with transaction.atomic():
                RateLimit.objects.create(
                    key=bucket.key,
                    capacity=bucket.capacity,
                    refill_rate=bucket.refill_rate,
                    tokens=float(bucket.capacity),
                    last_refill=now,
                    managed_by=ManagedBy.WORKFLOW,
                )
        except IntegrityError:
            pass  # another process created it first: lock theirs
        row = RateLimit.objects.select_for_update().get(key=bucket.key)
    elif row.managed_by == ManagedBy.WORKFLOW and bucket.capacity is not None and bucket.refill_rate is not None:
        if row.capacity != bucket.capacity or row.refill_rate != bucket.refill_rate:
            # the workflow changed its declaration: settle the balance at the old rate first
            row.tokens = min(float(bucket.capacity), _refilled(row, now))
            row.last_refill = now
            row.capacity, row.refill_rate = bucket.capacity, bucket.refill_rate
            row.save(update_fields=["tokens", "last_refill", "capacity", "refill_rate", "updated_at"])
    return row


def take(bucket: Bucket, now: datetime | None = None) -> Take:
    """Take one token from ``bucket`` (created on first use) if one is there, ignoring any line.

    Returns a :class:`Take`: ``wait`` 0.0 when a token was taken, else the seconds until the
    next token (nothing taken). Raises RateLimitNotConfigured (see :func:`_locked_row`).
    """
    now = now or timezone.now()
    with transaction.atomic():
        row = _locked_row(bucket, now)
        tokens = _refilled(row, now)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / row.refill_rate
        RateLimit.objects.filter(pk=row.pk).update(tokens=tokens, last_refill=now)
    return Take(wait=wait, tokens=tokens)


#: Seconds after its due time past which a reservation no longer holds newcomers back.
STALE_AFTER = 60.0


def acquire_for_step(step_pk: int, bucket: Bucket, now: datetime) -> tuple[float, bool]:
    """The gate's use of a bucket for one step: ``(seconds to wait, joined the line just now)``.

    ``(0.0, False)``: a token was taken, the step may start. Call inside the claim transaction:
    the token, the reservation and the step's state commit or roll back together.

    Raises:
        RateLimitNotConfigured: the bucket does not exist and the declaration lacks numbers.
    """
    with transaction.atomic():
        row = _locked_row(bucket, now)
        rate = row.refill_rate
        tokens = _refilled(row, now)
        reservation = TokenReservation.objects.filter(step_id=step_pk, key=bucket.key).first()
        if reservation is not None:
            # back from waiting in line: the next token is this step's
            if tokens >= 1.0:
                reservation.delete()
                RateLimit.objects.filter(pk=row.pk).update(tokens=tokens - 1.0, last_refill=now)
                return 0.0, False
            wait = (1.0 - tokens) / rate
            TokenReservation.objects.filter(pk=reservation.pk).update(due_at=now + timedelta(seconds=wait))
            RateLimit.objects.filter(pk=row.pk).update(tokens=tokens, last_refill=now)
            return wait, False
        waiting = TokenReservation.objects.filter(
            key=bucket.key, due_at__gt=now - timedelta(seconds=STALE_AFTER)
        ).count()
        if tokens - waiting >= 1.0:
            RateLimit.objects.filter(pk=row.pk).update(tokens=tokens - 1.0, last_refill=now)
            return 0.0, False
        wait = max(0.001, (waiting + 1 - tokens) / rate)
        TokenReservation.objects.create(step_id=step_pk, key=bucket.key, due_at=now + timedelta(seconds=wait))
        RateLimit.objects.filter(pk=row.pk).update(tokens=tokens, last_refill=now)
        return wait, True


def drop_reservations(step_filter: dict) -> int:
    """Remove the places in line of the steps matching ``step_filter`` (e.g. ``{"step__run_id": id}``)."""
    deleted, _ = TokenReservation.objects.filter(**step_filter).delete()
    return deleted
