"""``manage.py dispatch_event TYPE --payload JSON``: store an event, start the templates it triggers."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from runs.management.commands._cli import ensure_embedded_database, fail_input
from runs.services import ServiceError


class Command(BaseCommand):
    help = (
        "Dispatch an event: stored once per event id (a repeat starts nothing and shows the first "
        "dispatch's runs); every active template whose trigger lists TYPE starts. Exit 0 on success, "
        "1 when --wait saw a run fail, 2 on invalid input."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("type", help="the event type, e.g. streak_ping")
        parser.add_argument("--payload", default="{}", help="the payload, a JSON object (default {})")
        parser.add_argument("--event-id", default=None, help="the sender's event id (default: a new one)")
        parser.add_argument("--user-id", default="", help="user the event is about")
        parser.add_argument("--intent-id", default="", help="intent id (also the runs' correlation id)")
        parser.add_argument("--tenant", default="default", help="slug of the tenant (default: default)")
        parser.add_argument("--priority", type=int, default=5, help="priority of the runs, 0 (urgent) to 9")
        parser.add_argument(
            "--wait",
            action="store_true",
            help="wait for the runs to finish (always on in the embedded mode, where this process runs them)",
        )
        parser.add_argument("--wait-timeout", type=float, default=None, help="seconds to wait at most")
        parser.add_argument("--json", action="store_true", help="print one JSON object")

    def parse_payload(self, text: str) -> dict[str, Any]:
        try:
            payload = json.loads(text)
        except ValueError as exc:
            raise ServiceError(f"--payload: not JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise ServiceError("--payload: must be a JSON object")
        return payload

    def handle(self, *args, **options) -> None:
        from scheduler.services import dispatch_event

        ensure_embedded_database()
        try:
            result = dispatch_event(
                options["type"],
                self.parse_payload(options["payload"]),
                event_id=options["event_id"],
                tenant_id=options["tenant"],
                user_id=options["user_id"],
                intent_id=options["intent_id"],
                priority=options["priority"],
            )
        except ServiceError as exc:
            fail_input(self.stderr, str(exc))
        runs = result.runs
        if result.created and not runs and not result.errors:
            self.warn_nobody_listens(options["type"], options["tenant"])
        if runs and (options["wait"] or settings.ORCHESTRATOR_EMBEDDED):
            runs = self.wait([r.pk for r in runs], options["wait_timeout"])
        summary = {
            "event_id": result.event.event_id,
            "type": result.event.type,
            "created": result.created,
            "runs": [{"id": str(r.pk), "template": r.template_key, "status": r.status} for r in runs],
            "errors": result.errors,
        }
        if options["json"]:
            self.stdout.write(json.dumps(summary))
        else:
            state = "dispatched" if result.created else "already dispatched (repeat: nothing started)"
            self.stdout.write(f"event {summary['event_id']} ({summary['type']}) {state}: {len(runs)} run(s)")
            for run in summary["runs"]:
                self.stdout.write(f"  run {run['id']} {run['template']} {run['status']}")
            for error in result.errors:
                self.stdout.write(f"  not started: {error['template']}: {error['error']}")
        if options["wait"] or settings.ORCHESTRATOR_EMBEDDED:
            sys.exit(0 if all(r.status == "succeeded" for r in runs) else 1)

    def warn_nobody_listens(self, event_type: str, tenant_id: str) -> None:
        """One line on stderr when no active template listens to ``event_type`` (a misspelling?)."""
        from scheduler.services import known_event_types
        from templates_app.errors import did_you_mean

        hint = did_you_mean(event_type, known_event_types(tenant_id))
        self.stderr.write(f"warning: no active template of tenant {tenant_id!r} listens to {event_type!r}{hint}")

    def wait(self, run_ids: list[Any], wait_timeout: float | None) -> list[Any]:
        """Poll until every run is finished (sweeping now and then); returns the runs."""
        from runs import engine
        from runs.choices import RUN_TERMINAL
        from runs.models import Run

        worker_cm: Any = contextlib.nullcontext()
        if settings.ORCHESTRATOR_EMBEDDED:
            from runs.embedded import embedded_worker

            worker_cm = embedded_worker(settings.ORCHESTRATOR_EMBEDDED_CONCURRENCY)
        started = time.monotonic()
        next_sweep = started + settings.ORCHESTRATOR_SWEEP_INTERVAL
        with worker_cm:
            while True:
                runs = list(Run.objects.filter(pk__in=run_ids).order_by("created_at"))
                if all(r.status in RUN_TERMINAL for r in runs):
                    return runs
                if wait_timeout is not None and time.monotonic() - started > wait_timeout:
                    return runs
                if time.monotonic() >= next_sweep:
                    engine.sweep()
                    next_sweep = time.monotonic() + settings.ORCHESTRATOR_SWEEP_INTERVAL
                time.sleep(0.2)
