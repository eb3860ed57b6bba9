# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Auditing DPSVI: an empirical lower bound on epsilon, for a sound run and a broken one.

:func:`d3p.audit.audit_dpsvi` trains once through :meth:`d3p.svi.DPSVI.run` with ``m``
gradient canaries, each included with probability 1/2, guesses from the released
parameters which were in, and turns the correct guesses into a lower bound ``eps_lb`` on
epsilon that holds with 95 % confidence (Steinke, Nasr and Jagielski, 2023). A sound
mechanism gives ``eps_lb`` below the epsilon d3p reports. The script then audits a
deliberately broken mechanism, built here and nowhere in d3p: the same run with the privacy
noise scaled by 1/10 (a noise sampler that draws ten times too little), which leaks far
more than the accounting says, and ``eps_lb`` exceeds the reported epsilon.

Run ``python examples/audit.py --help`` for the options; ``--plot PATH`` saves histograms
of the canaries' scores, included against excluded, for both runs.
"""

from __future__ import annotations

import argparse
import time
import types

import numpy as np

import d3p.random
from d3p.audit import AuditResult, audit_dpsvi
from d3p.plan import PrivacyPlan

# Poisson sampling at rate 0.5, 20 steps, noise multiplier 5, C = 1: d3p reports
# epsilon = 1.85 at delta = 1e-5.
Q, STEPS, SIGMA, C = 0.5, 20, 5.0, 1.0


def quiet_noise_suite() -> types.ModuleType:
    """d3p.random with the privacy noise scaled by 1/10: a BROKEN mechanism, for the demo."""
    suite = types.ModuleType("quiet_random")
    for name in dir(d3p.random):
        if not name.startswith("__"):
            setattr(suite, name, getattr(d3p.random, name))
    suite.hardened_normal = lambda *a, **k: 0.1 * d3p.random.hardened_normal(*a, **k)
    return suite


def plot(path: str, audits: dict[str, AuditResult]) -> None:
    """Histograms of the canary scores, included against excluded, one panel per audit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(audits), figsize=(5 * len(audits), 3.8), squeeze=False)
    for ax, (name, audit) in zip(axes[0], audits.items(), strict=True):
        bins = np.histogram_bin_edges(audit.scores, 40)
        ax.hist(audit.scores[audit.included], bins, alpha=0.6, label="included")
        ax.hist(audit.scores[~audit.included], bins, alpha=0.6, label="excluded")
        ax.set_title(
            f"{name}: reported $\\varepsilon$ = {audit.epsilon:.2f}, "
            f"$\\varepsilon_{{lb}}$ = {audit.epsilon_lower_bound:.2f}"
        )
        ax.set_xlabel("score (movement of the canary's coordinate)")
        ax.set_ylabel("canaries")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    parser.add_argument(
        "--canaries", type=int, default=None, help="number of canaries (default 10000, smoke 1000)"
    )
    parser.add_argument("--smoke", action="store_true", help="a short run for CI")
    parser.add_argument("--plot", metavar="PATH", help="save score histograms as a PNG")
    args = parser.parse_args(argv)
    if not 0 < args.delta < 1:
        parser.error(f"--delta must be in (0, 1), got {args.delta}")
    if args.canaries is not None and args.canaries < 2:
        parser.error(f"--canaries must be at least 2, got {args.canaries}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run both audits; return their numbers (also printed)."""
    args = parse_args(argv)
    m = args.canaries or (1000 if args.smoke else 10_000)
    # the audited data set: m canary slots and m / 10 ordinary records
    plan = PrivacyPlan.poisson(m + m // 10, Q, C, SIGMA, STEPS)
    print(
        f"plan: Poisson q = {Q}, {STEPS} steps, sigma = {SIGMA}, C = {C}, "
        f"{plan.dataset_size} records of which {m} canary slots"
    )
    start = time.perf_counter()
    audits = {
        "sound": audit_dpsvi(plan, m, delta=args.delta, seed=args.seed),
        "noise / 10 (broken)": audit_dpsvi(
            plan, m, delta=args.delta, seed=args.seed, rng_suite=quiet_noise_suite()
        ),
    }
    print(f"{'':22s}{'reported eps':>14s}{'eps_lb (95 %)':>15s}{'correct':>12s}{'seconds':>9s}")
    for name, audit in audits.items():
        correct = f"{audit.num_correct}/{audit.num_guesses}"
        print(
            f"{name:22s}{audit.epsilon:14.3f}{audit.epsilon_lower_bound:15.3f}"
            f"{correct:>12s}{audit.seconds:9.1f}"
        )
        verdict = "VIOLATED" if audit.epsilon_lower_bound > audit.epsilon else "consistent"
        print(f"  -> the reported guarantee is {verdict} at 95 % confidence")
    result = {
        name: {
            "epsilon": a.epsilon,
            "epsilon_lower_bound": a.epsilon_lower_bound,
            "num_canaries": a.num_canaries,
            "num_guesses": a.num_guesses,
            "num_correct": a.num_correct,
        }
        for name, a in audits.items()
    }
    if args.plot:
        plot(args.plot, audits)
        print(f"wrote {args.plot}")
    result["seconds"] = time.perf_counter() - start
    print(f"done in {result['seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main()
