"""Settings, read from the environment.

With nothing set, the embedded default: a SQLite file under ``ORCHESTRATOR_DATA_DIR`` and an
in-memory Celery broker served by a worker inside the command's own process. Production sets
``DATABASE_URL`` (postgres://...) and ``CELERY_BROKER_URL`` (redis://...). Platform settings are
``ORCHESTRATOR_*``; README.md lists them all.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import dj_database_url

from .env import env_bool, env_float, env_int, env_list, env_str

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
    "django_celery_beat",
    "django_celery_results",
    "django_prometheus",
    "templates_app",
    "runs",
    "scheduler",
    "agents",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
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
CELERY_TASK_DEFAULT_QUEUE = env_str("ORCHESTRATOR_QUEUE", "orchestrator")
CELERY_TIMEZONE = TIME_ZONE
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# Longer than the longest step, or Redis hands an unacked message to a second worker mid-step.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env_int("ORCHESTRATOR_VISIBILITY_TIMEOUT", 3 * 3600),
}

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
#: Seconds a step may sit in `queued` before the sweeper sends its message again.
ORCHESTRATOR_REQUEUE_AFTER = env_float("ORCHESTRATOR_REQUEUE_AFTER", 300.0)
#: Seconds between sweeps (beat entry and the embedded runner's own loop).
ORCHESTRATOR_SWEEP_INTERVAL = env_float("ORCHESTRATOR_SWEEP_INTERVAL", 10.0)
#: Retry delays up to this many seconds ride on a Celery countdown; longer ones wait for the sweeper.
ORCHESTRATOR_COUNTDOWN_MAX = env_float("ORCHESTRATOR_COUNTDOWN_MAX", 60.0)
#: Worker threads of the embedded worker.
ORCHESTRATOR_EMBEDDED_CONCURRENCY = env_int("ORCHESTRATOR_EMBEDDED_CONCURRENCY", 4)
#: Dotted paths that `python` steps may call: the allow-list (extend with a comma-separated env).
ORCHESTRATOR_PYTHON_CALLABLES = [
    "templates_app.builtin_tasks.list_distributions",
    "templates_app.builtin_tasks.inspect_distributions",
    "templates_app.builtin_tasks.aggregate_audit",
    "templates_app.builtin_tasks.write_audit_report",
    "templates_app.builtin_tasks.list_subpackages",
    "templates_app.builtin_tasks.join_source_report",
    "agents.testing.echo",
    "agents.testing.fail",
    "agents.testing.flaky",
    *env_list("ORCHESTRATOR_PYTHON_CALLABLES"),
]
#: exec steps: memory limit (MiB) and largest stdout kept (bytes).
ORCHESTRATOR_EXEC_MEMORY_MB = env_int("ORCHESTRATOR_EXEC_MEMORY_MB", 1024)
ORCHESTRATOR_EXEC_MAX_OUTPUT = env_int("ORCHESTRATOR_EXEC_MAX_OUTPUT", 1_000_000)
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

CELERY_BEAT_SCHEDULE = {
    "orchestrator-sweep": {
        "task": "runs.sweep",
        "schedule": ORCHESTRATOR_SWEEP_INTERVAL,
        "options": {"expires": ORCHESTRATOR_SWEEP_INTERVAL},
    },
}

REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["stderr"], "level": env_str("ORCHESTRATOR_LOG_LEVEL", "WARNING")},
}
