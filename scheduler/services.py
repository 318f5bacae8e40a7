"""Verbs of the scheduler app: schedules (django-celery-beat), events, purging old runs.

Schedules
    :func:`save_schedule` validates a :class:`~scheduler.models.Schedule` and keeps its
    ``PeriodicTask`` in step (created, changed, enabled or disabled with it); deleting a schedule
    deletes its task (``scheduler.signals``). :func:`sync_template_schedule` makes a template's
    ``trigger.cron`` / ``trigger.interval`` a schedule named ``template:<key>`` and removes it when
    the trigger goes away; it runs whenever a template version is saved (``load_templates``, the
    API). :func:`fire_schedule` is what beat's message does: start the run of one tick.

Events
    :func:`dispatch_event` stores an :class:`~scheduler.models.IntentEvent` once per
    ``(tenant, event_id)`` and starts every active template of the tenant whose trigger lists the
    event's type. A repeat returns the first dispatch's runs and starts nothing.

Errors are :class:`ScheduleError` / ``runs.services.ServiceError`` subclasses: one line, with
the HTTP status an API answers.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from agents import workdir
from orchestrator_site.conf import conf
from runs.services import Conflict, Invalid, ServiceError
from templates_app.errors import WorkflowError, one_line

from . import ticks
from .models import IntentEvent, Schedule, ScheduleSource

log = logging.getLogger("orchestrator.scheduler")

#: The task beat sends for every schedule.
RUN_SCHEDULE_TASK = "scheduler.run_schedule"
#: Prefix of the PeriodicTask names this app owns.
PERIODIC_TASK_PREFIX = "orchestrator:schedule:"


class ScheduleError(Invalid):
    """A schedule that cannot be saved (400): bad cron, unknown template, bad variables..."""


# --- schedules --------------------------------------------------------------------------------------


def template_schedule_name(key: str) -> str:
    """Name of the schedule made from template ``key``'s trigger."""
    return f"template:{key}"


def validate_schedule(schedule: Schedule) -> None:
    """Check a schedule before saving. Raises ScheduleError (one line naming the field).

    Exactly one of cron (5 fields, Celery's syntax) and interval (>= 1 s); a known time zone;
    priority 0-9; a template of that key in the tenant; variables valid for its latest active
    version (required ones given, types coerced: strings from a form become integers...).
    """
    from templates_app.services import get_template
    from templates_app.spec import validate_inputs

    if bool(schedule.cron) == bool(schedule.interval):
        raise ScheduleError("give exactly one of cron and interval")
    if schedule.cron:
        try:
            ticks.parse_cron(schedule.cron)
        except ValueError as exc:
            raise ScheduleError(f"cron: {exc}") from None
    elif schedule.interval < 1:
        raise ScheduleError("interval: at least 1 second")
    try:
        ZoneInfo(schedule.timezone)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        raise ScheduleError(f"timezone: unknown time zone {str(schedule.timezone)[:64]!r}") from None
    if not 0 <= int(schedule.priority) <= 9:
        raise ScheduleError("priority: 0 (most urgent) to 9")
    if not isinstance(schedule.variables, dict):
        raise ScheduleError("variables: must be a mapping of names to values")
    try:
        template = get_template(schedule.template_key, tenant_id=schedule.tenant_id)
    except WorkflowError as exc:
        raise ScheduleError(f"template: {exc}") from None
    try:
        values = validate_inputs(template.spec, schedule.variables)
    except WorkflowError as exc:
        raise ScheduleError(f"variables: {exc}") from None
    declared = template.spec.get("variables") or {}
    schedule.variables = {k: values[k] for k in schedule.variables if k in declared}


def save_schedule(schedule: Schedule) -> Schedule:
    """Validate, save and sync the schedule's PeriodicTask, in one transaction. Raises ScheduleError."""
    validate_schedule(schedule)
    try:
        with transaction.atomic():
            schedule.last_error = "" if schedule.enabled else schedule.last_error
            schedule.save()
            sync_periodic_task(schedule)
    except IntegrityError:
        raise ScheduleError(f"name: a schedule named {schedule.name!r} exists in tenant {schedule.tenant_id!r}")
    return schedule


def _misfire_grace(schedule: Schedule) -> int:
    grace = int(conf.schedule_misfire_grace)
    if schedule.interval:
        grace = min(grace, int(schedule.interval))  # a late tick superseded by the next is dropped
    return max(1, grace)


def sync_periodic_task(schedule: Schedule) -> Any:
    """Create or update the ``PeriodicTask`` of ``schedule`` (inside the caller's transaction)."""
    from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

    crontab = interval = None
    if schedule.cron:
        crontab, _ = CrontabSchedule.objects.get_or_create(
            **ticks.cron_fields(schedule.cron), timezone=ZoneInfo(schedule.timezone)
        )
    else:
        interval, _ = IntervalSchedule.objects.get_or_create(
            every=int(schedule.interval), period=IntervalSchedule.SECONDS
        )
    task = schedule.periodic_task or PeriodicTask(name=f"{PERIODIC_TASK_PREFIX}{schedule.pk}")
    task.task = RUN_SCHEDULE_TASK
    task.kwargs = json.dumps({"schedule_id": schedule.pk})
    task.crontab, task.interval = crontab, interval
    task.enabled = schedule.enabled
    task.expire_seconds = _misfire_grace(schedule)
    task.priority = None  # the run's own priority orders its steps; beat's message is tiny
    task.description = f"{schedule.tenant_id}/{schedule.name}: runs template {schedule.template_key}"[:2000]
    task.save()
    if schedule.periodic_task_id != task.pk:
        schedule.periodic_task = task
        Schedule.objects.filter(pk=schedule.pk).update(periodic_task=task)
    return task


def delete_schedule(schedule: Schedule) -> None:
    """Delete the schedule and its PeriodicTask."""
    with transaction.atomic():
        task_id = schedule.periodic_task_id
        schedule.delete()
        _delete_periodic_task(task_id)


def _delete_periodic_task(task_id: int | None) -> None:
    from django_celery_beat.models import PeriodicTask

    if task_id:
        for task in PeriodicTask.objects.filter(pk=task_id):
            task.delete()  # the model's delete() tells beat the schedule changed


def set_enabled(schedule: Schedule, enabled: bool) -> None:
    """Enable or disable a schedule and its task. Raises ScheduleError when enabling a schedule
    that would not start (its template or variables are no longer valid)."""
    if enabled:
        validate_schedule(schedule)
    with transaction.atomic():
        schedule.enabled = enabled
        if enabled:
            schedule.last_error = ""
        schedule.save(update_fields=["enabled", "variables", "last_error", "updated_at"])
        sync_periodic_task(schedule)


def sync_template_schedule(tenant_id: str, key: str) -> Schedule | None:
    """Make the schedule of template ``key`` follow its latest active version's trigger.

    Trigger with ``cron`` (or ``interval``): the schedule ``template:<key>`` is created or
    updated (cron, interval, ``trigger.variables``, the settings' time zone). An operator's
    ``enabled = False`` is kept. When required variables are missing the schedule is saved
    disabled with ``last_error`` saying which. No such trigger (or no active version): the
    schedule and its beat entry are removed. Returns the schedule or None.
    """
    from templates_app.models import WorkflowTemplate
    from templates_app.spec import validate_inputs

    name = template_schedule_name(key)
    existing = Schedule.objects.filter(tenant_id=tenant_id, name=name, source=ScheduleSource.TEMPLATE).first()
    template = (
        WorkflowTemplate.objects.filter(tenant_id=tenant_id, key=key, is_active=True).order_by("-version").first()
    )
    trigger = (template.trigger if template is not None else None) or {}
    cron, interval = trigger.get("cron") or "", trigger.get("interval")
    if not cron and not interval:
        if existing is not None:
            delete_schedule(existing)
            log.info("schedule %s of tenant %s removed: the trigger has no cron or interval", name, tenant_id)
        return None
    schedule = existing or Schedule(
        tenant_id=tenant_id, name=name, template_key=key, source=ScheduleSource.TEMPLATE, enabled=True
    )
    schedule.cron = cron
    schedule.interval = None if cron else max(1, int(round(float(interval))))
    schedule.timezone = settings.TIME_ZONE
    schedule.variables = dict(trigger.get("variables") or {})
    schedule.description = f"From the trigger of template {key} v{template.version}."
    try:
        validate_inputs(template.spec, schedule.variables)
        if schedule.last_error.startswith("variables:"):
            schedule.last_error = ""
    except WorkflowError as exc:
        schedule.enabled = False
        schedule.last_error = one_line(f"variables: {exc} (give them in the trigger's variables)")
    with transaction.atomic():
        schedule.save()
        sync_periodic_task(schedule)
    return schedule


def current_tick(schedule: Schedule, now: datetime | None = None) -> datetime:
    """The tick of ``schedule`` at ``now`` (used when a message carries none)."""
    now = now or timezone.now()
    if schedule.cron:
        return ticks.previous_cron_tick(ticks.parse_cron(schedule.cron), now, schedule.timezone)
    return ticks.previous_interval_tick(float(schedule.interval), now)


def fire_schedule(schedule_id: int, tick: datetime | None = None) -> Any:
    """Start the run of ``schedule_id`` for ``tick`` (default: the tick now). Returns the Run or None.

    Idempotent per tick: the run's idempotency key is ``schedule:<id>:<tick>``, so a tick sent
    twice (two beats, a re-delivered message) returns the first run. A disabled or deleted
    schedule starts nothing. A failure to start (template gone, variables no longer valid) is
    recorded in ``last_error`` and logged, never raised: beat would only send it again.
    """
    from runs.choices import TriggerKind
    from runs.services import create_run

    schedule = Schedule.objects.filter(pk=schedule_id).first()
    if schedule is None or not schedule.enabled:
        return None
    tick = tick or current_tick(schedule)
    key = f"schedule:{schedule.pk}:{ticks.format_tick(tick)}"
    try:
        run, created = create_run(
            tenant=schedule.tenant_id,
            template_key=schedule.template_key,
            variables=schedule.variables,
            correlation_id=f"schedule:{schedule.name}"[:200],
            priority=schedule.priority,
            idempotency_key=key,
            user_id=schedule.user_id,
            trigger=TriggerKind.CRON,
            metadata={"schedule": schedule.name, "tick": ticks.format_tick(tick)},
        )
    except ServiceError as exc:
        Schedule.objects.filter(pk=schedule.pk).update(last_error=one_line(f"{ticks.format_tick(tick)}: {exc}"))
        log.warning("schedule %s could not start its run: %s", schedule.name, exc)
        return None
    if created:
        Schedule.objects.filter(pk=schedule.pk).update(last_tick=tick, last_run=run, last_error="")
    return run


def run_schedule_now(schedule: Schedule) -> Any:
    """Start a run of ``schedule`` at once, outside its ticks (admin / API "run now")."""
    from runs.choices import TriggerKind
    from runs.services import create_run

    run, _created = create_run(
        tenant=schedule.tenant_id,
        template_key=schedule.template_key,
        variables=schedule.variables,
        correlation_id=f"schedule:{schedule.name}"[:200],
        priority=schedule.priority,
        idempotency_key=f"schedule:{schedule.pk}:now:{uuid.uuid4().hex}",
        user_id=schedule.user_id,
        trigger=TriggerKind.MANUAL,
        metadata={"schedule": schedule.name},
    )
    return run


# --- events -----------------------------------------------------------------------------------------


@dataclass
class Dispatch:
    """What :func:`dispatch_event` did: the event, whether it was new, its runs and its errors."""

    event: IntentEvent
    created: bool
    runs: list[Any] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)


def known_event_types(tenant_id: str) -> set[str]:
    """Every event type a trigger of an active template of the tenant lists."""
    from templates_app.models import WorkflowTemplate

    triggers = WorkflowTemplate.objects.filter(
        tenant_id=tenant_id, is_active=True, trigger__type__in=["event", "cron_or_event"]
    ).values_list("trigger", flat=True)
    return {str(t) for trigger in triggers for t in ((trigger or {}).get("event_types") or [])}


def matching_templates(tenant_id: str, event_type: str) -> list[Any]:
    """Latest active version of each template of the tenant whose trigger lists ``event_type``."""
    from templates_app.models import WorkflowTemplate

    latest: dict[str, Any] = {}
    candidates = (
        WorkflowTemplate.objects.filter(
            tenant_id=tenant_id, is_active=True, trigger__type__in=["event", "cron_or_event"]
        )
        .only("id", "key", "version", "trigger", "spec", "tenant_id")
        .order_by("key", "-version")
    )
    for template in candidates:
        if template.key not in latest:
            latest[template.key] = template
    return [t for t in latest.values() if event_type in ((t.trigger or {}).get("event_types") or [])]


def event_variables(spec: dict[str, Any], event: IntentEvent) -> dict[str, Any]:
    """The variables a run started by ``event`` gets (the same rule as ``runs.services.dispatch``).

    Payload keys that are declared variables fill them; variables named ``payload``,
    ``user_id``, ``intent_id`` receive those values, and one named ``event`` the whole event
    ``{id, type, user_id, intent_id, payload}``. Other payload keys are kept on the run's
    metadata, not refused: an event carries more than one workflow needs.
    """
    declared = {k: d for k, d in (spec.get("variables") or {}).items() if "expr" not in d}
    payload = event.payload if isinstance(event.payload, dict) else {}
    values = {k: v for k, v in payload.items() if k in declared}
    whole = {
        "id": event.event_id,
        "type": event.type,
        "user_id": event.user_id,
        "intent_id": event.intent_id,
        "payload": event.payload,
    }
    for name, value in (
        ("payload", event.payload),
        ("user_id", event.user_id),
        ("intent_id", event.intent_id),
        ("event", whole),
    ):
        if name in declared and value not in (None, ""):
            values[name] = value
    return values


def dispatch_event(
    event_type: str,
    payload: dict[str, Any] | None = None,
    *,
    event_id: str | None = None,
    tenant_id: str = "default",
    user_id: str = "",
    intent_id: str = "",
    priority: int = 5,
) -> Dispatch:
    """Store the event once and start every matching template (see the module docstring).

    ``event_id`` None: a new random id (the event is then never a repeat). Each run's
    idempotency key is ``event:<event id>:<template key>`` and its correlation id the
    ``intent_id`` (else the event id). A template that cannot start (variables refused) is
    reported in ``errors`` and does not stop the others.

    Raises:
        Invalid: empty type, a payload that is not a JSON object, priority outside 0-9.
        Conflict: ``event_id`` was already used with another type.
    """
    from runs.choices import TriggerKind
    from runs.services import create_run

    event_type = (event_type or "").strip()
    if not event_type or len(event_type) > 200:
        raise Invalid("type: an event type of 1 to 200 characters is required")
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise Invalid("payload: must be a JSON object")
    if not 0 <= int(priority) <= 9:
        raise Invalid("priority: 0 (most urgent) to 9")
    event_id = (event_id or "").strip() or uuid.uuid4().hex
    if len(event_id) > 200:
        raise Invalid("event_id: at most 200 characters")

    existing = IntentEvent.objects.filter(tenant_id=tenant_id, event_id=event_id).first()
    if existing is not None:
        return _repeat(existing, event_type)
    try:
        with transaction.atomic():
            event = IntentEvent.objects.create(
                tenant_id=tenant_id,
                event_id=event_id,
                type=event_type,
                user_id=user_id or "",
                intent_id=intent_id or "",
                payload=payload,
            )
            result = Dispatch(event=event, created=True)
            for template in matching_templates(tenant_id, event_type):
                try:
                    with transaction.atomic():
                        run, _ = create_run(
                            tenant=tenant_id,
                            template_key=template.key,
                            variables=event_variables(template.spec, event),
                            correlation_id=(intent_id or event_id)[:200],
                            priority=priority,
                            idempotency_key=f"event:{event_id}:{template.key}"[:200],
                            user_id=user_id or "",
                            trigger=TriggerKind.EVENT,
                            metadata={
                                "event_id": event_id,
                                "event_type": event_type,
                                "intent_id": intent_id or None,
                                "payload": payload,
                            },
                        )
                except ServiceError as exc:
                    result.errors.append({"template": template.key, "error": str(exc)})
                    continue
                result.runs.append(run)
            event.runs.set(result.runs)
            if result.errors:
                IntentEvent.objects.filter(pk=event.pk).update(errors=result.errors)
                event.errors = result.errors
    except IntegrityError:
        # the same event id arrived twice at once: the first one dispatched it
        return _repeat(IntentEvent.objects.get(tenant_id=tenant_id, event_id=event_id), event_type)
    log.info(
        "event dispatched",
        extra={"event_id": event_id, "event_type": event_type, "runs": len(result.runs), "errors": len(result.errors)},
    )
    return result


def _repeat(event: IntentEvent, event_type: str) -> Dispatch:
    if event.type != event_type:
        raise Conflict(f"event_id {event.event_id!r} was already used for an event of type {event.type!r}")
    return Dispatch(event=event, created=False, runs=list(event.runs.order_by("created_at")), errors=event.errors)


# --- purging ----------------------------------------------------------------------------------------


def purge_runs(older_than_days: float | None = None, *, batch_size: int = 500, dry_run: bool = False) -> int:
    """Delete finished runs (with their steps, attempts, traces) finished more than N days ago.

    ``older_than_days`` default ``ORCHESTRATOR_RUN_RETENTION_DAYS``; 0 or less purges nothing.
    Deletes in batches of ``batch_size`` runs (one transaction each), so a large purge never
    holds long locks. Returns how many runs were (or, with ``dry_run``, would be) deleted.
    """
    from runs.choices import RUN_TERMINAL
    from runs.models import Run

    days = settings.ORCHESTRATOR_RUN_RETENTION_DAYS if older_than_days is None else older_than_days
    if days is None or days <= 0:
        return 0
    cutoff = timezone.now() - timedelta(days=float(days))
    finished = Run.objects.filter(status__in=sorted(RUN_TERMINAL), finished_at__lt=cutoff)
    if dry_run:
        return finished.count()
    deleted = 0
    while True:
        rows = list(finished.order_by("finished_at").values_list("pk", "tenant_id")[:batch_size])
        if not rows:
            return deleted
        ids = [pk for pk, _ in rows]
        with transaction.atomic():
            Run.objects.filter(pk__in=ids).delete()
        # the runs' work directories on this machine (agents.workdir) go with them
        workdir.remove_run_work_dirs([(tenant, pk) for pk, tenant in rows])
        deleted += len(ids)
        log.info("purged %d runs finished before %s", deleted, cutoff.isoformat())
