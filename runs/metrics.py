"""Prometheus metrics of the platform: seed 001's ``orchestrator_*`` series and seed 000's queue gauge.

Two kinds, so that ``/metrics`` is right while a web process and many worker processes run at once:

- Counters and histograms are incremented where things happen (the engine, in whichever worker
  child runs the step). prometheus_client's multiprocess mode keeps each process's values in
  files under ``PROMETHEUS_MULTIPROC_DIR`` (settings sets it before prometheus_client is
  imported) and ``/metrics`` sums them at scrape time.
- Gauges of state (active runs, active steps, queue depth by status, dead letters) are not kept
  in any process: :class:`DatabaseCollector` counts them from the rows at scrape time, through
  partial indexes that hold only the unfinished steps, so they are exact whichever process
  changed the rows and cost no full count of the tables.

Series (units in the name; every ``*_total`` is a counter):

=========================================== ========== ===============================================
``orchestrator_flow_runs_processed_total``  counter    runs that reached a final status, ``{status}``
``orchestrator_run_execution_seconds``      histogram  start to finish of those runs, seconds
``orchestrator_active_runs``                gauge      runs pending or running
``orchestrator_tasks_scheduled_total``      counter    steps handed to execution: messages sent to the
                                                       broker, and steps a worker continued inline
``orchestrator_tasks_completed_total``      counter    step attempts that ended, ``{status}``: succeeded,
                                                       retry, dead, failed, refused, cancelled
``orchestrator_task_execution_seconds``     histogram  attempt duration, ``{handler}`` (the step type)
``orchestrator_active_tasks``               gauge      steps queued, running or waiting for a retry
``orchestrator_retry_attempts_total``       counter    failed attempts that will be retried, ``{handler}``
``orchestrator_dead_letter_queue_size``     gauge      steps in ``dead`` (attempts exhausted)
``task_queue_jobs``                         gauge      unfinished steps ``{status}``: pending, queued,
                                                       running, retry_wait, dead
=========================================== ========== ===============================================

The recording functions never raise: a metrics problem must not fail a step.

Tenancy: ``/metrics`` is the operator's (``ORCHESTRATOR_METRICS_TOKEN`` guards it). No series
carries what a tenant named (credential aliases, template keys, rate-limit keys); the only
tenant-identifying label is ``tenant`` (the slug), and only when
``ORCHESTRATOR_METRICS_TENANT_LABEL`` is on (off by default: one series per tenant grows with the
tenants, and the slug names a customer). See :func:`tenant_label`.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from orchestrator_site.conf import conf

from .choices import RUN_TERMINAL, STEP_ACTIVE, RunStatus, StepStatus

log = logging.getLogger("orchestrator.metrics")

#: Step statuses reported by ``task_queue_jobs`` (finished ones other than dead are not in a queue).
QUEUE_STATUSES = (StepStatus.PENDING, StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.RETRY_WAIT, StepStatus.DEAD)
#: Results of an attempt as ``runs.engine.execute_step`` returns them (``not-claimed`` is not one).
ATTEMPT_RESULTS = ("succeeded", "retry", "dead", "failed", "refused", "cancelled")

_RUN_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, float("inf"))
_TASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, float("inf"))

FLOW_RUNS_PROCESSED = Counter(
    "orchestrator_flow_runs_processed", "Runs that reached a final status, by status.", ["status"]
)
RUN_EXECUTION_SECONDS = Histogram(
    "orchestrator_run_execution_seconds", "Seconds from a run's start to its final status.", buckets=_RUN_BUCKETS
)
TASKS_SCHEDULED = Counter(
    "orchestrator_tasks_scheduled", "Steps handed to execution: sent to the broker or continued inline by a worker."
)
TASKS_COMPLETED = Counter(
    "orchestrator_tasks_completed",
    "Step attempts that ended, by result (succeeded, retry, dead, failed, refused, cancelled).",
    ["status"],
)
TASK_EXECUTION_SECONDS = Histogram(
    "orchestrator_task_execution_seconds",
    "Seconds a step attempt ran, by handler (step type).",
    ["handler"],
    buckets=_TASK_BUCKETS,
)
RETRY_ATTEMPTS = Counter(
    "orchestrator_retry_attempts", "Failed step attempts that will be retried, by handler (step type).", ["handler"]
)

# Series exist (at 0) from the first scrape, so rate() and absent() behave before the first event.
for _status in sorted(RUN_TERMINAL):
    FLOW_RUNS_PROCESSED.labels(_status)
for _result in ATTEMPT_RESULTS:
    TASKS_COMPLETED.labels(_result)


def tenant_label(tenant_id: str | None) -> str:
    """The value of a ``tenant`` label: the slug when ``ORCHESTRATOR_METRICS_TENANT_LABEL`` is on,
    else ``""`` (Prometheus treats an empty label as absent, so the series is deployment-wide)."""
    if not conf.metrics_tenant_label:
        return ""
    return str(tenant_id or "")[:100]


def steps_sent(count: int) -> None:
    """``count`` steps were handed to execution (messages sent, or a step continued inline)."""
    try:
        TASKS_SCHEDULED.inc(count)
    except Exception:  # pragma: no cover - metrics never fail the engine
        log.debug("metrics: steps_sent failed", exc_info=True)


def attempt_finished(handler: str, result: str, seconds: float) -> None:
    """An attempt of a ``handler`` step ended with ``result`` (an ``execute_step`` return value) after ``seconds``."""
    if result not in ATTEMPT_RESULTS:
        return
    try:
        TASKS_COMPLETED.labels(result).inc()
        TASK_EXECUTION_SECONDS.labels(handler or "unknown").observe(max(0.0, seconds))
        if result == "retry":
            RETRY_ATTEMPTS.labels(handler or "unknown").inc()
    except Exception:  # pragma: no cover
        log.debug("metrics: attempt_finished failed", exc_info=True)


def attempts_cancelled(count: int) -> None:
    """``count`` running attempts were closed because their run was cancelled or timed out."""
    if count > 0:
        try:
            TASKS_COMPLETED.labels("cancelled").inc(count)
        except Exception:  # pragma: no cover
            log.debug("metrics: attempts_cancelled failed", exc_info=True)


def run_finished(status: str, seconds: float | None) -> None:
    """A run reached the final ``status``; ``seconds`` from its start (None when it never started)."""
    try:
        FLOW_RUNS_PROCESSED.labels(status).inc()
        if seconds is not None:
            RUN_EXECUTION_SECONDS.observe(max(0.0, seconds))
    except Exception:  # pragma: no cover
        log.debug("metrics: run_finished failed", exc_info=True)


def queue_counts() -> dict[str, int]:
    """Unfinished steps by status (every status of QUEUE_STATUSES, 0 when none). One query."""
    from django.db.models import Count

    from .models import Step

    counts = dict.fromkeys((str(s) for s in QUEUE_STATUSES), 0)
    rows = Step.objects.filter(status__in=QUEUE_STATUSES).values("status").annotate(n=Count("id")).order_by()
    for row in rows:
        counts[row["status"]] = row["n"]
    return counts


def active_run_count() -> int:
    """Runs pending or running. One query on the (status, created_at) index."""
    from .models import Run

    return Run.objects.filter(status__in=[RunStatus.PENDING, RunStatus.RUNNING]).order_by().count()


class DatabaseCollector(Collector):
    """Gauges computed from the rows at scrape time (exact across processes and machines)."""

    def collect(self) -> Iterator[Metric]:
        try:
            steps = queue_counts()
            runs = active_run_count()
        except Exception as exc:  # the database is down: /ready reports it; keep the counters scrapeable
            log.warning("metrics: could not read queue gauges: %s", exc)
            return
        yield GaugeMetricFamily("orchestrator_active_runs", "Runs pending or running.", value=runs)
        yield GaugeMetricFamily(
            "orchestrator_active_tasks",
            "Steps queued, running or waiting for a retry.",
            value=sum(steps[str(s)] for s in STEP_ACTIVE),
        )
        yield GaugeMetricFamily(
            "orchestrator_dead_letter_queue_size", "Steps dead after exhausting their attempts.", value=steps["dead"]
        )
        jobs = GaugeMetricFamily("task_queue_jobs", "Unfinished steps by status.", labels=["status"])
        for status, count in steps.items():
            jobs.add_metric([status], count)
        yield jobs


_handler_series_declared = False


def _declare_handler_series() -> None:
    """Zero series per step type for the ``{handler}`` metrics, so they exist before the first step."""
    global _handler_series_declared
    if _handler_series_declared:
        return
    try:
        from agents.registry import handler_types

        for handler in sorted(handler_types()):
            TASK_EXECUTION_SECONDS.labels(handler)
            RETRY_ATTEMPTS.labels(handler)
    except Exception:  # pragma: no cover - the registry failing to load shows elsewhere
        log.debug("metrics: could not list the step types", exc_info=True)
    _handler_series_declared = True


def multiprocess_dir() -> str | None:
    """The folder of per-process metric files, or None when multiprocess mode is off."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def metric_files() -> list[str]:
    """The per-process metric files to sum: this machine's folder, and the folders of the other
    machines (containers) under ``ORCHESTRATOR_METRICS_ROOT`` when this folder is one of them."""
    folder = multiprocess_dir()
    if not folder:
        return []
    folders = {os.path.abspath(folder)}
    root = conf.metrics_root
    if root and os.path.dirname(os.path.abspath(folder)) == os.path.abspath(root):
        folders |= {os.path.abspath(p) for p in glob.glob(os.path.join(root, "*")) if os.path.isdir(p)}
    return sorted(f for d in folders for f in glob.glob(os.path.join(d, "*.db")))


class FilesCollector(Collector):
    """Counters and histograms summed over the metric files of every process (see metric_files)."""

    def collect(self) -> Iterator[Metric]:
        return iter(multiprocess.MultiProcessCollector.merge(metric_files(), accumulate=True))


def exposition() -> tuple[bytes, str]:
    """(body, content type) of a scrape: every process's counters and histograms plus the DB gauges
    (text format 0.0.4).

    Includes django-prometheus's series (requests, database, cache) of every process.
    """
    _declare_handler_series()
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        registry.register(FilesCollector())
        body = b""
    else:  # one process: its own default registry
        body = generate_latest(REGISTRY)
    registry.register(DatabaseCollector())
    # text format 0.0.4: what every Prometheus (2.x and 3.x) and promtool read
    return body + generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4


def parse_families(text: str) -> dict[str, Any]:
    """{family name: Metric} of an exposition (tests and the dashboard read values with it)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {family.name: family for family in text_string_to_metric_families(text)}
