"""Plain language to a workflow: planner, model rounds with repair, dry run, save.

:func:`generate` is the one verb (the API, the command and the Celery task call it):

1. The planner (:mod:`.planner`) ranks the tenant's templates and the step types against the
   prompt. With no LLM provider configured for the tenant, its best template is the answer
   (``planner: "memory"``).
2. With a provider (``agents.llm.providers.configured``), the model gets the prompt, the
   planner's matches as examples, the step types and the allowed agent endpoints, and answers
   with the workflow as JSON under :func:`templates_app.spec.json_schema` (json_schema name
   ``workflow``). The answer is written as YAML and loaded by :func:`templates_app.spec.load_spec`,
   exactly like a hand-written file. An answer that is not the schema (``parse``), that the
   loader refuses (``validate``) or that fails its dry run (``dry_run``) goes back to the model
   with the one-line errors: at most ``ORCHESTRATOR_GENERATE_REPAIR_ROUNDS`` repair rounds.
3. Dry run (:mod:`.dryrun`) before anything is kept; save (a new template version marked
   ``generated``) only when asked.

Every round is journaled on the :class:`~templates_app.models.WorkflowGenerationJob`:
``{"round", "planner", "stage", "ok", "errors", "usage", "seconds"}``; the memory planner's round
also names its ``template``, the proposed ``chain`` (its steps in dependency order) and the
``step_types`` ranked against the prompt.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import yaml
from django.conf import settings
from django.utils import timezone

from orchestrator_site.conf import conf

from ..errors import WorkflowError, one_line
from ..models import GENERATION_TERMINAL, Complexity, GenerationStatus, WorkflowGenerationJob, WorkflowTemplate
from . import metrics, planner
from .dryrun import DryRunReport, dry_run
from .positional import positional_schema

#: Steps a workflow of each complexity may have at most (the schema's maxItems, told to the model).
COMPLEXITY_STEPS = {"low": 3, "medium": 8, "high": 20}
#: Seed 002's service names and what they are here.
SERVICE_TYPES = {"data": "http", "ai": "llm", "exec": "exec"}
MAX_SERVICES = 10
MAX_EXAMPLE_CHARS = 3000
REQUEST_KEYS = frozenset({"prompt", "domain", "complexity", "required_services", "save", "async"})


class GenerationInputError(ValueError):
    """The request itself is wrong (empty prompt, unknown complexity...): one line, nothing done."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


@dataclass
class GenerationRequest:
    """Seed 002's body (prompt, domain, complexity, required_services) plus ``save``."""

    prompt: str
    tenant_id: str = "default"
    domain: str = ""
    complexity: str = Complexity.MEDIUM
    required_services: list[str] = field(default_factory=list)
    save: bool = False
    user_id: str = ""


@dataclass
class GenerationResult:
    """The answer of ``POST /api/v1/generate`` and ``generate_workflow --json`` (see :meth:`as_dict`)."""

    ok: bool = False
    planner: str = "memory"
    matched_templates: list[str] = field(default_factory=list)
    template_key: str | None = None
    template_version: int | None = None
    yaml: str | None = None
    rounds: int = 0
    errors: list[str] = field(default_factory=list)
    dry_run: dict[str, Any] | None = None
    usage: dict[str, int] = field(
        default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    )
    spec: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """``{"ok", "planner", "matched_templates", "template_key", "template_version", "yaml",
        "rounds", "errors", "dry_run": {"status", "steps"} | None, "usage"}``."""
        return {
            "ok": self.ok,
            "planner": self.planner,
            "matched_templates": self.matched_templates,
            "template_key": self.template_key,
            "template_version": self.template_version,
            "yaml": self.yaml,
            "rounds": self.rounds,
            "errors": self.errors,
            "dry_run": self.dry_run,
            "usage": self.usage,
        }


def parse_request(data: Any, tenant_id: str = "default", user_id: str = "") -> GenerationRequest:
    """Check a request body (a mapping; ``async`` is read by the caller) and return the request.

    Raises GenerationInputError naming the field: unknown keys, prompt empty or longer than
    ``ORCHESTRATOR_GENERATE_MAX_PROMPT``, complexity not low|medium|high, required_services not a
    list of at most 10 known services (seed 002's data/ai/exec or a step type).
    """
    from agents import registry

    if not isinstance(data, Mapping):
        raise GenerationInputError("the body must be a JSON object with 'prompt'")
    unknown = sorted(set(data) - REQUEST_KEYS)
    if unknown:
        raise GenerationInputError(f"{unknown[0]}: unknown field (known: {', '.join(sorted(REQUEST_KEYS))})")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise GenerationInputError("prompt: required, a non-empty string")
    limit = settings.ORCHESTRATOR_GENERATE_MAX_PROMPT
    if len(prompt) > limit:
        raise GenerationInputError(f"prompt: longer than {limit} characters")
    domain = data.get("domain") or ""
    if not isinstance(domain, str) or len(domain) > 100:
        raise GenerationInputError("domain: must be a string of at most 100 characters")
    complexity = data.get("complexity") or Complexity.MEDIUM
    if complexity not in Complexity.values:
        raise GenerationInputError(f"complexity: must be one of low, medium, high, got {str(complexity)[:50]!r}")
    services = data.get("required_services") or []
    if not isinstance(services, list) or len(services) > MAX_SERVICES:
        raise GenerationInputError(f"required_services: must be a list of at most {MAX_SERVICES} service names")
    known = sorted(set(SERVICE_TYPES) | registry.handler_types())
    for service in services:
        if not isinstance(service, str) or (service not in SERVICE_TYPES and service not in registry.handler_types()):
            raise GenerationInputError(
                f"required_services: unknown service {str(service)[:50]!r} (known: {', '.join(known)})"
            )
    for name in ("save", "async"):
        if name in data and not isinstance(data[name], bool):
            raise GenerationInputError(f"{name}: must be true or false")
    return GenerationRequest(
        prompt=prompt.strip(),
        tenant_id=tenant_id,
        domain=domain.strip(),
        complexity=str(complexity),
        required_services=list(dict.fromkeys(services)),
        save=bool(data.get("save", False)),
        user_id=user_id,
    )


# --- the job row ---------------------------------------------------------------------------------


def create_job(request: GenerationRequest) -> WorkflowGenerationJob:
    """A queued job row for ``request`` (run it with :func:`run_job`)."""
    return WorkflowGenerationJob.objects.create(
        tenant_id=request.tenant_id,
        user_id=request.user_id[:150],
        prompt=request.prompt,
        domain=request.domain,
        complexity=request.complexity,
        required_services=request.required_services,
        save_template=request.save,
    )


def request_of(job: WorkflowGenerationJob) -> GenerationRequest:
    return GenerationRequest(
        prompt=job.prompt,
        tenant_id=job.tenant_id,
        domain=job.domain,
        complexity=job.complexity,
        required_services=list(job.required_services or []),
        save=job.save_template,
        user_id=job.user_id,
    )


def run_job(job_id: Any) -> WorkflowGenerationJob | None:
    """Run a queued job (the Celery task's body). Returns None when the job is gone or already taken.

    Claimed with a conditional UPDATE (queued -> running), so a duplicate message does nothing. A
    job still ``running`` after :func:`stale_after` seconds lost its worker (the task is
    ``acks_late`` + ``reject_on_worker_lost``, so its message comes back): it is claimed again and
    starts over, its journal kept.
    """
    from django.db.models import Q

    now = timezone.now()
    stale = now - timedelta(seconds=stale_after())
    claimable = Q(status=GenerationStatus.QUEUED) | Q(status=GenerationStatus.RUNNING, started_at__lt=stale)
    if not WorkflowGenerationJob.objects.filter(claimable, pk=job_id).update(
        status=GenerationStatus.RUNNING, started_at=now
    ):
        return None
    job = WorkflowGenerationJob.objects.get(pk=job_id)
    generate(request_of(job), job=job)
    job.refresh_from_db()
    return job


def stale_after() -> float:
    """Seconds after which a running job is presumed dead: every round's model call at its timeout, plus 10 minutes."""
    rounds = 1 + settings.ORCHESTRATOR_GENERATE_REPAIR_ROUNDS
    return rounds * settings.ORCHESTRATOR_GENERATE_LLM_TIMEOUT + 600.0


def _journal(job: WorkflowGenerationJob | None, entry: dict[str, Any]) -> None:
    if job is None:
        return
    job.rounds = [*job.rounds, entry]
    WorkflowGenerationJob.objects.filter(pk=job.pk).update(rounds=job.rounds)


def _finish(job: WorkflowGenerationJob | None, result: GenerationResult, template: WorkflowTemplate | None) -> None:
    if job is None:
        return
    job.status = GenerationStatus.SUCCEEDED if result.ok else GenerationStatus.FAILED
    job.planner = result.planner
    job.errors = result.errors
    job.result = result.as_dict()
    job.usage = result.usage
    job.template = template
    job.finished_at = timezone.now()
    job.save(update_fields=["status", "planner", "errors", "result", "usage", "template", "finished_at"])


# --- generation ----------------------------------------------------------------------------------


def generate(request: GenerationRequest, job: WorkflowGenerationJob | None = None) -> GenerationResult:
    """Turn ``request`` into a workflow; see the module docstring. Never raises for a bad answer.

    Returns a :class:`GenerationResult`; ``ok`` False with ``errors`` when no valid workflow came
    out (no template matched offline, or every round failed). With ``job``, the rounds are
    journaled on it and it ends ``succeeded`` or ``failed``.
    """
    try:
        return _generate(request, job)
    except Exception as exc:  # a bug or a lost database must not leave the job running forever
        if job is not None:
            WorkflowGenerationJob.objects.filter(pk=job.pk).exclude(status__in=GENERATION_TERMINAL).update(
                status=GenerationStatus.FAILED,
                errors=[one_line(f"internal error: {type(exc).__name__}: {exc}")],
                finished_at=timezone.now(),
            )
        raise


def _generate(request: GenerationRequest, job: WorkflowGenerationJob | None) -> GenerationResult:
    from agents.llm import providers

    started = time.monotonic()
    if job is not None and job.status == GenerationStatus.QUEUED:
        job.status, job.started_at = GenerationStatus.RUNNING, timezone.now()
        job.save(update_fields=["status", "started_at"])
    query = " ".join(filter(None, [request.prompt, request.domain]))
    plan = planner.plan(query, request.tenant_id)
    result = GenerationResult(matched_templates=[m.name for m in plan.templates])
    if providers.configured(request.tenant_id):
        result.planner = "llm"
        _with_model(request, plan, result, job)
    else:
        result.planner = "memory"
        _from_memory(request, plan, result, job)
    template = None
    if result.ok and request.save and result.spec is not None and result.yaml is not None:
        template = _save(request, result)
    _finish(job, result, template)
    metrics.observe_seconds(time.monotonic() - started)
    return result


def _from_memory(
    request: GenerationRequest, plan: planner.Plan, result: GenerationResult, job: WorkflowGenerationJob | None
) -> None:
    """The planner's best template is the answer; it still has to pass its dry run."""
    round_started = time.monotonic()
    result.rounds = 1
    best = plan.best
    template = (
        WorkflowTemplate.objects.filter(tenant_id=request.tenant_id, key=best.name, version=best.version).first()
        if best is not None
        else None
    )
    if template is None:
        result.errors = [
            "no stored template matches the prompt, and no LLM is configured to write a new workflow "
            "(set LLM_BASE_URL, or add a provider for the tenant)"
        ]
        _journal(job, _entry(1, "memory", "plan", False, result.errors, None, round_started))
        return
    result.spec, result.yaml = template.spec, template.source
    report = dry_run(template.spec, request.tenant_id)
    result.dry_run = report.as_dict()
    if not report.ok:
        metrics.count_failure("dry_run")
        result.errors = report.errors
    else:
        result.ok = True
        if request.save:  # already stored: saving again would change nothing
            result.template_key, result.template_version = template.key, template.version
    _journal(
        job,
        _entry(
            1,
            "memory",
            "dry_run",
            report.ok,
            result.errors,
            None,
            round_started,
            template=template.key,
            chain=plan.chain,
            step_types=[m.name for m in plan.step_types],
        ),
    )


def _entry(
    number: int,
    planner_name: str,
    stage: str,
    ok: bool,
    errors: list[str],
    usage: dict[str, Any] | None,
    started: float,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "round": number,
        "planner": planner_name,
        "stage": stage,
        "ok": ok,
        "errors": errors,
        "usage": usage,
        "seconds": round(time.monotonic() - started, 3),
        **extra,
    }


def _add_usage(total: dict[str, int], usage: Mapping[str, Any] | None) -> None:
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        total[name] = total.get(name, 0) + int((usage or {}).get(name) or 0)


def _strip_nulls(answer: Any) -> Any:
    """Drop null-valued keys of the top level and of each step (the schema lets a model send them)."""
    if not isinstance(answer, dict):
        return answer
    out = {k: v for k, v in answer.items() if v is not None}
    if isinstance(out.get("steps"), list):
        out["steps"] = [
            {k: v for k, v in s.items() if v is not None} if isinstance(s, dict) else s for s in out["steps"]
        ]
    return out


def to_yaml(answer: dict[str, Any]) -> str:
    """The canonical YAML file of a workflow given as JSON (what is saved as the template's source)."""
    return yaml.safe_dump(_strip_nulls(answer), sort_keys=False, allow_unicode=True, width=100)


def _with_model(
    request: GenerationRequest, plan: planner.Plan, result: GenerationResult, job: WorkflowGenerationJob | None
) -> None:
    from agents import llm

    from ..spec import json_schema, load_spec

    schema = json_schema(params=params_schemas())
    schema["properties"]["steps"]["maxItems"] = COMPLEXITY_STEPS[request.complexity]
    kind_schemas = llamacpp_schemas(request)
    messages = _messages(request, plan, schema, positional=bool(kind_schemas))
    rounds = 1 + settings.ORCHESTRATOR_GENERATE_REPAIR_ROUNDS
    for number in range(1, rounds + 1):
        round_started = time.monotonic()
        result.rounds = number
        usage: dict[str, Any] | None = None
        try:
            answer = llm.complete(
                tenant_id=request.tenant_id,
                messages=messages,
                schema=schema,
                schema_name="workflow",
                kind_schemas=kind_schemas,
                max_tokens=settings.ORCHESTRATOR_GENERATE_MAX_TOKENS,
                temperature=0.0,
                tag="planning",
                timeout=settings.ORCHESTRATOR_GENERATE_LLM_TIMEOUT,
            )
        except llm.LLMSchemaError as exc:
            usage = exc.result.usage if getattr(exc, "result", None) is not None else None
            _add_usage(result.usage, usage)
            errors = [one_line(e) for e in (exc.errors or [str(exc)])][:20]
            _fail_round(result, job, number, "parse", errors, usage, round_started)
            messages = [*messages, {"role": "assistant", "content": (exc.content or "")[:20000]}, _repair(errors)]
            continue
        except llm.LLMError as exc:
            # no answer at all (no provider left, budget, refused): repairing cannot help
            _fail_round(result, job, number, "llm", [one_line(str(exc))], None, round_started)
            return
        usage = answer.usage
        _add_usage(result.usage, usage)
        parsed = _strip_nulls(answer.parsed)
        text = to_yaml(parsed) if isinstance(parsed, dict) else ""
        result.yaml = text or None
        assistant = {"role": "assistant", "content": json.dumps(answer.parsed)[:20000]}
        try:
            spec = load_spec(text, source="generated.yaml")
        except WorkflowError as exc:
            errors = [str(exc)]
            _fail_round(result, job, number, "validate", errors, usage, round_started)
            messages = [*messages, assistant, _repair(errors)]
            continue
        taken = _key_taken(spec["key"], request) if request.save else None
        if taken:
            _fail_round(result, job, number, "validate", [taken], usage, round_started)
            messages = [*messages, assistant, _repair([taken])]
            continue
        report: DryRunReport = dry_run(spec, request.tenant_id)
        result.dry_run = report.as_dict()
        if not report.ok:
            _fail_round(result, job, number, "dry_run", report.errors[:20], usage, round_started)
            messages = [*messages, assistant, _repair(report.errors[:20], dry=True)]
            continue
        result.ok, result.errors, result.spec = True, [], spec
        _journal(job, _entry(number, "llm", "dry_run", True, [], usage, round_started))
        return


def llamacpp_schemas(request: GenerationRequest) -> dict[str, dict[str, Any]]:
    """``{"llamacpp": positional schema}`` when a llama.cpp provider may answer and
    ``ORCHESTRATOR_GENERATE_LLAMACPP_SCHEMA`` is ``positional`` (the default); else ``{}``.

    See :mod:`.positional`: under it, grammar-constrained decoding cannot produce a step that
    depends on an unknown or later step, nor a bad expression, so a small model's answer loads.
    """
    from agents import registry
    from agents.handlers.python import allowed_callables
    from agents.llm import providers

    if settings.ORCHESTRATOR_GENERATE_LLAMACPP_SCHEMA != "positional":
        return {}
    if not any(p.kind == "llamacpp" for p in providers.providers_for(request.tenant_id, "planning")):
        return {}
    steps = COMPLEXITY_STEPS[request.complexity]
    # positional python steps take no arguments: offer only the callables that need none
    callables = [path for path in sorted(allowed_callables()) if _callable_without_arguments(path)]
    return {"llamacpp": positional_schema(steps, callables, sorted(registry.handler_types()))}


def _callable_without_arguments(path: str) -> bool:
    from agents.handlers.python import check_call
    from agents.registry import StepError

    try:
        check_call({"callable": path})
    except StepError:
        return False
    return True


def params_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schemas of the params of the built-in step types, as their handlers validate them.

    Deliberately narrow (the params a generated workflow needs; a hand-written file may use
    more): http ``url`` or ``call``; python ``callable`` from ``ORCHESTRATOR_PYTHON_CALLABLES``.
    """
    from agents.handlers.python import allowed_callables

    text = {"type": "string"}
    anything: dict[str, Any] = {}
    http_common = {
        "method": {"type": "string", "enum": ["GET", "POST", "PUT", "PATCH", "DELETE"]},
        "headers": {"type": "object", "additionalProperties": text},
        "json": anything,
        "credential": text,
    }
    # two whole variants (url or call) rather than anyOf of bare `required` lists: llama.cpp's
    # schema-to-grammar converter accepts only the former
    http = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"url": {"type": "string", "pattern": "^https?://.*$"}, **http_common},
                "required": ["url"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"call": {"type": "string", "pattern": "^/.*$"}, **http_common},
                "required": ["call"],
                "additionalProperties": False,
            },
        ]
    }
    callables = sorted(allowed_callables())
    python: dict[str, Any] = {
        "type": "object",
        "properties": {
            "callable": {"type": "string", "enum": callables} if callables else text,
            "kwargs": {"type": "object"},
        },
        "required": ["callable"],
        "additionalProperties": False,
    }
    return {
        "http": http,
        "python": python,
        "exec": {
            "type": "object",
            "properties": {"command": {"type": "array", "items": text, "minItems": 1}, "stdin": anything},
            "required": ["command"],
            "additionalProperties": False,
        },
        "llm": {
            "type": "object",
            "properties": {
                "prompt": text,
                "system": text,
                "schema": {"type": "object"},
                "max_tokens": {"type": "integer"},
            },
            "required": ["prompt"],
            "additionalProperties": False,
        },
        "noop": {"type": "object", "properties": {"output": anything}, "additionalProperties": False},
        "sleep": {
            "type": "object",
            "properties": {"seconds": {"type": "number", "minimum": 0, "maximum": 3600}},
            "required": ["seconds"],
            "additionalProperties": False,
        },
        "condition": {"type": "object", "additionalProperties": False},
    }


def _key_taken(key: str, request: GenerationRequest) -> str | None:
    """An error line when saving would make a generated version the latest of a hand-written template."""
    latest = WorkflowTemplate.objects.filter(tenant_id=request.tenant_id, key=key).order_by("-version").first()
    if latest is not None and not latest.generated:
        return f"key {key!r} belongs to a stored workflow that was not generated: choose another key"
    return None


def _fail_round(
    result: GenerationResult,
    job: WorkflowGenerationJob | None,
    number: int,
    stage: str,
    errors: list[str],
    usage: dict[str, Any] | None,
    started: float,
) -> None:
    metrics.count_failure(stage)
    result.errors = errors
    _journal(job, _entry(number, "llm", stage, False, errors, usage, started))


def _repair(errors: list[str], dry: bool = False) -> dict[str, str]:
    what = "failed its dry run (side effects stubbed)" if dry else "was refused by the workflow loader"
    lines = "\n".join(f"- {e}" for e in errors)
    return {
        "role": "user",
        "content": f"The workflow {what}:\n{lines}\nAnswer again with the whole corrected workflow as JSON.",
    }


def _messages(
    request: GenerationRequest, plan: planner.Plan, schema: dict[str, Any], positional: bool = False
) -> list[dict[str, str]]:
    """The system message (format, step types, endpoints, examples) and the user's request.

    ``positional``: a llama.cpp provider gets the positional schema (:mod:`.positional`); the
    message says what it fixes.
    """
    from agents.handlers.python import allowed_callables

    docs = planner.step_type_documents()
    ranked = [m.name for m in plan.step_types] + sorted(set(docs) - {m.name for m in plan.step_types})
    types = "\n".join(
        f"- {name}: {planner.STEP_TYPE_WORDS.get(name, '')} ({_first_sentence(docs[name])})" for name in ranked
    )
    base = conf.agents_base_url or "(none configured)"
    callables = ", ".join(sorted(allowed_callables())) or "(none)"
    examples = []
    room = settings.ORCHESTRATOR_GENERATE_EXAMPLE_CHARS  # small local models have small contexts
    for match in plan.templates[:2]:
        template = WorkflowTemplate.objects.filter(
            tenant_id=request.tenant_id, key=match.name, version=match.version
        ).first()
        if template is not None and room > 0:
            text = template.source[: min(MAX_EXAMPLE_CHARS, room)]
            room -= len(text)
            examples.append(f"# example: {template.key}\n{text}")
    system = (
        "You write workflows for a durable workflow engine. Answer with ONE JSON object: the workflow in the "
        "canonical format (key, name, description, variables, steps with id/type/depends_on/params), valid "
        "against the JSON Schema named 'workflow'.\n"
        "Rules: step ids are unique; depends_on lists step ids only and has no cycles; expressions are "
        "${var} for variables and ${steps.<id>.output...} for outputs of steps the step depends on; a "
        "condition step has 'condition', 'on_success', 'on_failure'; for_each takes an expression giving a "
        "list and the step sees ${item}; durations are seconds.\n"
        f"Step types, most relevant first:\n{types}\n"
        f"Agent endpoints: http steps call paths under {base} with params.call (e.g. /functions/v1/<agent>) "
        "and params.method, or an absolute params.url.\n"
        f"python steps may call only these callables (params.callable, params.kwargs): {callables}.\n"
    )
    if positional:
        system += (
            "If your answer is constrained by a grammar (llama.cpp), steps are step_1, step_2... in order, a "
            "step depends only on earlier steps, and params are plain text without ${...}.\n"
        )
    if examples:
        system += "Stored workflows that match the request (YAML, same format):\n" + "\n\n".join(examples)
    user = request.prompt
    details = []
    if request.domain:
        details.append(f"domain: {request.domain}")
    details.append(f"complexity: {request.complexity} (at most {COMPLEXITY_STEPS[request.complexity]} steps)")
    if request.required_services:
        wanted = [SERVICE_TYPES.get(s, s) for s in request.required_services]
        details.append(f"use these step types: {', '.join(dict.fromkeys(wanted))}")
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"{user}\n\n" + "\n".join(details)},
    ]


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    return text.split(". ")[0][:200]


def _save(request: GenerationRequest, result: GenerationResult) -> WorkflowTemplate | None:
    from ..services import save_template

    assert result.spec is not None and result.yaml is not None
    if result.planner == "memory":
        return None  # the stored template itself: nothing new to save
    try:
        saved = save_template(
            result.spec, result.yaml, source_path="generated", tenant_id=request.tenant_id, generated=True
        )
    except WorkflowError as exc:
        result.ok, result.errors = False, [str(exc)]
        return None
    result.template_key, result.template_version = saved.template.key, saved.template.version
    return saved.template
