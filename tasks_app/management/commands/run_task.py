"""``manage.py run_task "<goal>" [--tool KEY ...] [--max-steps N] [--json]``: an agent task to its end."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from orchestrator_site.conf import conf
from runs import engine
from runs.choices import TriggerKind
from runs.events import Event
from runs.management.commands._cli import ensure_embedded_database, fail_input
from tasks_app import services
from tasks_app.events import task_feed
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
        parser.add_argument("--poll", type=float, default=0.2, help="seconds between reads of the progress feed")

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
        """Follow the task's event feed (``tasks_app.events``, the one the API streams and the admin
        shows) in-process until its ``end``, printing each step's change and the progress; sweep now
        and then. SIGINT/SIGTERM or ``--wait-timeout`` cancel the task (once; the feed then ends)."""
        interrupted: list[int] = []
        previous = {
            sig: signal.signal(sig, lambda s, f: interrupted.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        state: dict[str, Any] = {"progress": 0, "plan": {}}
        started = time.monotonic()
        next_sweep = started + conf.sweep_interval
        cancelled = False
        # a heartbeat every poll: the loop below gets control even while nothing changes
        feed = task_feed(task.pk, poll=poll, heartbeat=poll, max_seconds=math.inf)
        try:
            for event in feed.events():
                if event is not None:
                    self.show_event(event, state)
                    if event.name == "end":
                        break
                if not cancelled and interrupted:
                    cancelled = self.cancel(task, "interrupted (signal)")
                elif not cancelled and wait_timeout is not None and time.monotonic() - started > wait_timeout:
                    cancelled = self.cancel(task, f"run_task gave up after {wait_timeout} s")
                if time.monotonic() >= next_sweep:
                    engine.sweep()
                    next_sweep = time.monotonic() + conf.sweep_interval
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        final = AgentTask.objects.filter(pk=task.pk).first()
        if final is None:
            raise CommandError(f"task {task.pk} was deleted while it ran")
        return services.sync(final)

    def cancel(self, task: AgentTask, reason: str) -> bool:
        """Cancel the task (it may have ended meanwhile: nothing to do then). Returns True."""
        with contextlib.suppress(services.TaskStateError):
            services.cancel(AgentTask.objects.get(pk=task.pk), reason)
        return True

    def show_event(self, event: Event, state: dict[str, Any]) -> None:
        """One line per ``execution`` event (a step row's change): time, step id, status, attempt, the
        planned step's text, and the task's progress of that moment (from the ``task`` events, sent
        before the changes of the same read). ``state``: ``{"progress", "plan": {index: step data}}``."""
        data = event.data
        if event.name == "task":
            state["progress"] = data["progress"]
        elif event.name == "step":
            state["plan"][data["index"]] = data
        if self.as_json or event.name != "execution":
            return
        planned = state["plan"].get(data["index"] - 1)
        what = ""
        if data["op"] in ("args", "step") and planned and planned["status"] != "dropped":
            tool = planned["tool"]
            what = f" {(planned['description'] or '')[:60]}" + (f" [tool {tool}]" if tool else "")
        detail = f" attempt {data['attempts']}" if data["attempts"] > 1 else ""
        if data["error"] and data["status"] in ("retry_wait", "failed", "dead"):
            detail += f": {data['error'][:160]}"
        stamp = timezone.localtime().strftime("%H:%M:%S")
        self.stdout.write(f"  {stamp} {data['step_id']:<12} {data['status']:<10} {state['progress']:>3}%{what}{detail}")

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
