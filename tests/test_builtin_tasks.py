"""The builtin templates' callables, run on real data: this machine's installed distributions and
the installed Django package. No database."""

from __future__ import annotations

import inspect
import json
import os
from importlib import metadata
from pathlib import Path

import django
import pytest
import yaml

from agents.registry import StepContext, get_handler, run_with_timeout
from templates_app import builtin_tasks as bt
from templates_app.durations import parse_duration
from templates_app.expressions import evaluate, render
from templates_app.spec import load_spec, validate_inputs

BUILTIN = Path(bt.__file__).resolve().parent / "builtin"
DJANGO_DIR = Path(django.__file__).resolve().parent
#: The run id of every step run_step runs (so its work directory is known).
RUN_ID = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
def work(settings, tmp_path):
    """The run's work directory (under a temporary ORCHESTRATOR_RUN_WORK_ROOT) and a step context."""
    from agents import workdir

    settings.ORCHESTRATOR_RUN_WORK_ROOT = str(tmp_path / "work-root")
    ctx = StepContext(run_id=RUN_ID, step_id="report", step_pk=1, attempt=1, params={}, timeout=60, idempotency_key="k")
    path = workdir.run_work_dir(ctx)
    return path, ctx


def roundtrip(value):
    """What the engine does between steps: outputs are stored as JSON."""
    return json.loads(json.dumps(value))


def load_yaml(name: str) -> dict:
    return yaml.safe_load((BUILTIN / name).read_text())


def scan_script() -> str:
    step = next(s for s in load_yaml("source-report.yaml")["steps"] if s["id"] == "scan")
    command = step["params"]["command"]
    assert command[:2] == ["python", "-c"] and command[3] == "${item}"
    return command[2]


def run_step(step: dict, context: dict, index: int = 0):
    """Run one step of a builtin template the way a worker does, minus the database: render its
    params against ``context`` and call the real handler under its timeout."""
    params = dict(step.get("params") or {})
    if step["type"] == "condition":
        params["expression"] = evaluate(step["condition"], context)
    params = render(params, context)
    ctx = StepContext(
        run_id=RUN_ID,
        step_id=f"{step['id']}[{index}]" if step.get("for_each") else step["id"],
        step_pk=1,
        attempt=1,
        params=params,
        timeout=parse_duration(step.get("timeout") or "60s"),
        idempotency_key=f"test:{step['id']}:{index}",
    )
    return json.loads(json.dumps(run_with_timeout(get_handler(step["type"]), ctx)))


def run_scan(path: Path) -> dict:
    """The shipped `scan` step on one directory, through the real exec sandbox (scrubbed env,
    temp cwd, rlimits). Returns the scan object."""
    step = next(s for s in load_yaml("source-report.yaml")["steps"] if s["id"] == "scan")
    output = run_step(step, {"vars": {}, "steps": {}, "item": str(path), "index": 0})
    assert output["exit_code"] == 0, output["stderr"]
    assert isinstance(output["stdout"], dict), output
    return output["stdout"]


# --- copyleft classifier -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, families",
    [
        ("GPL-3.0-or-later", ["GPL"]),
        ("GPLv3", ["GPL"]),
        ("LGPLv2+", ["LGPL"]),
        ("LGPL-3.0-only", ["LGPL"]),
        ("AGPL-3.0", ["AGPL"]),
        ("MPL 2.0", ["MPL"]),
        ("MPL-2.0", ["MPL"]),
        ("Mozilla Public License 2.0 (MPL 2.0)", ["MPL"]),
        ("GNU General Public License v3 (GPLv3)", ["GPL"]),
        ("GNU Library or Lesser General Public License (LGPL)", ["LGPL"]),
        ("GNU Affero General Public License v3", ["AGPL"]),
        ("EPL-2.0", ["EPL"]),
        ("EUPL-1.2", ["EUPL"]),
        ("CDDL-1.0", ["CDDL"]),
        ("OSL-3.0", ["OSL"]),
        ("CC-BY-SA-4.0", ["CC-BY-SA"]),
        ("GPL-2.0 WITH Classpath-exception-2.0", ["GPL"]),
        ("BSD-3-Clause", []),
        ("BSD License", []),
        ("MIT", []),
        ("MIT License", []),
        ("Apache-2.0", []),
        ("Apache Software License", []),
        ("ISC", []),
        ("PSF-2.0", []),
        ("Python Software Foundation License", []),
        ("GPL-compatible permissive license", []),
        ("CC-BY-4.0", []),
        ("CC0-1.0", []),
        ("unknown", []),
        ("", []),
        (None, []),
    ],
)
def test_copyleft_families(text, families):
    assert bt.copyleft_families(text) == families
    assert bt.is_copyleft(text) is bool(families)


@pytest.mark.parametrize(
    "text",
    ["MIT OR GPL-2.0", "Apache-2.0 OR LGPL-2.1-or-later", "public domain, Python, 2-Clause BSD, GPL 3"],
)
def test_any_copyleft_option_is_flagged(text):
    # Documented choice: a disjunction with a copyleft option is flagged for review.
    assert bt.is_copyleft(text)


def test_resolve_license_order():
    assert bt.resolve_license("MIT", "Apache", ["BSD License"]) == ("MIT", "License-Expression")
    assert bt.resolve_license(None, "BSD-3-Clause", ["BSD License"]) == ("BSD-3-Clause", "License")
    assert bt.resolve_license(None, "UNKNOWN", ["BSD License"]) == ("BSD License", "classifier")
    assert bt.resolve_license(None, "", ["MIT License", "Apache Software License"]) == (
        "MIT License / Apache Software License",
        "classifier",
    )
    assert bt.resolve_license(None, None, []) == ("unknown", "unknown")


def test_long_license_text_is_not_used_whole():
    # Like scipy's License field: the full text, quoting a bundled GPL component further down.
    text = "Copyright (c) 2001, Someone.\nAll rights reserved.\n\n" + "Redistribution ... " * 50
    text += "\nThis bundled file is under the GPL.\n"
    assert bt.resolve_license(None, text, ["BSD License"]) == ("BSD License", "classifier")
    name, source = bt.resolve_license(None, text, [])
    assert (name, source) == ("Copyright (c) 2001, Someone.", "License")
    assert not bt.is_copyleft(name)


def test_normalize_license_name():
    assert bt.normalize_license_name("MIT License") == "MIT"
    assert bt.normalize_license_name("MIT license") == "MIT"
    assert bt.normalize_license_name("  MIT  ") == "MIT"
    assert bt.normalize_license_name("Apache Software License") == "Apache"
    assert bt.normalize_license_name("Apache 2.0") == "Apache-2.0"
    assert bt.normalize_license_name("BSD-3-Clause") == "BSD-3-Clause"
    assert bt.normalize_license_name("MIT OR Apache-2.0") == "MIT OR Apache-2.0"
    assert bt.normalize_license_name("MIT License / Apache Software License") == "MIT / Apache"
    assert bt.normalize_license_name("Apache License 2.0") == "Apache-2.0"
    assert bt.normalize_license_name("BSD 3-Clause License") == "BSD-3-Clause"
    assert bt.normalize_license_name("ISC License (ISCL)") == "ISC"
    assert bt.normalize_license_name("Dual License") == "Dual License"  # unknown: left alone
    assert bt.normalize_license_name("Some Custom License") == "Some Custom License"
    assert bt.normalize_license_name("") == "unknown"


# --- package-audit on the real environment ---------------------------------------------------


@pytest.fixture(scope="module")
def listing():
    return roundtrip(bt.list_distributions(batch_size=25))


@pytest.fixture(scope="module")
def inspected(listing):
    return [roundtrip(bt.inspect_distributions(names=batch)) for batch in listing["batches"]]


@pytest.fixture(scope="module")
def audit(inspected):
    return roundtrip(bt.aggregate_audit(batches=inspected))


def test_list_distributions(listing):
    names = [n for batch in listing["batches"] for n in batch]
    normalized = [bt._normalize_name(n) for n in names]
    assert listing["count"] == len(names) > 50
    assert normalized == sorted(set(normalized))  # sorted and deduplicated
    assert all(1 <= len(b) <= 25 for b in listing["batches"])
    assert all(len(b) == 25 for b in listing["batches"][:-1])
    for required in ("django", "celery", "pyyaml", "jinja2"):
        assert required in normalized
    installed = {bt._normalize_name(d.metadata["Name"]) for d in metadata.distributions()}
    assert set(normalized) == installed


def test_list_distributions_batch_size():
    assert len(bt.list_distributions(batch_size=1000)["batches"]) == 1
    with pytest.raises(ValueError, match="batch_size"):
        bt.list_distributions(batch_size=0)


def test_inspect_django_and_celery():
    django_row, celery_row = bt.inspect_distributions(names=["Django", "celery"])
    assert django_row["name"] == "Django"
    assert django_row["version"] == django.__version__
    assert "BSD" in django_row["license"]
    assert django_row["size_bytes"] > 1_000_000  # Django is several MB on disk
    assert django_row["files"] > 500
    assert 0 < django_row["requires_runtime"] <= django_row["requires"]  # asgiref, sqlparse, ...
    # celery has many extras (redis, sqs, ...): most of its Requires-Dist are extras.
    assert celery_row["requires"] > celery_row["requires_runtime"] > 0


def test_inspect_missing_distribution():
    (row,) = bt.inspect_distributions(names=["no-such-distribution-xyz"])
    assert row["error"] == "not installed"
    assert row["size_bytes"] == 0


def test_aggregate_audit_real(audit, listing):
    assert audit["total"] == listing["count"]
    assert sum(audit["licenses"].values()) == audit["total"]
    assert sum(audit["license_sources"].values()) == audit["total"]
    assert audit["total_size_bytes"] == sum(r["size_bytes"] for r in audit["packages"])
    assert audit["total_size_bytes"] > 10_000_000
    assert [bt._normalize_name(r["name"]) for r in audit["packages"]] == sorted(
        bt._normalize_name(r["name"]) for r in audit["packages"]
    )
    sizes = [r["size_bytes"] for r in audit["top_by_size"]]
    assert len(sizes) == 10 and sizes == sorted(sizes, reverse=True)
    assert sizes[0] == max(r["size_bytes"] for r in audit["packages"])
    runtime = [r["requires_runtime"] for r in audit["top_by_requires"]]
    assert len(runtime) == 10 and runtime == sorted(runtime, reverse=True)
    assert audit["copyleft_count"] == len(audit["copyleft"])
    flagged = {c["name"].lower(): c for c in audit["copyleft"]}
    # psycopg (a pinned requirement of this project) is LGPL-3.0-only.
    assert flagged["psycopg"]["families"] == ["LGPL"]
    assert "django" not in flagged and "celery" not in flagged
    assert all(c["families"] for c in audit["copyleft"])


def test_aggregate_dedups_and_uses_classifiers():
    rows = [
        {
            "name": "a-pkg",
            "version": "1",
            "license": "MIT",
            "license_source": "License",
            "license_classifiers": ["GNU General Public License (GPL)"],
            "requires": 2,
            "requires_runtime": 1,
            "size_bytes": 10,
            "files": 1,
        },
        {
            "name": "b",
            "version": "1",
            "license": "MIT",
            "license_source": "License-Expression",
            "license_classifiers": ["GNU General Public License (GPL)"],
            "requires": 0,
            "requires_runtime": 0,
            "size_bytes": 30,
            "files": 2,
        },
        {
            "name": "c",
            "version": "2",
            "license": "BSD License",
            "license_source": "classifier",
            "license_classifiers": ["BSD License"],
            "requires": 5,
            "requires_runtime": 5,
            "size_bytes": 20,
            "files": 3,
        },
    ]
    dup = dict(rows[0], name="A_Pkg")
    audit = bt.aggregate_audit(batches=[rows[:2], [rows[2], dup]])
    assert audit["total"] == 3
    assert [r["name"] for r in audit["packages"]] == ["a-pkg", "b", "c"]
    # Classifiers count unless a License-Expression (authoritative, PEP 639) was given.
    assert [c["name"] for c in audit["copyleft"]] == ["a-pkg"]
    assert audit["licenses"] == {"MIT": 2, "BSD": 1}
    assert [r["name"] for r in audit["top_by_size"]] == ["b", "c", "a-pkg"]
    assert [r["name"] for r in audit["top_by_requires"]] == ["c", "a-pkg", "b"]
    assert audit["total_size_bytes"] == 60


def test_write_audit_report(audit, work):
    folder, ctx = work
    result = bt.write_audit_report(audit=audit, report_path="out/reports/audit.md", ctx=ctx)
    path = Path(result["path"])
    assert path.is_absolute() and path == folder / "out" / "reports" / "audit.md"
    text = path.read_text()
    assert result["bytes"] == len(text.encode()) == path.stat().st_size
    assert result["packages"] == audit["total"]
    assert result["copyleft_count"] == audit["copyleft_count"]
    for heading in (
        "## Summary",
        "## Copyleft",
        "## Licenses",
        "## Top 10 by size on disk",
        "## Top 10 by dependency count",
        "## All distributions",
    ):
        assert heading in text
    assert "**Warning:**" in text and "psycopg" in text
    assert f"| Distributions | {audit['total']} |" in text
    # One table row per package in the full table.
    full = text.split("## All distributions")[1]
    assert sum(1 for line in full.splitlines() if line.startswith("| ")) == audit["total"] + 1
    assert not list(path.parent.glob(".*.tmp"))


def test_write_audit_report_none_found(work):
    audit = bt.aggregate_audit(batches=[bt.inspect_distributions(names=["Django"])])
    assert audit["copyleft_count"] == 0
    result = bt.write_audit_report(audit=audit, report_path="a.md", ctx=work[1])
    text = Path(result["path"]).read_text()
    assert "None found." in text and "Warning" not in text


def test_write_audit_report_empty_path(audit, work):
    with pytest.raises(ValueError, match="report_path"):
        bt.write_audit_report(audit=audit, report_path="", ctx=work[1])


@pytest.mark.parametrize("report_path", ["/tmp/audit.md", "../audit.md", "a/../../audit.md", "~/audit.md", "out/x.md"])
def test_write_audit_report_stays_in_the_run_work_directory(audit, work, tmp_path, report_path):
    # (issue 10: the callable wrote wherever the workflow said)
    folder, ctx = work
    outside = tmp_path / "outside"
    outside.mkdir()
    (folder / "out").symlink_to(outside)  # a symlink inside pointing out is an escape too
    with pytest.raises(ValueError, match="report_path"):
        bt.write_audit_report(audit=audit, report_path=report_path, ctx=ctx)
    assert list(outside.iterdir()) == [] and not (tmp_path / "audit.md").exists()
    # without a step context there is no work directory: refused as well
    with pytest.raises(ValueError, match="step context"):
        bt.write_audit_report(audit=audit, report_path="a.md")


# --- source-report on the installed Django package --------------------------------------------


def test_list_subpackages_default_is_django():
    found = bt.list_subpackages(source_dir="")
    assert found["root"] == str(DJANGO_DIR)
    assert found["name"] == "django"
    names = [Path(p).name for p in found["subpackages"]]
    assert names == sorted(names)
    assert {"db", "contrib", "core", "utils", "http"} <= set(names)
    assert "__pycache__" not in names
    assert all(Path(p).is_absolute() for p in found["subpackages"])
    assert found["root_files"] >= 2  # __init__.py, __main__.py, shortcuts.py


def test_list_subpackages_refuses_bad_paths(work):
    folder, ctx = work
    with pytest.raises(ValueError, match="does not exist"):
        bt.list_subpackages(source_dir="missing", ctx=ctx)
    (folder / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        bt.list_subpackages(source_dir="f.txt", ctx=ctx)


def test_list_subpackages_lists_only_the_run_work_directory(work, tmp_path):
    # (issue 10: the callable listed any folder the workflow named)
    folder, ctx = work
    (folder / "up").symlink_to(tmp_path)
    for source_dir in ("/etc", str(tmp_path), "..", "../..", "up", "up/work-root"):
        with pytest.raises(ValueError, match="source_dir"):
            bt.list_subpackages(source_dir=source_dir, ctx=ctx)
    # a folder on sys.path that is not an installed package (the project's own) is not a package
    with pytest.raises(ValueError, match="does not exist"):
        bt.list_subpackages(source_dir="orchestrator_site", ctx=ctx)
    # an installed package by its import name is fine
    assert bt.list_subpackages(source_dir="celery", ctx=ctx)["name"] == "celery"


def test_list_subpackages_skips_dirs_without_python(work):
    folder, ctx = work
    src = folder / "src"
    (src / "pkg" / "deep").mkdir(parents=True)
    (src / "pkg" / "deep" / "m.py").write_text("x = 1\n")
    (src / "data").mkdir()
    (src / "data" / "a.txt").write_text("x")
    (src / "top.py").write_text("")
    found = bt.list_subpackages(source_dir="src", ctx=ctx)
    assert found["subpackages"] == [str(src / "pkg")]
    assert found["root_files"] == 1


def test_scan_script_is_safe_from_expression_rendering():
    # The script travels in params, which the engine renders: it must hold no expression syntax.
    script = scan_script()
    for token in ("${", "{{", "}}", "{%", "%}", "{#", "#}"):
        assert token not in script


def test_scan_script_on_django_db():
    result = run_scan(DJANGO_DIR / "db")
    assert result["package"] == "db"
    assert result["path"] == str(DJANGO_DIR / "db")
    py_files = [p for p in (DJANGO_DIR / "db").rglob("*.py") if "__pycache__" not in p.parts]
    assert result["files"] == len(py_files)
    assert result["lines"] == sum(len(p.read_bytes().splitlines()) for p in py_files)
    assert result["lines"] == result["code_lines"] + result["comment_lines"] + result["blank_lines"]
    assert result["functions"] > 1000 and result["classes"] > 200
    assert result["parse_errors"] == 0


def test_scan_script_counts_exactly(work):
    # in the run's work directory: the only folder of ours the exec sandbox lets the scan read
    src = work[0] / "src" / "pkg"
    src.mkdir(parents=True)
    (src / "a.py").write_text(
        "# TODO: one\n"
        "\n"
        "class A:\n"
        "    '''Doc\n"
        "\n"
        "    TODO in a docstring is not a comment.'''\n"
        "    def f(self):  # FIXME and XXX\n"
        "        return 1\n"
        "\n"
        "async def g():\n"
        "    pass\n"
    )
    (src / "bad.py").write_text("def broken(:\n    pass\n")
    # tokenize gives up at the unterminated string after it has seen the comment: counted once.
    (src / "eof.py").write_text('# TODO once\nx = """never closed\n')
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "ignored.py").write_text("def nope(): pass\n")
    result = run_scan(src)
    assert result == {
        "package": "pkg",
        "path": str(src),
        "files": 3,
        "lines": 15,
        "code_lines": 11,  # a.py 8 (the docstring's blank line is code), bad.py 2, eof.py 1
        "comment_lines": 2,
        "blank_lines": 2,
        "functions": 2,
        "classes": 1,
        "todo": 4,
        "parse_errors": 2,
    }


def run_template(name: str, variables: dict) -> tuple[dict, dict]:
    """Run a builtin template's steps in file order through the real handlers, without the
    engine: for_each fans out in a loop, an untaken condition branch is skipped. Returns
    (step outputs by id, run outputs)."""
    doc = load_yaml(name)
    values = {k: v.get("default") for k, v in doc["variables"].items()} | variables
    steps: dict[str, dict] = {}
    skipped: set[str] = set()
    for step in doc["steps"]:
        step = {**doc.get("defaults", {}), **step}
        if step["id"] in skipped:
            steps[step["id"]] = {"status": "skipped", "output": None}
            continue
        context = {"vars": values, "steps": steps, "run": {"id": "test", "attempt": 1}}
        if step.get("for_each"):
            items = evaluate(step["for_each"], context)
            output = [run_step(step, {**context, "item": item, "index": i}, index=i) for i, item in enumerate(items)]
        else:
            output = run_step(step, context)
        if step["type"] == "condition":
            skipped.update(step["on_failure"] if output["result"] else step["on_success"])
        steps[step["id"]] = {"status": "succeeded", "output": output}
    context = {"vars": values, "steps": steps}
    return steps, {key: evaluate(expr, context) for key, expr in doc["outputs"].items()}


def test_package_audit_template_end_to_end(work):
    folder, _ = work
    steps, outputs = run_template("package-audit.yaml", {"batch_size": 40})
    listing = steps["list"]["output"]
    assert len(steps["inspect"]["output"]) == len(listing["batches"]) == -(-listing["count"] // 40)
    audit = steps["aggregate"]["output"]
    assert audit["total"] == listing["count"]
    assert steps["copyleft_check"]["output"] == {"result": audit["copyleft_count"] > 0}
    # This environment has psycopg (LGPL): the copyleft branch is taken.
    assert steps["flag_copyleft"]["output"] == {"flagged": audit["copyleft"]}
    assert steps["all_clear"]["status"] == "skipped"
    report = folder / "package-audit.md"
    assert outputs == {
        "report_path": str(report),
        "packages": listing["count"],
        "copyleft_count": audit["copyleft_count"],
    }
    assert report.stat().st_size == steps["report"]["output"]["bytes"]


def test_source_report_template_on_django(work):
    # discover -> scan (one sandboxed subprocess per subpackage) -> join, default source_dir = Django
    folder, _ = work
    steps, outputs = run_template("source-report.yaml", {"report_path": "r/django.md"})
    found = steps["discover"]["output"]
    assert found["root"] == str(DJANGO_DIR)
    scans = steps["scan"]["output"]
    assert len(scans) == len(found["subpackages"])
    assert all(s["exit_code"] == 0 and isinstance(s["stdout"], dict) for s in scans)
    joined = steps["join"]["output"]
    totals = joined["totals"]
    assert outputs == {"totals": totals, "report_path": str(folder / "r" / "django.md")}
    assert totals["subpackages"] == len(found["subpackages"])
    assert totals["files"] == sum(s["stdout"]["files"] for s in scans)
    py_files = [p for p in DJANGO_DIR.glob("*/**/*.py") if "__pycache__" not in p.parts]
    assert totals["files"] == len(py_files)
    assert totals["lines"] > 100_000 and totals["code_lines"] < totals["lines"]
    assert totals["functions"] > 5000 and totals["classes"] > 1000
    lines = [r["lines"] for r in joined["subpackages"]]
    assert lines == sorted(lines, reverse=True)
    text = Path(outputs["report_path"]).read_text()
    assert text == joined["markdown"]
    assert "# Source report: django" in text and "| db |" in text


def test_source_report_template_without_file(work):
    # a folder of the run's work directory: exec steps of the run read it (read-only)
    folder, _ = work
    (folder / "src" / "a").mkdir(parents=True)
    (folder / "src" / "a" / "m.py").write_text("def f():\n    return 1  # XXX\n")
    steps, outputs = run_template("source-report.yaml", {"source_dir": "src"})
    assert outputs["report_path"] is None
    assert outputs["totals"] == {
        "subpackages": 1,
        "files": 1,
        "lines": 2,
        "code_lines": 2,
        "functions": 1,
        "classes": 0,
        "todo": 1,
        "parse_errors": 0,
    }
    assert sorted(p.name for p in folder.iterdir()) == ["src"]  # no report written


def test_join_source_report_accepts_shapes(tmp_path):
    obj = {
        "package": "x",
        "path": "/x",
        "files": 1,
        "lines": 5,
        "code_lines": 4,
        "functions": 1,
        "classes": 0,
        "todo": 0,
        "parse_errors": 0,
    }
    other = dict(obj, package="y", lines=9)
    joined = bt.join_source_report(
        root="/",
        name="n",
        scans=[{"exit_code": 0, "stdout": obj, "stderr": ""}, json.dumps(other)],
    )
    assert [r["package"] for r in joined["subpackages"]] == ["y", "x"]
    assert joined["totals"]["lines"] == 14
    assert joined["path"] is None
    with pytest.raises(ValueError, match="not JSON"):
        bt.join_source_report(root="/", name="n", scans=[{"stdout": "oops"}])


# --- the YAML files ------------------------------------------------------------------------


def test_package_audit_yaml():
    doc = load_yaml("package-audit.yaml")
    assert doc["key"] == "package-audit"
    assert [s["id"] for s in doc["steps"]] == [
        "list",
        "inspect",
        "aggregate",
        "copyleft_check",
        "flag_copyleft",
        "all_clear",
        "report",
    ]
    assert doc["variables"]["report_path"]["default"] == "package-audit.md"
    assert doc["variables"]["batch_size"] == {
        "type": "integer",
        "default": 25,
        "description": doc["variables"]["batch_size"]["description"],
    }
    assert doc["defaults"]["retry"]["max_attempts"] == 2
    steps = {s["id"]: s for s in doc["steps"]}
    assert steps["inspect"]["for_each"] == "${steps.list.output.batches}"
    assert steps["copyleft_check"]["on_success"] == ["flag_copyleft"]
    assert steps["copyleft_check"]["on_failure"] == ["all_clear"]
    assert steps["report"]["trigger_rule"] == "none_failed"
    assert set(doc["outputs"]) == {"report_path", "packages", "copyleft_count"}
    _check_callables(doc)


def test_source_report_yaml():
    doc = load_yaml("source-report.yaml")
    assert doc["key"] == "source-report"
    assert [s["id"] for s in doc["steps"]] == ["discover", "scan", "join"]
    assert doc["variables"]["source_dir"]["default"] == ""
    assert doc["variables"]["report_path"]["default"] == ""
    assert set(doc["outputs"]) == {"totals", "report_path"}
    _check_callables(doc)


def _check_callables(doc):
    from django.conf import settings

    for step in doc["steps"]:
        if step["type"] == "python":
            dotted = step["params"]["callable"]
            assert dotted in settings.ORCHESTRATOR_PYTHON_CALLABLES
            assert callable(getattr(bt, dotted.rsplit(".", 1)[1]))


@pytest.mark.parametrize("name", ["package-audit.yaml", "source-report.yaml"])
def test_builtin_loads_with_load_spec(name):
    path = BUILTIN / name
    spec = load_spec(path.read_bytes(), source=str(path))
    doc = load_yaml(name)
    assert spec["key"] == doc["key"] and spec["dialect"] == "canonical"
    assert [s["id"] for s in spec["steps"]] == [s["id"] for s in doc["steps"]]
    for step in spec["steps"]:
        assert step["retry"]["max_attempts"] == 2
        assert step["timeout"] == (120.0 if step["id"] == "scan" else 60.0)
    # Every variable has a default: the template runs with no input at all.
    inputs = validate_inputs(spec, {})
    assert inputs == {k: v["default"] for k, v in doc["variables"].items()}


def test_package_audit_spec_graph():
    path = BUILTIN / "package-audit.yaml"
    steps = {s["id"]: s for s in load_spec(path.read_bytes(), source=str(path))["steps"]}
    assert steps["flag_copyleft"]["branch_of"] == {"step": "copyleft_check", "when": True}
    assert steps["all_clear"]["branch_of"] == {"step": "copyleft_check", "when": False}
    assert steps["report"]["depends_on"] == ["aggregate", "flag_copyleft", "all_clear"]
    assert steps["report"]["trigger_rule"] == "none_failed"
    assert steps["inspect"]["for_each"] == "${steps.list.output.batches}"
    # From the CLI every value is a string: batch_size is declared integer, so "7" becomes 7.
    spec = load_spec(path.read_bytes(), source=str(path))
    assert validate_inputs(spec, {"batch_size": "7"})["batch_size"] == 7


def test_default_allow_list_has_no_unconfined_callables():
    # (issue 10) the deployment default, not the test settings' extended list
    from orchestrator_site import settings as deployment

    assert os.environ.get("ORCHESTRATOR_PYTHON_CALLABLES") is None
    for helper in ("agents.testing.flaky", "agents.testing.echo", "agents.testing.fail", "agents.testing.slow"):
        assert helper not in deployment.ORCHESTRATOR_PYTHON_CALLABLES
    # what remains of the builtin templates takes the step context, i.e. its run's work directory
    for path in ("write_audit_report", "list_subpackages", "join_source_report"):
        assert f"templates_app.builtin_tasks.{path}" in deployment.ORCHESTRATOR_PYTHON_CALLABLES
        assert "ctx" in inspect.signature(getattr(bt, path)).parameters
