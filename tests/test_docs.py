"""The documentation site builds without a warning (Sphinx, warnings as errors).

docs/conf.py: the user guide (docs/index.md and the Markdown pages beside it,
through MyST) and the API reference (docs/api.rst, autodoc from the
docstrings).  Any warning -- a page outside the table of contents, a broken
cross-reference, a docstring Sphinx cannot parse -- fails the build.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import support

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_build_without_warnings(tmp_path: Path) -> None:
    for module, package in (("sphinx", "sphinx"), ("myst_parser", "myst-parser")):
        support.need(importlib.util.find_spec(module), f"{package} (pip install 'vchan[docs]')")
    out = tmp_path / "html"
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q",
                           "-b", "html", str(ROOT / "docs"), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    api = (out / "api.html").read_text()
    # The reference is made from the docstrings (a missing import would leave it empty).
    for name in ("vchan.open_connection", "vchan.Server.sockets", "vchan.testing.Emulator",
                 "vchan.backend.check_environment"):
        assert f'id="{name}"' in api, name
    guide = (out / "index.html").read_text()
    for page in ("api.html", "compat.html", "sessions.html", "benchmarks.html"):
        assert f'href="{page}"' in guide, page
