"""Each hot statement of the engine once, in SQL, with its portable twin beside it.

Only ``state`` calls this module (it is the writer; this is how the writes are spelled).
Profiled with py-spy on ``bench/run.py`` (W1, W2; docs/engine.md):
before this module a no-op step spent most of its worker CPU in the ORM building and compiling
the same 16 queries, not in PostgreSQL. The statements here do the same work in fewer round trips
and with no query compilation: the claim, its Attempt row and its trace are one statement (an
``UPDATE ... FROM runs_run ... RETURNING`` with two INSERTs in a CTE; the spec lookup, the
conditional update, the re-read of the step and its run and the two inserts were five queries),
closing a successful attempt is one statement (step and attempt rows), the dependents' counter
decrement returns the rows that became ready (no second SELECT), and marking steps queued and
inserting the transaction's traces share one round trip.

Semantics are the ORM code's, to the letter: the same conditions (status, lease token, attempts
below the limit) guard the same UPDATEs, so who wins a race is decided by PostgreSQL row locks
exactly as before. On other databases (the embedded SQLite mode) every function has a portable
twin written with the ORM right beside it, and the engine's test suite runs on both databases
(tests/engine_sqlite.py), so the two cannot drift.

The statements are sent with server-side binding and prepared once per connection (``_run``):
PostgreSQL no longer parses and plans them on every step, which halved its CPU per no-op step
(2.8 to 1.2 ms; README, Performance). Statements that go together (the run's lock and the
completion; marking steps queued and inserting traces) share one round trip (a psycopg pipeline).

Every function runs inside the caller's transaction (``claim_and_begin`` with ``relaxed`` is its
own) and returns model instances built with ``Model.from_db`` (field converters applied), so the
engine's other code does not change.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection, connections
from django.db.models import (
    BigIntegerField,
    BooleanField,
    CharField,
    DateTimeField,
    F,
    Field,
    FloatField,
    ForeignKey,
    IntegerField,
    Model,
    PositiveBigIntegerField,
    PositiveIntegerField,
    PositiveSmallIntegerField,
    Q,
    SmallIntegerField,
    TextField,
    UUIDField,
)

from ..choices import AttemptOutcome, StepStatus, TraceKind
from ..models import Attempt, Run, Step, Trace

__all__ = [
    "RUN_LOCK_FIELDS",
    "claim_and_begin",
    "apply_claim",
    "Close",
    "close_successes",
    "decrement_dependents",
    "decrement_parent",
    "exists",
    "FastClaim",
    "finish_check",
    "finish_run",
    "insert",
    "is_postgresql",
    "lock_run",
    "mark_queued",
    "write_batch",
]


def _run(
    statements: Sequence[tuple[str, Sequence[Any] | Mapping[str, Any] | None]],
    *,
    commit: bool = False,
    decline: int | None = None,
) -> list[list[tuple[Any, ...]] | None]:
    """Execute ``statements`` (SQL with ``%s`` or ``%(name)s`` placeholders, parameters) in the caller's
    transaction, in one network round trip; return each one's rows (``[]`` when it returns none).

    PostgreSQL only. Parameters are bound server-side (not quoted into the SQL text), and each
    statement is prepared on its first use in a connection (``ORCHESTRATOR_PREPARED_STATEMENTS``),
    so PostgreSQL parses and plans it once per connection instead of once per step: planning was
    about 0.9 ms of the 2.8 ms of PostgreSQL CPU a no-op step cost (README, Performance). Several
    statements are sent together in a psycopg pipeline (libpq pipeline mode: the server runs them
    in order and the client waits once). Errors are Django's (``django.db.OperationalError``...),
    as for any ORM query; a failing statement skips the ones after it.

    When these statements start the caller's transaction, its BEGIN goes in the same round trip
    (:func:`_begin`). ``commit``: the transaction's COMMIT goes in it too, last; only for a
    caller that writes nothing after (:func:`may_commit` says whether it may).

    ``decline``: the index of a statement that may fail with a division by zero on purpose (the
    fast chain claim's check, ``_FAST_CHECK``; never prepared), after a ``SAVEPOINT
    fast_claim`` among the statements before it. Its failure skips it and what follows (the
    COMMIT too): the transaction is rolled back to the savepoint and goes on, and its rows and
    the later ones come back as None. The ROLLBACK TO goes through libpq directly: psycopg
    forgets every prepared statement when it sees a command named ROLLBACK pass.
    """
    import psycopg

    connection.ensure_connection()
    raw = connection.connection
    prepare = raw.prepare_threshold is not None  # settings.DATABASES: ORCHESTRATOR_PREPARED_STATEMENTS
    pipelined = psycopg.Pipeline.is_supported()
    begin = _begin(raw) if pipelined else None
    around = [*([(begin, None)] if begin else []), *statements, *([("COMMIT", None)] if commit else [])]
    skipped = len(around)  # the statements from this index on did not run (a declined one)
    at = -1 if decline is None else decline + (1 if begin else 0)  # the declinable one, in ``around``
    with connection.wrap_database_errors:
        cursors = [psycopg.Cursor(raw) for _ in around]
        declined = (psycopg.errors.DivisionByZero, psycopg.errors.PipelineAborted) if decline is not None else ()
        caught: Exception | None = None
        try:
            if len(around) > 1 and pipelined:
                with raw.pipeline():
                    for i, (cursor, (sql, params)) in enumerate(zip(cursors, around, strict=True)):
                        try:  # not BEGIN, COMMIT, a declinable check
                            cursor.execute(sql, params, prepare=prepare and params is not None and i != at)
                        except declined as exc:  # the server skips the rest; leave the block quietly
                            caught = exc
                            break
            else:
                for i, (cursor, (sql, params)) in enumerate(zip(cursors, around, strict=True)):
                    cursor.execute(sql, params, prepare=prepare and params is not None and i != at)
        except declined as exc:
            caught = exc
        if caught is not None:
            if not all(_ran(cursor) for cursor in cursors[:at]):  # not the declined statement's
                raise caught
            result = raw.pgconn.exec_(b"ROLLBACK TO SAVEPOINT fast_claim")
            if result.status != _COMMAND_OK:
                raise psycopg.errors.error_from_result(result, encoding=raw.info.encoding)
            skipped = at
        # the result's status, not ``description``: that builds a Column object per column
        rows = [
            (cursor.fetchall() if _has_rows(cursor) else []) if i < skipped else None
            for i, cursor in enumerate(cursors)
        ]
        for cursor in cursors:
            cursor.close()
    return rows[1 : len(statements) + 1] if begin else rows[: len(statements)]


def _begin(raw: Any) -> str | None:
    """The BEGIN to send ahead of the statements of a round trip that starts the transaction of
    Django's outermost atomic block, or None (already in one; autocommit; other cases).

    psycopg starts a transaction, in pipeline mode, with BEGIN and a pipeline sync: a round trip
    of its own before every transaction (four round trips per chain step where two do the
    work). Sent here with the statements instead, in one round trip, the BEGIN psycopg would have
    sent (isolation level, read only, deferrable as the connection has them). For that, psycopg
    is put in autocommit mode, where it sends no BEGIN; the transaction is open all the same
    (psycopg's commit and rollback act on the server's transaction status). Django's atomic
    block sets autocommit back on at its exit, as it does anyway: only the outermost block that
    turned it off (``commit_on_exit``) qualifies."""
    from psycopg import IsolationLevel
    from psycopg.pq import TransactionStatus

    if raw.autocommit or not (connection.in_atomic_block and connection.commit_on_exit):
        return None
    if raw.pgconn.transaction_status != TransactionStatus.IDLE:
        return None
    parts = ["BEGIN"]
    if raw.isolation_level is not None:
        parts.append("ISOLATION LEVEL " + IsolationLevel(raw.isolation_level).name.replace("_", " "))
    if raw.read_only is not None:
        parts.append("READ ONLY" if raw.read_only else "READ WRITE")
    if raw.deferrable is not None:
        parts.append("DEFERRABLE" if raw.deferrable else "NOT DEFERRABLE")
    raw.autocommit = True
    return " ".join(parts)


def may_commit(starting: bool = False) -> bool:
    """Whether the caller's transaction may be committed by :func:`_run` (``commit``): PostgreSQL
    in pipeline mode, Django's outermost atomic block (no enclosing transaction, no savepoint),
    nothing marked for rollback. Django's COMMIT at the block's exit is then a no-op (psycopg
    sends none outside a transaction), and its on-commit callbacks run there as always.
    ``starting``: the round trip asked about also starts the transaction (:func:`_begin`)."""
    if not is_postgresql() or not connection.in_atomic_block or not connection.commit_on_exit:
        return False
    if connection.connection is None:
        return False
    import psycopg
    from psycopg.pq import TransactionStatus

    return (
        len(connection.atomic_blocks) == 1
        and not connection.savepoint_ids
        and not connection.needs_rollback
        and psycopg.Pipeline.is_supported()
        and connection.connection.pgconn.transaction_status
        in ((TransactionStatus.INTRANS, TransactionStatus.IDLE) if starting else (TransactionStatus.INTRANS,))
    )


def _has_rows(cursor: Any) -> bool:
    result = cursor.pgresult
    return result is not None and result.status == _TUPLES_OK


def _ran(cursor: Any) -> bool:
    """Whether the cursor's statement ran without error (a result of a successful status)."""
    result = cursor.pgresult
    return result is not None and result.status in (_COMMAND_OK, _TUPLES_OK)


_COMMAND_OK, _TUPLES_OK = 1, 2  # psycopg.pq.ExecStatus (libpq's PGRES_COMMAND_OK, PGRES_TUPLES_OK)


def is_postgresql() -> bool:
    return connection.vendor == "postgresql"


#: the Run fields a status-writing transaction reads when it locks the run (``lock_run``)
RUN_LOCK_FIELDS = (
    "id", "status", "tenant_id", "priority", "started_at", "deadline", "template_key", "inputs", "metadata",
)  # fmt: skip


def _lock_run_sql() -> tuple[str, list[Any]]:
    # in the model's field order: Model.from_db (_build) reads a partial row in that order
    fields = [f for f in Run._meta.concrete_fields if f.attname in RUN_LOCK_FIELDS]
    columns = ", ".join(f.column for f in fields)
    return f"SELECT {columns} FROM {Run._meta.db_table} WHERE id = %s FOR NO KEY UPDATE", fields


def lock_run(run_id: Any) -> Run | None:
    """``SELECT ... FOR NO KEY UPDATE`` of the run (the fields of RUN_LOCK_FIELDS, the others
    deferred). None: it is gone."""
    if not is_postgresql():
        return Run.objects.select_for_update(no_key=True).only(*RUN_LOCK_FIELDS).filter(pk=run_id).first()
    sql, fields = _lock_run_sql()
    rows = _run([(sql, [run_id])])[0]
    return _build(Run, fields, rows[0]) if rows else None


def finish_check(run_id: Any, terminal: Sequence[str]) -> tuple[Run | None, bool, list[dict[str, Any]], Any]:
    """Lock the run and read whether it is done, in one round trip on PostgreSQL.

    Returns ``(run, unfinished, rows, declared)``: the run as :func:`lock_run` reads it (None:
    gone); whether a step of it (children included) is in none of the ``terminal`` statuses; its
    top-level steps as ``{"step_id", "status", "error", "output", "dependents"}`` in id order,
    read only when none is unfinished (``[]`` otherwise: a run with many leaves is not read
    whole at each one); and its spec's declared ``outputs`` (None when not declared).
    """
    step_table = Step._meta.db_table
    if not is_postgresql():
        run = lock_run(run_id)
        if run is None:
            return None, False, [], None
        if Step.objects.filter(run_id=run_id).exclude(status__in=list(terminal)).exists():
            return run, True, [], None
        rows = list(
            Step.objects.filter(run_id=run_id, parent__isnull=True)
            .order_by("id")
            .values("step_id", "status", "error", "output", "dependents")
        )
        declared = Run.objects.filter(pk=run_id).values_list("spec", flat=True).first() or {}
        return run, False, rows, declared.get("outputs")
    lock, fields = _lock_run_sql()
    unfinished = f"SELECT 1 FROM {step_table} WHERE run_id = %s AND NOT (status = ANY(%s::text[]))"
    statements = [
        (lock, [run_id]),
        (f"SELECT EXISTS ({unfinished})", [run_id, list(terminal)]),
        (
            f"SELECT step_id, status, error, output, dependents FROM {step_table} "
            f"WHERE run_id = %s AND parent_id IS NULL AND NOT EXISTS ({unfinished}) ORDER BY id",
            [run_id, run_id, list(terminal)],
        ),
        (f"SELECT spec -> 'outputs' FROM {Run._meta.db_table} WHERE id = %s", [run_id]),
    ]
    locked, (pending,), rows, declared = _run(statements)
    if not locked:
        return None, False, [], None
    run = _build(Run, fields, locked[0])
    step_fields = [Step._meta.get_field(name) for name in ("step_id", "status", "error", "output", "dependents")]
    steps = [{f.attname: v for f, v in zip(step_fields, _values(step_fields, row), strict=True)} for row in rows]
    outputs = declared[0][0] if declared else None
    if isinstance(outputs, str):  # the JSON text (Django's jsonb loader leaves decoding to the field)
        outputs = json.loads(outputs)
    return run, bool(pending[0]), steps, outputs


def exists(model: type[Model], equal: dict[str, Any]) -> bool:
    """Whether a row of ``model`` has every field of ``equal`` (``{attname: value}``) equal to the
    value given: one prepared statement on PostgreSQL, the ORM's ``exists()`` elsewhere."""
    if not is_postgresql():
        return model.objects.filter(**equal).exists()
    where = " AND ".join(f"{model._meta.get_field(name).column} = %s" for name in equal) or "TRUE"
    sql = f"SELECT EXISTS (SELECT 1 FROM {model._meta.db_table} WHERE {where})"
    return bool(_run([(sql, list(equal.values()))])[0][0][0])


def finish_run(run_id: Any, status: str, *, outputs: Any, error: str, at: datetime, active: Sequence[str]) -> bool:
    """``UPDATE`` an ``active`` run to ``status`` with its outputs, error and finish time."""
    if not is_postgresql():
        return bool(
            Run.objects.filter(pk=run_id, status__in=list(active)).update(
                status=status, finished_at=at, outputs=outputs, error=error
            )
        )
    sql = (
        f"UPDATE {Run._meta.db_table} SET status = %s, finished_at = %s, outputs = %s::jsonb, error = %s "
        "WHERE id = %s AND status = ANY(%s::text[]) RETURNING 1"
    )
    return bool(_run([(sql, [status, at, json.dumps(outputs), error, run_id, list(active)])])[0])


def _columns(model: type[Model], exclude: Sequence[str] = ()) -> list[Any]:
    return [f for f in model._meta.concrete_fields if f.attname not in exclude]


@functools.cache
def _step_fields() -> list[Any]:
    """All of Step's columns, in model order (what a decrement returns)."""
    return _columns(Step)


def _values(fields: list[Any], values: Sequence[Any]) -> list[Any]:
    """Raw column values with the fields' converters applied (as the ORM's iterator does)."""
    converted = []
    for f, value in zip(fields, values, strict=True):
        if value is not None and hasattr(f, "from_db_value"):
            value = f.from_db_value(value, None, connection)
        converted.append(value)
    return converted


def _build(model: type[Model], fields: list[Any], values: Sequence[Any]) -> Any:
    """A model instance from raw column values, converters applied. ``fields`` in the model's
    field order (``Model.from_db`` places a partial row by that order); the others are deferred."""
    return model.from_db(connection.alias, [f.attname for f in fields], _values(fields, values))


def step_timeout(spec: dict[str, Any], default_timeout: float) -> float:
    """Seconds a step may run: its spec's ``timeout``, else ``default_timeout`` (0 counts as unset).

    The lease is this plus the grace. Portable twin of the claim's SQL expression
    ``COALESCE(NULLIF((spec ->> 'timeout')::float8, 0), default)``.
    """
    return float(spec.get("timeout") or default_timeout)


def _claim_orm(
    step_pk: int,
    token: uuid.UUID,
    now: datetime,
    worker: str,
    default_timeout: float,
    grace: float,
    inputs_known: Sequence[uuid.UUID],
) -> tuple[Step, Run] | None:
    from datetime import timedelta

    spec = Step.objects.filter(pk=step_pk).values_list("spec", flat=True).first()
    if spec is None:
        return None
    timeout = step_timeout(spec, default_timeout)
    claimed = (
        Step.objects.filter(pk=step_pk)
        .filter(Q(status=StepStatus.QUEUED) | Q(status=StepStatus.RETRY_WAIT, next_attempt_at__lte=now))
        .filter(attempts__lt=F("max_attempts"))
        .update(
            status=StepStatus.RUNNING,
            attempts=F("attempts") + 1,
            lease_token=token,
            lease_expires_at=now + timedelta(seconds=timeout + grace),
            worker=worker,
            next_attempt_at=None,
            started_at=now,
        )
    )
    if not claimed:
        return None
    if not inputs_known:  # the common case (small inputs are never held): one query, as before
        step = Step.objects.select_related("run").defer("run__spec").get(pk=step_pk)
        return step, step.run
    step = Step.objects.select_related("run").defer("run__spec", "run__inputs").get(pk=step_pk)
    if step.run_id not in inputs_known:
        step.run.inputs = Run.objects.filter(pk=step.run_id).values_list("inputs", flat=True).get()
    else:
        step.run.inputs = None  # the caller holds them (state.InputsCache)
    return step, step.run


def _insert_select(model: type[Model], exprs: dict[str, tuple[str, list[Any]]]) -> tuple[str, list[Any]]:
    """``INSERT INTO <model> (cols) SELECT <exprs>`` parts for a CTE: SQL and its parameters.

    ``exprs`` maps attnames to (SQL expression, params); every other column gets its Python
    default (as the ORM would insert it), so a column added later with a default still works.
    Its callers build their statements once per process (``_claim_statement``,
    ``_close_template``), which would freeze a callable default: one raises TypeError.
    """
    columns, values, params = [], [], []
    for f in model._meta.concrete_fields:
        if f.primary_key:
            continue
        columns.append(f.column)
        if f.attname in exprs:
            sql, extra = exprs[f.attname]
            values.append(sql)
            params.extend(extra)
        else:
            if f.has_default() and callable(f.default):
                raise TypeError(f"{model.__name__}.{f.attname} has a callable default: set it in the statement")
            values.append("%s")
            params.append(f.get_db_prep_save(f.get_default(), connection))
    return f"INSERT INTO {model._meta.db_table} ({', '.join(columns)}) SELECT {', '.join(values)}", params


#: The "running" trace message, built in SQL: "step '<id>' running (attempt <n>/<max>)".
_RUNNING_MESSAGE = "'step ''' || c.step_id || ''' running (attempt ' || c.attempts || '/' || c.max_attempts || ')'"
#: the cascade's trace of a step it decided to run (runs/engine/cascade.py ``_decide_one``)
_QUEUED_MESSAGE = "'step ''' || c.step_id || ''' queued'"


@dataclass(frozen=True)
class _Slot:
    """A parameter of a cached statement filled at each call (``%(name)s``: :func:`_named`)."""

    name: str


@functools.cache
def _reuse_fields() -> list[Any]:
    """The Step columns a claim writes (returned to a caller that holds the rest: ``reuse``)."""
    names = {"status", "attempts", "lease_token", "lease_expires_at", "worker", "next_attempt_at"}
    names |= {"started_at", "queued_at"}
    return [f for f in Step._meta.concrete_fields if f.attname in names]


@functools.cache
def _claim_statement(
    relaxed: bool, known: bool, decided: bool, reuse: bool, fast: str | None = None
) -> tuple[str, dict[str, Any], list[Any], list[Any]]:
    """:func:`claim_and_begin`'s statement, built once per process: (SQL with named
    placeholders, its constant parameters, step fields, run fields; :func:`_named`). Building
    it per claim was 2 % of a worker's CPU (py-spy, bench W6). The Attempt and Trace columns it
    does not set get their defaults here, once (:func:`_insert_select`).

    ``fast`` = the cascade's "plain step" predicate over ``ready``: the chain claim of
    :func:`close_successes` (:class:`FastClaim`; ``decided`` and ``reuse`` only). The step is
    not named by the caller: it is the completed step's one dependent (``%(dependent)s``) of the
    run (``%(run_id)s``), when its decrement made it ready and the predicate holds for it;
    else nothing is claimed, and ``_FAST_CHECK`` then fails (the cascade must decide). One row
    always (NULLs when nothing was claimed). Its traces are the step's "queued" then "running"
    (one INSERT, in that order)."""
    from ..choices import RUN_TERMINAL

    step_fields = _columns(Step)
    run_fields = _columns(Run, exclude=("spec",))
    step_table, run_table = Step._meta.db_table, Run._meta.db_table
    terminal = sorted(str(s) for s in RUN_TERMINAL)
    known = known and not reuse  # a reused run's inputs are not read at all
    token, now, worker = _Slot("token"), _Slot("now"), _Slot("worker")
    # a run's inputs (a map's items, say: kilobytes) are read, detoasted, sent and decoded only
    # for a run the caller does not hold them of (they never change once the run is created)
    claim_returning = ", ".join(
        [f"s.{f.column}" for f in step_fields]
        + [
            f"CASE WHEN r.id = ANY(%s::uuid[]) THEN NULL ELSE r.{f.column} END AS r_{f.column}"
            if f.attname == "inputs" and known
            else f"r.{f.column} AS r_{f.column}"
            for f in run_fields
        ]
    )
    if reuse:  # what the Attempt and trace need, what a claim writes, the run's status
        needed = {"id", "run_id", "step_id", "attempts", "max_attempts", "spec"}
        needed |= {f.attname for f in _reuse_fields()}
        claim_returning = ", ".join(
            [f"s.{f.column}" for f in step_fields if f.attname in needed] + ["r.status AS r_status"]
        )
    # decided: a pending step its completion's cascade has just decided to run (claim_inline),
    # queued and claimed in one update instead of two
    claimable = (
        ("s.status = %s AND s.pending_deps = 0", [StepStatus.PENDING])
        if decided
        else (
            "(s.status = %s OR (s.status = %s AND s.next_attempt_at <= %s))",
            [StepStatus.QUEUED, StepStatus.RETRY_WAIT, now],
        )
    )
    claim_sql = (
        f"UPDATE {step_table} AS s SET status = %s, attempts = s.attempts + 1, lease_token = %s, "
        "lease_expires_at = %s + make_interval(secs => "
        "COALESCE(NULLIF((s.spec ->> 'timeout')::float8, 0), %s) + %s), "
        "worker = %s, next_attempt_at = NULL, started_at = %s"
        + (", queued_at = %s " if decided else " ")
        + f"FROM {run_table} AS r "
        + ("WHERE s.id = (SELECT id FROM pick) " if fast else "WHERE s.id = %s ")
        + "AND r.id = s.run_id AND s.attempts < s.max_attempts "
        f"AND {claimable[0]} "
        f"RETURNING {claim_returning}"
    )
    claim_params = [
        StepStatus.RUNNING, token, now, _Slot("default_timeout"), _Slot("grace"), worker, now,
        *([now] if decided else []), *([] if fast else [_Slot("step_pk")]), *claimable[1],
        *([_Slot("inputs_known")] if known else []),
    ]  # fmt: skip
    pick_sql, pick_params = "", []
    if fast:
        # the completed step's dependent, when its decrement (earlier in the same transaction)
        # made it ready: claimed when it is plain
        pick_sql = (
            f"ready AS (SELECT x.id, x.run_id, x.type, x.spec, x.depends_on FROM {step_table} x "
            "WHERE x.run_id = %s AND x.parent_id IS NULL AND x.step_id = %s "
            "AND x.status = %s AND x.pending_deps = 0), "
            f"pick AS (SELECT CASE WHEN bool_and({fast}) THEN min(ready.id) END AS id FROM ready), "
        )
        pick_params = [_Slot("run_id"), _Slot("dependent"), StepStatus.PENDING]
    # the same test as gate.gated(): a declaration that is present and not null, on a step that
    # is not a map step (whose declarations are its children's)
    begin_if = (
        "FROM c WHERE c.r_status <> ALL(%s) AND ("
        "(COALESCE(jsonb_typeof(c.spec -> 'rate_limit'), 'null') = 'null' "
        "AND COALESCE(jsonb_typeof(c.spec -> 'concurrency'), 'null') = 'null') "
        "OR COALESCE(jsonb_typeof(c.spec -> 'for_each'), 'null') <> 'null')"
    )
    attempt_exprs = {
        "step_id": ("c.id", []),
        "run_id": ("c.run_id", []),
        "number": ("c.attempts", []),
        "worker": ("%s", [worker]),
        "lease_token": ("%s", [token]),
        "task_id": ("%s", [_Slot("task_id")]),
        "outcome": ("%s", [AttemptOutcome.RUNNING]),
        "started_at": ("%s", [now]),
    }
    trace_exprs = {
        "run_id": ("c.run_id", []),
        "step_row_id": ("c.id", []),
        "attempt": ("c.attempts", []),
        "kind": ("%s", ["state"]),
        "message": (_RUNNING_MESSAGE, []),
        "data": ("jsonb_build_object('worker', %s::text)", [worker]),
        "created_at": ("%s", [now]),
    }
    trace_from = ""
    if fast:  # the cascade's "queued" trace (k.n = 1), then the claim's "running" one (k.n = 2)
        trace_exprs.update(
            attempt=("CASE k.n WHEN 1 THEN NULL ELSE c.attempts END", []),
            message=(f"CASE k.n WHEN 1 THEN {_QUEUED_MESSAGE} ELSE {_RUNNING_MESSAGE} END", []),
            data=("CASE k.n WHEN 1 THEN NULL ELSE jsonb_build_object('worker', %s::text) END", [worker]),
        )
        trace_from = " CROSS JOIN (VALUES (1), (2)) AS k(n)"
    attempt_sql, attempt_params = _insert_select(Attempt, attempt_exprs)
    trace_sql, trace_params = _insert_select(Trace, trace_exprs)
    trace_if = begin_if.replace("FROM c ", f"FROM c{trace_from} ", 1) + (" ORDER BY k.n" if fast else "")
    # fast: one row always (NULLs when nothing was claimed), and the transaction-local setting
    # _FAST_CHECK reads: whether a ready dependent is left for the cascade
    flag = (
        ", flag AS (SELECT set_config('orchestrator.fast_claim_left', CASE WHEN (SELECT count(*) FROM ready) "
        "> (SELECT count(*) FROM c) THEN '1' ELSE '0' END, true) AS v) "
        if fast
        else " "
    )
    # relaxed: the statement is its own transaction, and set_config(..., true) is that
    # transaction's SET LOCAL (one statement, so it can be prepared)
    sql = (
        f"WITH {pick_sql}c AS ({claim_sql}), "
        f"a AS ({attempt_sql} {begin_if} RETURNING 1), "
        f"t AS ({trace_sql} {trace_if} RETURNING 1){flag}"
        + ("SELECT " + ", ".join(f"c.{f.column}" for f in _reuse_fields()) + ", c.r_status" if reuse else "SELECT c.*")
        + ", (SELECT count(*) FROM a)"
        + (", set_config('synchronous_commit', 'off', true)" if relaxed else "")
        + (" FROM flag LEFT JOIN c ON TRUE" if fast else " FROM c")
    )
    params = pick_params + claim_params + attempt_params + [terminal] + trace_params + [terminal]
    sql, constants = _named(sql, params)
    return sql, constants, step_fields, run_fields


#: After the fast chain claim: fails (division by zero) when it left a ready dependent for the
#: cascade (its transaction-local flag), else selects 1. Sent unprepared (``_run``'s
#: ``decline``): a prepared statement that fails leaves psycopg's cache, and its server-side
#: copy would stay behind at each failure.
_FAST_CHECK = "SELECT 1 / (1 - current_setting('orchestrator.fast_claim_left')::int)"


def _named(sql: str, params: list[Any]) -> tuple[str, dict[str, Any]]:
    """A cached statement with ``%s`` placeholders made one with named ones: each :class:`_Slot`
    becomes ``%(name)s`` (a name used twice is sent once), each constant a literal (None, bools,
    ints, strings, lists of strings: the engine's own statuses and column defaults, never a
    user's value) or, lacking one, a named constant. Returns (SQL, {name: constant}); a call
    adds its slots' values. psycopg dumps every parameter at every execution: the claim's 27
    (8 distinct values) were the largest part of its client-side cost after the round trip."""
    parts = sql.split("%s")
    if len(parts) != len(params) + 1:
        raise ValueError(f"_named: {len(parts) - 1} placeholders for {len(params)} parameters")
    text, constants = [parts[0]], {}
    for param, part in zip(params, parts[1:], strict=True):
        literal = None if isinstance(param, _Slot) else _literal(param)
        if isinstance(param, _Slot):
            text.append(f"%({param.name})s")
        elif literal is not None:
            text.append(literal.replace("%", "%%"))
        else:
            name = f"c{len(constants)}"
            constants[name] = param
            text.append(f"%({name})s")
        text.append(part)  # its own "%%" stay: the same escape in both styles
    return "".join(text), constants


def _literal(value: Any) -> str | None:
    """SQL literal text for a constant, or None when it has none here (it stays a parameter)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, str):
        return "'" + str(value).replace("'", "''") + "'"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "ARRAY[" + ", ".join(_literal(v) or "" for v in value) + "]::text[]" if value else "'{}'::text[]"
    return None


def claim_and_begin(
    step_pk: int,
    token: uuid.UUID,
    now: datetime,
    worker: str,
    task_id: str,
    default_timeout: float,
    grace: float,
    relaxed: bool,
    writes: tuple[list[int], list[Trace]] | None = None,
    inputs_known: Sequence[uuid.UUID] = (),
    decided: bool = False,
    reuse: tuple[Step, Run] | None = None,
    commit: bool = False,
) -> tuple[Step, Run, bool] | None:
    """Claim a step under a lease, and in the same statement write its Attempt row and trace.

    The claim: a step that is queued, or retry_wait and due, with attempts below its limit, is
    set running with attempts + 1, ``lease_token`` = ``token`` and ``lease_expires_at`` = now +
    its timeout (spec ``timeout`` seconds, else ``default_timeout``) + ``grace``. A duplicate or
    late message (step gone, taken, finished, not due) claims nothing.

    One prepared statement on PostgreSQL (:func:`_run`). With ``relaxed`` (the caller is not in a
    transaction) the statement is its own transaction and commits without waiting for the WAL
    flush (``set_config('synchronous_commit', 'off', true)`` in its SELECT list: that
    transaction's ``SET LOCAL``). That is safe for a claim, and only for a claim:
    losing it in a database crash costs nothing a flushed claim would have saved. If the
    database crashes after the claim and before the completion, the step is recovered either
    way (a lost claim leaves it ``queued``, re-sent by the sweeper; a kept one leaves it
    ``running``, recovered when its lease expires), and the completion, whose commit is
    flushed, flushes the claim's WAL before its own (WAL is sequential). It saves one disk flush
    per step (0.2-2 ms on the bench machine). Completions and accepted runs always wait for it.

    The Attempt and trace rows are written only when the run is still active
    and the step has no flow-control keys (``rate_limit``, ``concurrency``); the returned flag
    says whether they were, else the caller does that part itself (gate, cancellation).
    Returns ``(step, run, begun)`` (the run without its spec), or None when nothing was claimed.
    Other databases: the ORM claim, begun False.

    ``writes``: steps to mark queued and traces to insert first, as :func:`write_batch` (a
    completion claiming a step it made ready: one round trip for both, pipelined).

    ``inputs_known``: ids of runs whose ``inputs`` the caller holds already (state.InputsCache);
    for those the returned run's ``inputs`` is None instead of the column.

    ``decided``: the step is ``pending`` with no upstream left, and the caller's transaction has
    just decided to run it (a completion's cascade, ``attempts.claim_inline``): it is queued
    (``queued_at``) and claimed in the same update. A step's status is indexed, so each update
    of it writes every index: this saves one such update per inline step.

    ``reuse``: the caller's instances of the step and of its run, current but for what a claim
    changes (an inline claim: the completion's decrement returned the step's row, and the run is
    the completed step's): only the claim's columns and the run's status are returned, and set
    on them, instead of both whole rows (their JSON decoded again, 47 columns). PostgreSQL only.

    ``commit``: the caller's transaction is committed in the same round trip, after the claim
    (:func:`may_commit` must have said it may; the caller writes nothing after: an inline claim
    is a completion's last write), so the COMMIT costs no round trip of its own. A
    ``decided`` claim cannot take nothing: the caller's decrement holds the step's row lock and
    saw it pending with no upstream left, and a pending step always has an attempt left
    (``state.reset_step`` raises the limit). Were it to, the caller queues the step and sends
    its message at once, in a transaction of its own (``attempts.claim_inline``).
    """
    pks, traces = writes or ([], [])
    if not is_postgresql():
        write_batch(pks, now, traces)
        if decided:
            write_batch([step_pk], now, [])
        claimed = _claim_orm(step_pk, token, now, worker, default_timeout, grace, inputs_known)
        return (*claimed, False) if claimed else None
    sql, constants, step_fields, run_fields = _claim_statement(relaxed, bool(inputs_known), decided, reuse is not None)
    params = {
        **constants,
        "token": token, "now": now, "default_timeout": float(default_timeout), "grace": float(grace),
        "worker": worker, "step_pk": step_pk, "inputs_known": list(inputs_known), "task_id": task_id[:255],
    }  # fmt: skip
    rows = _run([*_batch_statements(pks, now, traces), (sql, params)], commit=commit)[-1]
    if not rows:
        return None
    row = rows[0]
    if reuse is not None:
        return apply_claim(row, *reuse)
    step = _build(Step, step_fields, row[: len(step_fields)])
    run = _build(Run, run_fields, row[len(step_fields) : len(step_fields) + len(run_fields)])
    step.run = run
    return step, run, bool(row[len(step_fields) + len(run_fields)])


@dataclass
class Close:
    """One successful attempt to record (:func:`close_successes`): ``output_json``/``input_json``
    are JSON texts (already produced by the caller's JSON round trip), ``duration_ms`` in ms,
    ``message`` its "succeeded" trace's (a ``state`` trace at the close's time), ``decrement``:
    count its dependents down too."""

    step: Step
    token: uuid.UUID
    output_json: str
    input_json: str
    duration_ms: int
    message: str
    decrement: bool


def apply_claim(row: tuple[Any, ...], step: Step, run: Run) -> tuple[Step, Run, bool]:
    """Set what a claim with ``reuse`` returned (``row``: its columns, the run's status, the
    Attempt count) on the caller's ``step`` and ``run``; returns ``(step, run, begun)``."""
    fields = _reuse_fields()
    for f, value in zip(fields, _values(fields, row[: len(fields)]), strict=True):
        setattr(step, f.attname, value)
    run.status = row[len(fields)]
    step.run = run
    return step, run, bool(row[len(fields) + 1])


@dataclass
class FastClaim:
    """A completion's request to claim the next step of a chain in its first round trip and to
    commit there (:func:`close_successes`, ``fast``).

    In: the claim's lease ``token``, ``worker`` and ``task_id``, the step timeout and lease
    grace (seconds) as :func:`claim_and_begin` takes them, and ``plain``: the cascade's SQL test
    of a step it would queue and claim with nothing to evaluate (``cascade.PLAIN_STEP_SQL``, over
    the columns of ``ready``); ``now``, the claim's time, is the close's (set by
    ``state.close_successes``: the next step starts when this one finished). Out: ``committed`` (the
    transaction is over: nothing was ready, or the one ready step was claimed) and ``row``: the
    claim's row as :func:`claim_and_begin` returns it with ``reuse`` (None: nothing claimed).
    Not committed: the cascade decides, in the same transaction, as without it."""

    token: uuid.UUID
    worker: str
    task_id: str
    default_timeout: float
    grace: float
    plain: str
    now: datetime | None = None
    committed: bool = False
    row: tuple[Any, ...] | None = None


def close_successes(
    run_id: Any, closes: Sequence[Close], now: datetime, *, shared: bool = False, fast: FastClaim | None = None
) -> list[tuple[bool, list[Step] | None]]:
    """Record successful attempts of steps of run ``run_id``: each step succeeded (output,
    input), its Attempt row closed, its trace inserted, and with ``decrement`` its dependents'
    counters counted down (:func:`decrement_dependents`).

    Each only while its step is still running under its lease token; per item, in order,
    ``(False, None)`` when the lease was taken over (or the step cancelled) and nothing of it was
    written, else ``(True, ready)``: the dependents that reached zero (whole rows, id order), None
    without ``decrement``.

    One round trip on PostgreSQL, in a pipeline: the run's lock first (``FOR NO KEY UPDATE``: the
    engine's one lock order, the run before its steps, runs/engine/state.py), then per item step,
    attempt and trace in one statement, then the decrement, which acts only when the statement
    before closed this attempt (its Attempt row, found by lease token, is now ``succeeded``). A
    completion used to take four round trips for the same writes; a group of completions
    (worker.Group) shares the lock, the round trip and the commit.

    ``shared``: the run's lock is ``FOR SHARE`` instead, which other shared completions hold at
    the same time and every writer of the exclusive one waits for (runs/engine/state.py, "Shared
    completions"). SQLite has one writer at a time and ignores it.

    ``fast`` (one close with its decrement, of a step with one dependent: a chain link; Django's
    outermost atomic block on PostgreSQL; else ignored): after the decrement, in the same round
    trip, a savepoint, the fast chain claim (:func:`_claim_statement`, ``fast``), its check and
    the COMMIT.
    A chain step then waits on PostgreSQL once instead of twice. See :class:`FastClaim`.
    """
    if not is_postgresql():
        Run.objects.select_for_update(no_key=True).filter(pk=run_id).values_list("pk").first()
        return [_close_orm(close, now) for close in closes]
    mode = "SHARE" if shared else "NO KEY UPDATE"
    lock = f"SELECT 1 FROM {Run._meta.db_table} WHERE id = %s FOR {mode}"
    statements: list[tuple[str, Sequence[Any] | Mapping[str, Any] | None]] = [(lock, [run_id])]
    where: list[tuple[int, int | None]] = []  # per item: index of its close, of its decrement
    for close in closes:
        statements.append(_close_statement(close, now))
        at = len(statements) - 1
        if close.decrement:
            statements.append(_decrement_dependents(close.step, close.token))
        where.append((at, len(statements) - 1 if close.decrement else None))
    names = list(closes[0].step.dependents) if closes else []
    if fast is not None and not (
        len(closes) == 1 and closes[0].decrement and len(names) == 1 and may_commit(starting=True)
    ):  # a chain link: one dependent
        fast = None
    if fast is not None:
        sql, constants, _s, _r = _claim_statement(False, False, True, True, fast.plain)
        params = {
            **constants,
            "run_id": run_id, "token": fast.token, "now": fast.now, "worker": fast.worker[:200],
            "task_id": fast.task_id[:255], "default_timeout": float(fast.default_timeout),
            "grace": float(fast.grace), "dependent": names[0],
        }  # fmt: skip
        statements += [("SAVEPOINT fast_claim", None), (sql, params), (_FAST_CHECK, ())]
    rows = _run(statements, commit=fast is not None, decline=len(statements) - 1 if fast is not None else None)
    if fast is not None and rows[-1] is not None:
        claimed = rows[-2][0]
        fast.committed, fast.row = True, (claimed if claimed[0] is not None else None)
    out: list[tuple[bool, list[Step] | None]] = []
    for at, decremented in where:
        if not rows[at][0][0]:
            out.append((False, None))
        else:
            out.append((True, _ready(rows[decremented]) if decremented is not None else None))
    return out


def _close_statement(close: Close, now: datetime) -> tuple[str, dict[str, Any]]:
    sql, constants = _close_template()
    step = close.step
    return sql, {
        **constants,
        "output": close.output_json, "input": close.input_json, "now": now, "step_pk": step.pk,
        "token": close.token, "duration_ms": close.duration_ms, "run_id": step.run_id,
        "attempt": step.attempts, "message": close.message,
    }  # fmt: skip


@functools.cache
def _close_template() -> tuple[str, dict[str, Any]]:
    """:func:`_close_statement`'s SQL (named placeholders) and constants, built once per process."""
    slot = _Slot
    trace_sql, trace_params = _insert_select(
        Trace,
        {
            "run_id": ("%s", [slot("run_id")]),
            "step_row_id": ("%s", [slot("step_pk")]),
            "attempt": ("%s", [slot("attempt")]),
            "kind": ("%s", [TraceKind.STATE]),
            "message": ("%s", [slot("message")]),
            "created_at": ("%s", [slot("now")]),
        },
    )
    sql = (
        f"WITH s AS (UPDATE {Step._meta.db_table} SET status = %s, output = %s::jsonb, input = %s::jsonb, "
        "error = '', finished_at = %s, lease_token = NULL, lease_expires_at = NULL "
        "WHERE id = %s AND status = %s AND lease_token = %s RETURNING id), "
        f"a AS (UPDATE {Attempt._meta.db_table} SET outcome = %s, finished_at = %s, duration_ms = %s "
        "WHERE step_id = %s AND number = %s AND lease_token = %s AND EXISTS (SELECT 1 FROM s) RETURNING 1), "
        f"t AS ({trace_sql} WHERE EXISTS (SELECT 1 FROM s) RETURNING 1) "
        "SELECT (SELECT count(*) FROM s)"
    )
    params = [
        StepStatus.SUCCEEDED, slot("output"), slot("input"), slot("now"), slot("step_pk"), StepStatus.RUNNING,
        slot("token"), AttemptOutcome.SUCCEEDED, slot("now"), slot("duration_ms"), slot("step_pk"), slot("attempt"),
        slot("token"),
        *trace_params,
    ]  # fmt: skip
    return _named(sql, params)


def _close_orm(close: Close, now: datetime) -> tuple[bool, list[Step] | None]:
    """:func:`close_successes` for one item, with the ORM (the caller holds the run's lock)."""
    step = close.step
    if not Step.objects.filter(pk=step.pk, status=StepStatus.RUNNING, lease_token=close.token).update(
        status=StepStatus.SUCCEEDED,
        output=json.loads(close.output_json),
        input=json.loads(close.input_json),
        error="",
        finished_at=now,
        lease_token=None,
        lease_expires_at=None,
    ):
        return False, None
    Attempt.objects.filter(step=step, lease_token=close.token).update(
        outcome=AttemptOutcome.SUCCEEDED, finished_at=now, duration_ms=close.duration_ms
    )
    Trace.objects.create(
        run_id=step.run_id,
        step_row_id=step.pk,
        attempt=step.attempts,
        kind=TraceKind.STATE,
        message=close.message,
        created_at=now,
    )
    return True, (decrement_dependents(step) if close.decrement else None)


def decrement_parent(parent_pk: int, count: int = 1) -> int:
    """Decrement a map parent's ``pending_children`` by ``count`` (children that finished in the
    same transaction); return the new count (-1: no such row)."""
    sql = (
        f"UPDATE {Step._meta.db_table} SET pending_children = pending_children - %s "
        "WHERE id = %s RETURNING pending_children"
    )
    if not is_postgresql():
        with connection.cursor() as cursor:
            cursor.execute(sql, [count, parent_pk])
            row = cursor.fetchone()
        return row[0] if row else -1
    rows = _run([(sql, [count, parent_pk])])[0]
    return rows[0][0] if rows else -1


def decrement_dependents(step: Step) -> list[Step]:
    """Decrement ``pending_deps`` of ``step``'s dependents; return those that reached zero.

    One ``UPDATE ... RETURNING`` of the whole rows of those that reached zero (PostgreSQL). The
    rows are locked in id order first, so two
    completions sharing dependents cannot deadlock, and the row lock serializes the decrements:
    exactly one completion sees a dependent reach zero.
    """
    names = list(step.dependents)
    table = Step._meta.db_table
    placeholders = ", ".join(["%s"] * len(names))
    if not is_postgresql():
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {table} SET pending_deps = pending_deps - 1 "
                f"WHERE run_id = %s AND parent_id IS NULL AND step_id IN ({placeholders}) RETURNING id, pending_deps",
                [step.run_id.hex, *names],
            )
            ready = [pk for pk, pending in cursor.fetchall() if pending == 0]
        return list(Step.objects.filter(pk__in=ready).order_by("id")) if ready else []
    return _ready(_run([_decrement_dependents(step)])[0])


def _decrement_dependents(step: Step, closed_by: uuid.UUID | None = None) -> tuple[str, dict[str, Any]]:
    """The PostgreSQL statement of :func:`decrement_dependents`. ``closed_by``: a lease token;
    nothing is decremented unless the step's attempt under it (number ``step.attempts``) is
    closed ``succeeded`` (a completion's decrement in the pipeline after its close). The
    attempt is found by its unique (step, number) index: a plan that chose the outcome index
    read every succeeded attempt in the table, each completion slower than the one before."""
    names = list(step.dependents)
    arity = len(names) if len(names) <= _DECREMENT_ARITIES else 0
    sql, constants = _decrement_template(closed_by is not None, arity)
    params = {**constants, "run_id": step.run_id}
    if arity:
        params.update((f"name{i}", name) for i, name in enumerate(names))
    else:
        params["names"] = names
    if closed_by is not None:
        params.update(step_pk=step.pk, attempt=step.attempts, token=closed_by)
    return sql, params


#: up to this many dependents, the decrement names each in a parameter of its own (a statement
#: per count); more, in one array parameter
_DECREMENT_ARITIES = 8


@functools.cache
def _decrement_template(guarded: bool, arity: int) -> tuple[str, dict[str, Any]]:
    """:func:`_decrement_dependents`'s SQL (named placeholders) and constants, once per process.

    ``arity``: the number of dependents, each a parameter of its own (``step_id IN (%s, %s)``),
    or 0: one array parameter (``step_id = ANY(%s)``). PostgreSQL's generic plan of a prepared
    statement assumes ten elements in an array parameter and so looks dearer than the plan made
    for each call's values, so it made a new plan at each call: 0.22 ms of a chain step's
    0.5 ms in this statement (server log, ``log_min_duration_statement``, on a bench database
    never analyzed: plans follow the statistics). With one parameter per name the generic plan
    is kept and the statement planned once per connection.
    """
    table = Step._meta.db_table
    guard, guard_params = "", []
    if guarded:
        guard = (
            f" AND EXISTS (SELECT 1 FROM {Attempt._meta.db_table} WHERE step_id = %s AND number = %s "
            "AND lease_token = %s AND outcome = %s)"
        )
        guard_params = [_Slot("step_pk"), _Slot("attempt"), _Slot("token"), AttemptOutcome.SUCCEEDED]
    returning = ", ".join(f"{table}.{f.column}" for f in _step_fields())  # what _ready reads
    # for a step that reached zero, how many of its upstream steps are not succeeded (as this
    # statement's snapshot sees them): 0 lets the cascade's all_success check skip its read
    unsucceeded = (
        f"CASE WHEN {table}.pending_deps = 0 THEN (SELECT count(*) FROM {table} d WHERE d.run_id = {table}.run_id "
        f"AND d.parent_id IS NULL AND d.step_id = ANY(ARRAY(SELECT jsonb_array_elements_text({table}.depends_on))) "
        "AND d.status <> %s) END"
    )
    # only the rows that reached zero come back: the others' rows (their spec's JSON, most of
    # all) were sent and decoded to be dropped (a lattice's completion counts two dependents down
    # and makes one ready, most often)
    if arity:
        match, names = f"step_id IN ({', '.join(['%s'] * arity)})", [_Slot(f"name{i}") for i in range(arity)]
    else:
        match, names = "step_id = ANY(%s::text[])", [_Slot("names")]
    sql = (
        f"WITH d AS (UPDATE {table} SET pending_deps = pending_deps - 1 WHERE id IN ("
        f"SELECT id FROM {table} WHERE run_id = %s AND parent_id IS NULL AND {match}{guard} "
        f"ORDER BY id FOR UPDATE) RETURNING {returning}, {unsucceeded}) SELECT * FROM d WHERE d.pending_deps = 0"
    )
    return _named(sql, [_Slot("run_id"), *names, *guard_params, StepStatus.SUCCEEDED])


def _ready(rows: list[tuple[Any, ...]]) -> list[Step]:
    """The rows a decrement returned that reached zero, as Steps in id order, each annotated
    with ``upstream_unsucceeded`` (its upstream steps not succeeded, as the decrement saw them;
    the attribute is absent on steps read otherwise, e.g. on SQLite)."""
    fields = _step_fields()
    pending_index = [f.attname for f in fields].index("pending_deps")
    ready = []
    for row in rows:
        if row[pending_index] != 0:
            continue
        step = _build(Step, fields, row[: len(fields)])
        step.upstream_unsucceeded = row[len(fields)]
        ready.append(step)
    ready.sort(key=lambda s: s.pk)
    return ready


def mark_queued(step_pks: list[int], now: datetime) -> None:
    """pending -> queued (``queued_at`` = now) for the given steps, in one statement."""
    if not step_pks:
        return
    if not is_postgresql():
        Step.objects.filter(pk__in=step_pks, status=StepStatus.PENDING).update(status=StepStatus.QUEUED, queued_at=now)
        return
    _run([_mark_queued(step_pks, now)])


def _mark_queued(step_pks: list[int], now: datetime) -> tuple[str, list[Any]]:
    return (
        f"UPDATE {Step._meta.db_table} SET status = %s, queued_at = %s WHERE id = ANY(%s::bigint[]) AND status = %s",
        [StepStatus.QUEUED, now, list(step_pks), StepStatus.PENDING],
    )


def write_batch(step_pks: list[int], now: datetime, traces: list[Trace], commit: bool = False) -> None:
    """:func:`mark_queued` and :func:`insert` of the traces, in one round trip on PostgreSQL;
    ``commit``: the caller's transaction's COMMIT too (:func:`may_commit` must have said it may)."""
    if not is_postgresql():
        mark_queued(step_pks, now)
        insert(traces)
        return
    statements = _batch_statements(step_pks, now, traces)
    if statements or commit:
        _run(statements, commit=commit)


def _batch_statements(step_pks: list[int], now: datetime, traces: list[Trace]) -> list[tuple[str, list[Any]]]:
    statements = []
    if step_pks:
        statements.append(_mark_queued(step_pks, now))
    if traces:
        statements.append(_insert_values(traces))
    return statements


def _insert_fields(model: type[Model]) -> list[Any]:
    """The columns an INSERT of ``model`` writes: all but a primary key the database generates."""
    return [f for f in model._meta.concrete_fields if not (f.primary_key and f.db_returning)]


def _prep_save(field: Any, obj: Model, conn: Any = connection) -> Any:
    """``field.get_db_prep_save(field.pre_save(obj, True))``, which on PostgreSQL leaves a
    timestamp that is None or aware as it is, and a value of :func:`_identity_types` too: those
    cases are answered here without the calls (Django's field preparation was a fifth of the
    time of inserting 1,000 runs, and of starting a run of 50 steps)."""
    kinds = _identity_types(field)
    if kinds:
        value = getattr(obj, field.attname)  # Field.pre_save, not overridden (_identity_types)
        return value if type(value) in kinds else field.get_db_prep_save(value, conn)
    value = field.pre_save(obj, True)
    if isinstance(field, DateTimeField) and (value is None or (isinstance(value, datetime) and value.tzinfo)):
        return value
    return field.get_db_prep_save(value, conn)


@functools.cache
def _identity_types(field: Any) -> tuple[type, ...]:
    """The exact types of value a plain field of ``field``'s class prepares as itself on
    PostgreSQL (``get_db_prep_save``: a str for a CharField, an int for an IntegerField, a UUID
    for a UUIDField, None for any of them; a foreign key as its target field), or () when
    ``field`` is of another class, or overrides ``pre_save``. Exact classes only: a subclass may
    prepare differently."""
    if type(field).pre_save is not Field.pre_save:
        return ()
    if isinstance(field, ForeignKey):
        return _identity_types(field.target_field) if type(field) is ForeignKey else ()
    kinds = _PLAIN_FIELDS.get(type(field))
    return (*kinds, type(None)) if kinds else ()


_PLAIN_FIELDS: dict[type, tuple[type, ...]] = {
    CharField: (str,), TextField: (str,), BooleanField: (bool,), FloatField: (float,), UUIDField: (uuid.UUID,),
    IntegerField: (int,), SmallIntegerField: (int,), BigIntegerField: (int,), PositiveIntegerField: (int,),
    PositiveSmallIntegerField: (int,), PositiveBigIntegerField: (int,),
}  # fmt: skip


def _insert_values(objs: list[Model], returning: bool = False) -> tuple[str, list[Any]]:
    """A multi-row INSERT for model instances (of one model): SQL and parameters.

    ``INSERT ... SELECT * FROM unnest(%s::type[], ...)``: one array parameter per column, so the
    SQL text is the same for any number of rows (prepared once) and no row count meets the
    protocol's 65,535-parameter limit. Values are prepared as the ORM prepares them
    (``pre_save``, ``get_db_prep_save``), so Python defaults and new columns are honoured. A
    primary key set in Python (a UUID default) is written; a generated one is returned with
    ``returning``, in row order (the order Django's own ``unnest`` bulk insert relies on).
    One row (a completion's trace, most often) is a plain ``VALUES`` row instead: psycopg dumps
    an array parameter in Python, a scalar in C.
    """
    model = type(objs[0])
    sql, fields = _insert_values_sql(model, returning, len(objs) == 1)
    conn = connections[connection.alias]  # not the proxy: one lookup instead of one per value
    if len(objs) == 1:
        return sql, [_prep_save(f, objs[0], conn) for f in fields]
    return sql, [[_prep_save(f, obj, conn) for obj in objs] for f in fields]


@functools.cache
def _insert_values_sql(model: type[Model], returning: bool, one: bool) -> tuple[str, list[Any]]:
    """:func:`_insert_values`'s SQL and fields for ``model`` (``one``: a single row), built once
    per process (the columns' types, asked of Django per insert, were 5 % of a worker's CPU in
    the bench's W6)."""
    fields = _insert_fields(model)
    names = ", ".join(f.column for f in fields)
    if one:
        values = ", ".join(f"%s::{f.db_type(connection)}" for f in fields)
        sql = f"INSERT INTO {model._meta.db_table} ({names}) VALUES ({values})"
    else:
        # binary parameters: psycopg's text array dumper escapes every element with a regex,
        # which was most of the client's time inserting 1,000 runs (1.73 s -> 1.31 s)
        arrays = ", ".join(f"%b::{f.db_type(connection)}[]" for f in fields)
        sql = f"INSERT INTO {model._meta.db_table} ({names}) SELECT {names} FROM unnest({arrays}) AS v({names})"
    if returning:
        sql += f" RETURNING {model._meta.pk.column}"
    return sql, fields


def insert(*groups: Iterable[Model]) -> None:
    """INSERT model instances, one statement per group (each group all of one model), all in one
    round trip. Sets the primary keys the database generates on the instances. A group may refer
    to rows of an earlier one only by keys set in Python (a run's UUID), not by generated ones.
    Other databases: ``bulk_create`` per group."""
    lists = [list(objs) for objs in groups]
    lists = [objs for objs in lists if objs]
    if not lists:
        return
    if not is_postgresql():
        for objs in lists:
            type(objs[0]).objects.bulk_create(objs)
        return
    returning = [type(objs[0])._meta.pk.db_returning for objs in lists]
    results = _run([_insert_values(objs, back) for objs, back in zip(lists, returning, strict=True)])
    for objs, back, rows in zip(lists, returning, results, strict=True):
        if back:
            for obj, (pk,) in zip(objs, rows, strict=True):
                obj.pk = pk
        for obj in objs:  # saved, as bulk_create leaves them
            obj._state.adding, obj._state.db = False, connection.alias
