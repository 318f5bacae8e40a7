"""The step-handler registry: one place where step types are registered and found.

A step type is a :class:`StepHandler` subclass in its own module under ``agents/handlers/``,
decorated with :func:`register`. The registry imports every module of that package the first time
it is asked for a handler (:func:`_load`), so adding a type means adding one module.

The engine (``runs``) builds a :class:`StepContext` per attempt and calls
:func:`run_with_timeout`; a handler returns a JSON-serializable output or raises
:class:`StepError` (``permanent=True`` for failures that retrying cannot fix; Saleor's
``handle_webhook_retry`` and healthchecks' ``TransportError(permanent=...)`` are the models).

Shape after NetBox ``JobRunner`` (one abstract ``run()``) and healthchecks ``hc/api/transports.py``.
"""

from __future__ import annotations

import abc
import contextvars
import importlib
import logging
import pkgutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from .redaction import known_secrets, redact

logger = logging.getLogger(__name__)

__all__ = [
    "StepContext",
    "StepContinuation",
    "StepDeferred",
    "StepError",
    "StepHandler",
    "StepTimeout",
    "canonical_type",
    "dry_run",
    "get_handler",
    "handler_types",
    "is_expression",
    "register",
    "run_with_timeout",
]


class StepError(Exception):
    """A step attempt failed.

    Attributes:
        message: one line for the step's error field and the trace (never contains secrets).
        permanent: True when retrying cannot help (bad request, 4xx, not allow-listed...): the
            engine marks the step dead at once instead of scheduling a retry.
        retry_after: seconds the caller asked us to wait before retrying (HTTP ``Retry-After``),
            or None; the engine uses it as a lower bound of the backoff delay.
        http_status: the HTTP status code when the failure came from an HTTP response.
        output: partial output worth keeping on the step/attempt (e.g. the response body of a
            failed call, the stdout of a failed command), JSON-serializable, or None.
    """

    def __init__(
        self,
        message: str,
        permanent: bool = False,
        retry_after: float | None = None,
        http_status: int | None = None,
        output: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        self.retry_after = retry_after
        self.http_status = http_status
        self.output = output

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, permanent={self.permanent!r}, "
            f"retry_after={self.retry_after!r}, http_status={self.http_status!r})"
        )


class StepTimeout(StepError):
    """A step attempt ran out of time (transient by default: the next attempt may be faster)."""


class StepDeferred(Exception):
    """The step may not run yet and no attempt should be spent (e.g. a token budget that resets).

    Raised by a handler when a policy (not a failure) says wait: e.g. an ``llm`` step whose tenant's
    token budget (policy ``wait``) is full until its window resets. The engine hands the step back
    to ``retry_wait`` for ``seconds`` (a Celery countdown or the sweeper), as the flow-control gate
    does for a rate limit: its attempt row is closed as ``deferred`` and the attempt is not counted
    against ``max_attempts``.

    Attributes:
        seconds: how long to wait before trying again, seconds (>= 0).
        reason: one line for the step's trace and error field (never contains secrets).
    """

    def __init__(self, seconds: float, reason: str) -> None:
        super().__init__(reason)
        self.seconds = max(0.0, float(seconds))
        self.reason = reason

    def __str__(self) -> str:
        return self.reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seconds={self.seconds!r}, reason={self.reason!r})"


@dataclass
class StepContinuation:
    """A handler's output that also appends steps to its run (Temporal-style: the workflow grows as
    it runs). Returned by a handler instead of a plain output; used by agent tasks (``tasks_app``).

    The engine records ``output`` as the step's output and, in the SAME transaction that records
    the success (the run row locked first), inserts ``steps`` as new top-level step rows of the run,
    calls ``on_success()`` and queues the new steps, so the run cannot finish in between and a
    retried attempt never appends twice (runs/engine/append.py).

    Attributes:
        output: the step's output (JSON-serializable).
        steps: step specs to append: ``{"id", "type", "params", "depends_on"?, "retry"?, "timeout"?}``;
            ids must be new in the run; ``depends_on`` may name only other appended steps.
        on_success: called with no arguments inside the completion's transaction, after the
            step's success was recorded (not called when the completion is refused: the lease
            was taken over). It may write rows of its own app; it must not do slow I/O.
    """

    output: Any
    steps: list[dict[str, Any]] = field(default_factory=list)
    on_success: Callable[[], None] | None = field(default=None, repr=False)


def _no_trace(kind: str, message: str, data: dict[str, Any] | None = None) -> None:
    """Default trace callback: drop the event."""


@dataclass
class StepContext:
    """What a handler knows about the attempt it runs.

    Attributes:
        run_id: the run's UUID as a string.
        step_id: the step's id in the spec (``fetch``, or ``inspect[3]`` for an expanded row).
        step_pk: primary key of the Step row.
        attempt: attempt number, 1-based.
        params: the step's params with every expression already resolved.
        timeout: seconds this attempt may take.
        idempotency_key: stable across attempts of the same step (run id + step id); side
            effecting handlers pass it on (``X-Idempotency-Key``).
        tenant_id: the run's tenant.
        correlation_id: the run's correlation id ("" when none).
        trace: ``trace(kind, message, data=None)`` appends a Trace event to the run. Handlers call
            it through :meth:`StepHandler.trace`, which redacts known secrets first.
        deadline: ``time.monotonic()`` value after which the attempt is out of time; defaults to
            now + ``timeout`` when not given.
        work_dir: the run's work directory (absolute path), the only folder python-step
            callables may read and write (``agents.workdir``); "" until the python handler
            fills it in for a callable that takes ``ctx``.
    """

    run_id: str
    step_id: str
    step_pk: int
    attempt: int
    params: dict[str, Any]
    timeout: float
    idempotency_key: str
    tenant_id: str = ""
    correlation_id: str = ""
    trace: Callable[..., None] = field(default=_no_trace, repr=False)
    deadline: float | None = None
    work_dir: str = ""

    def __post_init__(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + self.timeout

    def remaining(self, cap: float | None = None) -> float:
        """Seconds left before the deadline (never negative), at most ``cap`` and ``timeout``."""
        assert self.deadline is not None
        left = max(0.0, self.deadline - time.monotonic())
        left = min(left, self.timeout)
        if cap is not None:
            left = min(left, cap)
        return left


def is_expression(value: Any) -> bool:
    """True for a string that still holds an unresolved ``${...}`` expression."""
    return isinstance(value, str) and "${" in value


class StepHandler(abc.ABC):
    """Base class of step handlers: one subclass per step type, registered with :func:`register`.

    Class attributes:
        type_name: the canonical type (``http``); aliases (``data``) resolve to it.
        aliases: other names accepted in workflow files.
        enforces_timeout: True when :meth:`run` bounds its own duration by ``ctx.timeout`` /
            ``ctx.deadline`` (socket timeouts, subprocess kill, bounded sleep, or it returns at
            once), so :func:`run_with_timeout` can call it in the calling thread.
        internal: True for a type only the platform itself writes into a run (the ``agent`` steps
            of an agent task): a workflow file (hand-written or generated) may not name it.
    """

    type_name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    enforces_timeout: ClassVar[bool] = False
    internal: ClassVar[bool] = False

    def validate_params(self, params: dict[str, Any]) -> None:
        """Check ``params`` at load time; raise ValueError with a short message naming the field.

        Values that are still expressions (see :func:`is_expression`) are not type-checked. The
        default accepts any mapping.
        """
        if not isinstance(params, dict):
            raise ValueError("params must be a mapping")

    @abc.abstractmethod
    def run(self, ctx: StepContext) -> Any:
        """Do the step's work and return its output (JSON-serializable).

        Raises:
            StepError: the attempt failed (``permanent`` says whether a retry can help).
            StepTimeout: the attempt ran out of time.
        """

    def trace(self, ctx: StepContext, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """Append a trace event with every known secret redacted from message and data.

        A failing trace callback is logged and ignored: losing an audit line must not turn a
        finished side effect into a failed (and retried) step.
        """
        secrets = known_secrets()
        try:
            ctx.trace(kind, redact(message, secrets), redact(data, secrets))
        except Exception:
            logger.warning("trace callback failed for step %s", ctx.step_id, exc_info=True)


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

H = TypeVar("H", bound=type[StepHandler])

_classes: dict[str, type[StepHandler]] = {}
_aliases: dict[str, str] = {}
_instances: dict[str, StepHandler] = {}
_lock = threading.RLock()
_loaded = False

#: Dry runs (``templates_app.generation.dryrun``): a function ``canonical type -> StepHandler | None``
#: that :func:`get_handler` asks first, so the real engine runs a workflow with side-effecting
#: handlers replaced by stubs. A context variable: only the code inside ``dry_run.set(...)`` (one
#: thread, one request) sees the stubs; workers and other requests never do.
dry_run: contextvars.ContextVar[Callable[[str], StepHandler | None] | None] = contextvars.ContextVar(
    "dry_run", default=None
)


def register(cls: H) -> H:
    """Class decorator: register ``cls`` under its ``type_name`` and ``aliases``.

    Raises:
        ValueError: the class has no ``type_name``, or a name is already taken by another class.
    """
    name = cls.type_name
    if not name:
        raise ValueError(f"{cls.__qualname__} has no type_name")
    with _lock:
        for key in (name, *cls.aliases):
            owner = _aliases.get(key)
            taken_by = _classes.get(owner) if owner else None
            if taken_by is not None and _qualname(taken_by) != _qualname(cls):
                raise ValueError(f"step type {key!r} is already registered by {_qualname(taken_by)}")
        _classes[name] = cls
        _instances.pop(name, None)
        _aliases[name] = name
        for alias in cls.aliases:
            _aliases[alias] = name
    return cls


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _load() -> None:
    """Import every handler module under ``agents/handlers/`` once (each registers itself).

    Modules whose name starts with ``_`` are helpers, not handlers, and are skipped.
    """
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        from . import handlers

        for info in pkgutil.iter_modules(handlers.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{handlers.__name__}.{info.name}")
        _loaded = True


def canonical_type(name: str, *, internal: bool = False) -> str:
    """The canonical step type for ``name`` (``ai`` -> ``llm``, ``data`` -> ``http``).

    Matching ignores case and surrounding spaces. ``internal`` False (workflow files): a type
    marked ``internal`` is unknown. Raises KeyError for an unknown type.
    """
    _load()
    key = name.strip().lower() if isinstance(name, str) else name
    try:
        canonical = _aliases[key]
    except (KeyError, TypeError):
        raise KeyError(f"unknown step type {name!r}") from None
    if not internal and _classes[canonical].internal:
        raise KeyError(f"unknown step type {name!r}")
    return canonical


def get_handler(type_name: str) -> StepHandler:
    """The (cached, shared) handler instance for a type or alias; KeyError when unknown.

    Inside a dry run (:data:`dry_run` set) the stub it returns for the type, if any.
    """
    canonical = canonical_type(type_name, internal=True)
    stubs = dry_run.get()
    if stubs is not None:
        stub = stubs(canonical)
        if stub is not None:
            return stub
    handler = _instances.get(canonical)
    if handler is None:
        with _lock:
            handler = _instances.get(canonical)
            if handler is None:
                handler = _instances[canonical] = _classes[canonical]()
    return handler


def handler_types() -> set[str]:
    """The canonical step types a workflow file may use (aliases and internal types not included)."""
    _load()
    return {name for name, cls in _classes.items() if not cls.internal}


# --------------------------------------------------------------------------------------------
# Running under a timeout
# --------------------------------------------------------------------------------------------


def run_with_timeout(handler: StepHandler, ctx: StepContext) -> Any:
    """Run ``handler.run(ctx)`` bounded by ``ctx.timeout`` / ``ctx.deadline``.

    A handler with ``enforces_timeout = True`` runs in the calling thread (it bounds itself).
    Any other runs in a daemon thread that the caller joins for the remaining time; when the
    time is up this raises :class:`StepTimeout` (transient) and returns.

    Python cannot kill a thread: the abandoned thread KEEPS RUNNING until its callable returns
    (its result is then dropped). That is why side-effecting or long work belongs in ``exec``
    (a killable process) or in a callable that watches ``ctx.deadline`` itself. Being a daemon
    thread, it does not keep the worker process alive at exit.

    Exceptions raised by the handler (StepError or any other) are re-raised in the caller.
    """
    if handler.enforces_timeout:
        return handler.run(ctx)

    budget = ctx.remaining()
    if budget <= 0:
        raise StepTimeout("step timed out before it started (no time left before its deadline)")
    result: dict[str, Any] = {}
    # The thread sees the caller's context variables (log correlation ids and the like).
    context = contextvars.copy_context()

    def target() -> None:
        try:
            result["value"] = context.run(handler.run, ctx)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller as is
            result["error"] = exc
        finally:
            # Django connections are per thread: close the ones this thread may have opened.
            try:
                from django.db import connections

                connections.close_all()
            except Exception:  # pragma: no cover - Django not configured
                pass

    thread = threading.Thread(target=target, name=f"step-{ctx.step_id}-{ctx.attempt}", daemon=True)
    thread.start()
    thread.join(budget)
    if thread.is_alive():
        raise StepTimeout(
            f"step timed out after {_seconds(budget)} (its thread was abandoned, still running)",
            permanent=False,
        )
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _seconds(value: float) -> str:
    """Format a duration in seconds for messages: ``1.5s``, ``30s``."""
    return f"{value:.3g}s"
