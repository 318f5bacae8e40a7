"""Workflow templates: a key, versions, the normalized spec and the YAML it came from."""

from __future__ import annotations

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
