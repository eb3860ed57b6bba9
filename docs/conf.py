# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Sphinx configuration for the d3p documentation.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

import sys
import warnings
from pathlib import Path

# Document the checkout this file lives in, also when d3p is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# ``import d3p.random.debug`` warns (by design) that the module is not for production
# use. The API reference imports it on purpose, so that warning is expected here.
warnings.filterwarnings("ignore", category=UserWarning, message=r".*d3p\.random\.debug.*")

from d3p.version import VERSION  # noqa: E402

project = "d3p"
author = "d3p developers"
copyright = "2026, d3p developers"
version = VERSION
release = VERSION

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
]

exclude_patterns = ["_build"]
nitpicky = False

autodoc_default_options = {
    "members": True,
    "undoc-members": False,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_member_order = "bysource"

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
# Render "Attributes" sections as fields, so that NamedTuple fields are not described twice.
napoleon_use_ivar = True

html_theme = "alabaster"
html_static_path = ["_static"]
html_theme_options = {
    "description": "Differentially private variational inference for NumPyro",
    "fixed_sidebar": True,
}
