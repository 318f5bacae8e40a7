"""Workflow templates: a key, versions, the normalized spec and the YAML it came from."""

from __future__ import annotations

import uuid

from django.db import models


class WorkflowTemplate(models.Model):
    """One version of a workflow definition.

    ``spec`` is the normalized JSON (docs/spec-contract.md) and ``source`` the YAML text it was
    loaded from; ``content_hash`` (sha256 of the source) makes ``load_templates`` idempotent.
    """

    key = models.SlugField(max_length=200)
    version = models.PositiveIntegerField()
    name = models.CharField(max_length=200, blank=True)
    description = models.TextField(blank=True)
    category = models.CharField(max_length=100, blank=True)
    variables = models.JSONField(default=dict, blank=True)
    spec = models.JSONField()
    source = models.TextField(blank=True)
    source_path = models.CharField(max_length=500, blank=True)
    content_hash = models.CharField(max_length=64)
    trigger = models.JSONField(default=dict, blank=True)
    is_active = models.BooleanField(default=True)
    generated = models.BooleanField(
        default=False, help_text="Written by workflow generation (generate_workflow, POST /api/v1/generate)."
    )
    tenant_id = models.CharField(max_length=100, default="default", help_text="Slug of the owning tenant.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["key", "-version"]
        constraints = [
            # keys are per tenant: two tenants may each have their own `audit`
            models.UniqueConstraint(fields=["tenant_id", "key", "version"], name="template_tenant_key_version_uniq"),
            models.CheckConstraint(condition=models.Q(version__gte=1), name="template_version_positive"),
        ]
        indexes = [
            # latest active version of a key in a tenant: run_workflow KEY, the API, the event dispatcher
            models.Index(fields=["tenant_id", "key", "is_active", "-version"], name="template_tenant_key_active_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.key} v{self.version}"


class GenerationStatus(models.TextChoices):
    """Status of a :class:`WorkflowGenerationJob`; ``TERMINAL`` below."""

    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


GENERATION_TERMINAL = frozenset({GenerationStatus.SUCCEEDED, GenerationStatus.FAILED})


class Complexity(models.TextChoices):
    """Seed 002's ``complexity`` of a generation request."""

    LOW = "low", "Low"
    MEDIUM = "medium", "Medium"
    HIGH = "high", "High"


class WorkflowGenerationJob(models.Model):
    """One request to turn a plain-language prompt into a workflow (seed 000's ``workflow_generation_jobs``).

    ``rounds`` is the journal: one entry per planner/LLM round ``{"round", "stage", "ok",
    "errors", "usage", "seconds"}``; ``errors`` the one-line errors of the last round; ``result``
    the answer of ``POST /api/v1/generate`` (templates_app.generation.GenerationResult.as_dict);
    ``usage`` the summed LLM token usage ``{"prompt_tokens", "completion_tokens", "total_tokens"}``.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant_id = models.CharField(max_length=100, default="default", help_text="Slug of the owning tenant.")
    user_id = models.CharField(max_length=150, blank=True)
    status = models.CharField(max_length=16, choices=GenerationStatus.choices, default=GenerationStatus.QUEUED)
    prompt = models.TextField()
    domain = models.CharField(max_length=100, blank=True)
    complexity = models.CharField(max_length=10, choices=Complexity.choices, default=Complexity.MEDIUM)
    required_services = models.JSONField(default=list, blank=True)
    save_template = models.BooleanField(default=False, help_text="Save the workflow as a template version.")
    planner = models.CharField(max_length=10, blank=True, help_text="memory or llm")
    rounds = models.JSONField(default=list, blank=True)
    errors = models.JSONField(default=list, blank=True)
    result = models.JSONField(null=True, blank=True)
    usage = models.JSONField(default=dict, blank=True)
    template = models.ForeignKey(
        WorkflowTemplate, null=True, blank=True, on_delete=models.SET_NULL, related_name="generation_jobs"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "workflow_generation_jobs"
        ordering = ["-created_at"]
        indexes = [
            # a tenant's jobs, newest first: GET /api/v1/generate and the admin list
            models.Index(fields=["tenant_id", "-created_at"], name="genjob_tenant_created_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(status__in=[s.value for s in GenerationStatus]), name="genjob_status_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"generation {self.pk} ({self.status})"
