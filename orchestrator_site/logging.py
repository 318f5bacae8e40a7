"""Structured logs: one JSON object per line, carrying the run, step, tenant and correlation id.

Web and worker processes log through the same configuration (``LOGGING`` in settings is built by
:func:`build_logging_config`). Three pieces:

- a context (a ``contextvars.ContextVar``) that request middleware, the API and the engine fill
  with ``request_id``, ``tenant``, ``run_id``, ``step_id``, ``correlation_id``; :class:`ContextFilter`
  copies it onto every record, so a line logged deep inside a handler still names its run;
- :class:`RedactFilter`, which masks known secrets (service token, LLM key, credentials) and
  bearer/token authorization values in the message and the traceback before any handler sees them;
- :class:`JsonFormatter` (python-json-logger) writing ``{"timestamp", "level", "logger",
  "message", "process", ...context, ...extra}``.

``ORCHESTRATOR_LOG_FORMAT=text`` switches to plain lines for local debugging.

A traceback is part of its record (the ``exc_info`` field of the one JSON line), never a line
of its own: Celery's stdout/stderr redirection (which logs every written line as a record) is off
(``CELERY_WORKER_REDIRECT_STDOUTS``), and :class:`StderrHandler` installs ``sys.excepthook`` /
``threading.excepthook`` so that an uncaught exception (beat crashing on an unmigrated database,
a command dying) is logged as one CRITICAL record instead of being printed line by line.
gunicorn logs through the same formatter (gunicorn.conf.py: ``logconfig_dict`` from
:func:`build_logging_config` with ``gunicorn=True``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter as _BaseJsonFormatter

#: Fields the context may carry, in the order they appear in a line.
CONTEXT_FIELDS = ("request_id", "tenant", "run_id", "step_id", "correlation_id", "user")

_context: ContextVar[dict[str, Any]] = ContextVar("orchestrator_log_context", default={})  # noqa: B039 - never mutated

# `Authorization: Bearer abc`, `Token abc...`: masked whatever the configured secrets are.
_AUTH_VALUE = re.compile(r"(?i)\b(bearer|token|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def current() -> dict[str, Any]:
    """The fields bound in the current context (a copy)."""
    return dict(_context.get())


def bind(**fields: Any) -> None:
    """Add ``fields`` to the current context (None values are dropped); lasts until the scope ends."""
    merged = {**_context.get(), **{k: str(v) for k, v in fields.items() if v not in (None, "")}}
    _context.set(merged)


@contextlib.contextmanager
def scope(**fields: Any) -> Iterator[None]:
    """A nested context: fields bound inside are forgotten when the block exits."""
    token = _context.set(dict(_context.get()))
    bind(**fields)
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Copy the bound context onto each record (a field given with ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _context.get().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def _known_secrets() -> list[str]:
    try:
        from agents.redaction import known_secrets

        return known_secrets()
    except Exception:  # settings or apps not ready (early start-up): nothing configured to mask yet
        return []


#: URL query strings in the lines of HTTP client loggers (an api_key credential travels there).
_URL_QUERY = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#\"'<>]*)\?[^\s#\"'<>]*")
#: Loggers that write request URLs: their lines lose the query string (agents.redaction).
URL_LOGGERS = ("httpx", "httpcore", "urllib3", "openai")


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with known secrets (in every encoding: agents.redaction.encodings) and
    authorization values replaced by ``***``."""
    secrets = secrets if secrets is not None else _known_secrets()
    try:
        from agents.redaction import redact_text as _redact_secrets

        text = _redact_secrets(text, secrets)
    except Exception:  # apps not ready (early start-up): the raw forms at least
        for secret in sorted(secrets, key=len, reverse=True):
            if len(secret) >= 4:
                text = text.replace(secret, "***")
    return _AUTH_VALUE.sub(r"\1\2***", text)


def strip_query_strings(text: str) -> str:
    """``text`` with the query string of every URL in it replaced by ``?***``."""
    return _URL_QUERY.sub(r"\1?***", text)


class RedactFilter(logging.Filter):
    """Mask secrets in the rendered message and the traceback of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = str(record.msg)
        secrets = _known_secrets()
        if record.name.split(".", 1)[0] in URL_LOGGERS:
            message = strip_query_strings(message)
        record.msg, record.args = redact_text(message, secrets), None
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text, secrets)
        return True


class JsonFormatter(_BaseJsonFormatter):
    """One JSON object per line: timestamp (UTC ISO 8601), level, logger, message, context, extras."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("timestamp", True)
        kwargs.setdefault("rename_fields", {"levelname": "level", "name": "logger"})
        super().__init__("%(levelname)s %(name)s %(message)s %(process)d", *args, **kwargs)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return redact_text(super().formatException(ei))


class TextFormatter(logging.Formatter):
    """Plain lines for a terminal: ``time level logger message [run_id=... step_id=...]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return redact_text(super().formatException(ei))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if hasattr(record, name))
        return f"{line} [{fields}]" if fields else line


def _log_uncaught(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("orchestrator.crash").critical(
        "uncaught %s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb)
    )


def _log_uncaught_in_thread(args: Any) -> None:
    if args.exc_type is SystemExit:
        return
    logging.getLogger("orchestrator.crash").critical(
        "uncaught %s in thread %s: %s",
        args.exc_type.__name__,
        getattr(args.thread, "name", "?"),
        args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def install_excepthooks() -> None:
    """Log uncaught exceptions (main thread and other threads) as one record with the traceback."""
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


class StderrHandler(logging.StreamHandler):
    """The one handler of ``LOGGING``: stderr, and uncaught exceptions logged through it
    (:func:`install_excepthooks`) so that they are one JSON record too."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        install_excepthooks()


class RequestContextMiddleware:
    """Bind a request id (the caller's ``X-Request-ID`` when sane, else a new one) for the request.

    The id is echoed in the ``X-Request-ID`` response header so a caller can quote it.
    """

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        given = request.headers.get("X-Request-ID", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        with scope(request_id=request_id):
            response = self.get_response(request)
        response["X-Request-ID"] = request_id
        return response


def build_logging_config(level: str = "INFO", fmt: str = "json", *, gunicorn: bool = False) -> dict[str, Any]:
    """The ``LOGGING`` dict: stderr, JSON (or ``fmt="text"``), context and redaction filters.

    ``gunicorn=True`` adds gunicorn's ``gunicorn.error`` (at ``level``) and ``gunicorn.access``
    (INFO: one record per request) loggers, for gunicorn's ``logconfig_dict``.
    Raises ValueError on an unknown ``fmt``.
    """
    if fmt not in ("json", "text"):
        raise ValueError(f"ORCHESTRATOR_LOG_FORMAT: expected json or text, got {fmt!r}")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "context": {"()": "orchestrator_site.logging.ContextFilter"},
            "redact": {"()": "orchestrator_site.logging.RedactFilter"},
        },
        "formatters": {
            "json": {"()": "orchestrator_site.logging.JsonFormatter"},
            "text": {"()": "orchestrator_site.logging.TextFormatter"},
        },
        "handlers": {
            "stderr": {
                "()": "orchestrator_site.logging.StderrHandler",
                "formatter": fmt,
                "filters": ["context", "redact"],
            }
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            # request errors are logged by the API's exception handler with context; keep Django's too
            "django": {"level": level, "propagate": True},
            # one INFO line per request with the full URL (query string and any key in it):
            # warnings only (RedactFilter strips query strings from what still gets through)
            **{name: {"level": "WARNING", "propagate": True} for name in URL_LOGGERS},
            **(
                {
                    "gunicorn.error": {"handlers": ["stderr"], "level": level, "propagate": False},
                    "gunicorn.access": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
                }
                if gunicorn
                else {}
            ),
        },
    }
