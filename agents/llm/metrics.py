"""Prometheus series of the LLM router (multiprocess mode, like ``runs.metrics``).

=============================================== ======= ==================================================
``orchestrator_llm_tokens_total``                counter tokens used, ``{tenant, provider, kind}``; kind:
                                                         ``prompt`` or ``completion``
``orchestrator_llm_requests_total``              counter requests sent to providers (and calls a breaker
                                                         skipped), ``{provider, status}``; status: ``ok``,
                                                         ``throttled``, ``server_error``, ``connection_error``,
                                                         ``timeout``, ``context_length``, ``refused``,
                                                         ``schema_invalid``, ``circuit_open``
=============================================== ======= ==================================================

Recording never raises: a metrics problem must not fail a step.
"""

from __future__ import annotations

import logging

log = logging.getLogger("orchestrator.metrics")

# statuses (label `status` of orchestrator_llm_requests_total): ok, throttled, server_error,
# connection_error, timeout, context_length, refused, schema_invalid, circuit_open


def _counter(name: str, documentation: str, labels: list[str]):
    """A Counter, reusing one of that name when another module registered it first."""
    from prometheus_client import REGISTRY, Counter

    existing = getattr(REGISTRY, "_names_to_collectors", {}).get(f"{name}_total")
    if existing is not None:
        return existing
    return Counter(name, documentation, labels)


LLM_TOKENS = _counter(
    "orchestrator_llm_tokens",
    "LLM tokens used, by tenant, provider and kind (prompt, completion).",
    ["tenant", "provider", "kind"],
)
LLM_REQUESTS = _counter("orchestrator_llm_requests", "LLM requests by provider and outcome.", ["provider", "status"])


def count_request(provider: str, status: str) -> None:
    try:
        LLM_REQUESTS.labels(provider=provider[:100], status=status).inc()
    except Exception:  # pragma: no cover - a metric must never fail a step
        log.debug("llm request metric failed", exc_info=True)


def count_tokens(tenant: str, provider: str, usage: dict) -> None:
    try:
        for kind in ("prompt", "completion"):
            value = int(usage.get(f"{kind}_tokens") or 0)
            if value > 0:
                LLM_TOKENS.labels(tenant=tenant[:100], provider=provider[:100], kind=kind).inc(value)
    except Exception:  # pragma: no cover
        log.debug("llm token metric failed", exc_info=True)
