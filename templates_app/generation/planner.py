"""The planner (seed 000 "semantic memory hits"): rank stored templates and step types against a prompt.

Needs no model. Full-text search where the data lives:

- PostgreSQL: a stored generated column ``search_vector`` (migration 0004_template_search):
  ``to_tsvector('english', ...)`` of a template's key and name (weight A), description (B),
  category and step names (C), with a GIN index; matched with an OR of the prompt's words
  (``to_tsquery('english', 'w1 | w2 ...')``: stemmed, stop words dropped) and ranked with
  ``ts_rank``. Measured over 2,000 templates (bench data on the development machine): about
  420 ms a search when the vectors were computed at query time (SearchVector/SearchRank
  annotations); with the column and its index 18 ms when most templates share a word of the
  prompt, under 1 ms when few do.
- SQLite (the embedded default): an in-memory FTS5 table with the ``porter`` stemmer, filled
  with the tenant's templates and ranked with ``bm25`` (same column weights).

Step types (``agents.registry``) are ranked the same way against their module docstring plus a
few words users say for them ("api", "summarize", "script").

Spelling: stemming does not join British and American spellings ("licences" / "license"); the
builtin templates name both where it matters (templates_app/builtin/package-audit.yaml).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from django.db import connection

from ..models import WorkflowTemplate

#: Templates of one tenant considered at most (latest active version of each key).
MAX_TEMPLATES = 5000
#: Words of the prompt used at most.
MAX_WORDS = 64
_WORD = re.compile(r"[a-z0-9]+")
#: English stop words (PostgreSQL's english dictionary drops these too; FTS5's porter does not).
STOP_WORDS = frozenset(
    "a about above after again against all am an and any are as at be because been before being below between "
    "both but by can could did do does doing down during each few for from further had has have having he her "
    "here hers him his how i if in into is it its itself just me more most my no nor not now of off on once only "
    "or other our ours out over own same she should so some such than that the their them then there these they "
    "this those through to too under until up very was we were what when where which while who whom why will "
    "with would you your".split()
)

#: Extra words per step type: what users call the thing (seed 000's "heuristic enrichments").
STEP_TYPE_WORDS = {
    "http": "api call endpoint request fetch download webhook agent service data rest json url",
    "llm": "ai model prompt summarize summary classify extract generate text language chat analysis",
    "exec": "command script shell program run process scan count lines code tool binary subprocess",
    "python": "function callable python compute aggregate transform report parse inspect",
    "condition": "if branch check decide compare threshold gate",
    "parallel": "parallel concurrently fan out at once together",
    "noop": "placeholder constant fixed value",
    "sleep": "wait delay pause",
}


@dataclass
class Match:
    """A ranked hit: ``name`` is a template key or a step type; ``score`` > 0, larger is better."""

    name: str
    score: float
    version: int | None = None
    description: str = ""


@dataclass
class Plan:
    """The planner's answer.

    ``templates``: matches best first (a template's latest active version in the tenant);
    ``step_types``: the registered step types best first; ``chain``: the steps of the best
    template in dependency order (``[{"id", "type", "depends_on"}]``), empty when nothing matched.
    """

    templates: list[Match] = field(default_factory=list)
    step_types: list[Match] = field(default_factory=list)
    chain: list[dict[str, Any]] = field(default_factory=list)
    backend: str = ""

    @property
    def best(self) -> Match | None:
        return self.templates[0] if self.templates else None


def words(text: str) -> list[str]:
    """The prompt's words, lowercased, ASCII letters and digits only (safe inside a tsquery), deduplicated."""
    seen: list[str] = []
    for word in _WORD.findall(text.lower()):
        if word not in seen and word not in STOP_WORDS:
            seen.append(word)
    return seen[:MAX_WORDS]


@functools.lru_cache(maxsize=1)
def step_type_documents() -> dict[str, str]:
    """``{type: text}``: the handler module's first paragraph, its aliases and :data:`STEP_TYPE_WORDS`.

    Computed once per process (handlers register at import).
    """
    from agents import registry

    docs: dict[str, str] = {}
    types = sorted(registry.handler_types() | {"condition", "parallel"})
    for name in types:
        text = ""
        spec = importlib.util.find_spec(f"agents.handlers.{name}")
        if spec is not None and spec.origin:
            try:
                with open(spec.origin, encoding="utf-8") as handle:
                    text = (ast.get_docstring(ast.parse(handle.read())) or "").split("\n\n")[0]
            except (OSError, SyntaxError):
                text = ""
        aliases = [alias for alias, canonical in registry._aliases.items() if canonical == name and alias != name]
        docs[name] = " ".join([name, *aliases, text.replace("`", " "), STEP_TYPE_WORDS.get(name, "")])
    return docs


def _latest_templates(tenant_id: str) -> list[WorkflowTemplate]:
    rows = (
        WorkflowTemplate.objects.filter(tenant_id=tenant_id, is_active=True)
        .order_by("key", "-version")
        .only("pk", "key", "version", "name", "description", "category", "spec")
    )
    latest: dict[str, WorkflowTemplate] = {}
    for row in rows[: MAX_TEMPLATES * 4]:
        latest.setdefault(row.key, row)
        if len(latest) >= MAX_TEMPLATES:
            break
    return list(latest.values())


def _step_names(spec: Any) -> str:
    steps = spec.get("steps") if isinstance(spec, dict) else None
    if not isinstance(steps, list):
        return ""
    return " ".join(f"{s.get('id', '')} {s.get('name', '')}" for s in steps if isinstance(s, dict))


def chain_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """A template's steps in a dependency order (Kahn's algorithm, file order among ready steps)."""
    steps = [s for s in spec.get("steps", []) if isinstance(s, dict)]
    done: set[str] = set()
    order: list[dict[str, Any]] = []
    while len(order) < len(steps):
        ready = [s for s in steps if s["id"] not in done and set(s.get("depends_on", [])) <= done]
        if not ready:  # a cycle: cannot happen for a loaded spec
            break
        for step in ready:
            done.add(step["id"])
            order.append({"id": step["id"], "type": step.get("type"), "depends_on": list(step.get("depends_on", []))})
    return order


def plan(prompt: str, tenant_id: str, limit: int = 5) -> Plan:
    """Rank ``tenant_id``'s templates and the step types against ``prompt``; see the module docstring.

    Only the tenant's own templates are searched. Returns a :class:`Plan` (empty lists when no
    word of the prompt matches anything).
    """
    terms = words(prompt)
    result = Plan(backend=connection.vendor)
    if not terms:
        return result
    step_docs = step_type_documents()
    if connection.vendor == "postgresql":
        result.templates = _postgres_templates(terms, tenant_id, limit)
        result.step_types = _postgres_documents(terms, step_docs)
    else:
        templates = _latest_templates(tenant_id)
        result.templates = _fts5_templates(terms, templates, limit)
        result.step_types = _fts5_documents(terms, step_docs)
    if result.templates:
        best = WorkflowTemplate.objects.filter(
            tenant_id=tenant_id, key=result.templates[0].name, version=result.templates[0].version
        ).first()
        if best is not None:
            result.chain = chain_of(best.spec)
    return result


# --- PostgreSQL ----------------------------------------------------------------------------------


def _tsquery_text(terms: list[str]) -> str:
    return " | ".join(terms)  # words are [a-z0-9]+ only: nothing to escape


#: The planner's search (migration 0004_template_search: the stored vector and its GIN index).
_TEMPLATE_SEARCH = """
SELECT t.key, t.version, ts_rank(t.search_vector, q) AS rank, t.description
FROM templates_app_workflowtemplate t, to_tsquery('english', %s) q
WHERE t.tenant_id = %s AND t.is_active AND t.search_vector @@ q
  AND NOT EXISTS (
    SELECT 1 FROM templates_app_workflowtemplate n
    WHERE n.tenant_id = t.tenant_id AND n.key = t.key AND n.is_active AND n.version > t.version
  )
ORDER BY rank DESC, t.key
LIMIT %s
"""


def _postgres_templates(terms: list[str], tenant_id: str, limit: int) -> list[Match]:
    """The tenant's latest active versions whose ``search_vector`` matches any word, best ``ts_rank`` first."""
    with connection.cursor() as cursor:
        cursor.execute(_TEMPLATE_SEARCH, [_tsquery_text(terms), tenant_id, limit])
        return [Match(key, float(rank), version, description) for key, version, rank, description in cursor.fetchall()]


def _postgres_documents(terms: list[str], docs: dict[str, str]) -> list[Match]:
    names, texts = list(docs), [docs[n] for n in docs]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT name, ts_rank(to_tsvector('english', doc), to_tsquery('english', %s)) AS rank"
            " FROM unnest(%s::text[], %s::text[]) AS t(name, doc) ORDER BY rank DESC, name",
            [_tsquery_text(terms), names, texts],
        )
        return [Match(name, float(rank)) for name, rank in cursor.fetchall() if rank > 0]


# --- SQLite FTS5 --------------------------------------------------------------------------------


def _fts5_rank(terms: list[str], rows: list[tuple[str, str, str, str]], limit: int) -> list[tuple[str, float]]:
    """``rows``: (name, a-text, b-text, c-text); best ``limit`` names with their score, best first.

    The score counts, per prompt word, the columns it matches (weights 1.0 / 0.4 / 0.2, the
    defaults of PostgreSQL's ts_rank for A / B / C); FTS5's ``bm25`` breaks ties. bm25 alone is
    useless on a handful of documents: its IDF goes to zero when a word is in most of them.
    """
    db = sqlite3.connect(":memory:")
    try:
        db.execute("CREATE VIRTUAL TABLE doc USING fts5(name UNINDEXED, a, b, c, tokenize='porter unicode61')")
        db.executemany("INSERT INTO doc (name, a, b, c) VALUES (?, ?, ?, ?)", rows)
        scores: dict[str, float] = {}
        for term in terms:
            for column, weight in (("a", 1.0), ("b", 0.4), ("c", 0.2)):
                for (name,) in db.execute("SELECT name FROM doc WHERE doc MATCH ?", (f'{column} : "{term}"',)):
                    scores[name] = scores.get(name, 0.0) + weight
        if not scores:
            return []
        match = " OR ".join(f'"{term}"' for term in terms)
        ties = {
            name: bm25
            for name, bm25 in db.execute(
                "SELECT name, bm25(doc, 0.0, 4.0, 2.0, 1.0) FROM doc WHERE doc MATCH ?", (match,)
            )
        }
    finally:
        db.close()
    ordered = sorted(scores, key=lambda name: (-scores[name], ties.get(name, 0.0), name))
    return [(name, round(scores[name], 4)) for name in ordered[:limit]]


def _fts5_templates(terms: list[str], templates: list[WorkflowTemplate], limit: int) -> list[Match]:
    by_key = {t.key: t for t in templates}
    rows = [
        (t.key, f"{t.key.replace('-', ' ')} {t.name}", t.description, f"{t.category} {_step_names(t.spec)}")
        for t in templates
    ]
    return [
        Match(key, score, by_key[key].version, by_key[key].description) for key, score in _fts5_rank(terms, rows, limit)
    ]


def _fts5_documents(terms: list[str], docs: dict[str, str]) -> list[Match]:
    rows = [(name, name, text, "") for name, text in docs.items()]
    return [Match(name, score) for name, score in _fts5_rank(terms, rows, len(rows))]
