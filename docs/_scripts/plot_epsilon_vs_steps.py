# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Draw ``docs/_static/epsilon_vs_steps.png``: epsilon spent against the number of steps.

Run from the repository root: ``python docs/_scripts/plot_epsilon_vs_steps.py``.
The curves are computed with :func:`d3p.dputil.compute_epsilon` (PLD accountant,
add/remove relation) for Poisson sampling with q = 0.01 and delta = 1e-5.
"""

from pathlib import Path

import matplotlib
import numpy as np

from d3p.dputil import compute_epsilon

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Q = 0.01
DELTA = 1e-5
SIGMAS = (0.8, 1.0, 1.5, 2.0, 4.0)
STEPS = np.unique(np.logspace(1, 5, 13).round().astype(int))
OUT = Path(__file__).resolve().parent.parent / "_static" / "epsilon_vs_steps.png"


def main() -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    for sigma in SIGMAS:
        eps = [compute_epsilon(sigma, DELTA, Q, int(t)) for t in STEPS]
        ax.plot(STEPS, eps, "o-", ms=3, label=rf"$\sigma$ = {sigma:g}")
        print(
            f"sigma={sigma}: "
            + ", ".join(f"T={t}: {e:.3g}" for t, e in zip(STEPS, eps, strict=True))
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of steps T")
    ax.set_ylabel(r"$\varepsilon$ spent (add/remove relation)")
    ax.set_title(rf"Poisson sampling q = {Q:g}, $\delta$ = {DELTA:g} (PLD accountant)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="noise scale")
    fig.savefig(OUT, dpi=120)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
