"""``manage.py run_workflow <file.yaml | template-key> [--var name=value ...] [--json]``: the main job."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from runs import engine
from runs.choices import RUN_TERMINAL, STEP_TERMINAL, StepStatus, TriggerKind
from runs.models import Run, Step
from templates_app.errors import WorkflowError

from ._cli import ensure_embedded_database, fail_input

STATUS_MARK = {
    "pending": "·",
    "queued": "…",
    "running": "▶",
    "retry_wait": "↻",
    "succeeded": "✔",
    "failed": "✘",
    "dead": "☠",
    "skipped": "↷",
    "cancelled": "⊘",
}


class Command(BaseCommand):
    help = (
        "Run a workflow (a YAML file or a loaded template key) to completion, showing progress. "
        "Exit 0 when the run succeeded, 1 when it did not, 2 on invalid input."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("target", help="path to a workflow YAML file, or a template key")
        parser.add_argument(
            "--var",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="a workflow variable (repeatable); VALUE is coerced to the variable's type",
        )
        parser.add_argument("--template-version", type=int, default=None, help="template version (default: latest)")
        parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
        parser.add_argument("--correlation-id", default="", help="correlation id stored on the run")
        parser.add_argument(
            "--wait-timeout",
            type=float,
            default=None,
            help="seconds to wait for the run before giving up (default: no limit)",
        )
        parser.add_argument("--poll", type=float, default=0.2, help="seconds between progress reads")

    # --- steps the tests call directly -------------------------------------------------------
    def parse_vars(self, pairs: list[str]) -> dict[str, str]:
        values: dict[str, str] = {}
        for pair in pairs:
            name, sep, value = pair.partition("=")
            if not sep or not name.strip():
                raise WorkflowError(f"--var {pair!r}: expected NAME=VALUE")
            values[name.strip()] = value
        return values

    def resolve_target(self, target: str) -> tuple[dict[str, Any], Any]:
        """(spec, template) for a file path or a template key. Raises WorkflowError."""
        from templates_app.services import get_template, load_builtin_templates, load_template_file

        path = Path(target)
        if path.suffix in (".yaml", ".yml") or path.exists():
            template = load_template_file(path).template
            return template.spec, template
        load_builtin_templates()
        template = get_template(target, self.version)
        return template.spec, template

    def handle(self, *args, **options) -> None:
        self.version = options["template_version"]
        self.as_json = options["json"]
        ensure_embedded_database()
        try:
            inputs = self.parse_vars(options["var"])
            # one transaction: a refused input leaves no template version and no run behind
            with transaction.atomic():
                spec, template = self.resolve_target(options["target"])
                run = engine.start_run(
                    spec, inputs, template=template, trigger=TriggerKind.CLI, correlation_id=options["correlation_id"]
                )
        except WorkflowError as exc:
            fail_input(self.stderr, str(exc))
        if not self.as_json:
            self.stdout.write(f"run {run.pk} of {run.template_key} started ({len(spec['steps'])} steps)")
        worker_cm = contextlib.nullcontext()
        if settings.ORCHESTRATOR_EMBEDDED:
            from runs.embedded import embedded_worker

            worker_cm = embedded_worker(settings.ORCHESTRATOR_EMBEDDED_CONCURRENCY)
        with worker_cm:
            run = self.wait(run, options["poll"], options["wait_timeout"])
        self.report(run)
        sys.exit(0 if run.status == "succeeded" else 1)

    def wait(self, run: Run, poll: float, wait_timeout: float | None) -> Run:
        """Poll until the run is finished, printing step changes; sweep now and then."""
        interrupted: list[int] = []

        def on_signal(signum, frame):
            interrupted.append(signum)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        seen: dict[str, tuple[str, int]] = {}
        started = time.monotonic()
        next_sweep = started + settings.ORCHESTRATOR_SWEEP_INTERVAL
        try:
            while True:
                run.refresh_from_db(fields=["status", "outputs", "error", "finished_at"])
                self.show_progress(run, seen)
                if run.status in RUN_TERMINAL:
                    return run
                if interrupted:
                    engine.cancel_run(run.pk, "interrupted (signal)")
                    continue
                if wait_timeout is not None and time.monotonic() - started > wait_timeout:
                    engine.cancel_run(run.pk, f"run_workflow gave up after {wait_timeout} s")
                    continue
                if time.monotonic() >= next_sweep:
                    engine.sweep()
                    next_sweep = time.monotonic() + settings.ORCHESTRATOR_SWEEP_INTERVAL
                time.sleep(poll)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def show_progress(self, run: Run, seen: dict[str, tuple[str, int]]) -> None:
        if self.as_json:
            return
        rows = Step.objects.filter(run=run, parent__isnull=True).values(
            "step_id", "status", "attempts", "max_attempts", "error", "pending_children", "id"
        )
        for row in rows:
            done = 0
            if row["pending_children"] is not None and row["status"] == StepStatus.RUNNING:
                total = Step.objects.filter(parent_id=row["id"]).count()
                done = total - row["pending_children"]
            key = (row["status"], row["attempts"], done)
            if seen.get(row["step_id"]) == key:
                continue
            seen[row["step_id"]] = key
            detail = ""
            if row["status"] == StepStatus.RUNNING and row["pending_children"] is not None:
                detail = f" {done}/{total} items"
            elif row["status"] in (StepStatus.RUNNING, StepStatus.RETRY_WAIT) or row["attempts"] > 1:
                detail = f" attempt {row['attempts']}/{row['max_attempts']}"
            if row["error"] and row["status"] in (StepStatus.RETRY_WAIT, *STEP_TERMINAL):
                detail += f": {row['error'][:160]}"
            stamp = timezone.localtime().strftime("%H:%M:%S")
            mark = STATUS_MARK.get(row["status"], "?")
            self.stdout.write(f"  {stamp} {mark} {row['step_id']:<28} {row['status']}{detail}")

    def summary(self, run: Run) -> dict[str, Any]:
        steps = {
            row["step_id"]: {
                "status": row["status"],
                "attempts": row["attempts"],
                "output": row["output"],
                "error": row["error"] or None,
            }
            for row in Step.objects.filter(run=run, parent__isnull=True)
            .order_by("id")
            .values("step_id", "status", "attempts", "output", "error")
        }
        return {
            "run_id": str(run.pk),
            "status": run.status,
            "steps": steps,
            "outputs": run.outputs,
            "error": run.error or None,
        }

    def report(self, run: Run) -> None:
        data = self.summary(run)
        if self.as_json:
            self.stdout.write(json.dumps(data, default=str))
            return
        elapsed = ""
        full = Run.objects.only("started_at", "finished_at").get(pk=run.pk)
        if full.started_at and full.finished_at:
            elapsed = f" in {(full.finished_at - full.started_at).total_seconds():.2f} s"
        self.stdout.write(f"run {run.pk} {run.status}{elapsed}")
        if run.error:
            self.stdout.write(f"error: {run.error}")
        if run.outputs is not None:
            self.stdout.write("outputs: " + json.dumps(run.outputs, indent=2, default=str)[:20000])
