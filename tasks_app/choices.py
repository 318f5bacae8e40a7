"""Statuses of agent tasks, with their named groups."""

from __future__ import annotations

from django.db import models


class TaskStatus(models.TextChoices):
    PENDING = "pending"  # created, its run not started yet (or waiting for a run slot)
    RUNNING = "running"
    PAUSED = "paused"  # the next step waits until resume
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TASK_TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
TASK_ACTIVE = frozenset({TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.PAUSED})
