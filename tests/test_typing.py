"""The package's ``py.typed`` and "Typing :: Typed" hold for its users (issue 18).

A user's ``mypy --strict`` sees gcollective as an installed package: found on the path, read
only because of ``py.typed``, its own errors silenced. These tests build that view (the
package's modules plus the package data pyproject.toml ships, outside this checkout) and
check ``tests/typing_check.py``, a program written against the public API, with no
configuration but ``--strict``; and check that misuses of the API are reported, so the first
test cannot pass on ``Any``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the tests run on 3.11 and later in CI
    tomllib = pytest.importorskip("tomli")

pytest.importorskip("mypy", reason="needs mypy (in the test extra)")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gcollective"
USER_PROGRAM = ROOT / "tests" / "typing_check.py"

#: Misuses a user's type checker must report, each with the error code it should carry.
MISUSES = {
    'gcollective.incr("a", "one")': "arg-type",
    "gcollective.no_such_function()": "attr-defined",
    'node: int = gcollective.start("127.0.0.1:9001")': "assignment",
    'gcollective.watch("a", lambda key: None)': "arg-type",
    'gcollective.Collective("127.0.0.1:9001").set(42, 1)': "arg-type",
    "gcollective.DELETE.name.no_such_method()": "attr-defined",
    "gcollective.start(9001)": "arg-type",
}


def _installed_view(site: Path) -> None:
    """Copy what an install of gcollective holds into ``site``: its modules and the package
    data pyproject.toml declares (``py.typed``)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    data = config["tool"]["setuptools"]["package-data"]["gcollective"]
    target = site / "gcollective"
    target.mkdir(parents=True)
    for module in PACKAGE.glob("*.py"):
        shutil.copy(module, target)
    for pattern in data:
        for path in PACKAGE.glob(pattern):
            shutil.copy(path, target)


def _mypy_strict(tmp_path: Path, *programs: Path) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` as a user's project runs it: from its own directory, without this
    project's configuration, gcollective found on the path like an installed package."""
    site = tmp_path / "site"
    _installed_view(site)
    environment = dict(os.environ, PYTHONPATH=str(site))
    command = [sys.executable, "-m", "mypy", "--strict", "--config-file=", "--no-error-summary"]
    command += ["--cache-dir", str(tmp_path / "cache"), *map(str, programs)]
    return subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600
    )


def test_a_user_program_passes_mypy_strict(tmp_path):
    program = tmp_path / "user_program.py"
    shutil.copy(USER_PROGRAM, program)
    result = _mypy_strict(tmp_path, program)
    assert result.returncode == 0, result.stdout + result.stderr
    # Copied outside the checkout, so it really read the installed view (py.typed).
    assert "import-untyped" not in result.stdout


def test_misusing_the_api_is_a_type_error(tmp_path):
    lines = ["import gcollective", *MISUSES]
    program = tmp_path / "misuse.py"
    program.write_text(textwrap.dedent("\n".join(lines)) + "\n", encoding="utf-8")
    result = _mypy_strict(tmp_path, program)
    reported = result.stdout.splitlines()
    for number, (line, code) in enumerate(MISUSES.items(), start=2):
        errors = [error for error in reported if error.startswith(f"misuse.py:{number}: error")]
        assert any(error.endswith(f"[{code}]") for error in errors), (line, result.stdout)
