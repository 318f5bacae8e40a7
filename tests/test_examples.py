"""Every example workflow shipped in examples/ (and shown in the README) loads as documented."""

from __future__ import annotations

import pytest

from templates_app.spec import load_spec, load_spec_file
from tests.conftest import EXAMPLES, ROOT

#: The project callable of examples/release-notes.yaml (examples/release_notes.py).
EXAMPLE_CALLABLE = "examples.release_notes.filter_by_label"
EXAMPLE_FILES = sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".yaml", ".yml"))


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_loads(path, settings):
    # the README's example calls a project callable: allow-listed the way a user would
    settings.ORCHESTRATOR_PYTHON_CALLABLES = [
        *settings.ORCHESTRATOR_PYTHON_CALLABLES,
        "examples.release_notes.filter_by_label",
    ]
    spec = load_spec_file(path)
    assert spec["steps"]


def test_readme_example_shape(settings):
    settings.ORCHESTRATOR_PYTHON_CALLABLES = [
        *settings.ORCHESTRATOR_PYTHON_CALLABLES,
        "examples.release_notes.filter_by_label",
    ]
    spec = load_spec_file(EXAMPLES / "release-notes.yaml")
    steps = {s["id"]: s for s in spec["steps"]}
    assert steps["announce"]["branch_of"] == {"step": "big_release", "when": True}
    assert steps["skip_notice"]["branch_of"] == {"step": "big_release", "when": False}
    assert steps["per_label"]["as"] == "label"
    assert steps["archive"]["trigger_rule"] == "none_failed"
    assert spec["timeout"] == 900


def test_readme_workflow_blocks_load(settings):
    """Every complete workflow shown in README.md loads as shown there."""
    import re

    settings.ORCHESTRATOR_PYTHON_CALLABLES = [
        *settings.ORCHESTRATOR_PYTHON_CALLABLES,
        "examples.release_notes.filter_by_label",
    ]
    text = (ROOT / "README.md").read_text()
    blocks = [
        b
        for b in re.findall(r"```yaml\n(.*?)```", text, re.S)
        if re.search(r"^(key|id):", b, re.M) and re.search(r"^(steps|workflow):", b, re.M)
    ]
    assert len(blocks) >= 8
    for index, block in enumerate(blocks):
        assert load_spec(block, source=f"README.md yaml block {index}")["steps"]
