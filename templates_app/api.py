"""REST endpoints of workflow generation: ``/api/v1/generate`` (included by orchestrator_site/urls.py).

- ``POST /api/v1/generate``: seed 002's body (``prompt``, ``domain``, ``complexity``,
  ``required_services``) plus ``save`` and ``async``. Synchronous: 200 with the answer
  (``ok: true``) or 422 with it (``ok: false``: no valid workflow after the repair rounds).
  ``async: true``: 202 with the job's id; a Celery task runs it.
- ``GET /api/v1/generate``: the tenant's jobs, newest first. ``GET /api/v1/generate/{id}``: one job.

Tenancy, authentication, roles and errors are the API's (``runs.api``): a job belongs to the
tenant of the request; another tenant's job is a 404; POST needs the member or owner role; a bad
body is a one-line 400.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.urls import re_path, reverse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.generics import GenericAPIView, get_object_or_404
from rest_framework.request import Request
from rest_framework.response import Response

from runs.api.pagination import NewestFirstPagination
from runs.api.permissions import TENANT_PARAMETER
from runs.api.serializers import ErrorSerializer
from runs.api.views import ERRORS, READ_ERRORS, UUID_PATTERN, BaseAPIView

from .generation import GenerationInputError, create_job, generate, parse_request
from .models import WorkflowGenerationJob


class GenerateSerializer(serializers.Serializer):
    """The body of POST /api/v1/generate (documentation; checked by generation.parse_request)."""

    prompt = serializers.CharField(help_text="What the workflow should do, in plain language.")
    domain = serializers.CharField(required=False, help_text="Seed 002: a domain hint, e.g. data-science.")
    complexity = serializers.ChoiceField(choices=["low", "medium", "high"], required=False, default="medium")
    required_services = serializers.ListField(
        child=serializers.CharField(), required=False, help_text="Seed 002: data, ai, exec (or step types)."
    )
    save = serializers.BooleanField(required=False, default=False, help_text="Save a valid workflow as a template.")
    # `async` is a Python keyword: declared under another name and renamed in the schema
    async_ = serializers.BooleanField(required=False, default=False, help_text="Answer 202 and run as a job.")

    def get_fields(self) -> dict[str, Any]:
        fields = super().get_fields()
        fields["async"] = fields.pop("async_")
        return fields


class GenerateResultSerializer(serializers.Serializer):
    ok = serializers.BooleanField()
    planner = serializers.ChoiceField(choices=["memory", "llm"])
    matched_templates = serializers.ListField(child=serializers.CharField())
    template_key = serializers.CharField(allow_null=True)
    template_version = serializers.IntegerField(allow_null=True)
    yaml = serializers.CharField(allow_null=True)
    rounds = serializers.IntegerField()
    errors = serializers.ListField(child=serializers.CharField())
    dry_run = serializers.JSONField(
        allow_null=True, help_text='{"status", "steps": [{"id", "type", "status", "error"}]}'
    )
    usage = serializers.JSONField()
    job_id = serializers.UUIDField()


class GenerationJobSerializer(serializers.ModelSerializer):
    save = serializers.BooleanField(source="save_template")
    template_key = serializers.CharField(source="template.key", default=None, allow_null=True)
    template_version = serializers.IntegerField(source="template.version", default=None, allow_null=True)

    class Meta:
        model = WorkflowGenerationJob
        fields = [
            "id",
            "status",
            "prompt",
            "domain",
            "complexity",
            "required_services",
            "save",
            "planner",
            "rounds",
            "errors",
            "result",
            "usage",
            "template_key",
            "template_version",
            "user_id",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields


class GenerateView(BaseAPIView, GenericAPIView):
    serializer_class = GenerationJobSerializer
    pagination_class = NewestFirstPagination

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return WorkflowGenerationJob.objects.none()
        return self.scoped(WorkflowGenerationJob.objects.select_related("template")).order_by("-created_at")

    @extend_schema(
        summary="Seed 002: generate a workflow from a plain-language prompt",
        request=GenerateSerializer,
        parameters=[TENANT_PARAMETER],
        responses={
            200: GenerateResultSerializer,
            202: OpenApiResponse(description='{"id", "status": "queued", "status_url"}'),
            422: OpenApiResponse(GenerateResultSerializer, description="No valid workflow (ok false, errors)."),
            **ERRORS,
        },
    )
    def post(self, request: Request) -> Response:
        data = request.data
        try:
            generation = parse_request(data, tenant_id=self.tenant.slug, user_id=request.user.get_username())
        except GenerationInputError as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_400_BAD_REQUEST)
        job = create_job(generation)
        if data.get("async"):
            from .tasks import generate_workflow_task

            job_id = str(job.pk)
            transaction.on_commit(lambda: generate_workflow_task.delay(job_id))
            return Response(
                {
                    "id": job_id,
                    "status": job.status,
                    "status_url": reverse("generate-detail", kwargs={"job_id": job.pk}),
                },
                status=status.HTTP_202_ACCEPTED,
            )
        result = generate(generation, job=job)
        body = {**result.as_dict(), "job_id": str(job.pk)}
        return Response(body, status=status.HTTP_200_OK if result.ok else status.HTTP_422_UNPROCESSABLE_ENTITY)

    @extend_schema(
        summary="Generation jobs of the tenant, newest first",
        parameters=[TENANT_PARAMETER],
        responses={200: GenerationJobSerializer(many=True), **READ_ERRORS},
    )
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(GenerationJobSerializer(page, many=True).data)


class GenerateDetailView(BaseAPIView, GenericAPIView):
    serializer_class = GenerationJobSerializer

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return WorkflowGenerationJob.objects.none()
        return self.scoped(WorkflowGenerationJob.objects.select_related("template"))

    @extend_schema(
        summary="One generation job: status, rounds journal, errors, result, usage",
        parameters=[TENANT_PARAMETER],
        responses={200: GenerationJobSerializer, 404: OpenApiResponse(ErrorSerializer), **READ_ERRORS},
    )
    def get(self, request: Request, job_id: str) -> Response:
        job = get_object_or_404(self.get_queryset(), pk=job_id)
        return Response(GenerationJobSerializer(job).data)


#: Included under /api/v1/ by orchestrator_site/urls.py.
urlpatterns = [
    re_path(r"^generate/?$", GenerateView.as_view(), name="generate"),
    re_path(rf"^generate/(?P<job_id>{UUID_PATTERN})/?$", GenerateDetailView.as_view(), name="generate-detail"),
]
