"""What differs between the two supported brokers, Redis and RabbitMQ (AMQP 0-9-1).

Run priority is seed 004's: 0 is the most urgent, 9 the least, and the engine sends each step's
message with its run's priority (``runs.engine.enqueue_steps``). The brokers read that number in
opposite directions:

- Redis (kombu's emulation, settings ``CELERY_BROKER_TRANSPORT_OPTIONS``: ``priority_steps``,
  ``queue_order_strategy=priority``): one list per level, level 0 consumed first. The number is
  sent as it is.
- RabbitMQ: a queue declared with ``x-max-priority`` (settings: ``CELERY_TASK_QUEUE_MAX_PRIORITY``
  = 9) delivers the HIGHEST priority first (RabbitMQ, "Priority Queue Support"). So on an AMQP
  broker :func:`to_amqp_priority` maps the platform's number onto RabbitMQ's (``9 - priority``)
  just before the message is published (Celery's ``before_task_publish`` signal), for every
  producer: web, commands, workers and beat.
"""

from __future__ import annotations

from typing import Any

from celery.signals import before_task_publish

AMQP_SCHEMES = ("amqp", "amqps", "pyamqp", "librabbitmq")
#: Levels of run priority: 0 (most urgent) .. MAX_PRIORITY.
MAX_PRIORITY = 9


def is_amqp(broker_url: str) -> bool:
    """True for a RabbitMQ (AMQP 0-9-1) broker URL."""
    return broker_url.split("://", 1)[0].lower() in AMQP_SCHEMES


def to_amqp_priority(priority: int) -> int:
    """The RabbitMQ message priority for a run priority (0 most urgent -> 9, 9 -> 0); clamped."""
    return MAX_PRIORITY - max(0, min(MAX_PRIORITY, int(priority)))


@before_task_publish.connect(dispatch_uid="orchestrator.brokers.amqp_priority")
def _amqp_priority(sender: Any = None, properties: dict[str, Any] | None = None, **kwargs: Any) -> None:
    from orchestrator_site.celery import app

    if properties is None or properties.get("priority") is None:
        return
    if is_amqp(app.conf.broker_url or ""):
        properties["priority"] = to_amqp_priority(properties["priority"])
