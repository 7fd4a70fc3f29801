"""Sphinx configuration: the user guide (Markdown, through MyST) and the API
reference (autodoc, from the docstrings).  Built warning-free in CI by
tests/test_docs.py: sphinx-build -W --keep-going -b html docs DIR."""

from __future__ import annotations

import vchan

project = "vchan"
author = "The vchan developers"
copyright = "2026, The vchan developers"
version = release = vchan.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.intersphinx",
              "sphinx.ext.napoleon"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "bench/results.json"]

# Headings get anchors (docs link to sections as file.md#heading).
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# The reference needs no network: intersphinx only where an inventory is at hand.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

html_theme = "alabaster"
html_title = f"vchan {release}"
