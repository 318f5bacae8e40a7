"""Runs, steps, attempts and traces: the rows the engine keeps as the source of truth.

Statuses change only through ``runs/engine/state.py`` (conditional UPDATEs that check the
transition, under one lock order: the run, then its steps by id).
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import F, Q

from .choices import AttemptOutcome, MembershipRole, RunStatus, StepStatus, TraceKind, TriggerKind

#: The tenant of rows created without one (CLI runs, builtin templates).
DEFAULT_TENANT = "default"


class Tenant(models.Model):
    """An isolated workspace: templates, runs and their rows belong to exactly one tenant.

    Rows refer to a tenant by its ``slug`` (``Run.tenant_id``, ``WorkflowTemplate.tenant_id`` are
    slug strings), so the engine and the CLI keep working with plain strings and no join.
    """

    slug = models.SlugField(max_length=100, unique=True)
    name = models.CharField(max_length=200, blank=True)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class Membership(models.Model):
    """A user's place in a tenant. A user may belong to several tenants; one is their default."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="tenant_memberships")
    role = models.CharField(max_length=16, choices=MembershipRole.choices, default=MembershipRole.MEMBER)
    is_default = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tenant__slug"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "user"], name="membership_tenant_user_uniq"),
            # at most one default tenant per user: the tenant a request without X-Tenant acts in
            models.UniqueConstraint(
                fields=["user"], condition=Q(is_default=True), name="membership_one_default_per_user"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} ({self.role})"


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
    tenant_id = models.CharField(max_length=100, default=DEFAULT_TENANT, help_text="Slug of the owning Tenant.")
    user_id = models.CharField(max_length=200, blank=True)
    correlation_id = models.CharField(max_length=200, blank=True)
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)
    #: sha256 of the API request that created the run under ``idempotency_key`` (replay vs conflict)
    request_hash = models.CharField(max_length=64, blank=True)
    #: caller data that is not a variable (seed 004's dispatch: intent_id, payload)
    metadata = models.JSONField(default=dict, blank=True)
    rerun_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="reruns", db_index=False
    )  # indexed below (partial: most runs are not reruns)
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
            # API run lists and the admin change list: one tenant's runs, newest first (cursor pages)
            models.Index(fields=["tenant_id", "-created_at"], name="run_tenant_created_idx"),
            # the admin change list of a superuser: all runs, newest first, no sort of the table
            models.Index(fields=["-created_at"], name="run_created_idx"),
            # the dashboard's runs finished per hour (last 24 h)
            models.Index(fields=["-finished_at"], condition=Q(finished_at__isnull=False), name="run_finished_idx"),
            # run lists filtered by status, newest first
            models.Index(fields=["status", "-created_at"], name="run_status_created_idx"),
            # run lists filtered by template
            models.Index(fields=["template_key", "-created_at"], name="run_template_created_idx"),
            # lookups by the caller's correlation id
            models.Index(fields=["correlation_id"], name="run_correlation_idx"),
            # SET NULL on reruns when a run is purged
            models.Index(fields=["rerun_of"], condition=Q(rerun_of__isnull=False), name="run_rerun_of_idx"),
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
    # indexed for map children only (Meta.indexes, step_parent_idx): an index that also held
    # every top-level step was a plan for "parent_id IS NULL" that reads the whole table
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="children", db_index=False
    )
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
            # a map step's children; top-level steps (parent NULL) are found by run
            models.Index(fields=["parent"], condition=Q(parent__isnull=False), name="step_parent_idx"),
            # the sweeper: retries that are due
            models.Index(fields=["next_attempt_at"], condition=Q(status="retry_wait"), name="step_retry_due_idx"),
            # the sweeper: leases that expired (worker killed or stalled)
            models.Index(fields=["lease_expires_at"], condition=Q(status="running"), name="step_lease_expiry_idx"),
            # the sweeper: queued but never delivered (broker lost the message)
            models.Index(fields=["queued_at"], condition=Q(status="queued"), name="step_queued_since_idx"),
            # dead-letter list
            models.Index(fields=["-finished_at"], condition=Q(status="dead"), name="step_dead_idx"),
            # queue gauges at scrape time (task_queue_jobs, active tasks, dead letters) and the
            # dashboard: counts of the unfinished statuses without reading finished steps
            models.Index(
                fields=["status"],
                condition=Q(status__in=["pending", "queued", "running", "retry_wait", "dead"]),
                name="step_queue_status_idx",
            ),
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
    # `run.attempt_rows` like `step.attempt_rows` (`step.attempts` is the count of tries)
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="attempt_rows")
    number = models.PositiveIntegerField()
    worker = models.CharField(max_length=200, blank=True)
    lease_token = models.UUIDField()
    #: the Celery task id that ran this attempt: cancelling the run revokes it
    task_id = models.CharField(max_length=255, blank=True)
    outcome = models.CharField(max_length=16, choices=AttemptOutcome.choices, default=AttemptOutcome.RUNNING)
    error = models.TextField(blank=True)
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    #: LLM calls of this attempt: {"provider", "model", "prompt_tokens", "completion_tokens",
    #: "total_tokens", "estimated"} (agents.llm); None for attempts that called no model
    usage = models.JSONField(null=True, blank=True)

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
    # `step_row`, not `step`: `trace.step_row_id` is the Step row's primary key, where
    # `step.step_id` is the workflow's id of the step ("fetch"); the column is still `step_id`
    step_row = models.ForeignKey(
        Step, null=True, blank=True, on_delete=models.CASCADE, related_name="traces", db_column="step_id"
    )
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


class WorkerHeartbeat(models.Model):
    """A live Celery worker process: written every ``ORCHESTRATOR_WORKER_HEARTBEAT`` seconds.

    ``step_ids`` are the steps of the messages it holds (reserved or running), ``pool_pids`` its
    pool processes (a running attempt's ``Step.worker`` is ``<node>:<pool pid>``). The sweeper
    treats a worker whose heartbeat is older than ``ORCHESTRATOR_WORKER_LOST_AFTER`` as gone
    and re-sends its steps at once (runs/engine/sweeper.py ``recover_lost_workers``).
    """

    #: ``<node>:<main pid>``: a restarted worker with the same node name is another row
    name = models.CharField(max_length=255, unique=True)
    node = models.CharField(max_length=200)
    pid = models.PositiveIntegerField()
    pool_pids = models.JSONField(default=list, blank=True)
    step_ids = models.JSONField(default=list, blank=True)
    queues = models.JSONField(default=list, blank=True)
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField()

    class Meta:
        ordering = ["node"]
        indexes = [
            # the sweeper: heartbeats that stopped
            models.Index(fields=["last_seen"], name="heartbeat_last_seen_idx"),
        ]

    def __str__(self) -> str:
        return self.name


class Executor(models.Model):
    """A worker outside Celery (any language) that takes steps of its queues over HTTP (seed 001).

    It authenticates with ``Authorization: Bearer <token>``; only the token's sha256 is stored.
    It sees only its tenant's steps, and only those of ``queues`` (runs/engine/executors.py).
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="executors")
    name = models.SlugField(max_length=100)
    queues = models.JSONField(default=list, help_text="Queue names this executor may take steps of.")
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_seen = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["tenant__slug", "name"]
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="executor_tenant_name_uniq")]

    def __str__(self) -> str:
        return f"{self.name} ({self.tenant.slug}: {', '.join(self.queues)})"

    @staticmethod
    def hash_token(token: str) -> str:
        """sha256 hex of a presented token (what ``token_hash`` stores)."""
        import hashlib

        return hashlib.sha256(token.encode()).hexdigest()

    @classmethod
    def issue(cls, tenant: Tenant, name: str, queues: list[str]) -> tuple[Executor, str]:
        """Create an executor; returns it and its token (shown once, never stored)."""
        import secrets

        token = "exe_" + secrets.token_urlsafe(32)
        executor = cls.objects.create(tenant=tenant, name=name, queues=list(queues), token_hash=cls.hash_token(token))
        return executor, token
