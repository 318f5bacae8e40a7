"""Plain language to a workflow (issue 8 section 3; seed 000 planner, seed 002 ``POST /api/v1/generate``).

Public verbs: :func:`generate`, :func:`parse_request`, :func:`create_job`, :func:`run_job`
(:mod:`.service`); :func:`dry_run` (:mod:`.dryrun`); :func:`plan` (:mod:`.planner`).
"""

from __future__ import annotations

from .dryrun import DryRunReport, dry_run
from .planner import Plan, plan
from .service import (
    GenerationInputError,
    GenerationRequest,
    GenerationResult,
    create_job,
    generate,
    parse_request,
    run_job,
    to_yaml,
)

__all__ = [
    "DryRunReport",
    "GenerationInputError",
    "GenerationRequest",
    "GenerationResult",
    "Plan",
    "create_job",
    "dry_run",
    "generate",
    "parse_request",
    "plan",
    "run_job",
    "to_yaml",
]
