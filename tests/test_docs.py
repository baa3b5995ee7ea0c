"""The README renders and its links resolve (issue 21: the README is short and points into the
``docs/`` site, which CI builds with ``python -m sphinx -W``).

A README link that points at a file which was renamed or never written renders fine on a code
host and leads nowhere, and no Sphinx build looks at the README's links: this test does.
"""

from __future__ import annotations

import io
from pathlib import Path

import docutils.core
import docutils.nodes

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.rst"


def _readme_tree() -> docutils.nodes.document:
    """The README parsed by docutils, any warning an error (as a code host's renderer would
    show it broken)."""
    return docutils.core.publish_doctree(
        README.read_text(encoding="utf-8"),
        source_path=str(README),
        settings_overrides={"halt_level": 2, "report_level": 2, "warning_stream": io.StringIO()},
    )


def _local_links(tree: docutils.nodes.document) -> list[str]:
    """Every link target of the README that is a path in this repository."""
    links = []
    for reference in tree.findall(docutils.nodes.reference):
        uri = reference.get("refuri")
        if uri and "://" not in uri and not uri.startswith(("mailto:", "#")):
            links.append(uri)
    return links


def test_readme_renders_without_warnings():
    tree = _readme_tree()
    assert tree.findall(docutils.nodes.section), "the README has no sections"


def test_readme_links_into_docs_resolve():
    links = _local_links(_readme_tree())
    assert any(link.startswith("docs/") for link in links), "the README links into docs/"
    missing = [link for link in links if not (ROOT / link.split("#")[0]).is_file()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_docs_index_finds_the_readme_intro():
    # docs/index.rst includes the README's intro and quick start between these markers.
    text = README.read_text(encoding="utf-8")
    start = text.index("\n.. docs-intro-start\n")
    end = text.index("\n.. docs-intro-end\n")
    assert start < text.index("\nQuick start\n") < end
