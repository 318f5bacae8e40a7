"""``manage.py generate_workflow "<prompt>" [--domain D] [--complexity low|medium|high] [--save] [--json]``.

Also ``--service S`` (repeatable: seed 002's required_services) and ``--tenant T``.

Exit status: 0 a valid workflow (printed as YAML, or the whole answer with --json), 1 no valid
workflow after the repair rounds (the errors on stderr), 2 invalid input.
"""

from __future__ import annotations

import json
import sys

from django.core.management.base import BaseCommand

from runs.management.commands._cli import ensure_embedded_database, fail_input
from templates_app.generation import GenerationInputError, create_job, generate, parse_request


class Command(BaseCommand):
    help = (
        "Turn a plain-language prompt into a workflow: the planner's best stored template offline, "
        "or a model's answer (validated, repaired, dry-run) when an LLM is configured."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("prompt", help="what the workflow should do, in plain language")
        parser.add_argument("--domain", default="", help="seed 002's domain hint, e.g. data-science")
        parser.add_argument("--complexity", default="medium", help="low, medium (default) or high")
        parser.add_argument(
            "--service",
            action="append",
            default=[],
            dest="services",
            help="a required service: data, ai, exec or a step type (repeatable)",
        )
        parser.add_argument("--save", action="store_true", help="save a valid workflow as a new template version")
        parser.add_argument("--json", action="store_true", help="print the whole answer as JSON")
        parser.add_argument("--tenant", default="default", help="slug of the tenant (templates searched, saved into)")

    def handle(self, *args, **options) -> None:
        ensure_embedded_database()
        try:
            request = parse_request(
                {
                    "prompt": options["prompt"],
                    "domain": options["domain"],
                    "complexity": options["complexity"],
                    "required_services": options["services"],
                    "save": options["save"],
                },
                tenant_id=options["tenant"],
            )
        except GenerationInputError as exc:
            fail_input(self.stderr, str(exc))
            return
        job = create_job(request)
        result = generate(request, job=job)
        self.report(result.as_dict() | {"job_id": str(job.pk)}, as_json=options["json"])
        if not result.ok:
            sys.exit(1)

    def report(self, answer: dict, as_json: bool) -> None:
        """Print the answer: JSON, or a short summary (stderr) and the YAML (stdout)."""
        if as_json:
            self.stdout.write(json.dumps(answer, indent=2))
            return
        matched = ", ".join(answer["matched_templates"]) or "none"
        self.stderr.write(f"planner: {answer['planner']}  rounds: {answer['rounds']}  matched: {matched}")
        if answer["dry_run"]:
            steps = answer["dry_run"]["steps"]
            self.stderr.write(f"dry run: {answer['dry_run']['status']} ({len(steps)} steps)")
        if answer["template_key"]:
            self.stderr.write(f"saved: {answer['template_key']} v{answer['template_version']}")
        for error in answer["errors"]:
            self.stderr.write(f"error: {error}")
        if answer["ok"] and answer["yaml"]:
            self.stdout.write(answer["yaml"].rstrip("\n"))
