"""Sphinx configuration for implicit_nash."""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "implicit_nash"
author = "implicit_nash developers"
release = "0.1.0"
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "sphinx.ext.doctest",
    "matplotlib.sphinxext.plot_directive",
]
plot_html_show_formats = False
plot_html_show_source_link = False
autosummary_generate = True
autodoc_member_order = "bysource"
napoleon_google_docstring = True
# Links to PyTorch's docs need its inventory from the internet, which CI machines here do not
# reach; set IMPLICIT_NASH_DOCS_ONLINE=1 to turn them on (the build is otherwise identical).
intersphinx_mapping = ({"torch": ("https://pytorch.org/docs/stable", None)}
                       if os.environ.get("IMPLICIT_NASH_DOCS_ONLINE") == "1" else {})
exclude_patterns = ["_build"]
html_theme = "alabaster"
