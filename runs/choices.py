"""Statuses of runs, steps and attempts, with their named groups (one place for all of them)."""

from __future__ import annotations

from django.db import models


class RunStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


RUN_TERMINAL = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.TIMED_OUT})
RUN_ACTIVE = frozenset({RunStatus.PENDING, RunStatus.RUNNING})


class StepStatus(models.TextChoices):
    PENDING = "pending"  # waiting for dependencies
    QUEUED = "queued"  # message sent, not yet claimed
    RUNNING = "running"  # claimed under a lease (or, for a map parent, waiting on its children)
    RETRY_WAIT = "retry_wait"  # failed attempt, next try at next_attempt_at
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # permanent failure recorded without exhausting attempts
    SKIPPED = "skipped"  # untaken branch, `when` false, or upstream did not succeed
    DEAD = "dead"  # attempts exhausted: the dead letter
    CANCELLED = "cancelled"


STEP_TERMINAL = frozenset(
    {StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.DEAD, StepStatus.CANCELLED}
)
STEP_ACTIVE = frozenset({StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.RETRY_WAIT})
STEP_FAILED = frozenset({StepStatus.FAILED, StepStatus.DEAD})


class AttemptOutcome(models.TextChoices):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    LOST = "lost"  # lease expired: the worker died or stalled
    REFUSED = "refused"  # finished after its lease was taken over; result discarded
    CANCELLED = "cancelled"  # its run was cancelled or timed out while it ran
    DEFERRED = "deferred"  # handed back without counting (StepDeferred: e.g. a token budget)


class TriggerKind(models.TextChoices):
    MANUAL = "manual"
    CLI = "cli"
    API = "api"
    CRON = "cron"
    EVENT = "event"
    RETRY = "retry"  # a rerun of an earlier run made before 2026-11-30 (kept for old rows)
    RERUN = "rerun"  # a rerun of an earlier run (runs.services.rerun)


class TraceKind(models.TextChoices):
    STATE = "state"
    HTTP = "http"
    LLM = "llm"
    EXEC = "exec"
    DECISION = "decision"
    ERROR = "error"
    CHECKPOINT = "checkpoint"
    LOG = "log"


class MembershipRole(models.TextChoices):
    OWNER = "owner"  # everything a member can, and manages the tenant's members
    MEMBER = "member"  # reads; starts, cancels and retries runs; creates templates
    VIEWER = "viewer"  # reads only


#: Roles allowed to change things through the API (start runs, load templates, cancel, retry).
WRITE_ROLES = frozenset({MembershipRole.OWNER, MembershipRole.MEMBER})
