"""Runs, steps, attempts and traces: the rows the engine keeps as the source of truth.

Statuses change only through ``runs.engine`` (conditional UPDATEs that check the transition).
"""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import F, Q

from .choices import AttemptOutcome, RunStatus, StepStatus, TraceKind, TriggerKind


class Run(models.Model):
    """One execution of a workflow: a frozen copy of the spec, its inputs and its outcome."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    template = models.ForeignKey(
        "templates_app.WorkflowTemplate", null=True, blank=True, on_delete=models.SET_NULL, related_name="runs"
    )
    template_key = models.CharField(max_length=200)
    template_version = models.PositiveIntegerField(null=True, blank=True)
    spec = models.JSONField()
    inputs = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.PENDING)
    tenant_id = models.CharField(max_length=100, default="default")
    user_id = models.CharField(max_length=200, blank=True)
    correlation_id = models.CharField(max_length=200, blank=True)
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)
    priority = models.PositiveSmallIntegerField(default=5, help_text="Lower is more urgent (0-9).")
    trigger = models.CharField(max_length=16, choices=TriggerKind.choices, default=TriggerKind.MANUAL)
    outputs = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    steps_total = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    deadline = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant_id", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="run_tenant_idempotency_uniq",
            ),
            models.CheckConstraint(
                condition=Q(finished_at__isnull=True)
                | Q(started_at__isnull=True)
                | Q(finished_at__gte=F("started_at")),
                name="run_finished_after_started",
            ),
        ]
        indexes = [
            # run lists filtered by status, newest first
            models.Index(fields=["status", "-created_at"], name="run_status_created_idx"),
            # run lists filtered by template
            models.Index(fields=["template_key", "-created_at"], name="run_template_created_idx"),
            # lookups by the caller's correlation id
            models.Index(fields=["correlation_id"], name="run_correlation_idx"),
            # the sweeper: active runs whose deadline passed
            models.Index(
                fields=["deadline"], condition=Q(status__in=["pending", "running"]), name="run_active_deadline_idx"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.template_key} {self.id}"


class Step(models.Model):
    """One step of a run. Map children (for_each items, parallel branches) point at ``parent``.

    ``pending_deps`` counts dependencies not yet finished; the step is decided (queued or skipped)
    when it reaches zero. ``pending_children`` does the same for a map parent's children.
    """

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="steps")
    step_id = models.CharField(max_length=255)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE, related_name="children")
    map_index = models.PositiveIntegerField(null=True, blank=True)
    type = models.CharField(max_length=32)
    status = models.CharField(max_length=16, choices=StepStatus.choices, default=StepStatus.PENDING)
    spec = models.JSONField(default=dict)
    depends_on = models.JSONField(default=list, blank=True)
    dependents = models.JSONField(default=list, blank=True)
    pending_deps = models.IntegerField(default=0)
    pending_children = models.IntegerField(null=True, blank=True)
    item = models.JSONField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    max_attempts = models.PositiveIntegerField(default=1)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    lease_token = models.UUIDField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    input = models.JSONField(null=True, blank=True)
    output = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["run", "step_id"], name="step_run_step_id_uniq"),
            models.CheckConstraint(condition=Q(pending_deps__gte=0), name="step_pending_deps_nonneg"),
            models.CheckConstraint(condition=Q(attempts__lte=F("max_attempts")), name="step_attempts_within_limit"),
            models.CheckConstraint(condition=Q(max_attempts__gte=1), name="step_max_attempts_positive"),
        ]
        indexes = [
            # run detail, progress and the "anything left?" check at a run's end
            models.Index(fields=["run", "status"], name="step_run_status_idx"),
            # the sweeper: retries that are due
            models.Index(fields=["next_attempt_at"], condition=Q(status="retry_wait"), name="step_retry_due_idx"),
            # the sweeper: leases that expired (worker killed or stalled)
            models.Index(fields=["lease_expires_at"], condition=Q(status="running"), name="step_lease_expiry_idx"),
            # the sweeper: queued but never delivered (broker lost the message)
            models.Index(fields=["queued_at"], condition=Q(status="queued"), name="step_queued_since_idx"),
            # dead-letter list
            models.Index(fields=["-finished_at"], condition=Q(status="dead"), name="step_dead_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.step_id} ({self.status})"

    @property
    def idempotency_key(self) -> str:
        """Stable across attempts of this step in this run: ``<run id>:<step id>``."""
        return f"{self.run_id}:{self.step_id}"


class Attempt(models.Model):
    """One try of a step, written when the step is claimed and closed when the try ends."""

    step = models.ForeignKey(Step, on_delete=models.CASCADE, related_name="attempt_rows")
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="attempts")
    number = models.PositiveIntegerField()
    worker = models.CharField(max_length=200, blank=True)
    lease_token = models.UUIDField()
    outcome = models.CharField(max_length=16, choices=AttemptOutcome.choices, default=AttemptOutcome.RUNNING)
    error = models.TextField(blank=True)
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["step_id", "number"]
        constraints = [
            models.UniqueConstraint(fields=["step", "number"], name="attempt_step_number_uniq"),
            models.CheckConstraint(condition=Q(number__gte=1), name="attempt_number_positive"),
        ]
        indexes = [
            # recent failures across runs (dashboard)
            models.Index(fields=["outcome", "-started_at"], name="attempt_outcome_started_idx"),
        ]

    def __str__(self) -> str:
        return f"attempt {self.number} of step {self.step_id}"


class Trace(models.Model):
    """An append-only audit event of a run: state changes, HTTP/LLM/exec calls, decisions, errors.

    ``data`` is redacted before it is written; traces are never updated.
    """

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="traces")
    step = models.ForeignKey(Step, null=True, blank=True, on_delete=models.CASCADE, related_name="traces")
    attempt = models.PositiveIntegerField(null=True, blank=True)
    kind = models.CharField(max_length=16, choices=TraceKind.choices)
    message = models.TextField()
    data = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        indexes = [
            # a run's latest traces
            models.Index(fields=["run", "-id"], name="trace_run_latest_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.kind}: {self.message[:60]}"
