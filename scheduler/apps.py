from django.apps import AppConfig


class SchedulerConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "scheduler"
    verbose_name = "Schedules and events"

    def ready(self) -> None:
        from . import signals  # noqa: F401 - connects the receivers
