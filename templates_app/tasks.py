"""Thin Celery entry points of templates_app: arguments are ids, bodies call services."""

from __future__ import annotations

from celery import shared_task

from .generation import run_job


@shared_task(name="templates_app.generate_workflow", ignore_result=True, acks_late=True, reject_on_worker_lost=True)
def generate_workflow_task(job_id: str) -> str:
    """Run generation job ``job_id`` (``POST /api/v1/generate`` with ``async: true``).

    A job already taken or gone is left alone (a duplicate message): returns "not-claimed".
    """
    job = run_job(job_id)
    return "not-claimed" if job is None else job.status
