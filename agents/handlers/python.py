"""``python`` steps: call an allow-listed Python callable in the worker.

Params:
    callable: dotted path ``package.module.function``; it must be listed in
        ``ORCHESTRATOR_PYTHON_CALLABLES`` (checked at load time and again at run time).
    args: list of positional arguments.
    kwargs: mapping of keyword arguments.
    Any other param is passed as a keyword argument too (``kwargs`` wins on a clash), so
    ``{callable: agents.testing.echo, x: 1}`` calls ``echo(x=1)``.

A callable with a parameter named ``ctx`` also receives the :class:`~agents.registry.StepContext`
(to watch ``ctx.deadline``, call ``ctx.trace``, or use ``ctx.idempotency_key``), with
``ctx.work_dir`` set to the run's work directory (created on first use): a callable that
touches files confines every path a workflow gives it there (``agents.workdir.confine``).
Callables that write files or list folders chosen by the workflow without that confinement
(test helpers such as ``agents.testing.flaky``) never belong on the default allow-list.

Output: the return value, which must be JSON-serializable (else a permanent StepError).
A ``StepError`` raised by the callable passes through unchanged; any other exception becomes a
transient ``StepError("ExcType: message")``. The step's timeout is enforced by
``run_with_timeout`` from outside (a thread cannot be killed: see its docstring).
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

from orchestrator_site.conf import conf

from .. import workdir
from ..registry import StepContext, StepError, StepHandler, is_expression, register

logger = logging.getLogger(__name__)

#: Params that are not passed to the callable.
RESERVED = frozenset({"callable", "args", "kwargs", "timeout"})


def allowed_callables() -> set[str]:
    """The dotted paths ``python`` steps may call (setting ORCHESTRATOR_PYTHON_CALLABLES)."""
    return set(conf.python_callables or [])


@register
class PythonHandler(StepHandler):
    """Call an allow-listed callable; see the module docstring."""

    type_name = "python"

    def validate_params(self, params: dict[str, Any]) -> None:
        """Check callable (allow-listed), args and kwargs. Raises ValueError."""
        super().validate_params(params)
        path = params.get("callable")
        if path is None:
            raise ValueError("callable is required")
        if not is_expression(path):
            if not isinstance(path, str) or "." not in path:
                raise ValueError("callable must be a dotted path such as package.module.function")
            if path not in allowed_callables():
                raise ValueError(f"callable {path!r} is not allowed (add it to ORCHESTRATOR_PYTHON_CALLABLES)")
        args, kwargs = params.get("args"), params.get("kwargs")
        if args is not None and not is_expression(args) and not isinstance(args, list):
            raise ValueError("args must be a list")
        if kwargs is not None and not is_expression(kwargs) and not isinstance(kwargs, dict):
            raise ValueError("kwargs must be a mapping")

    def run(self, ctx: StepContext) -> Any:
        """Resolve, call, check the result is JSON-serializable."""
        p = ctx.params
        path = p.get("callable")
        if not isinstance(path, str) or path not in allowed_callables():
            raise StepError(
                f"callable {path!r} is not allowed (add it to ORCHESTRATOR_PYTHON_CALLABLES)",
                permanent=True,
            )
        func = resolve(path)
        args = p.get("args") or []
        if not isinstance(args, list):
            raise StepError("args must be a list", permanent=True)
        kwargs = {k: v for k, v in p.items() if k not in RESERVED}
        extra = p.get("kwargs") or {}
        if not isinstance(extra, dict):
            raise StepError("kwargs must be a mapping", permanent=True)
        kwargs.update(extra)
        if _accepts_ctx(func):
            try:
                workdir.run_work_dir(ctx)  # the only folder the callable may touch (ctx.work_dir)
            except OSError as exc:
                raise StepError(f"cannot create the run's work directory: {exc}") from None
            kwargs["ctx"] = ctx

        try:
            result = func(*args, **kwargs)
        except StepError:
            raise
        except TypeError as exc:
            # A wrong signature cannot get better by retrying: tell it apart from a TypeError
            # raised inside the callable.
            if _is_call_mismatch(func, args, kwargs):
                raise StepError(f"{path}: {exc}", permanent=True) from None
            raise StepError(f"TypeError: {exc}") from exc
        except Exception as exc:
            logger.info("python step %s: %s raised", ctx.step_id, path, exc_info=True)
            raise StepError(f"{type(exc).__name__}: {exc}") from exc
        try:
            json.dumps(result)
        except (TypeError, ValueError) as exc:
            raise StepError(f"{path} returned a value that is not JSON-serializable: {exc}", permanent=True) from None
        return result


def resolve(path: str) -> Callable[..., Any]:
    """Import ``package.module.function`` (attributes may nest). Permanent StepError if absent."""
    # Walk back until a module imports, so "pkg.mod.Class.method" works too.
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_path, attr_path = ".".join(parts[:split]), ".".join(parts[split:])
        try:
            target: Any = importlib.import_module(module_path)
        except ModuleNotFoundError as exc:
            if exc.name and (module_path + ".").startswith(exc.name + "."):
                continue  # this prefix is not a module: try a shorter one
            raise StepError(f"cannot import {path}: {exc}", permanent=True) from None
        except Exception as exc:
            raise StepError(f"cannot import {path}: {type(exc).__name__}: {exc}", permanent=True) from None
        try:
            for attr in attr_path.split("."):
                target = getattr(target, attr)
        except AttributeError:
            raise StepError(f"cannot import {path}: no attribute {attr_path}", permanent=True) from None
        if not callable(target):
            raise StepError(f"{path} is not callable", permanent=True)
        return target
    raise StepError(f"cannot import {path}: no such module", permanent=True)


def check_call(params: dict[str, Any]) -> None:
    """Raise a permanent StepError when ``params`` cannot call their callable at all (the dry run's check).

    The arguments are built as :meth:`PythonHandler.run` builds them (``args``, the params outside
    :data:`RESERVED`, ``kwargs``, and ``ctx`` when the callable takes it) and bound to its
    signature without calling it: ``"pkg.mod.f: missing a required argument: 'audit'"``. Values
    are not checked, only names and counts. An unknown or unlisted callable is a StepError too.
    """
    path = params.get("callable")
    if not isinstance(path, str) or path not in allowed_callables():
        raise StepError(f"callable {path!r} is not allowed (add it to ORCHESTRATOR_PYTHON_CALLABLES)", permanent=True)
    func = resolve(path)
    args = params.get("args") or []
    extra = params.get("kwargs") or {}
    if not isinstance(args, list) or not isinstance(extra, dict):
        raise StepError("args must be a list and kwargs a mapping", permanent=True)
    kwargs = {k: v for k, v in params.items() if k not in RESERVED}
    kwargs.update(extra)
    if _accepts_ctx(func):
        kwargs["ctx"] = None
    try:
        inspect.signature(func).bind(*args, **kwargs)
    except TypeError as exc:
        raise StepError(f"{path}: {exc}", permanent=True) from None
    except ValueError:  # no signature to read (a builtin): the real call will tell
        return


def _accepts_ctx(func: Callable[..., Any]) -> bool:
    try:
        return "ctx" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


def _is_call_mismatch(func: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> bool:
    """True when ``func`` cannot be called with these arguments at all."""
    try:
        inspect.signature(func).bind(*args, **kwargs)
    except TypeError:
        return True
    except ValueError:
        return False
    return False
