"""Agent tasks (seed 003's ``task_execution``) and the agent endpoints a task may call as tools.

An :class:`AgentTask` is driven by a run (``runs.Run``) whose steps are appended as it goes:
``decompose``, then per planned step ``step_<k>`` (an LLM call or a tool call, with
``args_<k>`` first when the model must pick the arguments), then ``evaluate_<k>``; ``replan_<k>``
and ``summarize_<k>`` when the evaluation asks for them. The run's steps, attempts and traces are
seed 003's ``task_execution_step`` / ``task_execution_trace``. The task row holds what the steps
decide (strategy, progress, context, summary, checkpoints, usage); it is written only inside the
transaction that records a step's success (``tasks_app.handler``), or by the services under the
run's lock (pause, resume, cancel).
"""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q

from runs.models import DEFAULT_TENANT

from .choices import TaskStatus


class AgentTask(models.Model):
    """A long-running goal worked on step by step by an LLM with tools (seed 003)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant_id = models.CharField(max_length=100, default=DEFAULT_TENANT, help_text="Slug of the owning Tenant.")
    user_id = models.CharField(max_length=200, blank=True)
    goal = models.TextField()
    thread_id = models.CharField(max_length=200, blank=True)
    #: seed 003's chatModel: {"provider", "model"}; ``model`` is asked of every provider
    chat_model = models.JSONField(default=dict, blank=True)
    #: names of the granted tools (template keys, agent endpoint names)
    tools = models.JSONField(default=list, blank=True)
    #: {"steps": [{"id", "description", "tool"?, "arguments"?}], "estimated_duration_s": int}
    strategy = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=TaskStatus.choices, default=TaskStatus.PENDING)
    progress = models.PositiveSmallIntegerField(default=0, help_text="Per cent, 0-100; never goes down.")
    #: planned steps executed (1-based index of the last one started; 0 before the first)
    current_step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    #: the conversation the model sees: OpenAI chat messages
    context = models.JSONField(default=list, blank=True)
    summary = models.TextField(blank=True)
    #: [{"number", "after_step", "cursor", "progress", "summary", "context", "reason", "at"}]
    checkpoints = models.JSONField(default=list, blank=True)
    #: {"prompt_tokens", "completion_tokens", "total_tokens", "llm_calls"}
    usage = models.JSONField(default=dict, blank=True)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    retry_count = models.PositiveIntegerField(default=0, help_text="Resumes after a failure or cancel.")
    max_steps = models.PositiveIntegerField()
    context_window_limit = models.PositiveIntegerField(help_text="Tokens of context before it is summarized.")
    checkpoint_interval = models.PositiveIntegerField(help_text="Steps between checkpoints.")
    run = models.ForeignKey(
        "runs.Run", null=True, blank=True, on_delete=models.SET_NULL, related_name="agent_tasks", db_index=False
    )  # indexed below
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(progress__lte=100), name="agenttask_progress_max_100"),
            models.CheckConstraint(condition=Q(max_steps__gte=1), name="agenttask_max_steps_positive"),
            models.CheckConstraint(condition=Q(checkpoint_interval__gte=1), name="agenttask_checkpoint_positive"),
            models.UniqueConstraint(
                fields=["tenant_id", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="agenttask_tenant_idempotency_uniq",
            ),
        ]
        indexes = [
            # the API and the admin: one tenant's tasks, newest first
            models.Index(fields=["tenant_id", "-created_at"], name="agenttask_tenant_created_idx"),
            # task of a run (the handler, the run page); SET NULL when a run is purged
            models.Index(fields=["run"], condition=Q(run__isnull=False), name="agenttask_run_idx"),
        ]

    def __str__(self) -> str:
        return f"task {self.id}: {self.goal[:60]}"


class AgentEndpoint(models.Model):
    """An agent endpoint a task may call as a tool: a ``call`` path (seed 004) with a JSON Schema of
    its arguments. The call is an ``http`` request (``agents/handlers/http.py``) to
    ``ORCHESTRATOR_AGENTS_BASE_URL`` + ``call`` with the arguments as the JSON body and the
    idempotency key ``<task>:<step>``."""

    tenant_id = models.CharField(max_length=100, default=DEFAULT_TENANT, help_text="Slug of the owning Tenant.")
    name = models.SlugField(max_length=64, help_text="The tool's name, as the model sees it.")
    description = models.TextField(blank=True)
    call = models.CharField(max_length=500, help_text="Path under ORCHESTRATOR_AGENTS_BASE_URL, e.g. /functions/v1/x")
    method = models.CharField(max_length=8, default="POST")
    arguments_schema = models.JSONField(default=dict, blank=True, help_text="JSON Schema of the arguments (object).")
    expensive = models.BooleanField(default=False, help_text="A checkpoint is written before each call.")
    timeout = models.FloatField(default=60.0, help_text="Seconds.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tenant_id", "name"]
        constraints = [models.UniqueConstraint(fields=["tenant_id", "name"], name="agentendpoint_tenant_name_uniq")]

    def __str__(self) -> str:
        return f"{self.name} ({self.call})"
