"""Callables behind the builtin templates `package-audit` and `source-report`.

Each function is a plain function that takes keyword arguments and returns a JSON-serializable
value, so a `python` step can call it (they are on the ORCHESTRATOR_PYTHON_CALLABLES allow-list).
They read real data that nobody here wrote: the installed distributions' metadata
(`importlib.metadata`) and the output of the `scan` exec step of `source-report`.

Sizes are in bytes throughout.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import stat
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

from agents import workdir

# --------------------------------------------------------------------------------------------
# Licenses
# --------------------------------------------------------------------------------------------

#: Copyleft families we flag, each with the patterns that name it. Acronyms match case-sensitively
#: and must not be glued to a preceding letter ("LGPL" is matched as LGPL, not as "GPL" inside
#: another word); spelled-out names match case-insensitively. "GPL-compatible" (said of permissive
#: licenses such as the PSF's) is not a GPL.
_COPYLEFT_PATTERNS: dict[str, list[re.Pattern[str]]] = {
    "AGPL": [
        re.compile(r"(?<![A-Za-z])AGPL"),
        re.compile(r"affero general public licen[cs]e", re.I),
    ],
    "LGPL": [
        re.compile(r"(?<![A-Za-z])LGPL"),
        re.compile(r"(lesser|library) general public licen[cs]e", re.I),
    ],
    "GPL": [
        re.compile(r"(?<![A-Za-z])GPL(?![- ]?compatible)"),
        re.compile(r"(?<!lesser )(?<!library )(?<!affero )general public licen[cs]e", re.I),
    ],
    "MPL": [re.compile(r"(?<![A-Za-z])MPL"), re.compile(r"mozilla public licen[cs]e", re.I)],
    "EPL": [re.compile(r"(?<![A-Za-z])EPL"), re.compile(r"eclipse public licen[cs]e", re.I)],
    "EUPL": [
        re.compile(r"(?<![A-Za-z])EUPL"),
        re.compile(r"european union public licen[cs]e", re.I),
    ],
    "CDDL": [
        re.compile(r"(?<![A-Za-z])CDDL"),
        re.compile(r"common development and distribution licen[cs]e", re.I),
    ],
    "OSL": [
        re.compile(r"(?<![A-Za-z])OSL(?![A-Za-z])"),
        re.compile(r"open software licen[cs]e", re.I),
    ],
    "CC-BY-SA": [
        re.compile(r"CC[- ]BY[- ]SA", re.I),
        re.compile(r"attribution[- ]share ?alike", re.I),
    ],
}

#: License classifiers that name a category, not a license.
_GENERIC_CLASSIFIERS = {"OSI Approved", "DFSG approved"}

#: Values of the License field that mean "not declared".
_EMPTY_LICENSE = {"", "unknown", "none", "n/a", "na", "-"}

#: A License field longer than this (or spanning lines) is treated as the license text itself.
_LONG_LICENSE = 80

#: Common spellings of the same license, mapped to one key for the license table.
_LICENSE_ALIASES = {
    "mit": "MIT",
    "bsd": "BSD",
    "new bsd": "BSD-3-Clause",
    "modified bsd": "BSD-3-Clause",
    "bsd 3-clause": "BSD-3-Clause",
    "bsd-3-clause": "BSD-3-Clause",
    "3-clause bsd": "BSD-3-Clause",
    "bsd 2-clause": "BSD-2-Clause",
    "bsd-2-clause": "BSD-2-Clause",
    "2-clause bsd": "BSD-2-Clause",
    "apache": "Apache",
    "apache software": "Apache",
    "apache 2.0": "Apache-2.0",
    "apache 2": "Apache-2.0",
    "apache-2.0": "Apache-2.0",
    "asl 2": "Apache-2.0",
    "asl 2.0": "Apache-2.0",
    "apache license 2.0": "Apache-2.0",
    "apache license, version 2.0": "Apache-2.0",
    "apache license version 2.0": "Apache-2.0",
    "isc": "ISC",
    "isc license (iscl)": "ISC",
    "mpl 2.0": "MPL-2.0",
    "mpl-2.0": "MPL-2.0",
    "lgplv3": "LGPL-3.0",
    "mozilla public license 2.0 (mpl 2.0)": "MPL-2.0",
    "python software foundation": "PSF",
    "psf": "PSF",
}


def copyleft_families(text: str | None) -> list[str]:
    """Copyleft families named in a license string (SPDX expression, License field or classifier).

    Returns family names from GPL, LGPL, AGPL, MPL, EPL, EUPL, CDDL, OSL, CC-BY-SA, in that
    table's order, without repeats; [] for permissive, unknown or empty text. Weak copyleft (LGPL,
    MPL, EPL, CDDL) counts: the point of the audit is to list what needs a lawyer's look.
    """
    if not text:
        return []
    return [family for family, patterns in _COPYLEFT_PATTERNS.items() if any(p.search(text) for p in patterns)]


def is_copyleft(text: str | None) -> bool:
    """True when `text` names any copyleft license.

    Choice: a disjunction such as "MIT OR GPL-2.0" is flagged too. Whether the permissive option
    was taken is a decision about how the package is used, which metadata cannot tell; the report
    lists the package so that someone makes that decision on purpose.
    """
    return bool(copyleft_families(text))


def _license_classifiers(dist_metadata: Any) -> list[str]:
    """The specific license names of the `License ::` classifiers (generic categories dropped)."""
    names = []
    for classifier in dist_metadata.get_all("Classifier") or []:
        parts = [p.strip() for p in classifier.split("::")]
        if len(parts) < 2 or parts[0] != "License" or parts[-1] in _GENERIC_CLASSIFIERS:
            continue
        if parts[-1] not in names:
            names.append(parts[-1])
    return names


def _first_line(text: str, limit: int = _LONG_LICENSE) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def resolve_license(expression: str | None, license_field: str | None, classifiers: list[str]) -> tuple[str, str]:
    """Choose one short license name for a distribution and say where it came from.

    Order: the PEP 639 `License-Expression`; the `License` field when it is a short name; the
    license classifiers (joined with " / "); the first line of a long `License` text; else
    "unknown". Some packages put the whole license text in `License` (scipy's holds 47 kB that
    also quote bundled GPL code), so a long text is never used whole.

    Returns (license, source) with source one of "License-Expression", "License",
    "classifier", "unknown".
    """
    if expression and expression.strip():
        return " ".join(expression.split()), "License-Expression"
    text = (license_field or "").strip()
    if text.lower() in _EMPTY_LICENSE:
        text = ""
    if text and "\n" not in text and len(text) <= _LONG_LICENSE:
        return text, "License"
    if classifiers:
        return " / ".join(classifiers), "classifier"
    if text:
        return _first_line(text), "License"
    return "unknown", "unknown"


def normalize_license_name(name: str) -> str:
    """A key for the license table: spacing collapsed and common spellings of the same license
    merged ("MIT License", "MIT license" -> "MIT"; "Apache License 2.0" -> "Apache-2.0";
    "Apache Software License" -> "Apache"). Unknown names and SPDX expressions pass through;
    classifier lists (" / ") are normalized part by part."""
    text = " ".join((name or "").split())
    if not text:
        return "unknown"
    parts = []
    for part in text.split(" / "):
        short = re.sub(r"\s+licen[cs]e$", "", part, flags=re.I).strip().lower()
        # Only known names lose their "License": "Dual License" stays as it is.
        parts.append(_LICENSE_ALIASES.get(part.lower()) or _LICENSE_ALIASES.get(short) or part)
    return " / ".join(dict.fromkeys(parts))


# --------------------------------------------------------------------------------------------
# package-audit
# --------------------------------------------------------------------------------------------


def _normalize_name(name: str) -> str:
    """PEP 503 normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def list_distributions(batch_size: int = 25) -> dict[str, Any]:
    """The installed distributions, deduplicated and cut into batches for `inspect`.

    Two distributions whose names normalize alike (PEP 503) count once: the first one on
    sys.path, which is the one `import` and `importlib.metadata.distribution()` would find.

    Returns {"count": int, "batches": [[name, ...], ...]}, names sorted by normalized name,
    each batch at most `batch_size` long. Raises ValueError when batch_size < 1.
    """
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    seen: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if not name:  # a broken .dist-info without metadata: nothing to audit
            continue
        seen.setdefault(_normalize_name(name), name)
    names = [seen[key] for key in sorted(seen)]
    batches = [names[i : i + batch_size] for i in range(0, len(names), batch_size)]
    return {"count": len(names), "batches": batches}


_EXTRA_MARKER = re.compile(r"""\bextra\s*==""")


def _inspect_one(name: str) -> dict[str, Any]:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        # Uninstalled between `list` and `inspect`: keep the row so the report says so.
        return {
            "name": name,
            "version": None,
            "license": "unknown",
            "license_source": "unknown",
            "license_classifiers": [],
            "requires": 0,
            "requires_runtime": 0,
            "size_bytes": 0,
            "files": 0,
            "error": "not installed",
        }
    md = dist.metadata
    classifiers = _license_classifiers(md)
    license_name, source = resolve_license(md.get("License-Expression"), md.get("License"), classifiers)
    requires = dist.requires or []
    runtime = [r for r in requires if not _EXTRA_MARKER.search(r.partition(";")[2])]
    files = dist.files or []
    size = 0
    for file in files:
        try:
            st = os.stat(file.locate())
        except OSError:  # listed in RECORD but gone (or never written, e.g. .pyc)
            continue
        if stat.S_ISREG(st.st_mode):
            size += st.st_size
    return {
        "name": md.get("Name") or name,
        "version": md.get("Version"),
        "license": license_name,
        "license_source": source,
        "license_classifiers": classifiers,
        "requires": len(requires),
        "requires_runtime": len(runtime),
        "size_bytes": size,
        "files": len(files),
    }


def inspect_distributions(names: list[str]) -> list[dict[str, Any]]:
    """License, dependency counts and size on disk of each named distribution.

    Returns one row per name, in the given order:
    {"name", "version", "license" (short name), "license_source" ("License-Expression" |
    "License" | "classifier" | "unknown"), "license_classifiers" ([str]), "requires" (all
    Requires-Dist entries), "requires_runtime" (those without an `extra ==` marker),
    "size_bytes" (sum of the sizes of the RECORD files that exist on disk), "files" (number of
    files RECORD lists)}. A name no longer installed gives a row with "error": "not installed".
    """
    if isinstance(names, str):
        names = [names]
    return [_inspect_one(str(name)) for name in names]


def _flatten_rows(batches: Any) -> list[dict[str, Any]]:
    """Rows from the joined for_each output: a list of lists of rows (a flat list is accepted)."""
    rows: list[dict[str, Any]] = []
    for entry in batches or []:
        if isinstance(entry, dict):
            rows.append(entry)
        elif isinstance(entry, list):
            rows.extend(r for r in entry if isinstance(r, dict))
        else:
            raise ValueError(f"expected a list of package rows, got {type(entry).__name__}")
    return rows


def aggregate_audit(batches: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Join the `inspect` batches into one audit.

    `batches` is the joined output of the for_each `inspect` step: a list (one per batch) of
    lists of rows. Rows are deduplicated by normalized name (a retried batch may repeat one).

    Returns {"total": int, "total_size_bytes": int, "licenses": {normalized license: count}
    (most common first), "license_sources": {source: count}, "copyleft": [{"name", "version",
    "license", "families"}], "copyleft_count": int, "top_by_size": [row, ...10],
    "top_by_requires": [row, ...10], "missing": [name], "packages": [row, ...] sorted by name}.
    A row is copyleft when its license or any of its license classifiers names a copyleft
    family (see `is_copyleft`); a License-Expression, when present, is authoritative and the
    classifiers are not consulted (PEP 639).
    """
    by_name: dict[str, dict[str, Any]] = {}
    for row in _flatten_rows(batches):
        by_name.setdefault(_normalize_name(str(row.get("name", ""))), row)
    packages = [by_name[key] for key in sorted(by_name)]

    copyleft = []
    for row in packages:
        texts = [row.get("license") or ""]
        if row.get("license_source") != "License-Expression":
            texts += row.get("license_classifiers") or []
        families = list(dict.fromkeys(f for t in texts for f in copyleft_families(t)))
        if families:
            copyleft.append(
                {
                    "name": row["name"],
                    "version": row.get("version"),
                    "license": row.get("license"),
                    "families": families,
                }
            )

    licenses = Counter(normalize_license_name(row.get("license") or "") for row in packages)
    sources = Counter(row.get("license_source") or "unknown" for row in packages)
    by_size = sorted(packages, key=lambda r: (-int(r.get("size_bytes") or 0), r["name"].lower()))
    by_requires = sorted(
        packages,
        key=lambda r: (
            -int(r.get("requires_runtime") or 0),
            -int(r.get("requires") or 0),
            r["name"].lower(),
        ),
    )
    return {
        "total": len(packages),
        "total_size_bytes": sum(int(r.get("size_bytes") or 0) for r in packages),
        "licenses": dict(sorted(licenses.items(), key=lambda kv: (-kv[1], kv[0].lower()))),
        "license_sources": dict(sources.most_common()),
        "copyleft": copyleft,
        "copyleft_count": len(copyleft),
        "top_by_size": by_size[:10],
        "top_by_requires": by_requires[:10],
        "missing": [r["name"] for r in packages if r.get("error")],
        "packages": packages,
    }


def _cell(value: Any) -> str:
    """A Markdown table cell: pipes escaped, newlines flattened."""
    text = "" if value is None else str(value)
    return " ".join(text.split()).replace("|", "\\|")


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def human_bytes(n: int | float) -> str:
    """1536 -> "1.5 KiB"."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


def _work_dir(ctx: Any) -> Path:
    """The run's work directory of the step ``ctx``; ValueError when called without one."""
    if ctx is None:
        raise ValueError("needs the step context (call it from a python step): files live in the run's work directory")
    return workdir.run_work_dir(ctx)


def _resolve_path(report_path: str, ctx: Any) -> Path:
    """``report_path`` inside the run's work directory (ValueError when empty or escaping)."""
    if not report_path or not str(report_path).strip():
        raise ValueError("report_path is empty")
    return workdir.confine(_work_dir(ctx), str(report_path), "report_path")


def _write_text(path: Path, text: str) -> int:
    # Write then rename, so a retried or concurrent attempt never leaves half a report behind.
    return workdir.write_file(path, text.encode("utf-8"))


def render_audit_markdown(audit: dict[str, Any]) -> str:
    """The Markdown report of an `aggregate_audit` result."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    total = int(audit.get("total") or 0)
    copyleft = audit.get("copyleft") or []
    out = [
        "# Package audit",
        "",
        f"Generated {now} by Python {platform.python_version()} ({sys.prefix}).",
        "",
        "## Summary",
        "",
        *_table(
            ["Measure", "Value"],
            [
                ["Distributions", total],
                ["Size on disk", human_bytes(int(audit.get("total_size_bytes") or 0))],
                ["Distinct licenses", len(audit.get("licenses") or {})],
                ["Copyleft", audit.get("copyleft_count", len(copyleft))],
                ["Missing (uninstalled during the audit)", len(audit.get("missing") or [])],
            ]
            + [
                [f"License taken from {source}", count]
                for source, count in (audit.get("license_sources") or {}).items()
            ],
        ),
        "",
        "## Copyleft",
        "",
    ]
    if copyleft:
        out += [
            f"> **Warning:** {len(copyleft)} distribution(s) name a copyleft license (GPL, LGPL,"
            " AGPL, MPL, EPL, EUPL, CDDL, OSL or CC-BY-SA). A package offered under a choice"
            ' ("MIT OR GPL-2.0") is listed too. Review how each one is used and distributed.',
            "",
            *_table(
                ["Package", "Version", "License", "Families"],
                [[c["name"], c.get("version"), c.get("license"), ", ".join(c.get("families", []))] for c in copyleft],
            ),
        ]
    else:
        out.append("None found.")
    out += [
        "",
        "## Licenses",
        "",
        *_table(
            ["License", "Distributions", "Share"],
            [
                [name, count, f"{100 * count / total:.1f}%" if total else "-"]
                for name, count in (audit.get("licenses") or {}).items()
            ],
        ),
        "",
        "## Top 10 by size on disk",
        "",
        *_table(
            ["Package", "Version", "Size", "Files"],
            [
                [r["name"], r.get("version"), human_bytes(int(r.get("size_bytes") or 0)), r.get("files")]
                for r in audit.get("top_by_size") or []
            ],
        ),
        "",
        "## Top 10 by dependency count",
        "",
        *_table(
            ["Package", "Version", "Runtime requirements", "All (with extras)"],
            [
                [r["name"], r.get("version"), r.get("requires_runtime"), r.get("requires")]
                for r in audit.get("top_by_requires") or []
            ],
        ),
        "",
        "## All distributions",
        "",
        *_table(
            ["Package", "Version", "License", "Source", "Requires (runtime/all)", "Size", "Files"],
            [
                [
                    r["name"],
                    r.get("version") or r.get("error", ""),
                    r.get("license"),
                    r.get("license_source"),
                    f"{r.get('requires_runtime', 0)}/{r.get('requires', 0)}",
                    human_bytes(int(r.get("size_bytes") or 0)),
                    r.get("files"),
                ]
                for r in audit.get("packages") or []
            ],
        ),
        "",
    ]
    return "\n".join(out)


def write_audit_report(audit: dict[str, Any], report_path: str = "package-audit.md", ctx: Any = None) -> dict[str, Any]:
    """Write the Markdown audit report to `report_path` inside the run's work directory.

    `report_path` is relative to the run's work directory (``ctx.work_dir``, see
    `agents.workdir`); a path that leaves it (absolute, ``..``, a symlink pointing out) is
    refused. Missing parent directories are created; the file is replaced atomically. Returns
    {"path": absolute path, "packages": int, "copyleft_count": int, "bytes": size of the report
    in bytes}. Raises ValueError on an empty or escaping path, OSError when the file cannot be
    written.
    """
    if not isinstance(audit, dict):
        raise ValueError(f"audit must be the output of aggregate_audit, got {type(audit).__name__}")
    path = _resolve_path(report_path, ctx)
    size = _write_text(path, render_audit_markdown(audit))
    return {
        "path": str(path),
        "packages": int(audit.get("total") or 0),
        "copyleft_count": int(audit.get("copyleft_count") or 0),
        "bytes": size,
    }


# --------------------------------------------------------------------------------------------
# source-report
# --------------------------------------------------------------------------------------------

_SKIP_DIRS = {"__pycache__", "node_modules"}


def _has_python(directory: Path) -> bool:
    for _dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        if any(f.endswith(".py") for f in filenames):
            return True
    return False


_PACKAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _installed_package_dir(name: str) -> Path | None:
    """The folder of the installed top-level package ``name``, or None.

    Found without importing it, and only a regular package (with ``__init__.py``) installed
    under the interpreter's prefix or site-packages: a folder that merely sits on ``sys.path``
    (the project's own, its data directory as a namespace package) does not count.
    """
    import importlib.util
    import site

    if not _PACKAGE_NAME.match(name):
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]).resolve()
    installed = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, *site.getsitepackages())}
    if not any(folder == base or base in folder.parents for base in installed):
        return None
    return folder


def list_subpackages(source_dir: str = "", ctx: Any = None) -> dict[str, Any]:
    """The directories the `scan` step fans out over.

    `source_dir`: "" means the installed Django package; the import name of another installed
    top-level package (``celery``) means that package's folder; anything else is a folder inside
    the run's work directory (``ctx.work_dir``; absolute paths, ``..`` and symlinks leading out
    are refused). Returns {"root": absolute path, "name": the root directory's name,
    "subpackages": [absolute paths of the immediate subdirectories holding at least one .py file
    at any depth, sorted], "root_files": number of .py files directly in the root (not scanned:
    they belong to no subpackage)}. Hidden directories and __pycache__ are skipped. Raises
    ValueError when the path escapes, does not exist or is not a directory.
    """
    name = "" if source_dir is None else str(source_dir).strip()
    package = _installed_package_dir(name or "django")
    if package is not None and (not name or not (_work_dir(ctx) / name).exists()):
        root = package
    else:
        root = workdir.confine(_work_dir(ctx), name, "source_dir")
    if not root.exists():
        raise ValueError(f"source_dir {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"source_dir {str(root)!r} is not a directory")
    subpackages = sorted(
        str(child)
        for child in root.iterdir()
        if child.is_dir() and not child.name.startswith(".") and child.name not in _SKIP_DIRS and _has_python(child)
    )
    root_files = sum(1 for child in root.iterdir() if child.is_file() and child.suffix == ".py")
    return {"root": str(root), "name": root.name, "subpackages": subpackages, "root_files": root_files}


_SCAN_COUNTS = ("files", "lines", "code_lines", "functions", "classes", "todo", "parse_errors")


def _scan_result(item: Any) -> dict[str, Any]:
    """One scan object from an exec step output ({"exit_code", "stdout", "stderr"}) or itself."""
    if isinstance(item, dict) and "stdout" in item and "package" not in item:
        item = item["stdout"]
    if isinstance(item, (str, bytes)):
        try:
            item = json.loads(item)
        except ValueError as exc:
            raise ValueError(f"scan output is not JSON: {str(item)[:200]!r}") from exc
    if not isinstance(item, dict) or "package" not in item:
        raise ValueError(f"unexpected scan output: {str(item)[:200]!r}")
    return item


def join_source_report(
    root: str, name: str, scans: list[Any], report_path: str = "", ctx: Any = None
) -> dict[str, Any]:
    """Join the per-subpackage scans into totals, rows and a Markdown report.

    `scans` is the joined output of the for_each `scan` exec step: a list of {"exit_code",
    "stdout": {scan object}, "stderr"} (bare scan objects and JSON strings are accepted too).
    A scan object is {"package", "path", "files", "lines", "code_lines", "comment_lines",
    "blank_lines", "functions", "classes", "todo", "parse_errors"}.

    Returns {"root", "name", "totals": {"subpackages", "files", "lines", "code_lines",
    "functions", "classes", "todo", "parse_errors"}, "subpackages": [scan objects sorted by
    lines, largest first], "markdown": str, "path": absolute path of the written report or None}.
    The file is written only when `report_path` is non-empty: relative to the run's work
    directory and confined to it like `write_audit_report`'s (parent directories created).
    """
    rows = [_scan_result(item) for item in scans or []]
    rows.sort(key=lambda r: (-int(r.get("lines") or 0), str(r.get("package"))))
    totals: dict[str, int] = {"subpackages": len(rows)}
    for key in _SCAN_COUNTS:
        totals[key] = sum(int(r.get(key) or 0) for r in rows)

    lines = totals["lines"]
    md = [
        f"# Source report: {name}",
        "",
        f"Root: `{root}`",
        "",
        "## Totals",
        "",
        *_table(
            ["Measure", "Value"],
            [[key.replace("_", " ").capitalize(), f"{value:,}"] for key, value in totals.items()],
        ),
        "",
        "Code lines are lines that are neither blank nor comment-only (docstrings count as code);"
        " TODO counts TODO, FIXME and XXX markers in comments. Modules directly in the root are"
        " not part of any subpackage and are not counted.",
        "",
        "## Subpackages by size",
        "",
        *_table(
            ["Subpackage", "Files", "Lines", "Share", "Code lines", "Functions", "Classes", "TODO", "Parse errors"],
            [
                [
                    r.get("package"),
                    r.get("files"),
                    f"{int(r.get('lines') or 0):,}",
                    f"{100 * int(r.get('lines') or 0) / lines:.1f}%" if lines else "-",
                    f"{int(r.get('code_lines') or 0):,}",
                    r.get("functions"),
                    r.get("classes"),
                    r.get("todo"),
                    r.get("parse_errors"),
                ]
                for r in rows
            ],
        ),
        "",
    ]
    markdown = "\n".join(md)
    path = None
    if report_path and str(report_path).strip():
        resolved = _resolve_path(report_path, ctx)
        _write_text(resolved, markdown)
        path = str(resolved)
    return {
        "root": root,
        "name": name,
        "totals": totals,
        "subpackages": rows,
        "markdown": markdown,
        "path": path,
    }


# --------------------------------------------------------------------------------------------
# Output examples for dry runs (templates_app.generation.dryrun): the shape each callable returns,
# so a generated workflow's references to these outputs are checked without running them.
# --------------------------------------------------------------------------------------------

_PACKAGE_ROW = {
    "name": "example",
    "version": "1.0",
    "license": "MIT",
    "license_source": "expression",
    "license_classifiers": [],
    "requires": 0,
    "requires_runtime": 0,
    "size_bytes": 0,
    "files": 0,
}
list_distributions.dry_run_output = {"count": 1, "batches": [["example"]]}  # type: ignore[attr-defined]
inspect_distributions.dry_run_output = [_PACKAGE_ROW]  # type: ignore[attr-defined]
aggregate_audit.dry_run_output = {  # type: ignore[attr-defined]
    "total": 1,
    "total_size_bytes": 0,
    "licenses": {"MIT": 1},
    "license_sources": {"expression": 1},
    "copyleft": [],
    "copyleft_count": 0,
    "top_by_size": [_PACKAGE_ROW],
    "top_by_requires": [_PACKAGE_ROW],
    "missing": [],
    "packages": [_PACKAGE_ROW],
}
write_audit_report.dry_run_output = {
    "path": "/dry-run/package-audit.md",
    "packages": 1,
    "copyleft_count": 0,
    "bytes": 0,
}  # type: ignore[attr-defined]
list_subpackages.dry_run_output = {
    "root": "/dry-run",
    "name": "example",
    "subpackages": ["/dry-run/a"],
    "root_files": 0,
}  # type: ignore[attr-defined]
join_source_report.dry_run_output = {  # type: ignore[attr-defined]
    "root": "/dry-run",
    "name": "example",
    "totals": {"files": 0, "lines": 0, "code_lines": 0, "functions": 0, "classes": 0, "todo": 0, "parse_errors": 0},
    "subpackages": [],
    "markdown": "",
    "path": None,
}
