"""The admin's agent-task pages: a readable change page (goal, strategy, progress bar, steps with
their tool calls and attempts, checkpoints, summary, token usage, the latest traces) and the
pause / resume / cancel actions, refused in tenants where the user only reads (runs/admin.py's
``TenantScopedAdmin`` rule). Rows are never edited by hand: the engine and the services own them.

While the task is active, the change page's status, progress bar and step rows follow the task's
event feed live (tasks_app/static/tasks_app/task_page.js: an ``EventSource`` on
``/api/v1/chat/orchestrate/{id}/events?tenant=<slug>``, the admin's session authenticating it).
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from runs.admin import TenantScopedAdmin
from runs.models import Trace

from . import services
from .choices import TASK_TERMINAL
from .models import AgentEndpoint, AgentTask


def _pre(value: Any) -> str:
    return format_html("<pre style='white-space:pre-wrap;max-height:30em;overflow:auto'>{}</pre>", value)


@admin.register(AgentTask)
class AgentTaskAdmin(TenantScopedAdmin):
    list_display = (
        "id",
        "goal_short",
        "status",
        "progress_bar",
        "current_step",
        "total_steps",
        "tenant_id",
        "created_at",
    )
    list_filter = ("status",)
    search_fields = ("=id", "goal", "thread_id")
    list_select_related = ("run",)
    raw_id_fields = ("run",)
    actions = ["pause_tasks", "resume_tasks", "cancel_tasks"]
    fields = (
        "id", "tenant_id", "status_view", "goal", "live_progress", "current_step", "total_steps", "strategy_view",
        "steps_view", "checkpoints_view", "summary", "usage_view", "result_view", "error", "run_link",
        "max_steps", "context_window_limit", "checkpoint_interval", "retry_count", "tools", "thread_id",
        "created_at", "updated_at", "finished_at", "traces_view",
    )  # fmt: skip
    readonly_fields = fields

    class Media:
        js = ["tasks_app/task_page.js"]

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return False  # tasks start through the API, run_task or services.start_task

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="goal")
    def goal_short(self, task: AgentTask) -> str:
        return task.goal[:80]

    @admin.display(description="progress")
    def progress_bar(self, task: AgentTask) -> str:
        return format_html("<progress max='100' value='{}'></progress> {}%", task.progress, task.progress)

    @admin.display(description="status")
    def status_view(self, task: AgentTask) -> str:
        return format_html(
            "<span id='task-status' class='ops-live' data-status='{}'>{}</span>", task.status, task.status
        )

    @admin.display(description="progress")
    def live_progress(self, task: AgentTask) -> str:
        """The progress bar, with what task_page.js needs to keep it (and the steps) live: the
        events URL (the tenant named in the query: an EventSource sends no X-Tenant header) and
        whether the task already ended (then nothing is opened)."""
        url = reverse("task-events", kwargs={"task_id": task.pk}) + f"?tenant={task.tenant_id}"
        return format_html(
            "<progress id='task-progress' max='100' value='{}'></progress> <span id='task-progress-text'>{}%</span>"
            "<span id='task-live' hidden data-events-url='{}' data-finished='{}'></span>",
            task.progress, task.progress, url, "1" if task.status in TASK_TERMINAL else "",
        )  # fmt: skip

    @admin.display(description="strategy")
    def strategy_view(self, task: AgentTask) -> str:
        steps = (task.strategy or {}).get("steps") or []
        if not steps:
            return "-"
        items = [
            (s.get("description", ""), f" [tool {s['tool']} {json.dumps(s.get('arguments'))}]" if s.get("tool") else "")
            for s in steps
        ]
        return format_html("<ol>{}</ol>", format_html_join("", "<li>{}{}</li>", items))

    @admin.display(description="steps (tool calls, attempts)")
    def steps_view(self, task: AgentTask) -> str:
        rows = services.planned_steps(task)
        if not rows and task.status in TASK_TERMINAL:
            return "-"
        return format_html(
            "<table id='task-steps'><tr><th>#</th><th>step</th><th>tool</th><th>status</th><th>attempts</th></tr>{}"
            "</table>",
            format_html_join(
                "", "<tr data-index='{}'><td>{}</td><td class='step-description'>{}</td><td class='step-tool'>{}</td>"
                "<td class='step-status'>{}</td><td class='step-attempts'>{}</td></tr>",
                ((r["index"], r["index"] + 1, r["description"], r["tool"] or "", r["status"], r["attempts"])
                 for r in rows),
            ),
        )  # fmt: skip

    @admin.display(description="checkpoints")
    def checkpoints_view(self, task: AgentTask) -> str:
        if not task.checkpoints:
            return "-"
        return format_html(
            "<ul>{}</ul>",
            format_html_join(
                "", "<li>#{} after step {} at {}% ({}): {} messages</li>",
                ((c["number"], c["after_step"], c["progress"], c["reason"], len(c.get("context") or []))
                 for c in task.checkpoints),
            ),
        )  # fmt: skip

    @admin.display(description="token usage")
    def usage_view(self, task: AgentTask) -> str:
        return _pre(json.dumps(task.usage or {}, indent=1))

    @admin.display(description="result")
    def result_view(self, task: AgentTask) -> str:
        return _pre(json.dumps(task.result, indent=1)) if task.result else "-"

    @admin.display(description="run")
    def run_link(self, task: AgentTask) -> str:
        if not task.run_id:
            return "-"
        return format_html(
            "<a href='../../../runs/run/{}/change/'>{} ({})</a>", task.run_id, task.run_id, task.run.status
        )

    @admin.display(description="latest traces")
    def traces_view(self, task: AgentTask) -> str:
        rows = list(Trace.objects.filter(run_id=task.run_id).order_by("-id")[:30]) if task.run_id else []
        if not rows:
            return "-"
        return format_html(
            "<table><tr><th>time</th><th>kind</th><th>message</th></tr>{}</table>",
            format_html_join(
                "", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                ((t.created_at.strftime("%H:%M:%S"), t.kind, t.message[:300]) for t in rows),
            ),
        )  # fmt: skip

    # actions: through the services, only in tenants where the user writes --------------------------
    def _each(self, request: HttpRequest, queryset: QuerySet, verb: str, func) -> None:
        done, refused = 0, []
        for task in self.writable_only(request, queryset)[:500]:
            try:
                func(task)
                done += 1
            except services.TaskStateError as exc:
                refused.append(f"{str(task.pk)[:8]}: {exc}")
        if done:
            self.message_user(request, f"{verb} {done} task(s).", messages.SUCCESS)
        for line in refused[:20]:
            self.message_user(request, line, messages.WARNING)

    @admin.action(description="Pause the selected tasks", permissions=["change"])
    def pause_tasks(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._each(request, queryset, "Paused", services.pause)

    @admin.action(description="Resume the selected tasks", permissions=["change"])
    def resume_tasks(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._each(request, queryset, "Resumed", services.resume)

    @admin.action(description="Cancel the selected tasks", permissions=["change"])
    def cancel_tasks(self, request: HttpRequest, queryset: QuerySet) -> None:
        user = request.user.get_username()
        self._each(request, queryset, "Cancelled", lambda t: services.cancel(t, reason=f"cancelled by {user}"))


@admin.register(AgentEndpoint)
class AgentEndpointAdmin(TenantScopedAdmin):
    list_display = ("name", "call", "method", "expensive", "tenant_id")
    search_fields = ("name", "call")
