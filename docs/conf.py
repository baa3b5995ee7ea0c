"""Sphinx configuration of gcollective's documentation: builtin theme, no extension, no network.

Build with ``python -m sphinx -W -b html docs docs/_build/html`` (CI does, warnings as errors).
"""

import pathlib
import re

_ROOT = pathlib.Path(__file__).resolve().parent.parent

project = "gcollective"
author = "the gcollective authors"
# One definition of the version: pyproject.toml's.
release = re.search(
    r'^version = "([^"]+)"', (_ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M
).group(1)  # type: ignore[union-attr]
version = release

root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_title = f"gcollective {release}"
