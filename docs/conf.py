"""Sphinx configuration for skanomaly's documentation."""

import skanomaly

project = "skanomaly"
author = "skanomaly developers"
copyright = "2026, skanomaly developers"
release = skanomaly.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "numpydoc",
]

autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"inherited-members": False}
numpydoc_show_class_members = True
numpydoc_class_members_toctree = False
numpydoc_show_inherited_class_members = False
numpydoc_xref_param_type = False

# No network at build time: intersphinx inventories are not fetched.
intersphinx_mapping = {}

templates_path = ["_templates"]
exclude_patterns = ["_build", "api/generated/*.examples"]
html_theme = "alabaster"
html_static_path = []
nitpicky = False
