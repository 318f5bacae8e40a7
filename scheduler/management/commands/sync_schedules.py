"""``manage.py sync_schedules``: rebuild the beat entries of every schedule (repair after a restore)."""

from __future__ import annotations

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Make every template's schedule follow its latest active trigger, and every schedule's "
        "django-celery-beat PeriodicTask follow the schedule. Idempotent."
    )

    def handle(self, *args, **options) -> None:
        from django.db import transaction

        from scheduler.models import Schedule
        from scheduler.services import sync_periodic_task, sync_template_schedule
        from templates_app.models import WorkflowTemplate

        keys = sorted(set(WorkflowTemplate.objects.values_list("tenant_id", "key")))
        templated = sum(1 for tenant, key in keys if sync_template_schedule(tenant, key) is not None)
        count = 0
        for schedule in Schedule.objects.all():
            with transaction.atomic():
                sync_periodic_task(schedule)
            count += 1
        self.stdout.write(f"{count} schedule(s) synced ({templated} from template triggers)")
