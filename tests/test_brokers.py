"""The broker differences (orchestrator_site/brokers.py): RabbitMQ reads message priority the other
way round from Redis, so the platform's 0 = most urgent is mapped on AMQP only. The backlog test
itself (tests/test_priority.py) runs on both brokers in .ci/run."""

from __future__ import annotations

import pytest

from orchestrator_site.brokers import _amqp_priority, is_amqp, to_amqp_priority


@pytest.mark.parametrize(
    ("url", "amqp"),
    [
        ("amqp://guest:guest@127.0.0.1:5672//", True),
        ("pyamqp://h/v", True),
        ("amqps://h", True),
        ("redis://127.0.0.1:6379/9", False),
        ("memory://localhost/", False),
    ],
)
def test_is_amqp(url, amqp):
    assert is_amqp(url) is amqp


def test_priorities_map_most_urgent_to_rabbitmqs_highest():
    assert [to_amqp_priority(p) for p in range(10)] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert to_amqp_priority(-3) == 9 and to_amqp_priority(42) == 0


def test_publish_hook_maps_only_on_amqp(monkeypatch):
    # Celery reads the broker URL from CELERY_BROKER_URL first, as every process here does
    monkeypatch.setenv("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
    properties = {"priority": 0}
    _amqp_priority(properties=properties)
    assert properties == {"priority": 9}
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:6379/9")
    properties = {"priority": 0}
    _amqp_priority(properties=properties)
    assert properties == {"priority": 0}
    _amqp_priority(properties={"priority": None})  # no priority given: nothing to map
