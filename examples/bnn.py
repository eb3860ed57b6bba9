# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Bayesian neural-network regression trained with differentially private VI.

Data: scikit-learn's bundled diabetes data (442 patients, 10 baseline features, a
measure of disease progression one year later; no download), split 80 % train and
20 % test. scikit-learn ships the features centred and scaled by the whole data set's
statistics (the publisher's preprocessing); the script multiplies them and shifts and
scales the target by fixed constants (``X_SCALE``, ``Y_SHIFT``, ``Y_SCALE``, close to
the published data set's spread) -- nothing is computed from the training split.

Model: a one-hidden-layer tanh network ``h(x)`` written with ``jax.example_libraries.stax``
and registered with ``numpyro.module`` (its weights are point estimates), followed by a
Bayesian linear output layer: ``y_i ~ Normal(h(x_i) . w + b, s)`` with standard-normal
priors on ``w`` and ``b`` and a log-normal prior on the noise scale ``s``. The guide is
mean-field Gaussian over ``(w, b, s)`` (``AutoDiagonalNormal``). DPSVI clips each
patient's gradient with respect to the network weights and the guide's parameters
together, and noises all of them.

The script prints the test RMSE and the coverage of the 90 % posterior-predictive
intervals, for DP-VI and a non-private :class:`numpyro.infer.SVI` baseline trained the
same way, next to the RMSE of predicting the training mean. ``--plot PATH`` saves the
predictive means and intervals against the held-out targets.
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
from jax.example_libraries import stax
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal
from numpyro.optim import Adam

import d3p.random
from d3p.svi import DPSVI

HIDDEN = 8
# scikit-learn scales each feature column to unit norm over the 442 patients (sd 0.048)
X_SCALE = 0.05
# the target (disease progression) ranges over 25..346; these make it roughly standard
Y_SHIFT, Y_SCALE = 150.0, 80.0


def feature_net(hidden: int) -> tuple[Callable, Callable]:
    """stax network: features -> ``hidden`` tanh units."""
    return stax.serial(stax.Dense(hidden), stax.Tanh)


FEATURES = feature_net(HIDDEN)


def model(x: jnp.ndarray, y: jnp.ndarray | None = None, num_obs_total: int | None = None) -> None:
    """Network features, Bayesian linear output layer, Gaussian noise."""
    h = numpyro.module("features", FEATURES, (-1, x.shape[1]))(x)
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([HIDDEN]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    s = numpyro.sample("s", dist.LogNormal(-1.0, 1.0))
    with numpyro.plate("data", num_obs_total, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(h @ w + b, s), obs=y)


def load_diabetes_split(seed: int) -> tuple[np.ndarray, ...]:
    """Scaled features and targets, split 80/20 into train and test."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x = (data.data / X_SCALE).astype(np.float32)
    y = ((data.target - Y_SHIFT) / Y_SCALE).astype(np.float32)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_train = int(0.8 * len(x))
    train, test = perm[:n_train], perm[n_train:]
    return x[train], y[train], x[test], y[test]


class Settings(NamedTuple):
    num_steps: int
    q: float  # Poisson sampling probability of each record per step
    clipping_threshold: float  # C: L2 bound on one record's gradient contribution
    learning_rate: float


DEFAULT = Settings(num_steps=1000, q=0.2, clipping_threshold=1.0, learning_rate=1e-2)
SMOKE = Settings(num_steps=300, q=0.2, clipping_threshold=1.0, learning_rate=3e-2)


def fit_dp(
    x: np.ndarray,
    y: np.ndarray,
    settings: Settings,
    epsilon: float,
    delta: float,
    seed: int,
    progress_bar: bool,
) -> tuple[AutoDiagonalNormal, dict, float, float]:
    """Train with DPSVI; return (guide, params, epsilon spent, sigma)."""
    guide = AutoDiagonalNormal(model)
    dpsvi = DPSVI.make_private_with_epsilon(
        model,
        guide,
        Adam(settings.learning_rate),
        Trace_ELBO(),
        clipping_threshold=settings.clipping_threshold,
        target_epsilon=epsilon,
        target_delta=delta,
        q=settings.q,
        num_steps=settings.num_steps,
        num_obs_total=len(x),
    )
    result = dpsvi.run(
        d3p.random.PRNGKey(seed), settings.num_steps, x, y, progress_bar=progress_bar
    )
    return guide, result.params, float(result.epsilon), dpsvi.dp_scale


def fit_nonprivate(
    x: np.ndarray, y: np.ndarray, settings: Settings, seed: int
) -> tuple[AutoDiagonalNormal, dict]:
    """Non-private baseline: SVI on random minibatches of the expected size."""
    n = len(x)
    batch_size = max(1, round(settings.q * n))
    guide = AutoDiagonalNormal(model)
    svi = SVI(model, guide, Adam(settings.learning_rate), Trace_ELBO(), num_obs_total=n)
    x, y = jnp.asarray(x), jnp.asarray(y)
    init_key, loop_key = jax.random.split(jax.random.key(seed))
    state = svi.init(init_key, x[:batch_size], y[:batch_size])

    def step(state, key):
        idx = jax.random.choice(key, n, (batch_size,), replace=False)
        return svi.update(state, x[idx], y[idx])

    state, _ = jax.lax.scan(step, state, jax.random.split(loop_key, settings.num_steps))
    return guide, svi.get_params(state)


def predict(guide: AutoDiagonalNormal, params: dict, x: np.ndarray, seed: int) -> np.ndarray:
    """Posterior-predictive draws of the (scaled) target, shape (draws, len(x))."""
    predictive = Predictive(model, guide=guide, params=params, num_samples=1000)
    return np.asarray(predictive(jax.random.key(seed), x, num_obs_total=len(x))["y"])


def scores(draws: np.ndarray, y: np.ndarray) -> dict:
    """Test RMSE of the predictive mean (target units) and 90 % interval coverage."""
    low, high = np.quantile(draws, [0.05, 0.95], axis=0)
    rmse = float(np.sqrt(np.mean((draws.mean(0) - y) ** 2))) * Y_SCALE
    return {"rmse": rmse, "coverage_90": float(np.mean((low <= y) & (y <= high)))}


def plot(path: str, draws: dict, y_test: np.ndarray, epsilon: float) -> None:
    """Predictive mean and 90 % interval against the held-out target, DP and non-private."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = y_test * Y_SCALE + Y_SHIFT
    lims = (truth.min() - 30, truth.max() + 30)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True, constrained_layout=True)
    titles = {"dp": rf"DP-VI ($\varepsilon$ = {epsilon:g})", "nonprivate": "non-private SVI"}
    for ax, (name, d) in zip(axes, draws.items(), strict=True):
        d = d * Y_SCALE + Y_SHIFT
        mean = d.mean(0)
        low, high = np.quantile(d, [0.05, 0.95], axis=0)
        ax.errorbar(truth, mean, yerr=(mean - low, high - mean), fmt="o", ms=3, alpha=0.6)
        ax.plot(lims, lims, "k--", lw=1)
        ax.set(xlim=lims, ylim=lims, title=titles[name], xlabel="held-out disease progression")
    axes[0].set_ylabel("predictive mean and 90 % interval")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--epsilon", type=float, default=1.0, help="target epsilon (default 1)")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta (default 1e-5)")
    parser.add_argument("--smoke", action="store_true", help="a few-second run for CI")
    parser.add_argument("--plot", metavar="PATH", help="save a PNG of the predictions")
    args = parser.parse_args(argv)
    if not args.epsilon > 0:
        parser.error(f"--epsilon must be positive, got {args.epsilon}")
    if not 0 < args.delta < 1:
        parser.error(f"--delta must be in (0, 1), got {args.delta}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the example; return its numbers (also printed)."""
    args = parse_args(argv)
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_diabetes_split(args.seed)
    settings = SMOKE if args.smoke else DEFAULT
    guide, params, eps_spent, sigma = fit_dp(
        x_train, y_train, settings, args.epsilon, args.delta, args.seed, not args.smoke
    )
    draws = {
        "dp": predict(guide, params, x_test, args.seed),
        "nonprivate": predict(
            *fit_nonprivate(x_train, y_train, settings, args.seed), x_test, args.seed
        ),
    }
    results = {name: scores(d, y_test) for name, d in draws.items()}
    # a data-independent reference would be the target's published spread; this one is
    # non-private: the test RMSE of always predicting the training mean
    constant_rmse = float(np.sqrt(np.mean((y_test - y_train.mean()) ** 2))) * Y_SCALE
    print(
        f"{len(x_train)} training records, {settings.num_steps} steps, q = {settings.q}, "
        f"C = {settings.clipping_threshold}, sigma = {sigma:.3f}"
    )
    print(f"privacy spent: epsilon = {eps_spent:.3f} at delta = {args.delta:g}")
    for name, r in results.items():
        print(
            f"{name:>10}: test RMSE {r['rmse']:.1f}, 90 % interval coverage {r['coverage_90']:.2f}"
        )
    print(f"(for reference: predicting the training mean, RMSE {constant_rmse:.1f})")
    if args.plot:
        plot(args.plot, draws, y_test, args.epsilon)
        print(f"wrote {args.plot}")
    seconds = time.perf_counter() - start
    print(f"done in {seconds:.1f} s")
    return {
        "epsilon_target": args.epsilon,
        "epsilon_spent": eps_spent,
        "delta": args.delta,
        "sigma": sigma,
        **results,
        "constant_rmse": constant_rmse,
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
