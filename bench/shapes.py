"""The bench workloads as graphs, shared by the platform side and the raw Celery side.

DESIGN.md's workloads: W1 fan-out/fan-in 1 -> 200 -> 1; W2 a chain of 50; W3 a lattice of 10
layers x 20 nodes, each node depending on two of the layer before (``i`` and ``i+1 mod 20``: not
series-parallel, so a canvas would need layer barriers); W4 100 runs of a 5-step chain at once;
W5 a for_each over 10,000 items (W5-1k: over 1,000, to show the cost grows linearly); W6 1,000
runs of a 3-step chain at once.

A :class:`Graph` lists, per node index, the nodes it depends on. ``graph(shape)`` is cached and
deterministic, so a raw Celery worker rebuilds the very graph the driver submitted from its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Graph:
    """A DAG over nodes ``0..n-1``: ``deps[i]`` and ``dependents[i]`` are lists of node indexes."""

    deps: tuple[tuple[int, ...], ...]
    dependents: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        return len(self.deps)

    @property
    def roots(self) -> list[int]:
        return [i for i, d in enumerate(self.deps) if not d]

    @property
    def sinks(self) -> list[int]:
        return [i for i, d in enumerate(self.dependents) if not d]


def _graph(deps: list[list[int]]) -> Graph:
    dependents: list[list[int]] = [[] for _ in deps]
    for node, parents in enumerate(deps):
        for parent in parents:
            dependents[parent].append(node)
    return Graph(tuple(tuple(d) for d in deps), tuple(tuple(d) for d in dependents))


def fan(width: int) -> Graph:
    """1 -> ``width`` -> 1: node 0 is the root, ``width + 1`` the join."""
    return _graph([[]] + [[0]] * width + [list(range(1, width + 1))])


def chain(length: int) -> Graph:
    return _graph([[]] + [[i] for i in range(length - 1)])


def lattice(layers: int, width: int) -> Graph:
    """``layers`` x ``width``; node (l, i) depends on (l-1, i) and (l-1, (i+1) % width)."""
    deps: list[list[int]] = []
    for layer in range(layers):
        for i in range(width):
            if layer == 0:
                deps.append([])
            else:
                base = (layer - 1) * width
                deps.append(sorted({base + i, base + (i + 1) % width}))
    return _graph(deps)


@lru_cache(maxsize=32)
def graph(shape: str) -> Graph:
    """The graph named ``shape``: ``fan:200``, ``chain:50``, ``lattice:10x20``."""
    kind, _, arg = shape.partition(":")
    if kind == "fan":
        return fan(int(arg))
    if kind == "chain":
        return chain(int(arg))
    if kind == "lattice":
        layers, width = arg.split("x")
        return lattice(int(layers), int(width))
    raise ValueError(f"unknown shape {shape!r}")


@dataclass(frozen=True)
class Workload:
    """One benchmark workload: ``runs`` runs of ``shape`` submitted at once.

    ``for_each``: on the platform the fan-out is a ``for_each`` over that many items (one step
    row per item inserted at run time); raw Celery runs the same ``fan:N`` shape.
    """

    name: str
    title: str
    shape: str
    runs: int = 1
    for_each: int | None = None

    @property
    def steps(self) -> int:
        """Steps (tasks) executed in all: what steps per second is computed from."""
        return graph(self.shape).size * self.runs


WORKLOADS = [
    Workload("W1", "fan-out/fan-in 1->200->1", "fan:200"),
    Workload("W2", "chain of 50", "chain:50"),
    Workload("W3", "lattice 10x20, 2 deps each", "lattice:10x20"),
    Workload("W4", "100 runs of a 5-step chain", "chain:5", runs=100),
    Workload("W5", "for_each over 10,000 items", "fan:10000", for_each=10_000),
    Workload("W5-1k", "for_each over 1,000 items", "fan:1000", for_each=1_000),
    Workload("W6", "1,000 runs of a 3-step chain", "chain:3", runs=1000),
]


def workflow_yaml(workload: Workload) -> str:
    """The platform's workflow file for ``workload``: noop steps in the workload's shape.

    for_each workloads: ``start`` -> ``each`` (for_each over the ``items`` variable) -> ``join``,
    the same 1 -> N -> 1 shape as ``fan:N``.
    """
    lines = [f"key: bench-{workload.name.lower()}", "steps:"]
    if workload.for_each is not None:
        lines += [
            "  - id: start",
            "    type: noop",
            "  - id: each",
            "    type: noop",
            "    depends_on: [start]",
            "    for_each: ${items}",
            "    params: {output: '${item}'}",
            "  - id: join",
            "    type: noop",
            "    depends_on: [each]",
            "variables:",
            "  items: {type: array, required: true}",
        ]
        return "\n".join(lines) + "\n"
    g = graph(workload.shape)
    for node in range(g.size):
        lines.append(f"  - id: n{node}")
        lines.append("    type: noop")
        if g.deps[node]:
            lines.append(f"    depends_on: [{', '.join(f'n{d}' for d in g.deps[node])}]")
    return "\n".join(lines) + "\n"
