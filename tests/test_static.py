"""Static checks: ruff (lint, import order, format), mypy, and the import contract.

They read the tree in place: the packages live under src/gridrender as installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BIN = Path(sys.executable).parent
SRC = ROOT / "src"
PYTHON_DIRS = ("src", "tests", "bench", "examples")


def run(*cmd: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600, check=False
    )


def test_ruff():
    result = run(str(BIN / "ruff"), "check", *PYTHON_DIRS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format():
    result = run(str(BIN / "ruff"), "format", "--check", *PYTHON_DIRS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy(tmp_path):
    result = run(
        str(BIN / "mypy"),
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "-p",
        "gridrender",
        env={"MYPYPATH": str(SRC)},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    return run(
        str(BIN / "lint-imports"), "--config", str(ROOT / "pyproject.toml"), "--no-cache", cwd=tree, env={"PYTHONPATH": str(tree)}
    )


def test_import_contract_holds():
    result = lint_imports(SRC)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    "module, line",
    [
        ("scheduler/ledger/records.py", "import torch"),  # directly
        ("scheduler/plan.py", "from gridrender.workers import builtin"),  # indirectly: builtin imports torch
        ("workers/chunk.py", "from gridrender import cli"),
    ],
)
def test_the_import_contract_catches_a_violation(tmp_path, module, line):
    tree = tmp_path / "src"
    shutil.copytree(SRC / "gridrender", tree / "gridrender", ignore=shutil.ignore_patterns("__pycache__"))
    target = tree / "gridrender" / module
    target.write_text(
        target.read_text().replace(
            "from __future__ import annotations\n", f"from __future__ import annotations\n\n{line}  # noqa\n", 1
        )
    )
    result = lint_imports(tree)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout


def test_every_setting_is_in_the_readme():
    from gridrender.scheduler.settings import Settings

    readme = (ROOT / "README.md").read_text()
    for name, field in Settings.model_fields.items():
        variable = field.validation_alias or f"GRIDRENDER_{name.upper()}"
        assert f"`{variable}`" in readme, f"{variable} is read by the code but not in README's configuration table"


def test_no_storage_key_is_spelled_outside_the_layout_module():
    import re

    spelled = re.compile(r"""["'](cells/|jobs/|\.\./\.\./cells)""")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in (SRC / "gridrender").rglob("*.py")
        if path.name != "layout.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if spelled.search(line)
    ]
    assert offenders == []
