"""Live progress as Server-Sent Events: a generic feed that diffs successive snapshots.

The wire format is the WHATWG HTML Living Standard, section "Server-sent events"
(https://html.spec.whatwg.org/multipage/server-sent-events.html): UTF-8 ``text/event-stream``,
each event a block of ``event:``, ``id:`` and ``data:`` lines ended by a blank line, ``:`` lines
are comments (our heartbeat), and a ``retry:`` line sets the client's reconnection delay (ms).
A client that reconnects sends the last ``id`` it received as the ``Last-Event-ID`` header.

How it works, for any watched object:

- A *snapshot function* returns a :class:`Snapshot`: an ordered mapping of item keys to
  :class:`Item` (event name, a short *token* that changes whenever the item changes, and the
  JSON data to send), plus ``done`` (the object reached its final state) and the data of the
  final ``end`` event. :func:`run_snapshot` is the one of a run (3 small queries).
- :class:`EventFeed` calls it every ``poll`` seconds and emits an :class:`Event` for each item
  whose token differs from the last one sent, in snapshot order; when ``done``, it emits the
  remaining changes and then ``end``, and stops. Changes faster than the poll interval are
  seen as their latest state (``queued`` then ``running`` within 0.5 s arrive as ``running``).
- Every event's ``id`` is a :class:`Cursor`: the tokens of everything the client has been sent
  so far, compressed (``c1.<base64url(zlib(json))>``, tens of bytes for a typical run). A
  reconnecting client's ``Last-Event-ID`` is decoded back into those tokens and the feed diffs
  the current snapshot against them: nothing is repeated and no change is lost, without any
  state kept on the server (any web process can serve the reconnection). A client that already
  received ``end`` gets nothing more (:meth:`EventFeed.finished`: the view answers 204, which
  per the standard tells an ``EventSource`` to stop reconnecting).

The same feed serves the HTTP view (:meth:`EventFeed.frames` yields text frames) and
in-process consumers such as a CLI (:meth:`EventFeed.events` yields :class:`Event` objects,
``None`` for a heartbeat tick). An agent task's feed is the same class with its own snapshot
function.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

#: Largest ``Last-Event-ID`` accepted, characters (gunicorn refuses headers past 8190 bytes anyway).
MAX_CURSOR_CHARS = 8000
#: Largest decompressed cursor, bytes: a client-made cursor cannot be a decompression bomb.
MAX_CURSOR_JSON = 1_000_000
#: Reconnection delay the stream asks clients for, milliseconds (the ``retry:`` field).
RETRY_MS = 2000


class InvalidCursor(ValueError):
    """A ``Last-Event-ID`` that is not a cursor this server made (one line, names the header)."""


@dataclass(frozen=True)
class Item:
    """One watched thing (a step, the run's progress): ``event`` name, change ``token``, ``data``."""

    event: str
    token: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Snapshot:
    """The watched object now: ``items`` in a stable order (new keys only appended), ``done`` when final.

    ``end`` is the data of the final ``end`` event (read only when ``done``).
    """

    items: dict[str, Item]
    done: bool = False
    end: dict[str, Any] = field(default_factory=dict)
    #: keys whose changes are sent after the others' in a poll (a summary such as the run's
    #: progress, listed first in ``items`` so that appended items keep the key order a prefix)
    last: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Event:
    """An event to send: ``name`` (``step``, ``run``, ``end``...), ``data`` (JSON), ``id`` (a cursor)."""

    name: str
    data: dict[str, Any]
    id: str

    def frame(self) -> str:
        """This event as a ``text/event-stream`` block (one ``data:`` line: JSON has no newlines)."""
        payload = json.dumps(self.data, separators=(",", ":"), default=str, ensure_ascii=False)
        return f"id: {self.id}\nevent: {self.name}\ndata: {payload}\n\n"


@dataclass
class Cursor:
    """What a client has been sent: ``tokens`` per item key, in order, and whether ``end`` was sent.

    Encoded as ``c1.<base64url(zlib(json))>`` where the JSON is
    ``{"k": crc32 of the keys, "t": [token, ...], "e": 0|1}``: the keys themselves are not sent
    (they are long and always a prefix of the current snapshot's keys, which are append-only),
    only a checksum that :meth:`tokens_for` compares against the current keys.
    """

    tokens: list[str] = field(default_factory=list)
    keys_crc: int = 0
    ended: bool = False

    @staticmethod
    def crc(keys: list[str]) -> int:
        return zlib.crc32("\n".join(keys).encode())

    @classmethod
    def of(cls, keys: list[str], sent: dict[str, str], ended: bool = False) -> Cursor:
        """The cursor of ``sent`` (``{key: token}``) over the snapshot's ``keys``: the key prefix up
        to the last key sent, ``""`` for a key of that prefix not sent yet (sent on resume)."""
        last = max((i for i, key in enumerate(keys) if key in sent), default=-1)
        prefix = keys[: last + 1]
        return cls(tokens=[sent.get(key, "") for key in prefix], keys_crc=cls.crc(prefix), ended=ended)

    def encode(self) -> str:
        raw = json.dumps({"k": self.keys_crc, "t": self.tokens, "e": int(self.ended)}, separators=(",", ":"))
        return "c1." + base64.urlsafe_b64encode(zlib.compress(raw.encode(), 9)).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """Parse a ``Last-Event-ID``. Raises InvalidCursor with a one-line reason."""
        if len(text) > MAX_CURSOR_CHARS:
            raise InvalidCursor(f"Last-Event-ID: longer than {MAX_CURSOR_CHARS} characters")
        if not text.startswith("c1."):
            raise InvalidCursor("Last-Event-ID: not an event id of this stream (expected c1.<...>)")
        try:
            packed = base64.urlsafe_b64decode(text[3:] + "=" * (-len(text[3:]) % 4))
            inflater = zlib.decompressobj()
            raw = inflater.decompress(packed, MAX_CURSOR_JSON)
            if inflater.unconsumed_tail:
                raise InvalidCursor(f"Last-Event-ID: decodes to more than {MAX_CURSOR_JSON} bytes")
            value = json.loads(raw)
        except (binascii.Error, zlib.error, ValueError, UnicodeDecodeError) as exc:
            if isinstance(exc, InvalidCursor):
                raise
            raise InvalidCursor("Last-Event-ID: not an event id of this stream (undecodable)") from None
        if (
            not isinstance(value, dict)
            or not isinstance(value.get("k"), int)
            or not isinstance(value.get("t"), list)
            or not all(isinstance(token, str) for token in value["t"])
            or value.get("e") not in (0, 1)
        ):
            raise InvalidCursor("Last-Event-ID: not an event id of this stream (bad shape)")
        return cls(tokens=value["t"], keys_crc=value["k"], ended=bool(value["e"]))

    def tokens_for(self, keys: list[str]) -> dict[str, str]:
        """``{key: token}`` the client has for the current ``keys``; ``{}`` when the keys do not
        match (the object changed shape: the client gets the full state again)."""
        count = len(self.tokens)
        if count > len(keys) or self.crc(keys[:count]) != self.keys_crc:
            return {}
        return {key: token for key, token in zip(keys[:count], self.tokens, strict=True) if token}


class EventFeed:
    """Events of one watched object, from ``snapshot_fn`` polled every ``poll`` seconds.

    ``last_event_id``: the client's ``Last-Event-ID`` (None: send the whole current state first).
    ``heartbeat``: seconds of silence before a heartbeat (``None`` from :meth:`events`, a comment
    line in :meth:`frames`). ``max_seconds``: the feed stops after this long even if the object is
    not done (the client reconnects with its last id). ``clock``/``sleep`` are injectable for tests.

    Raises InvalidCursor (from the constructor) for a ``last_event_id`` this server did not make.
    ``snapshot_fn`` may raise LookupError when the object is gone: the feed then ends with an
    ``end`` event ``{"status": "gone"}``.
    """

    def __init__(
        self,
        snapshot_fn: Callable[[], Snapshot],
        *,
        last_event_id: str | None = None,
        poll: float = 0.5,
        heartbeat: float = 15.0,
        max_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.snapshot_fn = snapshot_fn
        self.cursor = Cursor.decode(last_event_id) if last_event_id else Cursor()
        self.poll = max(poll, 0.01)
        self.heartbeat = heartbeat
        self.max_seconds = max_seconds
        self.clock = clock
        self.sleep = sleep
        self._first: Snapshot | None = None
        #: why the feed stopped: "end", "max_seconds" (None while running)
        self.stopped: str | None = None

    def _snapshot(self) -> Snapshot:
        try:
            return self.snapshot_fn()
        except LookupError:
            return Snapshot(items={}, done=True, end={"status": "gone"})

    def finished(self) -> bool:
        """True when the client already received ``end`` and nothing changed since (send nothing)."""
        if not self.cursor.ended:
            return False
        self._first = snapshot = self._snapshot()
        sent = self.cursor.tokens_for(list(snapshot.items))
        return (
            snapshot.done
            and bool(sent or not snapshot.items)
            and all(sent.get(key) == item.token for key, item in snapshot.items.items())
        )

    def events(self) -> Iterator[Event | None]:
        """Events in order; ``None`` marks a heartbeat tick. Ends after ``end`` or ``max_seconds``."""
        started = last_sent = self.clock()
        sent: dict[str, str] | None = None
        while True:
            snapshot, self._first = self._first or self._snapshot(), None
            keys = list(snapshot.items)
            if sent is None:
                sent = self.cursor.tokens_for(keys)
            order = [k for k in keys if k not in snapshot.last] + [k for k in keys if k in snapshot.last]
            for key in order:
                item = snapshot.items[key]
                if sent.get(key) != item.token:
                    sent[key] = item.token
                    last_sent = self.clock()
                    yield Event(item.event, item.data, Cursor.of(keys, sent).encode())
            if snapshot.done:
                self.stopped = "end"
                yield Event("end", snapshot.end, Cursor.of(keys, sent, ended=True).encode())
                return
            now = self.clock()
            if now - started >= self.max_seconds:
                self.stopped = "max_seconds"
                return
            if now - last_sent >= self.heartbeat:
                last_sent = now
                yield None
            self.sleep(min(self.poll, max(0.0, self.max_seconds - (now - started))))

    def frames(self) -> Iterator[str]:
        """:meth:`events` as ``text/event-stream`` text: a ``retry:`` line first, ``: heartbeat``
        comments, and a closing comment when ``max_seconds`` ends the stream."""
        yield f"retry: {RETRY_MS}\n\n"
        for event in self.events():
            yield ": heartbeat\n\n" if event is None else event.frame()
        if self.stopped == "max_seconds":
            yield f": stream closed after {self.max_seconds:g} s; reconnect with Last-Event-ID\n\n"


# --- runs -------------------------------------------------------------------------------------------

#: Longest step error text sent in a ``step`` event, characters (the full one is in the step detail).
ERROR_CHARS = 500


def run_snapshot(run_id: Any) -> Snapshot:
    """The snapshot of a run: one ``run`` item with the run's status and progress (over all step
    rows, map items included; sent after the step changes of the same poll), then one ``step``
    item per top-level step in creation order (steps appended later keep the order a prefix).

    ``step`` data: ``{"step_id", "index", "type", "status", "attempts", "max_attempts",
    "started_at", "finished_at", "error"}`` (error cut at ERROR_CHARS); token: status and attempts.
    ``run`` data: ``{"run_id", "status", "progress" (0-100, per cent of step rows finished; 100
    when succeeded), "done", "total"}``; token: status, done, total. ``end`` data: ``{"run_id",
    "status", "progress", "outputs", "error", "finished_at"}``. Three queries, each on an index
    (the run by pk, its top-level steps by ``run_id``, the status counts by ``step_run_status_idx``);
    one more at the end for the outputs.

    Raises LookupError (Run.DoesNotExist) when the run is gone.
    """
    from .choices import RUN_TERMINAL
    from .models import Run, Step
    from .services import progress

    # outputs may be large: read only once the run is finished (the `end` event)
    run = Run.objects.only("id", "status").get(pk=run_id)
    done = run.status in RUN_TERMINAL
    if done:
        run = Run.objects.only("id", "status", "outputs", "error", "finished_at").get(pk=run_id)
    info = progress(run)
    items: dict[str, Item] = {
        "run": Item(
            "run",
            f"{run.status}:{info['done']}/{info['total']}",
            {
                "run_id": str(run.pk),
                "status": run.status,
                "progress": info["percent"],
                "done": info["done"],
                "total": info["total"],
            },
        )
    }
    rows = (
        Step.objects.filter(run_id=run.pk, parent__isnull=True)
        .order_by("id")
        .values_list("step_id", "type", "status", "attempts", "max_attempts", "started_at", "finished_at", "error")
    )
    for index, (step_id, kind, status, attempts, max_attempts, started, finished, error) in enumerate(rows):
        items[f"step:{step_id}"] = Item(
            "step",
            f"{status}:{attempts}",
            {
                "step_id": step_id,
                "index": index,
                "type": kind,
                "status": status,
                "attempts": attempts,
                "max_attempts": max_attempts,
                "started_at": started,
                "finished_at": finished,
                "error": (error or "")[:ERROR_CHARS] or None,
            },
        )
    return Snapshot(
        items=items,
        last=frozenset({"run"}),
        done=done,
        end={
            "run_id": str(run.pk),
            "status": run.status,
            "progress": info["percent"],
            "outputs": run.outputs,
            "error": run.error or None,
            "finished_at": run.finished_at,
        }
        if done
        else {},
    )


def run_feed(run_id: Any, *, last_event_id: str | None = None, **options: Any) -> EventFeed:
    """An :class:`EventFeed` of a run with the deployment's settings (``ORCHESTRATOR_SSE_*``);
    ``options`` override them (``poll``, ``heartbeat``, ``max_seconds``, ``clock``, ``sleep``).
    Raises InvalidCursor for a bad ``last_event_id``."""
    from orchestrator_site.conf import conf

    settings = {"poll": conf.sse_poll, "heartbeat": conf.sse_heartbeat, "max_seconds": conf.sse_max_seconds}
    return EventFeed(lambda: run_snapshot(run_id), last_event_id=last_event_id, **{**settings, **options})
