"""``manage.py run_task "<goal>" [--tool KEY ...] [--max-steps N] [--json]``: an agent task to its end."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand
from django.utils import timezone

from orchestrator_site.conf import conf
from runs import engine
from runs.choices import TriggerKind
from runs.management.commands._cli import ensure_embedded_database, fail_input
from runs.models import Step
from tasks_app import services
from tasks_app.choices import TASK_TERMINAL
from tasks_app.models import AgentTask


class Command(BaseCommand):
    help = (
        "Run an agent task (seed 003) to its end, showing its steps and progress. The tools are workflow "
        "templates (by key) or agent endpoints of the tenant. Exit 0 when it completed, 1 when it failed or "
        "was cancelled, 2 on invalid input."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("goal", help="what the task should achieve")
        parser.add_argument("--tool", action="append", default=[], metavar="KEY", help="a tool (repeatable)")
        parser.add_argument("--max-steps", type=int, default=None, help="planned steps at most")
        parser.add_argument("--context-window-limit", type=int, default=None, help="tokens before summarizing")
        parser.add_argument("--checkpoint-interval", type=int, default=None, help="steps between checkpoints")
        parser.add_argument("--model", default="", help="the model asked of every provider")
        parser.add_argument("--tenant", default="default", help="tenant slug (default: default)")
        parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
        parser.add_argument("--wait-timeout", type=float, default=None, help="seconds before cancelling the task")
        parser.add_argument("--poll", type=float, default=0.2, help="seconds between progress reads")

    def handle(self, *args: Any, **options: Any) -> None:
        self.as_json = options["json"]
        ensure_embedded_database()
        try:
            task = services.start_task(
                options["tenant"],
                options["goal"],
                options["tool"],
                trigger=TriggerKind.CLI,
                max_steps=options["max_steps"],
                context_window_limit=options["context_window_limit"],
                checkpoint_interval=options["checkpoint_interval"],
                chat_model={"model": options["model"]} if options["model"] else None,
            )
        except services.TaskInputError as exc:
            fail_input(self.stderr, str(exc))
        if not self.as_json:
            self.stdout.write(f"task {task.pk} started: {task.goal[:100]}")
        worker_cm: Any = contextlib.nullcontext()
        if settings.ORCHESTRATOR_EMBEDDED:
            from runs.embedded import embedded_worker

            worker_cm = embedded_worker(conf.embedded_concurrency)
        with worker_cm:
            task = self.wait(task, options["poll"], options["wait_timeout"])
        self.report(task)
        sys.exit(0 if task.status == "completed" else 1)

    def wait(self, task: AgentTask, poll: float, wait_timeout: float | None) -> AgentTask:
        """Poll until the task ends, printing each step's change and the progress; sweep now and then.
        SIGINT/SIGTERM or ``--wait-timeout`` cancel the task."""
        interrupted: list[int] = []
        previous = {
            sig: signal.signal(sig, lambda s, f: interrupted.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        seen: dict[str, tuple[str, int]] = {}
        started = time.monotonic()
        next_sweep = started + conf.sweep_interval
        try:
            while True:
                task = services.sync(AgentTask.objects.get(pk=task.pk))
                self.show_progress(task, seen)
                if task.status in TASK_TERMINAL:
                    return task
                if interrupted:
                    services.cancel(task, "interrupted (signal)")
                elif wait_timeout is not None and time.monotonic() - started > wait_timeout:
                    services.cancel(task, f"run_task gave up after {wait_timeout} s")
                if time.monotonic() >= next_sweep:
                    engine.sweep()
                    next_sweep = time.monotonic() + conf.sweep_interval
                time.sleep(poll)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def show_progress(self, task: AgentTask, seen: dict[str, tuple[str, int]]) -> None:
        """One line per step change: time, step id, status, attempt, the planned step's text, progress."""
        if self.as_json or task.run_id is None:
            return
        plan = (task.strategy or {}).get("steps") or []
        for row in (
            Step.objects.filter(run_id=task.run_id)
            .order_by("id")
            .values("step_id", "status", "attempts", "error", "spec")
        ):
            key = (row["status"], row["attempts"])
            if seen.get(row["step_id"]) == key:
                continue
            seen[row["step_id"]] = key
            params = (row["spec"] or {}).get("params") or {}
            index = int(params.get("index") or 0)
            what = ""
            if params.get("op") in ("args", "step") and 0 < index <= len(plan):
                tool = plan[index - 1].get("tool")
                what = f" {plan[index - 1].get('description', '')[:60]}" + (f" [tool {tool}]" if tool else "")
            detail = f" attempt {row['attempts']}" if row["attempts"] > 1 else ""
            if row["error"] and row["status"] in ("retry_wait", "failed", "dead"):
                detail += f": {row['error'][:160]}"
            stamp = timezone.localtime().strftime("%H:%M:%S")
            self.stdout.write(f"  {stamp} {row['step_id']:<12} {row['status']:<10} {task.progress:>3}%{what}{detail}")

    def summary(self, task: AgentTask) -> dict[str, Any]:
        """The ``--json`` object: task_id, status, progress, steps, checkpoints, usage, result (and error)."""
        steps = [
            {k: s[k] for k in ("index", "description", "status", "tool", "attempts")}
            for s in services.planned_steps(task)
        ]
        return {
            "task_id": str(task.pk),
            "status": task.status,
            "progress": task.progress,
            "steps": steps,
            "checkpoints": len(task.checkpoints or []),
            "usage": task.usage or {},
            "result": task.result,
            "error": task.error or None,
        }

    def report(self, task: AgentTask) -> None:
        data = self.summary(task)
        if self.as_json:
            self.stdout.write(json.dumps(data, default=str))
            return
        usage = data["usage"]
        self.stdout.write(
            f"task {task.pk} {task.status} at {task.progress}%: {task.total_steps} planned steps, "
            f"{data['checkpoints']} checkpoints, {usage.get('llm_calls', 0)} LLM calls, "
            f"{usage.get('total_tokens', 0)} tokens"
        )
        if task.result:
            self.stdout.write(f"result: {str(task.result.get('answer', ''))[:500]}")
        if task.error:
            self.stdout.write(f"error: {task.error}")
