"""Tick times: the instant a schedule fired for, the same whichever beat or worker computes it.

A scheduled run's idempotency key is ``schedule:<id>:<tick>``. The tick is the latest time the
schedule matches at or before "now" (cron: the latest matching minute in the schedule's time zone;
interval: the latest multiple of the interval since the Unix epoch), computed in the beat process
when the message is sent (``scheduler.beat.TickScheduler``). Two beats sending the same firing, or
one beat sending it twice, give the same tick and so start one run.

Cron matching follows Celery's ``crontab`` (all five fields must match, day-of-week 0 = Sunday),
so the tick is a time beat itself would fire at.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

from celery.schedules import crontab
from celery.schedules import schedule as interval_schedule

#: How far back (days) a cron tick is searched: enough for any yearly schedule and leap days.
MAX_DAYS_BACK = 366 * 8
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def parse_cron(expression: str) -> crontab:
    """A Celery crontab of a 5-field expression. Raises ValueError naming the problem."""
    fields = str(expression).split()
    if len(fields) != 5:
        raise ValueError(f"cron {expression!r} must have 5 fields (minute hour day-of-month month day-of-week)")
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        return crontab(
            minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year, day_of_week=day_of_week
        )
    except Exception as exc:  # ValueError and celery's ParseException
        raise ValueError(f"invalid cron {expression!r}: {exc}") from None


def cron_fields(expression: str) -> dict[str, str]:
    """``{minute, hour, day_of_month, month_of_year, day_of_week}`` of a 5-field expression."""
    parse_cron(expression)
    minute, hour, day_of_month, month_of_year, day_of_week = expression.split()
    return {
        "minute": minute,
        "hour": hour,
        "day_of_month": day_of_month,
        "month_of_year": month_of_year,
        "day_of_week": day_of_week,
    }


def _zone(tz: Any) -> dt.tzinfo:
    if tz is None:
        from django.conf import settings

        return ZoneInfo(settings.TIME_ZONE)
    if isinstance(tz, str):
        return ZoneInfo(tz)
    return tz


def previous_cron_tick(cron: crontab, now: dt.datetime, tz: Any = None) -> dt.datetime:
    """The latest minute at or before ``now`` that ``cron`` matches, in ``tz`` (default: the
    crontab's own ``tz`` attribute, else settings.TIME_ZONE); returned in UTC.

    Raises ValueError when nothing matches in ``MAX_DAYS_BACK`` days (e.g. "0 0 31 2 *").
    """
    zone = _zone(tz if tz is not None else getattr(cron, "tz", None))
    local = now.astimezone(zone)
    hours = sorted(cron.hour, reverse=True)
    minutes = sorted(cron.minute, reverse=True)
    for days_back in range(MAX_DAYS_BACK):
        day = local.date() - dt.timedelta(days=days_back)
        if (
            day.month not in cron.month_of_year
            or day.day not in cron.day_of_month
            or day.isoweekday() % 7 not in cron.day_of_week
        ):
            continue
        for hour in hours:
            if days_back == 0 and hour > local.hour:
                continue
            for minute in minutes:
                if days_back == 0 and hour == local.hour and minute > local.minute:
                    continue
                return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=zone).astimezone(dt.UTC)
    raise ValueError(f"the cron schedule matches no time in the last {MAX_DAYS_BACK} days")


def previous_interval_tick(seconds: float, now: dt.datetime) -> dt.datetime:
    """The latest multiple of ``seconds`` since the Unix epoch at or before ``now`` (UTC)."""
    if seconds <= 0:
        raise ValueError("the interval must be positive")
    elapsed = (now.astimezone(dt.UTC) - _EPOCH).total_seconds()
    return _EPOCH + dt.timedelta(seconds=(elapsed // seconds) * seconds)


def tick_for(celery_schedule: Any, now: dt.datetime) -> dt.datetime | None:
    """The tick of a Celery schedule object (beat entry) at ``now``; None for other kinds."""
    if isinstance(celery_schedule, crontab):
        return previous_cron_tick(celery_schedule, now)
    if isinstance(celery_schedule, interval_schedule):
        return previous_interval_tick(celery_schedule.run_every.total_seconds(), now)
    return None


def format_tick(tick: dt.datetime) -> str:
    """The tick as it appears in idempotency keys and messages: ``2026-01-31T07:00:00Z``."""
    return tick.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_tick(text: str) -> dt.datetime:
    """Inverse of :func:`format_tick` (any ISO 8601 with a zone is accepted). Raises ValueError."""
    value = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"tick {text!r} has no time zone")
    return value.astimezone(dt.UTC)
