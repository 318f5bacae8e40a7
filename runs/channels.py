"""Seed 002's Redis request channel: requests in, one run per ``correlation_id``, results out.

Messages (seed 002's names):

- request, on ``workflow-requests``: ``{"correlation_id": str (1-192 printable characters),
  "workflow_template": str (a template key of the tenant), "variables": object (optional),
  "version": int (optional)}``, UTF-8 JSON, at most ``ORCHESTRATOR_REQUESTS_MAX_BYTES`` bytes
  and its ``variables`` at most ``ORCHESTRATOR_REQUESTS_MAX_VARIABLES_BYTES`` as JSON.
- response, on ``workflow-responses``, once per run when it finishes: ``{"correlation_id",
  "execution_id", "workflow_template", "status" (succeeded | failed | cancelled | timed_out),
  "outputs", "error", "finished_at"}``. Seed 002 prints the channel names and the request but not
  the response; its fields follow the seed's HTTP answer (``execution_id``, ``status``,
  ``workflow_template``, ``correlation_id``).
- error response, for a request that starts nothing (unknown template, bad variables, missing
  field) and names its ``correlation_id``: ``{"correlation_id", "status": "error", "error":
  "<one line naming the field>"}``. A request without a usable ``correlation_id`` is only logged.

Two transports of the same channel:

- pub/sub (``PUBLISH``/``SUBSCRIBE``): what seed 002 does; Redis delivers a message only to the
  subscribers connected at that moment, so a request published while no listener runs is lost.
- a Redis Stream with a consumer group (redis.io, "Redis Streams" / XREADGROUP, XACK,
  XAUTOCLAIM): the durable form. Requests are ``XADD workflow-requests * message <json>`` (or
  the fields ``correlation_id``, ``workflow_template``, ``variables`` as JSON text); a listener
  reads with ``XREADGROUP`` as a member of ``ORCHESTRATOR_REQUESTS_GROUP``, acknowledges
  (``XACK``) once the run exists (or the error response is sent), and claims entries another
  consumer left unacknowledged for ``ORCHESTRATOR_REQUESTS_CLAIM_IDLE`` seconds (``XAUTOCLAIM``:
  that consumer is presumed dead). Responses are ``XADD workflow-responses MAXLEN ~ N * message
  <json>``. A request is processed at least once; the idempotency key makes that one run.

One run per correlation id: the run's idempotency key is ``request:<correlation_id>``, unique in
the tenant (``Run`` constraint ``run_tenant_idempotency_uniq``), so a repeated message, a second
listener or a redelivered stream entry finds the existing run and starts nothing.

Knowing when a run finished, durably: a run started from a request carries
``metadata["request"] = {"reply_to": <responses channel>, "mode": "pubsub"|"stream",
"responded": false}``. The listener keeps the ids of the runs it waits for in memory and reads
their status in one query every ``ORCHESTRATOR_REQUESTS_POLL`` seconds; for each finished one it
flips ``responded`` to true with a conditional UPDATE (exactly one listener wins it, however many
run) and then publishes the response; if the publish fails the flag is put back and the next poll
tries again. On start, a listener re-derives what it waits for from the database: every run of
its tenant with such metadata for its channel and mode and ``responded`` false. So a restart (or
a crash) loses no response, except for a crash in the instant between the flag and the publish.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db.models import Q

log = logging.getLogger("orchestrator.channels")

#: ``request:`` + the correlation id must fit the 200 characters of an idempotency key.
MAX_CORRELATION_ID = 192
_CORRELATION_ID = re.compile(r"[\x21-\x7e]{1,192}")
_TEMPLATE_KEY = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,199}")
#: Runs read per status query (the rest wait for the next poll).
STATUS_BATCH = 500


class BadRequest(ValueError):
    """A request that starts nothing: one-line ``str()`` naming the field; ``correlation_id`` when known."""

    def __init__(self, message: str, correlation_id: str | None = None) -> None:
        super().__init__(" ".join(message.split()))
        self.correlation_id = correlation_id


@dataclass(frozen=True)
class WorkflowRequest:
    """A valid request (see the module docstring for the wire shape)."""

    correlation_id: str
    workflow_template: str
    variables: dict[str, Any]
    version: int | None = None

    @property
    def idempotency_key(self) -> str:
        return f"request:{self.correlation_id}"


def parse_request(raw: bytes | str | dict[str, Any], *, max_bytes: int, max_variables_bytes: int) -> WorkflowRequest:
    """Validate one request message (JSON text, or stream fields as a dict of str). Raises BadRequest."""
    if isinstance(raw, dict):
        data: Any = dict(raw)
        if "variables" in data and isinstance(data["variables"], str):
            try:
                data["variables"] = json.loads(data["variables"])
            except ValueError:
                raise BadRequest("variables: not valid JSON", _cid(data)) from None
        if "version" in data and isinstance(data["version"], str) and data["version"].isdigit():
            data["version"] = int(data["version"])
    else:
        size = len(raw.encode() if isinstance(raw, str) else raw)
        if size > max_bytes:
            raise BadRequest(f"message: {size} bytes, at most {max_bytes}")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"message: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadRequest("message: expected a JSON object")
    correlation_id = _cid(data)
    if correlation_id is None:
        raise BadRequest(f"correlation_id: required, 1-{MAX_CORRELATION_ID} printable ASCII characters, no spaces")
    unknown = sorted(set(data) - {"correlation_id", "workflow_template", "variables", "version"})
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown field", correlation_id)
    template = data.get("workflow_template")
    if not isinstance(template, str) or not _TEMPLATE_KEY.fullmatch(template):
        raise BadRequest("workflow_template: required, a template key", correlation_id)
    variables = data.get("variables", {})
    if variables is None:
        variables = {}
    if not isinstance(variables, dict):
        raise BadRequest("variables: expected an object", correlation_id)
    variables_size = len(json.dumps(variables, separators=(",", ":")).encode())
    if variables_size > max_variables_bytes:
        raise BadRequest(f"variables: {variables_size} bytes as JSON, at most {max_variables_bytes}", correlation_id)
    version = data.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise BadRequest("version: expected an integer >= 1", correlation_id)
    return WorkflowRequest(correlation_id, template, variables, version)


def _cid(data: Any) -> str | None:
    value = data.get("correlation_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) and _CORRELATION_ID.fullmatch(value) else None


def dumps(message: dict[str, Any]) -> str:
    """A response as compact JSON (datetimes as ISO text)."""
    return json.dumps(
        message, separators=(",", ":"), default=lambda v: v.isoformat() if hasattr(v, "isoformat") else str(v)
    )


class RequestHandler:
    """Starts runs for requests and sends the response of each when it finishes.

    ``send(message)`` publishes one response (a dict) on the responses channel and raises on
    failure. ``tenant``: slug of the tenant runs are started in; ``reply_to``/``mode`` identify
    the channel in the runs' metadata (see the module docstring). Database errors propagate
    (the caller decides: a stream entry stays unacknowledged and is retried).
    """

    def __init__(
        self,
        *,
        tenant: str,
        reply_to: str,
        mode: str,
        send: Callable[[dict[str, Any]], None],
        max_bytes: int,
        max_variables_bytes: int,
        out: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.tenant, self.reply_to, self.mode, self.send = tenant, reply_to, mode, send
        self.max_bytes, self.max_variables_bytes = max_bytes, max_variables_bytes
        self.out = out
        self.waiting: set[Any] = set()

    def marker(self) -> dict[str, Any]:
        return {"reply_to": self.reply_to, "mode": self.mode, "responded": False}

    def recover(self) -> int:
        """Load the runs of this tenant and channel whose response was not sent yet. Returns how many."""
        from .models import Run

        ids = Run.objects.filter(
            tenant_id=self.tenant,
            idempotency_key__startswith="request:",
            metadata__request__reply_to=self.reply_to,
            metadata__request__mode=self.mode,
            metadata__request__responded=False,
        ).values_list("pk", flat=True)
        self.waiting.update(ids)
        return len(self.waiting)

    def handle(self, raw: bytes | str | dict[str, Any]) -> str:
        """Handle one message; never raises for a bad message (an error response goes out instead).

        Returns what happened: ``"started"``, ``"repeat"`` or ``"error"``.
        """
        from . import services
        from .choices import TriggerKind

        try:
            request = parse_request(raw, max_bytes=self.max_bytes, max_variables_bytes=self.max_variables_bytes)
            run, created = services.create_run(
                tenant=self.tenant,
                template_key=request.workflow_template,
                version=request.version,
                variables=request.variables,
                correlation_id=request.correlation_id,
                idempotency_key=request.idempotency_key,
                user_id=f"{self.mode}:{self.reply_to}"[:200],
                trigger=TriggerKind.API,
                metadata={"request": self.marker()},
            )
        except (BadRequest, services.ServiceError) as exc:
            correlation_id = getattr(exc, "correlation_id", None)
            if correlation_id is None and not isinstance(exc, BadRequest):
                correlation_id = request.correlation_id
            log.warning("request refused: %s", exc, extra={"correlation_id": correlation_id})
            self.out(f"refused {correlation_id or '(no correlation_id)'}: {exc}")
            if correlation_id is not None:
                self.send({"correlation_id": correlation_id, "status": "error", "error": str(exc)})
            return "error"
        if not created:
            self.out(f"repeat {request.correlation_id}: run {run.pk} exists, nothing started")
            return "repeat"
        self.waiting.add(run.pk)
        self.out(f"started run {run.pk} of {run.template_key} for {request.correlation_id}")
        return "started"

    def respond_finished(self) -> int:
        """Send the response of every waited-for run that finished (one query). Returns how many."""
        from .choices import RUN_TERMINAL
        from .models import Run

        if not self.waiting:
            return 0
        batch = list(self.waiting)[:STATUS_BATCH]
        sent = 0
        finished = Run.objects.filter(pk__in=batch, status__in=RUN_TERMINAL).only(
            "id", "status", "outputs", "error", "finished_at", "template_key", "correlation_id", "metadata"
        )
        gone = set(batch) - set(Run.objects.filter(pk__in=batch).values_list("pk", flat=True))
        self.waiting -= gone  # purged meanwhile: nothing to answer
        for run in finished:
            if self._respond(run):
                sent += 1
            self.waiting.discard(run.pk)
        return sent

    def _respond(self, run: Any) -> bool:
        from .models import Run

        request = (run.metadata or {}).get("request") or {}
        claimed = {**(run.metadata or {}), "request": {**request, "responded": True}}
        # the conditional UPDATE: one listener sends it, however many wait for it
        if not Run.objects.filter(Q(pk=run.pk) & Q(metadata__request__responded=False)).update(metadata=claimed):
            return False
        message = {
            "correlation_id": run.correlation_id,
            "execution_id": str(run.pk),
            "workflow_template": run.template_key,
            "status": run.status,
            "outputs": run.outputs,
            "error": run.error or None,
            "finished_at": run.finished_at,
        }
        try:
            self.send(message)
        except Exception:
            Run.objects.filter(pk=run.pk).update(metadata={**claimed, "request": {**request, "responded": False}})
            self.waiting.add(run.pk)
            raise
        self.out(f"response sent for {run.correlation_id}: run {run.pk} {run.status}")
        return True


# --- transports ---------------------------------------------------------------------------------------


class Stopper:
    """A flag set by SIGTERM/SIGINT: loops finish the message in hand and return."""

    def __init__(self) -> None:
        self.stopped = False

    def stop(self, *args: Any) -> None:
        self.stopped = True


def serve_pubsub(client: Any, handler: RequestHandler, *, channel: str, poll: float, stopper: Stopper) -> None:
    """SUBSCRIBE ``channel`` and handle messages until ``stopper`` is set; between messages, at
    most every ``poll`` seconds, send the responses of finished runs."""
    import redis

    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    next_check = 0.0
    try:
        while not stopper.stopped:
            try:
                # redis-py reconnects and subscribes again on the next read after a lost connection
                message = pubsub.get_message(timeout=poll)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.error("redis unreachable, retrying in 1 s: %s", type(exc).__name__)
                time.sleep(1.0)
                continue
            if message is not None and message.get("type") == "message":
                _guarded(handler, message["data"])
            if time.monotonic() >= next_check:
                _respond_guarded(handler)
                next_check = time.monotonic() + poll
    finally:
        pubsub.close()


def ensure_group(client: Any, stream: str, group: str) -> None:
    """Create the consumer group (and the stream) if missing: ``XGROUP CREATE <stream> <group> 0 MKSTREAM``."""
    import redis

    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def serve_stream(
    client: Any,
    handler: RequestHandler,
    *,
    stream: str,
    group: str,
    consumer: str,
    poll: float,
    claim_idle: float,
    stopper: Stopper,
) -> None:
    """Read ``stream`` as ``consumer`` of ``group`` until ``stopper`` is set (see the module docstring).

    Each entry is acknowledged after it was handled (run created, repeat found, or error response
    sent); an entry whose handling hit an unexpected error (database down) stays pending and comes
    back through XAUTOCLAIM after ``claim_idle`` seconds.
    """
    import redis

    ensure_group(client, stream, group)
    next_claim = 0.0
    next_check = 0.0
    while not stopper.stopped:
        try:
            next_claim = _stream_round(client, handler, stream, group, consumer, poll, claim_idle, stopper, next_claim)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.error("redis unreachable, retrying in 1 s: %s", type(exc).__name__)
            time.sleep(1.0)
            continue
        if time.monotonic() >= next_check:
            _respond_guarded(handler)
            next_check = time.monotonic() + poll


def _stream_round(
    client: Any,
    handler: RequestHandler,
    stream: str,
    group: str,
    consumer: str,
    poll: float,
    claim_idle: float,
    stopper: Stopper,
    next_claim: float,
) -> float:
    """One read of the stream (claimed entries first); returns when to claim next."""
    entries: list[tuple[Any, dict[Any, Any]]] = []
    if time.monotonic() >= next_claim:
        # entries left unacknowledged by a dead consumer (or by this one, after an error)
        _next, claimed, *_deleted = client.xautoclaim(
            stream, group, consumer, min_idle_time=int(claim_idle * 1000), start_id="0-0", count=100
        )
        entries.extend(claimed)
        next_claim = time.monotonic() + max(claim_idle / 2, poll)
    if not entries:
        answer = client.xreadgroup(group, consumer, {stream: ">"}, count=20, block=max(1, int(poll * 1000)))
        for _name, items in answer or []:
            entries.extend(items)
    for entry_id, fields in entries:
        if stopper.stopped:
            break  # unacknowledged: another consumer (or this one, restarted) claims it
        if fields is None:
            continue  # deleted from the stream meanwhile
        if _guarded(handler, _stream_message(fields)):
            client.xack(stream, group, entry_id)
    return next_claim


def _stream_message(fields: dict[Any, Any]) -> bytes | dict[str, str]:
    decoded = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode(errors="replace") if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
    message = fields.get(b"message", fields.get("message"))
    return message if message is not None else decoded


def _guarded(handler: RequestHandler, raw: Any) -> bool:
    """Handle one message; True when it is dealt with (False: an unexpected error, logged)."""
    try:
        handler.handle(raw)
        return True
    except Exception as exc:
        log.error("request not handled (will be retried if durable): %s", " ".join(str(exc).split())[:300])
        return False


def _respond_guarded(handler: RequestHandler) -> None:
    try:
        handler.respond_finished()
    except Exception as exc:
        log.error("responses not sent (next poll retries): %s", " ".join(str(exc).split())[:300])
