"""Workflow generation through the real local model (llama-cpp-python's server on SmolLM2-135M-Instruct).

The tiny model proves the protocol, not planning quality: its answers are decoded under the
workflow JSON Schema (the server turns ``response_format``'s schema into a grammar), so every
round's answer is JSON of the schema's shape, and the loader decides the rest (its references
between steps, which no JSON Schema can express). Skipped with a reason where requirements-llm.txt
is not installed (the ``local_llm`` fixture, tests/conftest.py).
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from templates_app.generation import create_job, generate, parse_request
from templates_app.generation.service import COMPLEXITY_STEPS, params_schemas
from templates_app.models import WorkflowGenerationJob
from templates_app.spec import json_schema

pytestmark = pytest.mark.django_db


def test_the_workflow_schema_converts_to_a_llama_cpp_grammar():
    """llama.cpp answers a schema it cannot convert WITHOUT constraint (silently): keep it convertible."""
    grammar = pytest.importorskip("llama_cpp.llama_grammar", reason="pip install -r requirements-llm.txt")
    gbnf = grammar.json_schema_to_gbnf(json.dumps(json_schema(params=params_schemas())))
    assert "root" in gbnf


def test_generation_through_the_local_model_is_schema_constrained(settings, local_llm, tenants):
    settings.ORCHESTRATOR_LLM_BASE_URL = local_llm.url
    settings.ORCHESTRATOR_LLM_MODEL = "smollm2-135m"
    settings.ORCHESTRATOR_LLM_KIND = "llamacpp"
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = []
    settings.GEMINI_API_KEY = ""
    settings.ORCHESTRATOR_GENERATE_MAX_TOKENS = 400  # the fixture's context is 2,048 tokens
    settings.ORCHESTRATOR_GENERATE_REPAIR_ROUNDS = 1
    request = parse_request(
        {"prompt": "Key hello. Exactly one step: id hello, type noop, depends_on [], params {}.", "complexity": "low"},
        tenant_id="acme",
    )
    job = create_job(request)
    result = generate(request, job=job)

    job = WorkflowGenerationJob.objects.get(pk=job.pk)
    assert result.planner == "llm" and result.usage["completion_tokens"] > 0
    # every round's answer was the schema's JSON: it reached the loader (or passed it)
    assert [r["stage"] for r in job.rounds] and all(r["stage"] in ("validate", "dry_run") for r in job.rounds), (
        job.rounds
    )
    answer = yaml.safe_load(result.yaml)
    schema = json_schema(params=params_schemas())
    schema["properties"]["steps"]["maxItems"] = COMPLEXITY_STEPS["low"]
    jsonschema.validate(answer, schema)
    if not result.ok:
        # what the 135M model gets wrong is beyond any schema: references between steps
        assert all("depends_on" in e or "unknown step" in e or "cycle" in e for e in result.errors), result.errors
