"""Every environment variable the README's settings tables document is read by settings.py.

Issue 8 section 4: ``ORCHESTRATOR_DATA_SERVICE_URL`` and ``ORCHESTRATOR_HTTP_MAX_RESPONSE_BYTES`` were
documented but never read, so a deployment setting them got the defaults. The walk below finds every
table of README.md whose first column is headed "variable" or "setting", takes each backticked
UPPER_CASE name in that column (``_SUFFIX`` shorthand expands against the row's first name), and
fails on any name that orchestrator_site/settings.py does not read from the environment.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SETTINGS = ROOT / "orchestrator_site" / "settings.py"
#: gunicorn's own settings file reads the web server's variables (ORCHESTRATOR_WEB_*)
GUNICORN = ROOT / "gunicorn.conf.py"

_READERS = {"env_str", "env_int", "env_float", "env_bool", "env_list", "get", "getenv"}
_NAME = re.compile(r"`([A-Z][A-Z0-9_]*|_[A-Z0-9_]+)`")


def documented_variables(text: str) -> dict[str, int]:
    """``{variable: README line}`` from the first column of every settings table."""
    found: dict[str, int] = {}
    in_table = False
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not in_table:
            in_table = cells[0].lower() in ("variable", "setting")
            continue
        if set(cells[0]) <= set("-: "):  # the |---| line
            continue
        names = _NAME.findall(cells[0].replace("\\|", ""))
        prefix = ""
        for name in names:
            if name.startswith("_"):
                if prefix:
                    found.setdefault(prefix + name, number)
                continue
            found.setdefault(name, number)
            prefix = prefix or name.rsplit("_", 1)[0]
    return found


def variables_read_by_settings() -> set[str]:
    """String literals passed as the variable name to env_* / os.environ.get / os.getenv / os.environ[...],
    in settings.py and gunicorn.conf.py."""
    names: set[str] = set()
    tree = ast.Module(
        body=[*ast.parse(SETTINGS.read_text()).body, *ast.parse(GUNICORN.read_text()).body], type_ignores=[]
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in _READERS and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            if ast.unparse(node.value) == "os.environ" and isinstance(node.slice.value, str):
                names.add(node.slice.value)
    return names


def test_the_walk_finds_the_settings_tables():
    documented = documented_variables(README.read_text())
    # one from each table, and the shorthand expanded
    for name in (
        "DATABASE_URL",
        "ORCHESTRATOR_TOKEN_TTL_DAYS",
        "ORCHESTRATOR_FERNET_KEYS",
        "ORCHESTRATOR_SERVICE_JWT_KID",
    ):
        assert name in documented, name
    assert len(documented) > 40


def test_every_documented_variable_is_read_by_settings():
    documented = documented_variables(README.read_text())
    read = variables_read_by_settings()
    missing = {name: line for name, line in documented.items() if name not in read}
    assert not missing, "README documents variables settings.py never reads: " + ", ".join(
        f"{name} (README.md line {line})" for name, line in sorted(missing.items())
    )


def test_the_variables_fixed_in_issue_8_reach_the_settings(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_", "LLM_", "GEMINI_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="orchestrator_site.settings",
        ORCHESTRATOR_DATA_DIR=str(tmp_path),
        ORCHESTRATOR_DATA_SERVICE_URL="http://data.internal:8080/query",
        ORCHESTRATOR_HTTP_MAX_RESPONSE_BYTES="12345",
        LLM_BASE_URL="http://127.0.0.1:8000/v1",
        LLM_MODEL="Qwen/Qwen2.5-32B-Instruct",
        GEMINI_API_KEY="gm-test",
        GEMINI_MODEL="gemini-2.0-flash-exp",
    )
    code = (
        "import json, django; django.setup(); from django.conf import settings as s; print(json.dumps(["
        "s.ORCHESTRATOR_DATA_SERVICE_URL, s.ORCHESTRATOR_HTTP_MAX_RESPONSE_BYTES, s.ORCHESTRATOR_LLM_BASE_URL,"
        " s.ORCHESTRATOR_LLM_MODEL, s.GEMINI_ENABLED, s.GEMINI_MODEL]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        "http://data.internal:8080/query",
        12345,
        "http://127.0.0.1:8000/v1",
        "Qwen/Qwen2.5-32B-Instruct",
        True,
        "gemini-2.0-flash-exp",
    ]
