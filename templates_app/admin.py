"""Templates in the admin: versions, their YAML and spec, and a "Run now" form taking the variables.

The form has one field per declared variable, typed after it (text, integer, number, yes/no, JSON
for objects and arrays), pre-filled with the defaults; submitting starts a run through
``runs.services.create_run`` (trigger ``manual``) and opens the run's page.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from runs import services, tenancy
from runs.admin import pretty_json
from runs.choices import TriggerKind

from .models import WorkflowGenerationJob, WorkflowTemplate


def _variable_field(name: str, decl: dict[str, Any]) -> forms.Field:
    """A form field for one declared variable (required only when it has no default)."""
    kind = decl.get("type", "any")
    required = bool(decl.get("required")) and "default" not in decl
    common: dict[str, Any] = {"required": required, "help_text": decl.get("description", ""), "label": name}
    default = decl.get("default")
    if kind == "string":
        return forms.CharField(initial=default, strip=False, **common)
    if kind == "integer":
        return forms.IntegerField(initial=default, **common)
    if kind == "number":
        return forms.FloatField(initial=default, **common)
    if kind == "boolean":
        return forms.NullBooleanField(
            initial=default,
            widget=forms.Select(choices=[("", "(default)"), ("true", "yes"), ("false", "no")]),
            **common,
        )
    initial = json.dumps(default) if "default" in decl else None
    return forms.JSONField(initial=initial, **common, widget=forms.Textarea(attrs={"rows": 3, "cols": 60}))


class RunNowForm(forms.Form):
    """Variables of the template plus the run's correlation id and priority."""

    correlation_id = forms.CharField(max_length=200, required=False)
    priority = forms.IntegerField(min_value=0, max_value=9, initial=5, help_text="0 is the most urgent.")

    def __init__(self, template: WorkflowTemplate, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.variable_names: list[str] = []
        for name, decl in (template.variables or {}).items():
            if "expr" in decl:
                continue  # computed by the workflow
            self.fields[f"var_{name}"] = _variable_field(name, decl)
            self.variable_names.append(name)

    def variables(self) -> dict[str, Any]:
        """The variables given (empty fields left out, so the template's defaults apply)."""
        values = {}
        for name in self.variable_names:
            value = self.cleaned_data.get(f"var_{name}")
            if value not in (None, ""):
                values[name] = value
        return values


@admin.register(WorkflowTemplate)
class WorkflowTemplateAdmin(admin.ModelAdmin):
    list_display = [
        "key",
        "version",
        "name",
        "tenant_id",
        "category",
        "is_active",
        "generated",
        "created_at",
        "run_now_link",
    ]
    list_filter = ["is_active", "generated", "tenant_id", "category"]
    search_fields = ["key", "name"]
    ordering = ["tenant_id", "key", "-version"]
    list_per_page = 100

    class Media:
        css = {"all": ["runs/ops.css"]}

    readonly_fields = [
        "key",
        "version",
        "name",
        "description",
        "category",
        "tenant_id",
        "generated",
        "content_hash",
        "source_path",
        "created_at",
        "run_now_link",
        "variables_display",
        "trigger_display",
        "source_display",
        "spec_display",
    ]
    fields = ["is_active", *readonly_fields]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        queryset = tenancy.scope_for_user(super().get_queryset(request), request.user)
        match = getattr(request, "resolver_match", None)
        if match is not None and match.url_name == "templates_app_workflowtemplate_changelist":
            queryset = queryset.defer("spec", "source")
        return queryset

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # templates come from YAML: `manage.py load_templates` or POST /api/v1/templates

    def has_change_permission(self, request: HttpRequest, obj: WorkflowTemplate | None = None) -> bool:
        """``is_active`` is editable here: owners and members of the template's tenant only."""
        if not super().has_change_permission(request, obj):
            return False
        writable = tenancy.writable_tenant_slugs(request.user)
        return writable is None or (bool(writable) if obj is None else obj.tenant_id in writable)

    def get_list_display(self, request: HttpRequest) -> list[str]:
        columns = list(super().get_list_display(request))
        if tenancy.writable_tenant_slugs(request.user) == set():  # a viewer everywhere: no "Run now"
            columns.remove("run_now_link")
        return columns

    @admin.display(description="run")
    def run_now_link(self, template: WorkflowTemplate) -> str:
        url = reverse("admin:templates_app_workflowtemplate_run", args=[template.pk])
        return format_html('<a class="button" href="{}">Run now</a>', url)

    @admin.display(description="variables")
    def variables_display(self, template: WorkflowTemplate) -> str:
        return pretty_json(template.variables)

    @admin.display(description="trigger")
    def trigger_display(self, template: WorkflowTemplate) -> str:
        return pretty_json(template.trigger)

    @admin.display(description="YAML")
    def source_display(self, template: WorkflowTemplate) -> str:
        return format_html('<pre style="max-height:40em;overflow:auto">{}</pre>', template.source or "-")

    @admin.display(description="normalized spec")
    def spec_display(self, template: WorkflowTemplate) -> str:
        return pretty_json(template.spec)

    def get_urls(self):
        return [
            path(
                "<int:object_id>/run/",
                self.admin_site.admin_view(self.run_now_view),
                name="templates_app_workflowtemplate_run",
            ),
            *super().get_urls(),
        ]

    def run_now_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        """GET: the form; POST: start the run and open it (errors stay on the form)."""
        template = get_object_or_404(self.get_queryset(request), pk=object_id)
        if not request.user.has_perm("runs.add_run") and not request.user.is_superuser:
            raise PermissionDenied
        writable = tenancy.writable_tenant_slugs(request.user)
        if writable is not None and template.tenant_id not in writable:  # viewers read only, as in the API
            role = tenancy.role_in(request.user, template.tenant_id) or "none"
            self.message_user(
                request,
                f"Refused: your role in tenant {template.tenant_id!r} is {role}: read only (as in the API). "
                "No run was started.",
                messages.ERROR,
            )
            return HttpResponseRedirect(reverse("admin:templates_app_workflowtemplate_change", args=[template.pk]))
        form = RunNowForm(template, request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                run, _created = services.create_run(
                    tenant=template.tenant_id,
                    template_key=template.key,
                    version=template.version,
                    variables=form.variables(),
                    correlation_id=form.cleaned_data.get("correlation_id") or "",
                    priority=form.cleaned_data.get("priority", 5),
                    user_id=request.user.get_username(),
                    trigger=TriggerKind.MANUAL,
                )
            except services.ServiceError as exc:
                form.add_error(None, str(exc))
            else:
                self.message_user(
                    request, f"Run {run.pk} of {template.key} v{template.version} started.", messages.SUCCESS
                )
                return HttpResponseRedirect(reverse("admin:runs_run_change", args=[run.pk]))
        context = {
            **self.admin_site.each_context(request),
            "title": f"Run {template.key} v{template.version}",
            "template_obj": template,
            "form": form,
            "opts": self.model._meta,
            "original": template,
        }
        return TemplateResponse(request, "admin/templates_app/workflowtemplate/run_now.html", context)


@admin.register(WorkflowGenerationJob)
class WorkflowGenerationJobAdmin(admin.ModelAdmin):
    """Generation jobs (read only): prompt, the rounds journal, errors, result and token usage."""

    list_display = ["id", "tenant_id", "status", "planner", "short_prompt", "template", "created_at", "finished_at"]
    list_filter = ["status", "planner", "tenant_id"]
    list_select_related = ["template"]
    search_fields = ["prompt"]
    ordering = ["-created_at"]
    list_per_page = 100
    readonly_fields = [
        "id",
        "tenant_id",
        "user_id",
        "status",
        "prompt",
        "domain",
        "complexity",
        "required_services",
        "save_template",
        "planner",
        "template",
        "created_at",
        "started_at",
        "finished_at",
        "usage",
        "errors_display",
        "rounds_display",
        "result_display",
    ]
    fields = readonly_fields

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return tenancy.scope_for_user(super().get_queryset(request), request.user)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # jobs come from generate_workflow and POST /api/v1/generate

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="prompt")
    def short_prompt(self, job: WorkflowGenerationJob) -> str:
        return job.prompt if len(job.prompt) <= 80 else job.prompt[:77] + "..."

    @admin.display(description="errors")
    def errors_display(self, job: WorkflowGenerationJob) -> str:
        return pretty_json(job.errors)

    @admin.display(description="rounds")
    def rounds_display(self, job: WorkflowGenerationJob) -> str:
        return pretty_json(job.rounds)

    @admin.display(description="result")
    def result_display(self, job: WorkflowGenerationJob) -> str:
        return pretty_json(job.result)
