"""Every example workflow shipped in examples/ (and shown in the README) loads as documented."""

from __future__ import annotations

import pytest

from templates_app.spec import load_spec_file
from tests.conftest import EXAMPLES

EXAMPLE_FILES = sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".yaml", ".yml"))


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_loads(path, settings):
    # the README's example calls a project callable: allow-listed the way a user would
    settings.ORCHESTRATOR_PYTHON_CALLABLES = [*settings.ORCHESTRATOR_PYTHON_CALLABLES, "mypkg.notes.filter_by_label"]
    spec = load_spec_file(path)
    assert spec["steps"]


def test_readme_example_shape(settings):
    settings.ORCHESTRATOR_PYTHON_CALLABLES = [*settings.ORCHESTRATOR_PYTHON_CALLABLES, "mypkg.notes.filter_by_label"]
    spec = load_spec_file(EXAMPLES / "release-notes.yaml")
    steps = {s["id"]: s for s in spec["steps"]}
    assert steps["announce"]["branch_of"] == {"step": "big_release", "when": True}
    assert steps["skip_notice"]["branch_of"] == {"step": "big_release", "when": False}
    assert steps["per_label"]["as"] == "label"
    assert steps["archive"]["trigger_rule"] == "none_failed"
    assert spec["timeout"] == 900
