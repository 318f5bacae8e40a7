from . import brokers  # noqa: F401 - connects the RabbitMQ priority mapping (before_task_publish)
from .celery import app as celery_app

__all__ = ("celery_app",)
