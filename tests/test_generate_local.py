"""Workflow generation through the real local model (llama-cpp-python's server on SmolLM2-135M-Instruct).

The tiny model proves the protocol, not planning quality. Its answers are decoded under the
positional workflow schema (templates_app/generation/positional.py; the server turns
``response_format``'s schema into a grammar): step ids are fixed, a step depends only on earlier
steps and params are plain text, so whatever the model picks, the answer loads and dry-runs
(tests/test_generate_positional.py proves that for random answers of the schema). The exact answer
is not asserted: at temperature 0 the server is greedy, but a repeated prompt reuses its KV cache
and can decode differently. Under the full schema (``ORCHESTRATOR_GENERATE_LLAMACPP_SCHEMA=full``)
the answer is still the schema's JSON, and the loader refuses what the model gets wrong.
Skipped with a reason where requirements-llm.txt is not installed (the ``local_llm`` fixture,
tests/conftest.py).
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from templates_app.generation import create_job, generate, parse_request
from templates_app.generation.positional import step_id
from templates_app.generation.service import COMPLEXITY_STEPS, llamacpp_schemas, params_schemas
from templates_app.models import WorkflowGenerationJob, WorkflowTemplate
from templates_app.spec import json_schema, load_spec

pytestmark = pytest.mark.django_db

#: The README's prompt (its "With the local model" output).
PROMPT = "Key hello. Exactly one step: id hello, type noop, depends_on [], params {}."


@pytest.fixture
def local(settings, local_llm):
    settings.ORCHESTRATOR_LLM_BASE_URL = local_llm.url
    settings.ORCHESTRATOR_LLM_MODEL = "smollm2-135m"
    settings.ORCHESTRATOR_LLM_KIND = "llamacpp"
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = []
    settings.GEMINI_API_KEY = ""
    # the fixture's context is 2,048 tokens: a 700-token prompt, and room for the longest answer
    # the low-complexity schema allows (1,363 characters; 983 tokens when its strings are random)
    settings.ORCHESTRATOR_GENERATE_MAX_TOKENS = 1300
    settings.ORCHESTRATOR_GENERATE_EXAMPLE_CHARS = 0
    settings.ORCHESTRATOR_GENERATE_REPAIR_ROUNDS = 0  # one answer: it must load as it comes
    return local_llm


def test_the_workflow_schema_converts_to_a_llama_cpp_grammar():
    """llama.cpp answers a schema it cannot convert WITHOUT constraint (silently): keep it convertible."""
    grammar = pytest.importorskip("llama_cpp.llama_grammar", reason="pip install -r requirements-llm.txt")
    gbnf = grammar.json_schema_to_gbnf(json.dumps(json_schema(params=params_schemas())))
    assert "root" in gbnf


def test_generation_through_the_local_model_loads_dry_runs_and_is_saved(local, tenants):
    request = parse_request({"prompt": PROMPT, "complexity": "low", "save": True}, tenant_id="acme")
    assert "llamacpp" in llamacpp_schemas(request)  # the positional schema is what the server gets
    job = create_job(request)

    result = generate(request, job=job)

    # one round, through the model, that loaded and dry-ran
    job = WorkflowGenerationJob.objects.get(pk=job.pk)
    assert result.ok and result.errors == [], (result.errors, result.yaml)
    assert result.planner == "llm" and result.rounds == 1
    assert [(r["stage"], r["ok"]) for r in job.rounds] == [("dry_run", True)]
    assert 0 < result.usage["completion_tokens"] < 1300  # finished, not cut at max_tokens
    spec = load_spec(result.yaml, source="generated.yaml")
    ids = [s["id"] for s in spec["steps"]]
    assert ids == [step_id(k) for k in range(1, len(ids) + 1)] and len(ids) <= COMPLEXITY_STEPS["low"]
    jsonschema.validate(yaml.safe_load(result.yaml), llamacpp_schemas(request)["llamacpp"])
    assert result.dry_run["status"] == "succeeded"
    assert [s["id"] for s in result.dry_run["steps"]] == ids
    # python steps call only callables that need no argument (their calls bind in the dry run)
    python = llamacpp_schemas(request)["llamacpp"]["$defs"].get("params_python")
    assert python is None or "templates_app.builtin_tasks.write_audit_report" not in json.dumps(python)
    # saved as a new generated version of its key
    saved = WorkflowTemplate.objects.get(tenant_id="acme", key=result.template_key)
    assert saved.generated and saved.version == result.template_version and saved.spec == spec


def test_under_the_full_schema_the_answer_is_schema_json_and_the_loader_decides(local, settings, tenants):
    settings.ORCHESTRATOR_GENERATE_LLAMACPP_SCHEMA = "full"
    settings.ORCHESTRATOR_GENERATE_MAX_TOKENS = 400  # as measured for the README (its strings are unbounded)
    request = parse_request({"prompt": PROMPT, "complexity": "low"}, tenant_id="acme")
    assert llamacpp_schemas(request) == {}
    job = create_job(request)

    result = generate(request, job=job)

    job = WorkflowGenerationJob.objects.get(pk=job.pk)
    assert result.planner == "llm" and result.usage["completion_tokens"] > 0
    # the answer was the schema's JSON: it reached the loader (or passed it)
    assert [r["stage"] for r in job.rounds] in (["validate"], ["dry_run"]), job.rounds
    schema = json_schema(params=params_schemas())
    schema["properties"]["steps"]["maxItems"] = COMPLEXITY_STEPS["low"]
    jsonschema.validate(yaml.safe_load(result.yaml), schema)
    if not result.ok:
        # what a 135M model gets wrong here, the positional schema rules out: references between steps
        assert all("depends_on" in e or "unknown step" in e or "cycle" in e for e in result.errors), result.errors
