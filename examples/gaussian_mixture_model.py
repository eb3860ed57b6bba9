# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""A Gaussian mixture model fitted with differentially private VI.

Data: N synthetic records in 2-D from a mixture of k = 3 diagonal Gaussians with
known locations, scales and weights (generated here, no download).
Model: the likelihood is :class:`d3p.gmm.GaussianMixture` with priors
locs ~ Normal(0, 5), scales ~ LogNormal(0, 1) (per component and coordinate) and
mixture weights ~ Dirichlet(1, ..., 1); the guide is a mean-field Gaussian
(``AutoDiagonalNormal``) over the unconstrained parameters. Its starting point is
fixed in advance and does not look at the data (component locations on a circle),
because a data-dependent initialisation would leak.

A mixture's components are only identified up to relabelling, so the recovered
components are matched to the true ones by the permutation that minimises the
total squared distance between locations. The script prints the recovered
components next to the truth; ``--plot PATH`` draws them as 2-standard-deviation
ellipses over a sample of the data.
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal
from numpyro.infer.initialization import init_to_value
from numpyro.optim import Adam

import d3p.random
from d3p.gmm import GaussianMixture
from d3p.svi import DPSVI

TRUE_LOCS = np.array([[-4.0, 0.0], [0.0, 4.0], [4.0, -1.0]])
TRUE_SCALES = np.array([[1.0, 0.7], [0.8, 0.8], [0.6, 1.2]])
TRUE_WEIGHTS = np.array([0.5, 0.3, 0.2])
K, D = TRUE_LOCS.shape


def model(x: jnp.ndarray, num_obs_total: int | None = None) -> None:
    """Mixture of ``K`` diagonal Gaussians in ``D`` dimensions."""
    locs = numpyro.sample("locs", dist.Normal(0.0, 5.0).expand([K, D]).to_event(2))
    scales = numpyro.sample("scales", dist.LogNormal(0.0, 1.0).expand([K, D]).to_event(2))
    weights = numpyro.sample("weights", dist.Dirichlet(jnp.ones(K)))
    with numpyro.plate("data", num_obs_total, subsample_size=x.shape[0]):
        numpyro.sample("x", GaussianMixture(locs, scales, weights), obs=x)


def initial_values() -> dict:
    """A data-independent starting point: locations evenly spaced on a circle of radius 2."""
    angles = 2 * np.pi * np.arange(K) / K
    locs = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return {
        "locs": jnp.asarray(locs, jnp.float32),
        "scales": jnp.ones((K, D)),
        "weights": jnp.full(K, 1.0 / K),
    }


def generate_data(n: int, seed: int) -> np.ndarray:
    """Draw ``n`` records from the true mixture."""
    rng = np.random.default_rng(seed)
    z = rng.choice(K, size=n, p=TRUE_WEIGHTS)
    return (TRUE_LOCS[z] + TRUE_SCALES[z] * rng.normal(size=(n, D))).astype(np.float32)


def match_components(locs: np.ndarray) -> tuple[int, ...]:
    """The permutation ``p`` with ``locs[p[j]]`` closest to ``TRUE_LOCS[j]`` overall."""
    return min(
        itertools.permutations(range(K)),
        key=lambda p: float(np.sum((locs[list(p)] - TRUE_LOCS) ** 2)),
    )


def fit_dp(
    x: np.ndarray,
    epsilon: float,
    delta: float,
    num_steps: int,
    q: float,
    seed: int,
    progress_bar: bool,
) -> dict:
    """Fit the mixture with DPSVI; return the recovered components (posterior medians)."""
    guide = AutoDiagonalNormal(model, init_loc_fn=init_to_value(values=initial_values()))
    # Budget first: the noise scale is calibrated so that num_steps Poisson(q) steps spend at
    # most (epsilon, delta), add/remove relation; run() then uses exactly that plan.
    dpsvi = DPSVI.make_private_with_epsilon(
        model,
        guide,
        Adam(2e-2),
        Trace_ELBO(),
        clipping_threshold=3.0,
        target_epsilon=epsilon,
        target_delta=delta,
        q=q,
        num_steps=num_steps,
        num_obs_total=len(x),
    )
    result = dpsvi.run(d3p.random.PRNGKey(seed), num_steps, x, progress_bar=progress_bar)
    median = guide.median(result.params)
    perm = list(match_components(np.asarray(median["locs"])))
    return {
        "locs": np.asarray(median["locs"])[perm],
        "scales": np.asarray(median["scales"])[perm],
        "weights": np.asarray(median["weights"])[perm],
        "epsilon_spent": float(result.epsilon),
        "sigma": dpsvi.dp_scale,
    }


def plot(path: str, x: np.ndarray, fit: dict, epsilon: float) -> None:
    """Data sample with the true and the recovered components as 2-sd ellipses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    fig, ax = plt.subplots(figsize=(6.5, 6), constrained_layout=True)
    shown = x[: min(len(x), 2000)]
    ax.scatter(shown[:, 0], shown[:, 1], s=3, color="0.7", label="data (sample)")
    for j in range(K):
        for locs, scales, style, label in (
            (TRUE_LOCS, TRUE_SCALES, dict(ec="k", ls="--"), "true component"),
            (fit["locs"], fit["scales"], dict(ec=f"C{j}", ls="-"), f"DP-VI component {j + 1}"),
        ):
            ax.add_patch(
                Ellipse(
                    locs[j],
                    4 * scales[j][0],
                    4 * scales[j][1],
                    fill=False,
                    lw=2,
                    label=label if (j == 0 or label != "true component") else None,
                    **style,
                )
            )
        top = (fit["locs"][j][0], fit["locs"][j][1] + 2 * fit["scales"][j][1])
        ax.annotate(
            f"weight {fit['weights'][j]:.2f} (true {TRUE_WEIGHTS[j]:.2f})",
            top,
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize="small",
            bbox=dict(boxstyle="round", fc="white", alpha=0.8),
        )
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_aspect("equal")
    ax.legend(loc="lower left", fontsize="small")
    ax.set_title(rf"Gaussian mixture, DP-VI at $\varepsilon$ = {epsilon:g} (ellipses: 2 sd)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--epsilon", type=float, default=1.0, help="target epsilon (default 1)")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta (default 1e-5)")
    parser.add_argument("--num-records", type=int, default=10_000, help="N (default 10000)")
    parser.add_argument("--smoke", action="store_true", help="a few-second run for CI")
    parser.add_argument("--plot", metavar="PATH", help="save a PNG of the components")
    args = parser.parse_args(argv)
    if not args.epsilon > 0:
        parser.error(f"--epsilon must be positive, got {args.epsilon}")
    if not 0 < args.delta < 1:
        parser.error(f"--delta must be in (0, 1), got {args.delta}")
    if args.num_records < 1:
        parser.error(f"--num-records must be at least 1, got {args.num_records}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the example; return its numbers (also printed)."""
    args = parse_args(argv)
    start = time.perf_counter()
    x = generate_data(args.num_records, args.seed)
    num_steps, q = (400, 0.05) if args.smoke else (3000, 0.01)
    fit = fit_dp(x, args.epsilon, args.delta, num_steps, q, args.seed, not args.smoke)
    print(f"N = {len(x)}, {num_steps} steps, q = {q}, sigma = {fit['sigma']:.3f}")
    print(f"privacy spent: epsilon = {fit['epsilon_spent']:.3f} at delta = {args.delta:g}")
    print("component  weight (true)   location (true)              scales (true)")

    def pair(v: np.ndarray) -> str:
        return f"({v[0]:5.2f}, {v[1]:5.2f})"

    for j in range(K):
        print(
            f"{j + 1:9d}  {fit['weights'][j]:.2f} ({TRUE_WEIGHTS[j]:.2f})     "
            f"{pair(fit['locs'][j])} {pair(TRUE_LOCS[j])}   "
            f"{pair(fit['scales'][j])} {pair(TRUE_SCALES[j])}"
        )
    loc_error = float(np.max(np.linalg.norm(fit["locs"] - TRUE_LOCS, axis=1)))
    print(f"largest distance of a recovered location from the truth: {loc_error:.3f}")
    if args.plot:
        plot(args.plot, x, fit, args.epsilon)
        print(f"wrote {args.plot}")
    seconds = time.perf_counter() - start
    print(f"done in {seconds:.1f} s")
    return {
        "epsilon_target": args.epsilon,
        "epsilon_spent": fit["epsilon_spent"],
        "delta": args.delta,
        "sigma": fit["sigma"],
        "locs": fit["locs"].tolist(),
        "scales": fit["scales"].tolist(),
        "weights": fit["weights"].tolist(),
        "max_loc_error": loc_error,
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
