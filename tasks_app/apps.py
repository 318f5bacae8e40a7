from django.apps import AppConfig


class TasksConfig(AppConfig):
    """Durable agent tasks (seed 003): ``AgentTask`` driven by a run whose steps are appended as it goes."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "tasks_app"
    verbose_name = "Agent tasks"

    def ready(self) -> None:
        from runs.signals import run_finished

        from . import handler  # noqa: F401 - registers the ``agent`` step type
        from .services import run_finished_receiver

        run_finished.connect(run_finished_receiver, dispatch_uid="tasks_app.run_finished")
