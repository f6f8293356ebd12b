"""The documentation: every public name is in the API reference, and the docs build without warnings
with every doctest and example passing (sphinx-build -W, html and doctest builders)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

import implicit_nash
import implicit_nash.meta

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _api_names():
    text = (DOCS / "api.rst").read_text()
    return set(re.findall(r"^   ([A-Za-z_][\w.]*)$", text, flags=re.M))


def test_every_public_name_is_in_the_api_reference():
    listed = _api_names()
    missing = [n for n in implicit_nash.__all__ if n not in listed]
    assert not missing, f"not in docs/api.rst: {missing}"
    meta = [n for n in implicit_nash.meta.__all__ if n not in ("ALGORITHMS", "META_GRADIENTS")]
    assert not [n for n in meta if n not in listed], "implicit_nash.meta names missing from docs/api.rst"


@pytest.mark.slow  # a Sphinx build that runs every example: minutes
@pytest.mark.parametrize("builder", ["html", "doctest"])
def test_docs_build_without_warnings(builder, tmp_path):
    pytest.importorskip("sphinx")
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder,
                           str(DOCS), str(tmp_path / builder)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
