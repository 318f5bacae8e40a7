"""Keep beat in step with templates and schedules (connected in ``SchedulerConfig.ready``).

- a template version saved or deleted (``load_templates``, the API, the admin): its key's
  template schedule follows the latest active version's trigger (``sync_template_schedule``);
- a schedule deleted (admin bulk delete included): its PeriodicTask goes too.
"""

from __future__ import annotations

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from templates_app.models import WorkflowTemplate

from .models import Schedule


@receiver(post_save, sender=WorkflowTemplate, dispatch_uid="scheduler.template_saved")
@receiver(post_delete, sender=WorkflowTemplate, dispatch_uid="scheduler.template_deleted")
def template_changed(sender, instance: WorkflowTemplate, **kwargs) -> None:
    if kwargs.get("raw"):
        return  # loaddata
    from .services import sync_template_schedule

    sync_template_schedule(instance.tenant_id, instance.key)


@receiver(post_delete, sender=Schedule, dispatch_uid="scheduler.schedule_deleted")
def schedule_deleted(sender, instance: Schedule, **kwargs) -> None:
    from .services import _delete_periodic_task

    _delete_periodic_task(instance.periodic_task_id)
