"""What the run page draws: the run's DAG (a layered layout computed here) and the timeline of its attempts.

The graph is laid out on the server and drawn as plain SVG by the template, so the page needs no
layout library and the picture is the same in every browser and in tests. The layout is the
first half of Sugiyama's layered drawing (Sugiyama, Tagawa, Toda, "Methods for visual
understanding of hierarchical system structures", 1981): each step goes in the layer of its
longest path from a root (left to right, as Airflow's graph view), and within a layer steps are
ordered by the barycenter (mean position) of their dependencies, one sweep from left to right.
Workflows have tens of steps, not thousands, so crossing reduction beyond one sweep is not worth
a dependency.

Map items (``for_each`` children) and ``parallel`` branches are folded into their step: the node
shows counts per status of its children (one grouped query on ``step_run_status_idx``). The
timeline lists attempts, oldest first, capped at :data:`TIMELINE_LIMIT` bars.

:func:`live_payload` is what the page polls (``GET .../live/`` every ~2 s while the run is active):
statuses, counts and attempts, all times in seconds since the run was created.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from django.db.models import Count, F
from django.utils import timezone

from .choices import RUN_TERMINAL
from .models import Attempt, Run, Step

#: Node box in px (the SVG's user units).
NODE_W, NODE_H = 168, 46
#: Gaps between layers (x) and between nodes of one layer (y), px.
GAP_X, GAP_Y = 64, 18
#: Top-level steps drawn; a run with more (generated workflows) gets a note and its first ones.
GRAPH_LIMIT = 300
#: Attempt bars in the timeline; the page says when there are more.
TIMELINE_LIMIT = 400


def layout(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Positions for a DAG drawn left to right.

    ``steps``: ``[{"id": str, "depends_on": [str], ...}]`` in file order (dependencies on unknown
    ids are ignored). Returns ``{"nodes": [step dict + x, y, w, h, layer], "edges": [{"from",
    "to", "path"}], "width", "height"}`` in px; ``path`` is an SVG cubic Bézier from the right
    edge of the dependency to the left edge of the dependent.
    """
    by_id = {s["id"]: s for s in steps}
    layer: dict[str, int] = {}

    def depth(sid: str, seen: frozenset[str] = frozenset()) -> int:
        if sid in layer:
            return layer[sid]
        deps = [d for d in by_id[sid].get("depends_on") or [] if d in by_id and d not in seen]
        layer[sid] = 1 + max((depth(d, seen | {sid}) for d in deps), default=-1)
        return layer[sid]

    for s in steps:
        depth(s["id"])
    layers: dict[int, list[str]] = defaultdict(list)
    for s in steps:  # file order first: stable and what the author wrote
        layers[layer[s["id"]]].append(s["id"])
    position: dict[str, float] = {}
    for n in sorted(layers):
        ids = layers[n]
        if n:

            def barycenter(sid: str) -> float:
                deps = [position[d] for d in by_id[sid].get("depends_on") or [] if d in position]
                return sum(deps) / len(deps) if deps else 0.0

            ids.sort(key=barycenter)  # stable: ties keep file order
        for i, sid in enumerate(ids):
            position[sid] = i
    tallest = max((len(ids) for ids in layers.values()), default=0)
    height = max(1, tallest) * (NODE_H + GAP_Y) + GAP_Y
    nodes = []
    coords: dict[str, tuple[int, int]] = {}
    for n, ids in layers.items():
        offset = (height - len(ids) * (NODE_H + GAP_Y) - GAP_Y) // 2  # centre short layers
        for i, sid in enumerate(ids):
            x = GAP_Y + n * (NODE_W + GAP_X)
            y = GAP_Y + offset + i * (NODE_H + GAP_Y)
            coords[sid] = (x, y)
            nodes.append({**by_id[sid], "x": x, "y": y, "w": NODE_W, "h": NODE_H, "layer": n})
    nodes.sort(key=lambda node: (node["layer"], node["y"]))
    edges = []
    for s in steps:
        for dep in s.get("depends_on") or []:
            if dep not in coords:
                continue
            (x1, y1), (x2, y2) = coords[dep], coords[s["id"]]
            x1, y1, y2 = x1 + NODE_W, y1 + NODE_H // 2, y2 + NODE_H // 2
            mid = (x1 + x2) // 2
            edges.append({"from": dep, "to": s["id"], "path": f"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2 - 6},{y2}"})
    width = GAP_Y * 2 + (max(layers, default=0) + 1) * (NODE_W + GAP_X) - GAP_X
    return {"nodes": nodes, "edges": edges, "width": width, "height": height}


def _seconds(moment: Any, origin: Any) -> float | None:
    return None if moment is None else round((moment - origin).total_seconds(), 3)


def step_states(run: Run) -> tuple[list[dict[str, Any]], int]:
    """The run's top-level steps (at most :data:`GRAPH_LIMIT`) with their map items folded in.

    Returns ``(steps, total)``; each step is ``{"id", "pk", "type", "status", "depends_on",
    "attempts", "max_attempts", "error", "started", "finished", "items": {status: n} | None,
    "items_total": int}``; times in seconds since the run was created (None when not reached).
    Two queries.
    """
    rows = list(
        Step.objects.filter(run_id=run.pk, parent__isnull=True)
        .order_by("id")
        .values(
            "pk",
            "step_id",
            "type",
            "status",
            "depends_on",
            "attempts",
            "max_attempts",
            "error",
            "started_at",
            "finished_at",
        )[: GRAPH_LIMIT + 1]
    )
    total = len(rows) if len(rows) <= GRAPH_LIMIT else run.steps_total
    rows = rows[:GRAPH_LIMIT]
    items: dict[int, dict[str, int]] = defaultdict(dict)
    children = (
        Step.objects.filter(run_id=run.pk, parent__isnull=False).values("parent_id", "status").annotate(n=Count("id"))
    )
    for row in children.order_by():
        items[row["parent_id"]][row["status"]] = row["n"]
    steps = []
    for row in rows:
        counts = items.get(row["pk"])
        steps.append(
            {
                "id": row["step_id"],
                "pk": row["pk"],
                "type": row["type"],
                "status": row["status"],
                "depends_on": row["depends_on"] or [],
                "attempts": row["attempts"],
                "max_attempts": row["max_attempts"],
                "error": (row["error"] or "")[:300],
                "started": _seconds(row["started_at"], run.created_at),
                "finished": _seconds(row["finished_at"], run.created_at),
                "items": dict(sorted(counts.items())) if counts else None,
                "items_total": sum(counts.values()) if counts else 0,
            }
        )
    return steps, total


def timeline(run: Run) -> dict[str, Any]:
    """Attempts of ``run`` for the Gantt chart, oldest first, at most :data:`TIMELINE_LIMIT`.

    Returns ``{"attempts": [{"step", "step_pk", "number", "outcome", "start", "end", "running",
    "worker", "error"}], "more": bool}``; ``start``/``end`` in seconds since the run was created,
    ``end`` of a running attempt is now. One query on the attempt's ``run_id`` index.
    """
    now = timezone.now()
    rows = list(
        Attempt.objects.filter(run_id=run.pk)
        .annotate(step_code=F("step__step_id"))
        .order_by("started_at", "id")
        .values("step_code", "step_id", "number", "outcome", "started_at", "finished_at", "worker", "error")[
            : TIMELINE_LIMIT + 1
        ]
    )
    attempts = [
        {
            "step": row["step_code"],
            "step_pk": row["step_id"],
            "number": row["number"],
            "outcome": row["outcome"],
            "start": _seconds(row["started_at"], run.created_at),
            "end": _seconds(row["finished_at"] or now, run.created_at),
            "running": row["finished_at"] is None,
            "worker": row["worker"],
            "error": (row["error"] or "")[:200],
        }
        for row in rows[:TIMELINE_LIMIT]
    ]
    return {"attempts": attempts, "more": len(rows) > TIMELINE_LIMIT}


def live_payload(run: Run) -> dict[str, Any]:
    """What the run page polls: ``{"run": {"status", "finished", "error", "elapsed"}, "steps": [...],
    "steps_total", "timeline": {...}}`` (see :func:`step_states`, :func:`timeline`). Seconds."""
    steps, total = step_states(run)
    end = run.finished_at or timezone.now()
    return {
        "run": {
            "status": run.status,
            "finished": run.status in RUN_TERMINAL,
            "error": (run.error or "")[:300],
            "elapsed": _seconds(end, run.created_at),
        },
        "steps": steps,
        "steps_total": total,
        "timeline": timeline(run),
    }


def graph(run: Run, live: dict[str, Any] | None = None) -> dict[str, Any]:
    """The laid-out DAG of ``run`` with each step's state: :func:`layout` over :func:`step_states`
    (or over the steps of ``live``, a :func:`live_payload` of the same run, to save its queries),
    plus ``"truncated": bool`` when the run has more than :data:`GRAPH_LIMIT` top-level steps."""
    steps, total = (live["steps"], live["steps_total"]) if live is not None else step_states(run)
    drawn = layout(steps)
    drawn["truncated"] = total > len(steps)
    drawn["total"] = total
    return drawn
