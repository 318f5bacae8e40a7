"""Errors of the LLM router (``agents.llm``).

All of them are :class:`agents.registry.StepError` subclasses, so a step handler may let them
propagate: ``permanent`` tells the engine whether a retry can help, ``retry_after`` (seconds) is a
lower bound of the backoff delay.
"""

from __future__ import annotations

from typing import Any

from ..registry import StepError, StepTimeout

__all__ = ["BudgetExceeded", "BudgetWait", "LLMError", "LLMSchemaError", "LLMTimeout"]


class LLMError(StepError):
    """An LLM call failed on every provider tried, or was refused by one.

    Attributes (besides StepError's ``message``, ``permanent``, ``retry_after`` in seconds,
    ``http_status``, ``output``):
        code: a short machine-readable reason: ``no_provider``, ``refused`` (a 4xx other than
            429/context length: permanent), ``unavailable`` (every provider failed or was skipped
            by its circuit breaker), ``throttled`` (every provider answered 429; ``retry_after``
            is the smallest Retry-After seen), ``timeout``, ``schema`` (see LLMSchemaError),
            ``budget_exceeded`` (see BudgetExceeded), ``budget_wait`` (see BudgetWait).
        failures: one ``"<provider>: <reason>"`` line per provider tried, in order.
    """

    code = "llm_error"

    def __init__(
        self,
        message: str,
        *,
        permanent: bool = False,
        retry_after: float | None = None,
        http_status: int | None = None,
        output: Any = None,
        code: str | None = None,
        failures: list[str] | None = None,
    ) -> None:
        super().__init__(message, permanent=permanent, retry_after=retry_after, http_status=http_status, output=output)
        if code is not None:
            self.code = code
        self.failures = list(failures or [])


class LLMTimeout(LLMError, StepTimeout):
    """Every provider tried timed out (or no time was left): transient, code ``timeout``.

    Also a :class:`agents.registry.StepTimeout`, so the attempt is recorded as timed out.
    """

    code = "timeout"


class LLMSchemaError(LLMError):
    """The answer was not JSON, or did not validate against the requested schema.

    Counts as a failed attempt of the step (transient: the next attempt may answer better).

    Attributes:
        content: the raw answer text.
        errors: one line per problem (``"$.steps[0].id: 'x' is not of type 'integer'"``), at most 20.
        result: the :class:`agents.llm.LLMResult` whose content failed (usage is real and was
            charged to the budget), or None.
    """

    code = "schema"

    def __init__(self, message: str, *, content: str = "", errors: list[str] | None = None, result: Any = None):
        super().__init__(message, permanent=False)
        self.content = content
        self.errors = list(errors or [])
        self.result = result


class BudgetExceeded(LLMError):
    """The tenant's token budget (policy ``fail``) cannot cover this call: permanent.

    The message starts with ``budget_exceeded``. Attributes: ``budget_id``, ``period``
    (``day``/``month``), ``limit``, ``used``, ``reserved`` (tokens), ``resets_in`` (seconds).
    """

    code = "budget_exceeded"

    def __init__(
        self,
        message: str,
        *,
        budget_id: int | None = None,
        period: str = "",
        limit: int = 0,
        used: int = 0,
        reserved: int = 0,
        resets_in: float = 0.0,
    ) -> None:
        super().__init__(message, permanent=True)
        self.budget_id, self.period, self.limit = budget_id, period, limit
        self.used, self.reserved, self.resets_in = used, reserved, resets_in


class BudgetWait(LLMError):
    """The tenant's token budget (policy ``wait``) cannot cover this call now.

    ``seconds``: until the budget's window resets (also ``retry_after``). Not a failure of the
    attempt: the ``llm`` handler turns it into :class:`agents.registry.StepDeferred`, which the
    engine makes a wait that spends no attempt.
    """

    code = "budget_wait"

    def __init__(self, message: str, *, seconds: float, budget_id: int | None = None, period: str = "") -> None:
        super().__init__(message, permanent=False, retry_after=seconds)
        self.seconds = seconds
        self.budget_id, self.period = budget_id, period
