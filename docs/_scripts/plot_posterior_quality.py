# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Draw ``docs/_static/posterior_quality.png`` from the posterior-quality benchmark's JSON.

Run from the repository root: ``python docs/_scripts/plot_posterior_quality.py [JSON]``
(default: the newest ``benchmarks/reference/*-quality-*.json``, written by
``python -m benchmarks --only quality --json PATH``). For logistic regression (d = 10,
N = 10^4) and linear regression (d = 10, N = 10^4): the relative error of the posterior
mean, the error of the posterior standard deviations and the coverage of the true weights
by the 90 % credible intervals, against epsilon, for each DP-VI variant and the
non-private reference.
"""

import json
import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
OUT = ROOT / "docs" / "_static" / "posterior_quality.png"
PROBLEMS = ("logistic regression d=10 N=10000", "linear regression d=10 N=10000")
VARIANTS = {  # name: (label, style)
    "plain": ("plain", "o-"),
    "aligned": ("aligned", "s-"),
    "averaged": ("averaged", "^-"),
    "aligned+averaged": ("aligned + averaged", "v-"),
    "noise-aware": ("noise-aware", "D--"),
    "aligned+noise-aware": ("aligned + noise-aware", "P--"),
}
PANELS = (  # column, y label
    ("mean_err", r"relative error of the mean $\|\mu - \mu_{ref}\| / \|\mu_{ref}\|$"),
    ("std_err", r"RMS of $\log(\mathrm{std} / \mathrm{std}_{ref})$"),
    ("cov90", "coverage of the true weights, 90 % intervals"),
)


def newest_reference() -> Path:
    return max((ROOT / "benchmarks" / "reference").glob("*-quality-*.json"))


def tables(path: Path) -> dict[str, list[dict]]:
    """The benchmark's tables by problem name (the title up to its first comma)."""
    sections = json.loads(path.read_text())["sections"]["quality"]
    return {title.split(",")[0]: rows for title, rows in sections.items()}


def main(path: Path | None = None) -> None:
    path = path or newest_reference()
    found = tables(path)
    problems = [p for p in PROBLEMS if p in found]
    fig, axes = plt.subplots(
        len(problems), len(PANELS), figsize=(13, 3.8 * len(problems)), squeeze=False
    )
    for row_axes, problem in zip(axes, problems, strict=True):
        rows = found[problem]
        reference = next(r for r in rows if r["epsilon"] == "-")
        for ax, (column, label) in zip(row_axes, PANELS, strict=True):
            for variant, (name, style) in VARIANTS.items():
                points = sorted((r["epsilon"], r[column]) for r in rows if r["variant"] == variant)
                if points:
                    eps, values = zip(*points, strict=True)
                    ax.plot(eps, values, style, ms=5, label=name)
            if column == "cov90":
                ax.axhline(0.9, color="k", lw=0.8, label="nominal 90 %")
                ax.axhline(reference["cov90"], color="gray", ls=":", label=reference["variant"])
                ax.legend(fontsize=7, loc="best")
            else:
                ax.set_ylim(bottom=0)
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xticks([0.3, 1, 3], ["0.3", "1", "3"])
            ax.set_xlabel(r"$\varepsilon$ ($\delta$ = 1e-5)")
            ax.set_ylabel(label, fontsize=8)
            ax.set_title(problem.replace("N=10000", r"N=$10^4$"), fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    plt.close(fig)
    print(f"wrote {OUT} from {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
