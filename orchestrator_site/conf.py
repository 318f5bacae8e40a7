"""``conf``: the platform's settings as one typed object.

The defaults live in one place, ``orchestrator_site/settings.py`` (each read from the
environment there, with its unit in a comment). Code reads ``conf.<name>`` for
``settings.ORCHESTRATOR_<NAME>``, coerced to the type annotated below, instead of repeating a
``getattr(settings, ..., default)`` with a second default. Values are read from Django's settings
at each access, so ``override_settings`` and pytest-django's ``settings`` fixture work.

Raises AttributeError for a name that is not declared here (a typo fails loudly).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings


class Conf:
    """Typed, read-only view of the ``ORCHESTRATOR_*`` settings. Units: seconds unless named."""

    # the engine
    embedded: bool
    queue: str
    system_queue: str
    default_step_timeout: float
    default_max_attempts: int
    lease_grace: float
    requeue_after: float
    sweep_interval: float
    countdown_max: float
    inline_steps: int
    inline_seconds: float
    batch_steps: int
    batch_spread: int
    batch_hold: float
    recover_dead_workers: bool
    worker_heartbeat: float
    worker_lost_after: float
    release_db_during_step: bool
    embedded_concurrency: int
    expand_batch: int
    # flow control
    max_concurrent_runs: int
    concurrency_poll: float
    # agents, handlers, the sandbox
    agents_base_url: str
    data_service_url: str
    service_token: str
    http_allow_hosts: list
    http_max_response_bytes: int
    python_callables: list
    run_work_root: str
    exec_memory_mb: int
    exec_max_output: int
    exec_max_processes: int
    exec_network_hosts: list
    exec_sandbox: str
    exec_bwrap: str
    exec_uid: int
    exec_gid: int
    exec_ro_paths: list
    exec_tmpfs_mb: int
    # credentials, service JWT
    fernet_keys: list
    service_jwt_key: str
    service_jwt_algorithm: str
    service_jwt_ttl: int
    service_jwt_issuer: str
    service_jwt_audience: str
    service_jwt_kid: str
    # the LLM router
    llm_base_url: str
    llm_model: str
    llm_kind: str
    llm_fallback_urls: list
    llm_timeout: float
    llm_max_tokens_cap: int
    llm_max_response_bytes: int
    llm_breaker_failures: int
    llm_breaker_cooldown: float
    llm_budget_hold_seconds: float
    llm_budget_recheck: float
    # agent tasks (tasks_app)
    task_max_steps: int
    task_max_steps_cap: int
    task_context_window_limit: int
    task_checkpoint_interval: int
    task_max_goal_chars: int
    task_max_tools: int
    task_max_tokens: int
    task_plan_wait: float
    task_child_recheck: float
    task_pause_recheck: float
    # operations
    schedule_misfire_grace: int
    ping_timeout: float
    metrics_root: str
    metrics_token: str
    metrics_tenant_label: bool
    # live progress (SSE) and seed 002's Redis request channel
    sse_max_seconds: float
    sse_poll: float
    sse_heartbeat: float
    requests_redis_url: str
    requests_channel: str
    responses_channel: str
    requests_tenant: str
    requests_max_bytes: int
    requests_max_variables_bytes: int
    requests_group: str
    requests_claim_idle: float
    responses_maxlen: int
    requests_poll: float

    def __getattr__(self, name: str) -> Any:
        kind = type(self).__annotations__.get(name)
        if kind is None:
            raise AttributeError(f"conf has no setting {name!r}: declare it in orchestrator_site/conf.py")
        value = getattr(settings, f"ORCHESTRATOR_{name.upper()}")
        caster = {"bool": bool, "int": int, "float": float, "str": str, "list": list}[kind]
        return caster(value) if value is not None else caster()


conf = Conf()
