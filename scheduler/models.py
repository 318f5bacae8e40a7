"""Schedules (cron and interval, run by django-celery-beat) and incoming events.

- :class:`Schedule`: starts runs of a template on a cron expression or every N seconds, with the
  schedule's variables. Each has one ``django_celery_beat.PeriodicTask`` (kept in step by
  ``scheduler.services``) that sends ``scheduler.run_schedule`` with the tick time; the run's
  idempotency key is ``schedule:<id>:<tick>``, so one tick never starts two runs. Schedules made
  from a template's ``trigger`` (``source=template``) follow the template on every load.
- :class:`IntentEvent`: seed 004's ``intent_events`` row: stored once per ``(tenant, event_id)``,
  with the runs it started.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q


def default_timezone() -> str:
    """The time zone of new schedules: the settings' ``TIME_ZONE``."""
    return settings.TIME_ZONE


class ScheduleSource(models.TextChoices):
    TEMPLATE = "template"  # made from the template's trigger by load_templates; follows it
    USER = "user"  # made in the admin or the API


class Schedule(models.Model):
    """Start a run of ``template_key`` (its latest active version) at every tick."""

    tenant_id = models.CharField(max_length=100, default="default", help_text="Slug of the owning tenant.")
    name = models.CharField(max_length=200, help_text="Unique in the tenant; template schedules: template:<key>.")
    template_key = models.SlugField(max_length=200)
    variables = models.JSONField(default=dict, blank=True, help_text="Variables of every run it starts.")
    cron = models.CharField(
        max_length=120, blank=True, help_text='Five fields: minute hour day-of-month month day-of-week ("0 7 * * *").'
    )
    interval = models.PositiveIntegerField(null=True, blank=True, help_text="Seconds between runs (instead of cron).")
    timezone = models.CharField(max_length=64, default=default_timezone, help_text="Time zone of the cron fields.")
    priority = models.PositiveSmallIntegerField(default=5, help_text="Priority of its runs: 0 (most urgent) to 9.")
    user_id = models.CharField(max_length=200, blank=True, help_text="Recorded as the user of its runs.")
    enabled = models.BooleanField(default=True)
    source = models.CharField(max_length=16, choices=ScheduleSource.choices, default=ScheduleSource.USER)
    description = models.TextField(blank=True)
    periodic_task = models.OneToOneField(
        "django_celery_beat.PeriodicTask", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    last_tick = models.DateTimeField(null=True, blank=True, help_text="Tick of the last run started.")
    last_run = models.ForeignKey("runs.Run", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["tenant_id", "name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant_id", "name"], name="schedule_tenant_name_uniq"),
            # exactly one of cron and interval
            models.CheckConstraint(
                condition=(~Q(cron="") & Q(interval__isnull=True)) | (Q(cron="") & Q(interval__gte=1)),
                name="schedule_cron_xor_interval",
            ),
            models.CheckConstraint(condition=Q(priority__lte=9), name="schedule_priority_0_9"),
        ]
        indexes = [
            # template schedules of a template (sync after load_templates)
            models.Index(fields=["tenant_id", "template_key"], name="schedule_template_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.when})"

    @property
    def when(self) -> str:
        """``cron 0 7 * * * Europe/Paris`` or ``every 30 s``."""
        return f"cron {self.cron} {self.timezone}" if self.cron else f"every {self.interval} s"


class IntentEvent(models.Model):
    """An incoming event (seed 004's ``intent_events``): idempotent on ``(tenant_id, event_id)``."""

    tenant_id = models.CharField(max_length=100, default="default", help_text="Slug of the owning tenant.")
    event_id = models.CharField(max_length=200, help_text="The sender's id; a repeat is a no-op.")
    type = models.CharField(max_length=200, help_text="Templates whose trigger lists this type start.")
    user_id = models.CharField(max_length=200, blank=True)
    intent_id = models.CharField(max_length=200, blank=True)
    payload = models.JSONField(default=dict, blank=True)
    runs = models.ManyToManyField("runs.Run", blank=True, related_name="+")
    errors = models.JSONField(
        default=list, blank=True, help_text="Templates the event matched but could not start: [{template, error}]."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["tenant_id", "event_id"], name="intentevent_tenant_event_uniq"),
        ]
        indexes = [
            # event lists of a tenant, newest first; by type
            models.Index(fields=["tenant_id", "-created_at"], name="intentevent_tenant_created_idx"),
            models.Index(fields=["tenant_id", "type", "-created_at"], name="intentevent_type_created_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.type} {self.event_id}"
