"""Seed 000's generation series (multiprocess mode, like ``runs.metrics``).

=========================================== ========= ==================================================
``workflow_generation_seconds``              histogram one generation (planner, LLM rounds, dry runs), seconds
``workflow_generation_failures_total``       counter   failed rounds ``{stage}``: ``llm`` (no answer),
                                                       ``parse`` (not JSON / not the schema), ``validate``
                                                       (refused by the loader), ``dry_run``
=========================================== ========= ==================================================

Recording never raises.
"""

from __future__ import annotations

import logging

log = logging.getLogger("orchestrator.metrics")

STAGES = ("llm", "parse", "validate", "dry_run")


def _collector(kind: str, name: str, documentation: str, labels: list[str], **extra):
    """A Counter/Histogram, reusing the one of that name when this module was loaded twice."""
    import prometheus_client
    from prometheus_client import REGISTRY

    existing = getattr(REGISTRY, "_names_to_collectors", {}).get(name)
    if existing is None and kind == "Counter":
        existing = getattr(REGISTRY, "_names_to_collectors", {}).get(f"{name}_total")
    if existing is not None:
        return existing
    return getattr(prometheus_client, kind)(name, documentation, labels, **extra)


GENERATION_SECONDS = _collector(
    "Histogram",
    "workflow_generation_seconds",
    "Seconds one workflow generation took (planner, LLM rounds, dry runs).",
    [],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf")),
)
GENERATION_FAILURES = _collector(
    "Counter",
    "workflow_generation_failures",
    "Failed workflow generation rounds, by stage (llm, parse, validate, dry_run).",
    ["stage"],
)
for _stage in STAGES:
    GENERATION_FAILURES.labels(_stage)


def observe_seconds(seconds: float) -> None:
    try:
        GENERATION_SECONDS.observe(max(0.0, seconds))
    except Exception:  # pragma: no cover - metrics never fail a generation
        log.debug("metrics: workflow_generation_seconds failed", exc_info=True)


def count_failure(stage: str) -> None:
    try:
        GENERATION_FAILURES.labels(stage).inc()
    except Exception:  # pragma: no cover
        log.debug("metrics: workflow_generation_failures failed", exc_info=True)
