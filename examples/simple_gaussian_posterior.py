# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""DP-VI on a model with a closed-form posterior: the mean of a Gaussian.

Data: N synthetic records x_i ~ Normal(mu, s^2 I) in d = 2 dimensions with known
noise standard deviation s = 1 and a true mean mu (generated here, no download).
Model: prior mu ~ Normal(0, tau^2 I) with tau = 10. The exact posterior is Gaussian,

    precision = 1 / tau^2 + N / s^2,   mean = (sum_i x_i / s^2) / precision,

and, being a product of independent Gaussians over the coordinates, a mean-field
Gaussian guide can represent it exactly. So any difference between the DP-VI
posterior and the exact one is the price of privacy (noise and clipping) plus
optimisation error. The script prints both posteriors (means and standard
deviations) and with ``--plot PATH`` draws their densities per coordinate.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.optim import Adam

import d3p.random
from d3p.svi import DPSVI

PRIOR_STD = 10.0  # tau
OBS_STD = 1.0  # s, known
TRUE_MEAN = np.array([1.0, -2.0])


def model(x: jnp.ndarray, num_obs_total: int | None = None) -> None:
    """Gaussian with unknown mean and known standard deviation ``OBS_STD``."""
    d = x.shape[-1]
    mu = numpyro.sample("mu", dist.Normal(0.0, PRIOR_STD).expand([d]).to_event(1))
    with numpyro.plate("data", num_obs_total, subsample_size=x.shape[0]):
        numpyro.sample("x", dist.Normal(mu, OBS_STD).to_event(1), obs=x)


def exact_posterior(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form posterior mean and standard deviation of ``mu`` (per coordinate)."""
    precision = 1.0 / PRIOR_STD**2 + len(x) / OBS_STD**2
    mean = x.sum(axis=0) / OBS_STD**2 / precision
    return mean, np.full_like(mean, precision**-0.5)


class Settings(NamedTuple):
    num_steps: int
    q: float  # Poisson sampling probability of each record per step
    clipping_threshold: float  # C: L2 bound on one record's gradient contribution
    learning_rate: tuple[float, float]  # Adam step size, decayed geometrically: first, last


DEFAULT = Settings(num_steps=1000, q=0.2, clipping_threshold=1.0, learning_rate=(0.1, 5e-3))
SMOKE = Settings(num_steps=300, q=0.2, clipping_threshold=1.0, learning_rate=(0.1, 5e-3))


def step_size_schedule(settings: Settings) -> Callable[[jax.Array], jax.Array]:
    """Geometric decay of Adam's step size: large steps first, small steps to settle."""
    first, last = settings.learning_rate
    return lambda i: first * (last / first) ** (i / settings.num_steps)


def fit_dp(
    x: np.ndarray, settings: Settings, epsilon: float, delta: float, seed: int, progress_bar: bool
) -> dict:
    """Fit the mean-field Gaussian guide with DPSVI; return its mean, std and the privacy spent."""
    guide = AutoNormal(model)
    # Budget first: dp_scale is calibrated so that the run spends at most (epsilon, delta).
    dpsvi = DPSVI.make_private_with_epsilon(
        model,
        guide,
        # b2=0.9: a short memory of gradient magnitudes, so that the large gradients of the
        # first steps do not freeze the guide's scales later on
        Adam(step_size_schedule(settings), b2=0.9),
        Trace_ELBO(),
        clipping_threshold=settings.clipping_threshold,
        target_epsilon=epsilon,
        target_delta=delta,
        q=settings.q,
        num_steps=settings.num_steps,
        num_obs_total=len(x),
    )
    result = dpsvi.run(d3p.random.PRNGKey(seed), settings.num_steps, x, progress_bar=progress_bar)
    return {
        "mean": np.asarray(result.params["mu_auto_loc"]),
        "std": np.asarray(result.params["mu_auto_scale"]),
        "epsilon_spent": float(result.epsilon),
        "sigma": dpsvi.dp_scale,
    }


def plot(path: str, exact: tuple[np.ndarray, np.ndarray], dp: dict, epsilon: float) -> None:
    """Exact and DP-VI posterior densities of each coordinate of ``mu``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def pdf(t: np.ndarray, m: float, s: float) -> np.ndarray:
        return np.exp(-0.5 * ((t - m) / s) ** 2) / (s * np.sqrt(2 * np.pi))

    fig, axes = plt.subplots(1, len(TRUE_MEAN), figsize=(10, 4), constrained_layout=True)
    for j, ax in enumerate(axes):
        m, s = exact[0][j], exact[1][j]
        lo = min(m - 5 * s, dp["mean"][j] - 4 * dp["std"][j])
        hi = max(m + 5 * s, dp["mean"][j] + 4 * dp["std"][j])
        grid = np.linspace(lo, hi, 400)
        ax.plot(grid, pdf(grid, m, s), "k-", label="exact posterior")
        ax.plot(
            grid,
            pdf(grid, dp["mean"][j], dp["std"][j]),
            "C1--",
            label=rf"DP-VI, $\varepsilon$ = {epsilon:g}",
        )
        ax.axvline(TRUE_MEAN[j], color="C2", linestyle=":", label="true value")
        ax.set_xlabel(rf"$\mu_{j + 1}$")
        ax.set_ylabel("posterior density")
        ax.legend()
    fig.suptitle("Posterior of a Gaussian mean: exact vs. differentially private VI")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--epsilon", type=float, default=1.0, help="target epsilon (default 1)")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta (default 1e-5)")
    parser.add_argument("--num-records", type=int, default=10_000, help="N (default 10000)")
    parser.add_argument("--smoke", action="store_true", help="a few-second run for CI")
    parser.add_argument("--plot", metavar="PATH", help="save a PNG of the posteriors")
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
    rng = np.random.default_rng(args.seed)
    x = TRUE_MEAN + OBS_STD * rng.normal(size=(args.num_records, len(TRUE_MEAN)))
    x = x.astype(np.float32)
    settings = SMOKE if args.smoke else DEFAULT
    exact = exact_posterior(x.astype(np.float64))
    dp = fit_dp(x, settings, args.epsilon, args.delta, args.seed, not args.smoke)
    print(
        f"N = {len(x)}, {settings.num_steps} steps, q = {settings.q}, "
        f"C = {settings.clipping_threshold}, sigma = {dp['sigma']:.3f}"
    )
    print(f"privacy spent: epsilon = {dp['epsilon_spent']:.3f} at delta = {args.delta:g}")
    print(f"{'':10s}{'exact mean':>12s}{'DP mean':>12s}{'exact std':>12s}{'DP std':>12s}")
    for j in range(len(TRUE_MEAN)):
        print(
            f"mu[{j}]     {exact[0][j]:12.4f}{dp['mean'][j]:12.4f}"
            f"{exact[1][j]:12.4f}{dp['std'][j]:12.4f}"
        )
    if args.plot:
        plot(args.plot, exact, dp, args.epsilon)
        print(f"wrote {args.plot}")
    seconds = time.perf_counter() - start
    print(f"done in {seconds:.1f} s")
    return {
        "epsilon_target": args.epsilon,
        "epsilon_spent": dp["epsilon_spent"],
        "delta": args.delta,
        "sigma": dp["sigma"],
        "exact_mean": exact[0].tolist(),
        "exact_std": exact[1].tolist(),
        "dp_mean": dp["mean"].tolist(),
        "dp_std": dp["std"].tolist(),
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
