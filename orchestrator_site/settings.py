"""Settings, read from the environment.

With nothing set, the embedded default: a SQLite file under ``ORCHESTRATOR_DATA_DIR`` and an
in-memory Celery broker served by a worker inside the command's own process. Production sets
``DATABASE_URL`` (postgres://...) and ``CELERY_BROKER_URL`` (redis://...). Platform settings are
``ORCHESTRATOR_*``; README.md lists them all.
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from .env import env_bool, env_float, env_int, env_list, env_str
from .logging import build_logging_config

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(env_str("ORCHESTRATOR_DATA_DIR", str(BASE_DIR / "var")))


def _secret_key() -> str:
    """The configured key, else one generated once and kept in the data directory."""
    configured = env_str("DJANGO_SECRET_KEY")
    if configured:
        return configured
    path = DATA_DIR / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(50)
        path.write_text(key)
        path.chmod(0o600)
        return key


SECRET_KEY = _secret_key()


def _embedded_fernet_keys() -> list[str]:
    """The embedded default's credential keys: generated once into the data directory (0600)."""
    import base64

    path = DATA_DIR / "fernet_keys"
    try:
        return [k.strip() for k in path.read_text().split(",") if k.strip()]
    except FileNotFoundError:
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key)
        return [key]


DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "django_filters",
    "knox",
    "django_celery_beat",
    "django_celery_results",
    "django_prometheus",
    "templates_app",
    "runs",
    "scheduler",
    "agents",
    "tasks_app",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",  # the admin's CSS/JS from any WSGI server
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "orchestrator_site.logging.RequestContextMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "orchestrator_site.urls"
WSGI_APPLICATION = "orchestrator_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
SQLITE_PATH = DATA_DIR / "orchestrator.sqlite3"
DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{SQLITE_PATH}")
#: The engine's hot statements (runs/engine/sql.py) are prepared once per database connection
#: (PostgreSQL parses and plans them once, not on every step). Turn off behind a connection
#: pooler that cannot keep prepared statements (PgBouncer in transaction mode before 1.21).
ORCHESTRATOR_PREPARED_STATEMENTS = env_bool("ORCHESTRATOR_PREPARED_STATEMENTS", True)
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("DB_CONN_MAX_AGE", 60))}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Writers take the lock at BEGIN (no upgrade deadlocks between worker threads); WAL lets the
    # progress display read while workers write.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
else:
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # psycopg prepares a statement on its first use (prepare=True) only where this is set; the
    # ORM's queries are bound client-side (Django's default) and never prepared
    DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = (
        5 if ORCHESTRATOR_PREPARED_STATEMENTS else None
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("ORCHESTRATOR_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"

# --- Celery ---------------------------------------------------------------------------------
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "memory://localhost/")
#: True when no broker is configured: commands start a worker inside their own process.
ORCHESTRATOR_EMBEDDED = CELERY_BROKER_URL.startswith("memory://")
CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND", "django-db")
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
#: The step queue (every `runs.execute_step` message).
ORCHESTRATOR_QUEUE = CELERY_TASK_DEFAULT_QUEUE = env_str("ORCHESTRATOR_QUEUE", "orchestrator")
#: The system queue: sweeps, deadline checks, schedule ticks, health report, purge. Its own, so
#: recovery does not wait behind a backlog of steps; run a worker for it (`-Q <queue>-system`,
#: or one worker for both queues: `-Q orchestrator,orchestrator-system`).
ORCHESTRATOR_SYSTEM_QUEUE = env_str("ORCHESTRATOR_SYSTEM_QUEUE", f"{CELERY_TASK_DEFAULT_QUEUE}-system")
CELERY_TASK_ROUTES = {
    name: {"queue": ORCHESTRATOR_SYSTEM_QUEUE}
    for name in (
        "runs.sweep",
        "runs.expire_run",
        "scheduler.run_schedule",
        "scheduler.health_report",
        "scheduler.purge_runs",
    )
}
CELERY_TIMEZONE = TIME_ZONE
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Keep a worker process's database connection across tasks: without this, Celery's Django fixup
# closes it around every task, so every step paid for a new PostgreSQL backend (profiled: ~10% of
# a step's CPU). runs/tasks.py checks the connection before each task instead (CONN_MAX_AGE and
# CONN_HEALTH_CHECKS, as for a web request), so a database restart is still survived.
CELERY_DB_REUSE_MAX = env_int("ORCHESTRATOR_DB_REUSE_MAX", 1000)
# django-celery-beat's DatabaseScheduler, plus the tick time of each schedule firing in the
# message (scheduler/beat.py): the idempotency key of a scheduled run is schedule + tick.
CELERY_BEAT_SCHEDULER = "scheduler.beat:TickScheduler"
# Longer than the longest step, or Redis hands an unacked message to a second worker mid-step.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env_int("ORCHESTRATOR_VISIBILITY_TIMEOUT", 3 * 3600),
    # Run priority (0 = most urgent .. 9, seed 004) on Redis: one list per level, `queue`,
    # `queue:1` .. `queue:9`; a worker's BRPOP names them in level order, so with prefetch 1 and
    # acks_late the most urgent waiting message is always taken next (Celery "Redis Message
    # Priorities"; kombu >= 4.0.2 consumes 0 first). Other brokers ignore these options.
    "priority_steps": list(range(10)),
    "sep": ":",
    "queue_order_strategy": "priority",
}
if ORCHESTRATOR_EMBEDDED:
    # kombu's in-memory transport polls its queues every `polling_interval` seconds (1.0 by
    # default): a message waited up to a second for the worker thread, which made the embedded
    # default take 0.2 s per step on W4 (bench/embedded.py). The queues are in-process: poll often.
    CELERY_BROKER_TRANSPORT_OPTIONS["polling_interval"] = 0.01
#: Messages sent without a priority (system tasks, sweeper re-sends) go to the middle level.
CELERY_TASK_DEFAULT_PRIORITY = 5

# --- The platform (ORCHESTRATOR_*) ----------------------------------------------------------
#: Base URL that seed-004 style `call:` paths are joined to (EDGE_BASE_URL also accepted).
ORCHESTRATOR_AGENTS_BASE_URL = env_str("ORCHESTRATOR_AGENTS_BASE_URL", env_str("EDGE_BASE_URL"))
#: Static bearer token for agent calls (EDGE_SERVICE_JWT also accepted). Never logged.
ORCHESTRATOR_SERVICE_TOKEN = env_str("ORCHESTRATOR_SERVICE_TOKEN", env_str("EDGE_SERVICE_JWT"))
#: Seconds; a step without its own timeout gets this one.
ORCHESTRATOR_DEFAULT_STEP_TIMEOUT = env_float("ORCHESTRATOR_DEFAULT_STEP_TIMEOUT", 300.0)
#: Attempts for a step without a retry policy.
ORCHESTRATOR_DEFAULT_MAX_ATTEMPTS = env_int("ORCHESTRATOR_DEFAULT_MAX_ATTEMPTS", 3)
#: Seconds added to a step's timeout to form its lease.
ORCHESTRATOR_LEASE_GRACE = env_float("ORCHESTRATOR_LEASE_GRACE", 30.0)
#: Seconds a step may sit in `queued` before the sweeper sends its message again (a broker that
#: lost it). A worker that dies holding messages is detected sooner, by its heartbeat.
ORCHESTRATOR_REQUEUE_AFTER = env_float("ORCHESTRATOR_REQUEUE_AFTER", 300.0)
#: Seconds between sweeps (beat entry and the embedded runner's own loop).
ORCHESTRATOR_SWEEP_INTERVAL = env_float("ORCHESTRATOR_SWEEP_INTERVAL", 5.0)
#: Seconds between a worker's heartbeats (the steps of the messages it holds, runs/workers.py),
#: and seconds of silence after which the sweeper counts it as gone and re-sends its steps.
ORCHESTRATOR_WORKER_HEARTBEAT = env_float("ORCHESTRATOR_WORKER_HEARTBEAT", 2.0)
ORCHESTRATOR_WORKER_LOST_AFTER = env_float("ORCHESTRATOR_WORKER_LOST_AFTER", 10.0)
#: Retry delays up to this many seconds ride on a Celery countdown; longer ones wait for the sweeper.
ORCHESTRATOR_COUNTDOWN_MAX = env_float("ORCHESTRATOR_COUNTDOWN_MAX", 60.0)
#: Inline continuation (runs.engine.execute_step): a worker that finishes a step runs one of the
#: dependents it made ready itself, claimed in the same commit, up to this many steps per message
#: (0 = off: every step is a message) and not starting one after this many seconds.
ORCHESTRATOR_INLINE_STEPS = env_int("ORCHESTRATOR_INLINE_STEPS", 100)
ORCHESTRATOR_INLINE_SECONDS = env_float("ORCHESTRATOR_INLINE_SECONDS", 5.0)
#: Batched messages (runs.engine.broker.enqueue_steps): when one commit makes many steps ready,
#: they are sent as messages of up to ORCHESTRATOR_BATCH_STEPS step ids (1 = one message per
#: step), and never fewer than ORCHESTRATOR_BATCH_SPREAD messages, so a fan-out still reaches
#: that many workers at once. The worker runs a message's steps one after the other, each with
#: its own claim and commit, and gives the ones it has not started back to the broker (one
#: message each) as soon as a step runs longer than ORCHESTRATOR_BATCH_HOLD seconds.
ORCHESTRATOR_BATCH_STEPS = env_int("ORCHESTRATOR_BATCH_STEPS", 16)
ORCHESTRATOR_BATCH_SPREAD = env_int("ORCHESTRATOR_BATCH_SPREAD", 8)
ORCHESTRATOR_BATCH_HOLD = env_float("ORCHESTRATOR_BATCH_HOLD", 0.05)
#: The sweeper (and a redelivered message) count a running attempt as lost at once when its
#: worker process, on this host, is gone. Off only where hosts share a hostname but not a pid
#: namespace; leases recover every lost step anyway.
ORCHESTRATOR_RECOVER_DEAD_WORKERS = env_bool("ORCHESTRATOR_RECOVER_DEAD_WORKERS", True)
#: Close a worker thread's database connection while its step's handler runs (reopened for the
#: outcome): for thread-pool workers running many slow calls at once (-P threads -c 100), which
#: would otherwise hold one idle PostgreSQL connection per thread.
ORCHESTRATOR_RELEASE_DB_DURING_STEP = env_bool("ORCHESTRATOR_RELEASE_DB_DURING_STEP", False)
#: Worker threads of the embedded worker.
ORCHESTRATOR_EMBEDDED_CONCURRENCY = env_int("ORCHESTRATOR_EMBEDDED_CONCURRENCY", 4)
#: Dotted paths that `python` steps may call: the allow-list (extend with a comma-separated env).
#: Only callables that confine every path they are given to the run's work directory belong
#: here (issue 10); test helpers (agents.testing.*) are added by the test settings only.
ORCHESTRATOR_PYTHON_CALLABLES = [
    "templates_app.builtin_tasks.list_distributions",
    "templates_app.builtin_tasks.inspect_distributions",
    "templates_app.builtin_tasks.aggregate_audit",
    "templates_app.builtin_tasks.write_audit_report",
    "templates_app.builtin_tasks.list_subpackages",
    "templates_app.builtin_tasks.join_source_report",
    "scheduler.health.check",
    *env_list("ORCHESTRATOR_PYTHON_CALLABLES"),
]
#: exec steps: memory limit (MiB) and largest stdout kept (bytes).
ORCHESTRATOR_EXEC_MEMORY_MB = env_int("ORCHESTRATOR_EXEC_MEMORY_MB", 1024)
ORCHESTRATOR_EXEC_MAX_OUTPUT = env_int("ORCHESTRATOR_EXEC_MAX_OUTPUT", 1_000_000)
#: exec steps: most processes a command may run at once (a pids cgroup where one can be made,
#: else a watchdog counting the command's session); past it the whole command is killed.
ORCHESTRATOR_EXEC_MAX_PROCESSES = env_int("ORCHESTRATOR_EXEC_MAX_PROCESSES", 64)
#: http/llm steps: destinations allowed although internal (loopback, link-local, private ranges
#: are refused otherwise: SSRF guard, agents/netguard.py). Host, IP or CIDR, optional :port.
ORCHESTRATOR_HTTP_ALLOW_HOSTS = env_list("ORCHESTRATOR_HTTP_ALLOW_HOSTS")
#: OpenAI-compatible chat completions endpoint tried first by `llm` steps, then the fallbacks.
ORCHESTRATOR_LLM_BASE_URL = env_str("ORCHESTRATOR_LLM_BASE_URL", env_str("LLM_BASE_URL"))
ORCHESTRATOR_LLM_MODEL = env_str("ORCHESTRATOR_LLM_MODEL", env_str("LLM_MODEL", "default"))
ORCHESTRATOR_LLM_API_KEY = env_str("ORCHESTRATOR_LLM_API_KEY")
#: Comma-separated fallback base URLs (same API), tried in order after the first.
ORCHESTRATOR_LLM_FALLBACK_URLS = env_list("ORCHESTRATOR_LLM_FALLBACK_URLS")
#: Largest workflow file accepted (bytes).
ORCHESTRATOR_MAX_SPEC_BYTES = env_int("ORCHESTRATOR_MAX_SPEC_BYTES", 1_000_000)
#: Extra folders of YAML files loaded by `load_templates` with no argument.
ORCHESTRATOR_TEMPLATE_DIRS = env_list("ORCHESTRATOR_TEMPLATE_DIRS")

# --- Triggers and flow control (scheduler/, runs/engine/gate/; README: Triggers and flow control) ---
#: Concurrent runs per tenant when the admin sets no `tenant:<slug>` concurrency limit; runs over
#: it wait as `pending`. Seed 002's MAX_CONCURRENT_WORKFLOWS is read too; 0 = no limit.
ORCHESTRATOR_MAX_CONCURRENT_RUNS = env_int("ORCHESTRATOR_MAX_CONCURRENT_RUNS", env_int("MAX_CONCURRENT_WORKFLOWS", 0))
#: Seconds a step waiting for a concurrency slot waits at most before it looks again (a slot
#: released by another step wakes it at once; this is the safety net).
ORCHESTRATOR_CONCURRENCY_POLL = env_float("ORCHESTRATOR_CONCURRENCY_POLL", 2.0)
#: Seconds a schedule's tick may be late (beat or workers down) and still start its run
#: (APScheduler's "misfire grace time"); later ticks are dropped by the broker (`expires`).
ORCHESTRATOR_SCHEDULE_MISFIRE_GRACE = env_int("ORCHESTRATOR_SCHEDULE_MISFIRE_GRACE", 3600)
#: Days finished runs (with steps, attempts, traces) are kept; the purge job deletes older ones.
#: 0 keeps them forever.
ORCHESTRATOR_RUN_RETENTION_DAYS = env_int("ORCHESTRATOR_RUN_RETENTION_DAYS", 30)
#: Cron expressions (settings' time zone) of the system jobs: health report (seed 000: hourly)
#: and purge of old runs.
ORCHESTRATOR_HEALTH_CRON = env_str("ORCHESTRATOR_HEALTH_CRON", "0 * * * *")
ORCHESTRATOR_PURGE_CRON = env_str("ORCHESTRATOR_PURGE_CRON", "30 3 * * *")
#: Seconds past which an unfinished step that the sweeper should have moved counts as stuck
#: in the health report (queued, lease expired, retry overdue).
ORCHESTRATOR_STUCK_AFTER = env_float("ORCHESTRATOR_STUCK_AFTER", 900.0)
#: Fernet keys (urlsafe base64, 32 bytes each) encrypting credential secrets, comma-separated,
#: the NEWEST FIRST: it encrypts, all of them decrypt (MultiFernet). Rotate with
#: `manage.py rotate_keys`. Never derived from SECRET_KEY (issue 10: an exec step that read the
#: secret key could decrypt every tenant's credentials). Unset: the embedded default generates
#: one key once into <data dir>/fernet_keys (0600); any other deployment must set it (system
#: check agents.E003; credentials are refused until then).
ORCHESTRATOR_FERNET_KEYS = env_list("ORCHESTRATOR_FERNET_KEYS") or (
    _embedded_fernet_keys() if ORCHESTRATOR_EMBEDDED else []
)
#: Signed service JWT for agent calls (agents/service_auth.py), instead of the static service
#: token when a key is set: HS256 shared secret, or a PEM private key for RS256/ES256.
ORCHESTRATOR_SERVICE_JWT_KEY = env_str("ORCHESTRATOR_SERVICE_JWT_KEY")
ORCHESTRATOR_SERVICE_JWT_ALGORITHM = env_str("ORCHESTRATOR_SERVICE_JWT_ALGORITHM", "HS256")
#: Seconds a service JWT stays valid (short: one call, its retries get a fresh one).
ORCHESTRATOR_SERVICE_JWT_TTL = env_int("ORCHESTRATOR_SERVICE_JWT_TTL", 60)
ORCHESTRATOR_SERVICE_JWT_ISSUER = env_str("ORCHESTRATOR_SERVICE_JWT_ISSUER", "orchestrator")
#: `aud` claim (empty = none), e.g. the agents' base URL.
ORCHESTRATOR_SERVICE_JWT_AUDIENCE = env_str("ORCHESTRATOR_SERVICE_JWT_AUDIENCE")
#: `kid` header naming the key, for receivers that hold several.
ORCHESTRATOR_SERVICE_JWT_KID = env_str("ORCHESTRATOR_SERVICE_JWT_KID")


# --- Isolation of exec and python steps, credential keys (issue 10: tenant escapes) ----------
#: How exec steps are isolated: "bwrap" (bubblewrap namespaces, required), "process" (process
#: limits and Landlock only: a command reads what the worker's user reads), "auto" (bwrap where it
#: works; else the embedded default falls back to "process" with a warning logged once, and any
#: other deployment refuses exec steps). README: Sandbox.
ORCHESTRATOR_EXEC_SANDBOX = env_str("ORCHESTRATOR_EXEC_SANDBOX", "auto").lower()
#: The bubblewrap program (name on PATH, or a path).
ORCHESTRATOR_EXEC_BWRAP = env_str("ORCHESTRATOR_EXEC_BWRAP", "bwrap")
#: The unprivileged user and group commands run as when the worker is root (65534: nobody).
ORCHESTRATOR_EXEC_UID = env_int("ORCHESTRATOR_EXEC_UID", 65534)
ORCHESTRATOR_EXEC_GID = env_int("ORCHESTRATOR_EXEC_GID", 65534)
#: Size of a command's private /tmp (tmpfs), MiB.
ORCHESTRATOR_EXEC_TMPFS_MB = env_int("ORCHESTRATOR_EXEC_TMPFS_MB", 256)
#: Extra folders commands may read (read-only), comma-separated absolute paths; the worker's
#: interpreter and its site-packages are always visible, the data directory never.
ORCHESTRATOR_EXEC_RO_PATHS = env_list("ORCHESTRATOR_EXEC_RO_PATHS")
#: Hosts exec steps may declare with `network: true` (`host`, `*.example.com`, `*` = any host the
#: SSRF guard lets through). Empty (default): exec steps never get a network.
ORCHESTRATOR_EXEC_NETWORK_HOSTS = env_list("ORCHESTRATOR_EXEC_NETWORK_HOSTS")
#: Root of the per-run work directories of python steps (`<root>/<tenant>/<run id>`): builtin
#: callables read and write files only in there.
ORCHESTRATOR_RUN_WORK_ROOT = env_str("ORCHESTRATOR_RUN_WORK_ROOT", str(DATA_DIR / "work"))


def _cron(expression: str, name: str):
    """A Celery crontab from a 5-field cron expression; ImproperlyConfigured naming ``name``."""
    from celery.schedules import crontab

    fields = expression.split()
    if len(fields) != 5:
        raise ImproperlyConfigured(f"{name}: expected 5 cron fields, got {expression!r}")
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        return crontab(minute, hour, day_of_week, day_of_month, month_of_year)
    except Exception as exc:
        raise ImproperlyConfigured(f"{name}: invalid cron {expression!r}: {exc}") from None


CELERY_BEAT_SCHEDULE = {
    # due retries, expired leases, lost messages, deadlines; also expired concurrency slots and
    # runs waiting for a slot (runs.engine.sweep)
    "orchestrator-sweep": {
        "task": "runs.sweep",
        "schedule": ORCHESTRATOR_SWEEP_INTERVAL,
        "options": {"expires": ORCHESTRATOR_SWEEP_INTERVAL},
    },
    # seed 000's hourly health check: database, broker, workers, stuck runs -> a run + metrics
    "orchestrator-health-report": {
        "task": "scheduler.health_report",
        "schedule": _cron(ORCHESTRATOR_HEALTH_CRON, "ORCHESTRATOR_HEALTH_CRON"),
        "options": {"expires": 600},
    },
    # finished runs older than ORCHESTRATOR_RUN_RETENTION_DAYS
    "orchestrator-purge-runs": {
        "task": "scheduler.purge_runs",
        "schedule": _cron(ORCHESTRATOR_PURGE_CRON, "ORCHESTRATOR_PURGE_CRON"),
        "options": {"expires": 3600},
    },
}

# --- REST API (runs/api) ----------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # API tokens (hashed at rest, expiring) for programs; the session for the browsable API
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "knox.auth.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    # JSON only; refuses NUL characters, lone surrogates and absurd nesting with a 400
    "DEFAULT_PARSER_CLASSES": ["runs.api.parsers.StrictJSONParser"],
    "EXCEPTION_HANDLER": "runs.api.errors.exception_handler",
}
#: Days an API token made by `create_token` or `POST /api/v1/auth/login` stays valid (0 = never expires).
ORCHESTRATOR_TOKEN_TTL_DAYS = env_int("ORCHESTRATOR_TOKEN_TTL_DAYS", 30)
REST_KNOX = {
    "TOKEN_TTL": timedelta(days=ORCHESTRATOR_TOKEN_TTL_DAYS) if ORCHESTRATOR_TOKEN_TTL_DAYS > 0 else None,
    "TOKEN_PREFIX": "orch_",  # recognisable by secret scanners
    "AUTO_REFRESH": False,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Orchestrator API",
    "DESCRIPTION": (
        "Durable workflow runs on Django + Celery. Authenticate with `Authorization: Token <token>`; "
        "act in a tenant with `X-Tenant: <slug>` (default: your default tenant)."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "RunStatusEnum": "runs.choices.RunStatus",
        "StepStatusEnum": "runs.choices.StepStatus",
        "AttemptOutcomeEnum": "runs.choices.AttemptOutcome",
        "TraceKindEnum": "runs.choices.TraceKind",
    },
}

# --- Observability: JSON logs, Prometheus ------------------------------------------------------
#: Root log level of web, worker and commands (a Celery worker's `-l` overrides it).
ORCHESTRATOR_LOG_LEVEL = env_str("ORCHESTRATOR_LOG_LEVEL", "WARNING").upper()
#: `json` (one object per line, the default) or `text`.
ORCHESTRATOR_LOG_FORMAT = env_str("ORCHESTRATOR_LOG_FORMAT", "json").lower()
try:
    LOGGING = build_logging_config(ORCHESTRATOR_LOG_LEVEL, ORCHESTRATOR_LOG_FORMAT)
except ValueError as exc:
    raise ImproperlyConfigured(str(exc)) from None
#: Counters and histograms of every process (web, each worker child) are kept as files and summed
#: at scrape time (prometheus_client's multiprocess mode). By default each machine (hostname) has
#: its own folder under ORCHESTRATOR_METRICS_ROOT (pids repeat across containers sharing the data
#: folder, and two processes must never write one file); /metrics sums every folder of the root.
#: Clear the root when the whole deployment restarts. Set before any import of prometheus_client,
#: which reads it once.
ORCHESTRATOR_METRICS_ROOT = env_str("ORCHESTRATOR_METRICS_ROOT", str(DATA_DIR / "metrics"))
PROMETHEUS_MULTIPROC_DIR = env_str(
    "PROMETHEUS_MULTIPROC_DIR", str(Path(ORCHESTRATOR_METRICS_ROOT) / socket.gethostname())
)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = PROMETHEUS_MULTIPROC_DIR
Path(PROMETHEUS_MULTIPROC_DIR).mkdir(parents=True, exist_ok=True)
#: django-prometheus: the unapplied-migrations gauge is named `*_total`, which promtool rejects.
PROMETHEUS_EXPORT_MIGRATIONS = False
#: Seconds /ready waits for the database and the broker.
ORCHESTRATOR_READY_TIMEOUT = env_float("ORCHESTRATOR_READY_TIMEOUT", 2.0)
#: When set, /metrics requires `Authorization: Bearer <this token>`.
ORCHESTRATOR_METRICS_TOKEN = env_str("ORCHESTRATOR_METRICS_TOKEN")
#: WhiteNoise serves static files (the admin's) straight from the apps: no collectstatic needed.
WHITENOISE_USE_FINDERS = True
Path(STATIC_ROOT).mkdir(parents=True, exist_ok=True)  # WhiteNoise warns about a missing one
#: Seconds the admin dashboard waits for Celery workers to answer a ping.
ORCHESTRATOR_PING_TIMEOUT = env_float("ORCHESTRATOR_PING_TIMEOUT", 0.5)

# --- Hardening (issue 10): tenancy of /metrics, login throttling, expression and spec limits ------
#: Add a `tenant` label (the tenant slug) to per-tenant series (credential_resolution_total).
#: Off by default: /metrics then names no tenant at all.
ORCHESTRATOR_METRICS_TENANT_LABEL = env_bool("ORCHESTRATOR_METRICS_TENANT_LABEL", False)
#: Sign-in throttles (runs/api/throttling.py), DRF rate strings ("<n>/<sec|min|hour|day>"):
#: attempts per client address, and wrong passwords per user name; past either, 429.
ORCHESTRATOR_LOGIN_RATE = env_str("ORCHESTRATOR_LOGIN_RATE", "30/min")
ORCHESTRATOR_LOGIN_FAILURE_RATE = env_str("ORCHESTRATOR_LOGIN_FAILURE_RATE", "10/hour")
REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"] = {
    "login": ORCHESTRATOR_LOGIN_RATE,
    "login_failures": ORCHESTRATOR_LOGIN_FAILURE_RATE,
}
#: Reverse proxies in front of the web processes whose X-Forwarded-For entry is trusted for the
#: client address (DRF NUM_PROXIES). 0: REMOTE_ADDR only (the header can be forged by anyone).
REST_FRAMEWORK["NUM_PROXIES"] = env_int("ORCHESTRATOR_NUM_PROXIES", 0)
#: Django's cache, where the throttles keep their counts: it must be shared by every web process,
#: so Redis (Django's built-in RedisCache) whenever there is one: ORCHESTRATOR_CACHE_URL, else the
#: broker's URL when the broker is Redis; otherwise (embedded default, RabbitMQ without a cache
#: URL) the per-process memory cache.
ORCHESTRATOR_CACHE_URL = env_str(
    "ORCHESTRATOR_CACHE_URL", CELERY_BROKER_URL if CELERY_BROKER_URL.startswith(("redis://", "rediss://")) else ""
)
if ORCHESTRATOR_CACHE_URL.startswith(("redis://", "rediss://", "unix://")):
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": ORCHESTRATOR_CACHE_URL,
            "KEY_PREFIX": "orchestrator-cache",
            "TIMEOUT": 3600,
        }
    }
elif ORCHESTRATOR_CACHE_URL:
    raise ImproperlyConfigured(f"ORCHESTRATOR_CACHE_URL: expected a redis:// URL, got {ORCHESTRATOR_CACHE_URL!r}")
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "orchestrator"}}
#: Expressions (templates_app/expressions.py), per evaluation (all the params of a step, or all
#: the computed variables of a run): largest string or list one may build (characters or items),
#: work units (one per filter/test/method call or lazily produced item, one per 64 elements a
#: C-level scan walks), and wall-clock seconds (0 = no bound besides the step's own deadline).
ORCHESTRATOR_EXPRESSION_MAX_LENGTH = env_int("ORCHESTRATOR_EXPRESSION_MAX_LENGTH", 1_000_000)
ORCHESTRATOR_EXPRESSION_MAX_WORK = env_int("ORCHESTRATOR_EXPRESSION_MAX_WORK", 1_000_000)
ORCHESTRATOR_EXPRESSION_MAX_SECONDS = env_float("ORCHESTRATOR_EXPRESSION_MAX_SECONDS", 2.0)
#: Caps on what a workflow file may ask for (templates_app/spec.py, checked at load): a step's
#: timeout (seconds; keep it below ORCHESTRATOR_VISIBILITY_TIMEOUT minus the lease grace, or
#: Redis hands a running step's message to a second worker), the workflow's own timeout
#: (seconds), attempts per step, retry delays (seconds), steps declared in one file (parallel
#: branches included), and items of one for_each (also enforced by the engine at expansion).
ORCHESTRATOR_MAX_STEP_TIMEOUT = env_float("ORCHESTRATOR_MAX_STEP_TIMEOUT", 7200.0)
ORCHESTRATOR_MAX_RUN_TIMEOUT = env_float("ORCHESTRATOR_MAX_RUN_TIMEOUT", 7 * 86400.0)
ORCHESTRATOR_MAX_ATTEMPTS = env_int("ORCHESTRATOR_MAX_ATTEMPTS", 100)
ORCHESTRATOR_MAX_RETRY_DELAY = env_float("ORCHESTRATOR_MAX_RETRY_DELAY", 86400.0)
ORCHESTRATOR_MAX_STEPS_PER_RUN = env_int("ORCHESTRATOR_MAX_STEPS_PER_RUN", 5000)
ORCHESTRATOR_MAX_FOR_EACH_ITEMS = env_int("ORCHESTRATOR_MAX_FOR_EACH_ITEMS", 10_000)
#: A for_each with more items than this is not expanded in the transaction that decides it (an
#: API request, or a completion holding its run's lock): the step is queued, and a worker
#: inserts its children in batches of this many, each batch its own commit, sent as it commits.
ORCHESTRATOR_EXPAND_BATCH = env_int("ORCHESTRATOR_EXPAND_BATCH", 1000)

# --- LLM router, token budgets, local model (issue 8 sections 1-2: agents/llm/) ---------------------
#: Seed 000's names work as printed: LLM_BASE_URL / LLM_MODEL (read above as the aliases of
#: ORCHESTRATOR_LLM_BASE_URL / ORCHESTRATOR_LLM_MODEL) and LLM_API_KEY here.
ORCHESTRATOR_LLM_API_KEY = ORCHESTRATOR_LLM_API_KEY or env_str("LLM_API_KEY")
#: How the main provider takes structured output: `openai` (json_schema) or `llamacpp`
#: (json_object + schema, for llama-cpp-python's server).
ORCHESTRATOR_LLM_KIND = env_str("ORCHESTRATOR_LLM_KIND", env_str("LLM_KIND", "openai")).lower()
if ORCHESTRATOR_LLM_KIND not in ("openai", "llamacpp"):
    raise ImproperlyConfigured(f"ORCHESTRATOR_LLM_KIND: expected openai or llamacpp, got {ORCHESTRATOR_LLM_KIND!r}")
#: Gemini as a fallback through its OpenAI-compatible endpoint (seed 000): registered when a key is
#: set, unless GEMINI_ENABLED=false. ORCHESTRATOR_LLM_GEMINI_* are aliases.
GEMINI_API_KEY = env_str("GEMINI_API_KEY", env_str("ORCHESTRATOR_LLM_GEMINI_API_KEY"))
GEMINI_ENABLED = env_bool("GEMINI_ENABLED", env_bool("ORCHESTRATOR_LLM_GEMINI_ENABLED", bool(GEMINI_API_KEY)))
GEMINI_MODEL = env_str("GEMINI_MODEL", env_str("ORCHESTRATOR_LLM_GEMINI_MODEL", "gemini-2.0-flash"))
GEMINI_BASE_URL = env_str(
    "GEMINI_BASE_URL",
    env_str("ORCHESTRATOR_LLM_GEMINI_BASE_URL", "https://generativelanguage.googleapis.com/v1beta/openai/"),
)
#: Seconds an LLM call may take over all its providers when the caller gives no timeout.
ORCHESTRATOR_LLM_TIMEOUT = env_float("ORCHESTRATOR_LLM_TIMEOUT", 120.0)
#: Largest answer read from an LLM provider, bytes (past it the provider counts as failed).
ORCHESTRATOR_LLM_MAX_RESPONSE_BYTES = env_int("ORCHESTRATOR_LLM_MAX_RESPONSE_BYTES", 20_000_000)
#: Largest max_tokens a call may ask for.
ORCHESTRATOR_LLM_MAX_TOKENS_CAP = env_int("ORCHESTRATOR_LLM_MAX_TOKENS_CAP", 32768)
#: Circuit breaker per provider (state in the database, shared by all workers): consecutive
#: failures that open it, and seconds it stays open before one probe call is let through.
ORCHESTRATOR_LLM_BREAKER_FAILURES = env_int("ORCHESTRATOR_LLM_BREAKER_FAILURES", 3)
ORCHESTRATOR_LLM_BREAKER_COOLDOWN = env_float("ORCHESTRATOR_LLM_BREAKER_COOLDOWN", 30.0)
#: Seconds a call's budget reservation is held at most (a worker killed mid-call frees it then).
ORCHESTRATOR_LLM_BUDGET_HOLD_SECONDS = env_float("ORCHESTRATOR_LLM_BUDGET_HOLD_SECONDS", 900.0)
#: Seconds a `wait` budget waits when only calls in flight (not spent tokens) fill it.
ORCHESTRATOR_LLM_BUDGET_RECHECK = env_float("ORCHESTRATOR_LLM_BUDGET_RECHECK", 5.0)

# --- Agent tasks (seed 003, tasks_app): deployment defaults; each task may set its own --------------
#: Planned steps a task may execute at most (seed 003's maxSteps), and the largest value a caller may ask.
ORCHESTRATOR_TASK_MAX_STEPS = env_int("ORCHESTRATOR_TASK_MAX_STEPS", 50)
ORCHESTRATOR_TASK_MAX_STEPS_CAP = env_int("ORCHESTRATOR_TASK_MAX_STEPS_CAP", 200)
#: Tokens of context (estimated, 4 characters a token) past which it is summarized (contextWindowLimit).
ORCHESTRATOR_TASK_CONTEXT_WINDOW_LIMIT = env_int("ORCHESTRATOR_TASK_CONTEXT_WINDOW_LIMIT", 100_000)
#: Steps between checkpoints (checkpointInterval).
ORCHESTRATOR_TASK_CHECKPOINT_INTERVAL = env_int("ORCHESTRATOR_TASK_CHECKPOINT_INTERVAL", 5)
#: Characters of a goal at most; tools one task may be granted at most.
ORCHESTRATOR_TASK_MAX_GOAL_CHARS = env_int("ORCHESTRATOR_TASK_MAX_GOAL_CHARS", 4000)
ORCHESTRATOR_TASK_MAX_TOOLS = env_int("ORCHESTRATOR_TASK_MAX_TOOLS", 20)
#: max_tokens of each LLM call of a task (reserved on the tenant's token budgets).
ORCHESTRATOR_TASK_MAX_TOKENS = env_int("ORCHESTRATOR_TASK_MAX_TOKENS", 1024)
#: Seconds POST /chat/orchestrate waits for the decomposition before answering without it.
ORCHESTRATOR_TASK_PLAN_WAIT = env_float("ORCHESTRATOR_TASK_PLAN_WAIT", 10.0)
#: Seconds between re-checks of a tool's child run (its finish wakes the step at once anyway),
#: and of a paused task (resume wakes it at once).
ORCHESTRATOR_TASK_CHILD_RECHECK = env_float("ORCHESTRATOR_TASK_CHILD_RECHECK", 10.0)
ORCHESTRATOR_TASK_PAUSE_RECHECK = env_float("ORCHESTRATOR_TASK_PAUSE_RECHECK", 300.0)

# --- Documented settings read from the environment (issue 8 section 4) ------------------------------
#: Where seed 002 `data` tasks without url/call are POSTed.
ORCHESTRATOR_DATA_SERVICE_URL = env_str("ORCHESTRATOR_DATA_SERVICE_URL")
#: Largest http step response body kept, bytes.
ORCHESTRATOR_HTTP_MAX_RESPONSE_BYTES = env_int("ORCHESTRATOR_HTTP_MAX_RESPONSE_BYTES", 10_000_000)

# --- Workflow generation from plain language (issue 8 section 3: templates_app/generation/) ----------
#: Repair rounds after the first answer of the model (each sends the loader's or dry run's errors back).
ORCHESTRATOR_GENERATE_REPAIR_ROUNDS = env_int("ORCHESTRATOR_GENERATE_REPAIR_ROUNDS", 2)
if not 0 <= ORCHESTRATOR_GENERATE_REPAIR_ROUNDS <= 10:
    raise ImproperlyConfigured("ORCHESTRATOR_GENERATE_REPAIR_ROUNDS: expected 0..10")
#: Longest prompt accepted, characters.
ORCHESTRATOR_GENERATE_MAX_PROMPT = env_int("ORCHESTRATOR_GENERATE_MAX_PROMPT", 4000)
#: max_tokens of each model answer (reserved on the tenant's token budgets before the call).
ORCHESTRATOR_GENERATE_MAX_TOKENS = env_int("ORCHESTRATOR_GENERATE_MAX_TOKENS", 4096)
#: Characters of matching stored templates sent to the model as examples (0: none; small contexts).
ORCHESTRATOR_GENERATE_EXAMPLE_CHARS = env_int("ORCHESTRATOR_GENERATE_EXAMPLE_CHARS", 6000)
#: Seconds one model call may take (over all providers).
ORCHESTRATOR_GENERATE_LLM_TIMEOUT = env_float("ORCHESTRATOR_GENERATE_LLM_TIMEOUT", 120.0)
#: The workflow schema sent to llama.cpp providers: `positional` (fixed step ids, depends_on only on
#: earlier steps, plain-text params: what the loader would refuse cannot be decoded;
#: templates_app/generation/positional.py) or `full` (the same schema as every other provider).
ORCHESTRATOR_GENERATE_LLAMACPP_SCHEMA = env_str("ORCHESTRATOR_GENERATE_LLAMACPP_SCHEMA", "positional").lower()
if ORCHESTRATOR_GENERATE_LLAMACPP_SCHEMA not in ("positional", "full"):
    raise ImproperlyConfigured(
        "ORCHESTRATOR_GENERATE_LLAMACPP_SCHEMA: expected positional or full, "
        f"got {ORCHESTRATOR_GENERATE_LLAMACPP_SCHEMA!r}"
    )


# --- Operator experience (issue 12): offline API docs, API errors, static files ------------------
#: Swagger UI and Redoc from our own static files (drf-spectacular-sidecar), never a CDN: the docs
#: at /api/v1/docs render on a machine with no internet access.
INSTALLED_APPS += ["drf_spectacular_sidecar"]
SPECTACULAR_SETTINGS.update(
    {
        "SWAGGER_UI_DIST": "SIDECAR",
        "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
        "REDOC_DIST": "SIDECAR",
        # the error answers every operation shares (400/401/403/404/409/413/414/415/503), documented once
        "POSTPROCESSING_HOOKS": [
            "drf_spectacular.hooks.postprocess_schema_enums",
            "runs.api.schema.document_errors",
        ],
    }
)
#: Where `collectstatic` puts the static files (the Docker image: /app/static); WhiteNoise serves them.
STATIC_ROOT = Path(env_str("ORCHESTRATOR_STATIC_ROOT", str(STATIC_ROOT)))
#: A filter given twice or empty is a 400 naming it (django-filter would take the last one or
#: ignore it), as the schema promises.
REST_FRAMEWORK["DEFAULT_FILTER_BACKENDS"] = ["runs.api.filters.StrictFilterBackend"]
#: A CSRF refusal under /api/ is JSON like every other API error.
CSRF_FAILURE_VIEW = "orchestrator_site.api_errors.csrf_failure"

# --- Logging of worker and beat (issue 12) -------------------------------------------------------
#: Celery's redirection of stdout/stderr logs every written line as a record, so a traceback
#: printed on a crash became hundreds of JSON lines. Off: uncaught exceptions are logged as one
#: record by orchestrator_site.logging (its excepthooks), and tasks do not print.
CELERY_WORKER_REDIRECT_STDOUTS = env_bool("ORCHESTRATOR_REDIRECT_STDOUTS", False)

# --- RabbitMQ (issue 12) ----------------------------------------------------------------------
# CELERY_BROKER_URL=amqp://user:password@host:5672/vhost selects RabbitMQ, Celery's recommended
# production broker; orchestrator_site/brokers.py has what differs from Redis.
if CELERY_BROKER_URL.split("://", 1)[0].lower() in ("amqp", "amqps", "pyamqp"):
    #: Run priority: every queue Celery declares gets `x-max-priority: 9`; brokers.py maps the
    #: platform's 0 = most urgent onto RabbitMQ's 9 = highest. (An existing queue declared without
    #: it must be deleted once: RabbitMQ refuses to redeclare a queue with other arguments.)
    CELERY_TASK_QUEUE_MAX_PRIORITY = 9
    #: No visibility timeout on RabbitMQ: an unacked message goes back to the queue when its
    #: consumer's connection or channel closes (worker killed), not after a timer. The server's
    #: `consumer_timeout` (default 30 min) closes a channel whose delivery stays unacked longer:
    #: with acks_late that is a step running longer than it. Set it above your longest step
    #: (rabbitmq.conf `consumer_timeout = 10800000`, milliseconds); a redelivered step finds its
    #: lease held and is not run twice, so a too-short timeout costs a redelivery, not a duplicate.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        # publisher confirms: a message counts as sent once RabbitMQ has it
        "confirm_publish": env_bool("ORCHESTRATOR_AMQP_CONFIRM_PUBLISH", True),
    }
    #: AMQP heartbeat (seconds): a dead TCP peer is noticed within about two of them.
    CELERY_BROKER_HEARTBEAT = env_int("ORCHESTRATOR_AMQP_HEARTBEAT", 60)
    #: Connections kept open per process for publishing.
    CELERY_BROKER_POOL_LIMIT = env_int("ORCHESTRATOR_AMQP_POOL_LIMIT", 10)

# --- Live progress (Server-Sent Events) and seed 002's Redis request channel (issue 9) -------------
#: Longest an event stream (`GET /api/v1/runs/{id}/events`) stays open, seconds; the client
#: reconnects with Last-Event-ID and goes on where it stopped.
ORCHESTRATOR_SSE_MAX_SECONDS = env_float("ORCHESTRATOR_SSE_MAX_SECONDS", 3600.0)
#: Seconds between two reads of the watched rows (a few small queries each).
ORCHESTRATOR_SSE_POLL = env_float("ORCHESTRATOR_SSE_POLL", 0.5)
#: Seconds of silence after which a stream sends a comment line (keeps proxies from closing it).
ORCHESTRATOR_SSE_HEARTBEAT = env_float("ORCHESTRATOR_SSE_HEARTBEAT", 15.0)
#: Redis of `listen_requests`: default the cache's Redis, else the broker's when it is Redis.
ORCHESTRATOR_REQUESTS_REDIS_URL = env_str(
    "ORCHESTRATOR_REQUESTS_REDIS_URL",
    ORCHESTRATOR_CACHE_URL if ORCHESTRATOR_CACHE_URL.startswith(("redis://", "rediss://", "unix://")) else "",
)
#: Pub/sub channel (or stream, with --stream) of seed 002's requests, and of its responses.
ORCHESTRATOR_REQUESTS_CHANNEL = env_str("ORCHESTRATOR_REQUESTS_CHANNEL", "workflow-requests")
ORCHESTRATOR_RESPONSES_CHANNEL = env_str("ORCHESTRATOR_RESPONSES_CHANNEL", "workflow-responses")
#: The tenant requests start runs in (`listen_requests --tenant` overrides it).
ORCHESTRATOR_REQUESTS_TENANT = env_str("ORCHESTRATOR_REQUESTS_TENANT", "default")
#: Largest request message accepted, bytes; and largest `variables` object (as JSON), bytes.
ORCHESTRATOR_REQUESTS_MAX_BYTES = env_int("ORCHESTRATOR_REQUESTS_MAX_BYTES", 1_000_000)
ORCHESTRATOR_REQUESTS_MAX_VARIABLES_BYTES = env_int("ORCHESTRATOR_REQUESTS_MAX_VARIABLES_BYTES", 256_000)
#: Stream mode: the consumer group, and seconds a delivered entry may stay unacknowledged before
#: another consumer claims it (XAUTOCLAIM: its consumer is presumed dead).
ORCHESTRATOR_REQUESTS_GROUP = env_str("ORCHESTRATOR_REQUESTS_GROUP", "orchestrator")
ORCHESTRATOR_REQUESTS_CLAIM_IDLE = env_float("ORCHESTRATOR_REQUESTS_CLAIM_IDLE", 60.0)
#: Stream mode: approximate length the responses stream is trimmed to (XADD MAXLEN ~).
ORCHESTRATOR_RESPONSES_MAXLEN = env_int("ORCHESTRATOR_RESPONSES_MAXLEN", 100_000)
#: Seconds between two reads of the status of the runs a listener waits for.
ORCHESTRATOR_REQUESTS_POLL = env_float("ORCHESTRATOR_REQUESTS_POLL", 0.5)
