# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Sphinx configuration for the d3p documentation.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

import re
import sys
import warnings
from pathlib import Path

from docutils import nodes
from docutils.utils.math import latex2mathml
from sphinx.util import logging

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
]

# Math is rendered to MathML when the pages are built (docutils' LaTeX-to-MathML converter,
# pure Python), so the pages need no JavaScript and no CDN: they show their formulas offline.
# MathML Core is rendered by current Firefox, Chrome/Edge (109+) and Safari.
html_math_renderer = "mathml"

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


logger = logging.getLogger(__name__)


# amsmath commands docutils' converter does not know (docutils 0.22), as the ones it knows
_AMSMATH_ONLY_AS = {r"\dots": r"\ldots"}
_AMSMATH_ONLY = re.compile(r"\\dots(?![A-Za-z])")


def _mathml(translator, latex: str, location, as_block: bool) -> None:
    """Append ``latex`` as MathML; a formula the converter cannot read is a warning (an
    error under ``-W``) and is shown as its LaTeX source."""
    try:
        converted = _AMSMATH_ONLY.sub(lambda m: _AMSMATH_ONLY_AS[m[0]], latex)
        translator.body.append(latex2mathml.tex2mathml(converted, as_block=as_block))
    except Exception as error:  # the converter raises SyntaxError and others on bad input
        logger.warning("math %r not converted to MathML: %s", latex, error, location=location)
        translator.body.append(f"<code>{translator.encode(latex)}</code>")


def _visit_math(translator, node) -> None:
    _mathml(translator, node.astext(), node, as_block=False)
    raise nodes.SkipNode


def _visit_displaymath(translator, node) -> None:
    # one display per equation (a blank line separates equations in a math directive)
    translator.body.append(translator.starttag(node, "div", CLASS="math"))
    for part in node.astext().split("\n\n"):
        if part.strip():
            _mathml(translator, part, node, as_block=True)
    translator.body.append("</div>\n")
    raise nodes.SkipNode


# ``<module 'd3p.random' from '/path/on/the/build/machine/...'>`` in a signature (a module as a
# default value, e.g. DPSVI's rng_suite) is shown as the module's name
_MODULE_REPR = re.compile(r"<module '([\w.]+)'(?: from '[^']*')?>")


def _signature_without_paths(app, what, name, obj, options, signature, return_annotation):
    if signature is None:
        return None
    return _MODULE_REPR.sub(r"\1", signature), return_annotation


def setup(app):
    app.add_html_math_renderer("mathml", (_visit_math, None), (_visit_displaymath, None))
    app.connect("autodoc-process-signature", _signature_without_paths)
