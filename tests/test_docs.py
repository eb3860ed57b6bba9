# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Every Python block of README.md and docs/ runs as written (issue 25), and so do the
scripts in docs/_scripts.

The blocks of one page run in order in one namespace, as a reader pastes them into one
session. Before the first block the namespace holds :data:`PRELUDE`: what a reader brings to
a guide page from the quickstart (the imports, a logistic-regression ``model`` with its
``guide``, "your data" ``X, y`` of ``N`` records, ``q``, ``num_steps``, ``sigma``). A line
``X, y = ...`` (an assignment of ``...``) in a block stands for the reader's own data: it is
left out and the names it assigns must already be defined (by the prelude or by a hidden
block of the page). Pages mark what the reader does not see with sybil's directives in
comments, which Sphinx and Markdown renderers do not show:

* ``.. invisible-code-block: python`` (Markdown: ``<!-- invisible-code-block: python -->``)
  runs setup the page only describes in words;
* ``.. skip: next "reason"`` (Markdown: ``<!-- skip: next "reason" -->``) leaves out the next
  block, which cannot run here (several hosts, SLURM); the reason is required.

Shell blocks (``bash``) are not Python and are not run.
"""

import html
import re
import runpy
import textwrap
import unittest
from pathlib import Path

import pytest

sybil = pytest.importorskip("sybil", reason="the docs tests need sybil (the 'test' extra)")
from sybil import Sybil  # noqa: E402
from sybil.parsers import markdown as md_parsers  # noqa: E402
from sybil.parsers import rest as rst_parsers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

PRELUDE = '''
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal
from numpyro.optim import Adam

import d3p.random
from d3p.svi import DPSVI


def make_data(n, d=5, seed=0):
    """n records of a logistic regression with d standardised features (float32)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    w = np.linspace(-1.0, 1.5, d)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-X @ w))).astype(np.float32)
    return X, y


def model(X, y=None, num_obs_total=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
    with numpyro.plate("batch", num_obs_total, subsample_size=X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)


guide = AutoDiagonalNormal(model)
X, y = make_data(1_000)  # your data: N records, one per individual
data = (X, y)
N, d = X.shape
q, num_steps = 0.01, 200  # Poisson sampling probability and number of steps
sigma = 1.2  # the noise multiplier, as approximate_sigma_remove_relation gives it
'''

# "X, y = ...": a stand-in for the reader's own values
PLACEHOLDER = re.compile(
    r"^(?P<indent>[ \t]*)(?P<names>[A-Za-z_]\w*(?:[ \t]*,[ \t]*[A-Za-z_]\w*)*)[ \t]*=[ \t]*"
    r"\.\.\.[ \t]*(?:#.*)?$",
    re.MULTILINE,
)


def run_block(example) -> None:
    """Run one Python block in the page's namespace (sybil evaluator), placeholders left out."""
    __tracebackhide__ = True
    source = str(example.parsed)
    missing = [
        name.strip()
        for m in PLACEHOLDER.finditer(source)
        for name in m["names"].split(",")
        if name.strip() not in example.namespace
    ]
    if missing:
        raise AssertionError(
            f"{example.path}, line {example.line}: the placeholder for {missing} needs a "
            "definition before it (the prelude or an invisible-code-block of the page)"
        )
    source = PLACEHOLDER.sub(lambda m: m["indent"] + "pass", source)
    # pad so that tracebacks give the line numbers of the page
    padded = "\n" * (example.line + example.parsed.line_offset) + source
    exec(compile(padded, example.path, "exec", dont_inherit=True), example.namespace)


RST = Sybil(
    parsers=[rst_parsers.CodeBlockParser("python", run_block), rst_parsers.SkipParser()],
    path=str(ROOT),
)
MARKDOWN = Sybil(
    parsers=[md_parsers.CodeBlockParser("python", run_block), md_parsers.SkipParser()],
    path=str(ROOT),
)

VISIBLE = {
    ".rst": re.compile(r"^[ \t]*\.\. (?:code-block|sourcecode|code)::[ \t]*python[ \t]*$", re.M),
    ".md": re.compile(r"^[ \t]*```python[ \t]*$", re.M),
}
HIDDEN = {
    ".rst": re.compile(r"^[ \t]*\.\. invisible-code-block:[ \t]*python[ \t]*$", re.M),
    ".md": re.compile(r"^[ \t]*<!-- invisible-code-block:[ \t]*python", re.M),
}
SKIP = {
    ".rst": re.compile(r"^[ \t]*\.\. skip:(?P<args>.*)$", re.M),
    ".md": re.compile(r"^[ \t]*<!-- skip:(?P<args>.*?)-->", re.M),
}


def pages() -> list[Path]:
    """README.md and every .rst page under docs/ (the build folder left out)."""
    found = [ROOT / "README.md"] + sorted(
        p for p in DOCS.rglob("*.rst") if "_build" not in p.relative_to(DOCS).parts
    )
    return found


def pages_with_python() -> list[Path]:
    return [p for p in pages() if VISIBLE[p.suffix].search(p.read_text(encoding="utf-8"))]


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_the_collector_sees_the_pages_and_their_blocks():
    # the runner must not silently miss pages or blocks: README and the guides hold Python,
    # and sybil finds exactly the blocks a plain search for the directives finds
    with_python = {page_id(p) for p in pages_with_python()}
    assert {"README.md", "docs/guide/svi.rst", "docs/guide/plan.rst"} <= with_python
    for page in pages():
        text = page.read_text(encoding="utf-8")
        expected = len(VISIBLE[page.suffix].findall(text)) + len(HIDDEN[page.suffix].findall(text))
        parser = RST if page.suffix == ".rst" else MARKDOWN
        examples = list(parser.parse(page))
        code = [e for e in examples if e.region.evaluator is run_block]
        assert len(code) == expected, page_id(page)


@pytest.mark.parametrize("page", pages(), ids=page_id)
def test_every_skip_names_its_reason(page):
    # "skip: next" alone would hide a block without saying why; a reason is required
    for m in SKIP[page.suffix].finditer(page.read_text(encoding="utf-8")):
        args = m["args"].strip()
        assert re.fullmatch(r"next\s+([\"']).{10,}\1", args), (page_id(page), args)


# Pages that train several DPSVI objects (a compilation each, 8-36 s): in the slow run,
# which CI runs too, to keep the default run under 10 minutes on 2 cores.
SLOW_PAGES = {
    "docs/guide/svi.rst",
    "docs/guide/scaling.rst",
    "docs/choosing_parameters.rst",
    "docs/guide/modelling.rst",
    "README.md",
}


def _page_param(page):
    marks = [pytest.mark.slow] if page_id(page) in SLOW_PAGES else []
    return pytest.param(page, id=page_id(page), marks=marks)


@pytest.mark.parametrize("page", [_page_param(p) for p in pages_with_python()])
def test_python_blocks_run(page):
    parser = RST if page.suffix == ".rst" else MARKDOWN
    document = parser.parse(page)
    exec(compile(PRELUDE, "<docs prelude>", "exec"), document.namespace)
    ran = skipped = 0
    for example in document:
        try:
            example.evaluate()
        except unittest.SkipTest:
            skipped += 1  # marked with its reason; test_every_skip_names_its_reason checks that
            continue
        ran += example.region.evaluator is run_block
    assert ran + skipped > 0, page_id(page)


@pytest.mark.slow  # 2000 steps on 10 000 records; the README's quickstart block runs by default
def test_quickstart_script_runs(capsys):
    # docs/quickstart.rst includes this script; it must run from the repository root
    runpy.run_path(str(DOCS / "_scripts" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "epsilon spent" in out and "posterior mean of w" in out


@pytest.mark.slow  # 65 PLD accountant evaluations of up to 10^5 steps
def test_plot_script_runs(tmp_path):
    # draws docs/_static/epsilon_vs_steps.png; here into tmp_path, the tracked figure stays
    script = runpy.run_path(str(DOCS / "_scripts" / "plot_epsilon_vs_steps.py"))
    main = script["main"]
    main.__globals__["OUT"] = tmp_path / "epsilon_vs_steps.png"
    main()
    assert (tmp_path / "epsilon_vs_steps.png").stat().st_size > 10_000


# ------------------------------------------------------------------ docs/conf.py settings

MATH_ROLE = re.compile(r":math:`([^`]+)`")
MATH_DIRECTIVE = re.compile(r"^\.\. math::[ \t]*\n\n((?:[ \t]+.*\n|[ \t]*\n)+)", re.M)


class _Translator:
    """The two members of Sphinx's HTML translator that conf.py's math renderer uses."""

    def __init__(self):
        self.body = []

    @staticmethod
    def encode(text):
        return html.escape(text)


def test_docs_render_math_offline_and_signatures_without_paths():
    # the pages need no MathJax (no CDN): every formula of the pages becomes MathML when
    # the site is built; and a module default shows as its name, not the build machine's path
    conf = runpy.run_path(str(DOCS / "conf.py"))
    assert conf["html_math_renderer"] == "mathml"
    assert "sphinx.ext.mathjax" not in conf["extensions"]
    formulas = []
    for page in pages():
        text = page.read_text(encoding="utf-8")
        formulas += MATH_ROLE.findall(text)
        formulas += [textwrap.dedent(m) for m in MATH_DIRECTIVE.findall(text)]
    assert len(formulas) > 50
    for latex in formulas:
        translator = _Translator()
        conf["_mathml"](translator, latex, None, as_block=False)
        assert translator.body[0].startswith("<math"), latex

    import d3p.random

    signature = f"(model, guide, rng_suite={d3p.random!r}, *, chunk_size=None)"
    assert " from '" in signature  # the repr of a module names its file
    shown, _ = conf["_signature_without_paths"](None, "class", "DPSVI", None, {}, signature, None)
    assert shown == "(model, guide, rng_suite=d3p.random, *, chunk_size=None)"
