# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Federated DP-VI across three data owners, on Flower: against pooled data and each alone.

Three silos (say, hospitals) hold records of a Bayesian logistic regression (standard
normal prior on the weights and the intercept, mean-field Gaussian guide). They are of
unequal size and their features are distributed somewhat differently (each silo's
features are shifted and scaled its own way). At the same privacy per record (every
record is protected at the same (epsilon, delta), add/remove relation), the script
compares

* **federated**: :func:`d3p.federated.train_federated`, each silo taking DPSVI steps on its
  own records in Flower's simulation engine and the server averaging their parameters;
* **pooled**: DPSVI on all records in one place (what the silos may not do, the best
  case);
* **alone**: DPSVI on each silo's own records only (what each can do without the others).

Each noise scale is calibrated for the run's steps with :mod:`d3p.plan`
(:meth:`d3p.plan.PrivacyBudget.calibrate`). The scores are the test accuracy and the test
log-likelihood (mean log posterior-predictive probability per test record) on held-out
records drawn from all three silos' populations. The data are synthetic (no download;
the features need no data-dependent pre-processing).

Run ``python examples/federated.py --help`` for the options; ``--plot PATH`` saves a plot of
the scores.
"""

from __future__ import annotations

import argparse
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal
from numpyro.optim import Adam

import d3p.random
from d3p.federated import train_federated
from d3p.svi import DPSVI

D = 10  # features


class Settings(NamedTuple):
    sizes: tuple[int, ...]  # records per silo
    num_rounds: int
    local_steps: int  # DPSVI steps per silo per round
    q: float  # Poisson sampling rate of each record per step
    clipping_threshold: float  # C: L2 bound on one record's gradient
    learning_rate: float


DEFAULT = Settings((500, 1500, 3000), 20, 50, 0.02, 2.0, 2e-2)
SMOKE = Settings((400, 1000, 2000), 3, 20, 0.05, 2.0, 5e-2)


def model(X: jnp.ndarray, y: jnp.ndarray | None = None, num_obs_total: int | None = None) -> None:
    """Logistic regression; ``num_obs_total`` is the size of the data the ELBO is for."""
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", num_obs_total, subsample_size=X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ w + b), obs=y)


def make_data(sizes: tuple[int, ...], seed: int) -> tuple[list, tuple, np.ndarray]:
    """Silos with different feature distributions, a test set from all of them, the truth."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=D + 1)  # weights, then the intercept
    shifts = np.linspace(-0.8, 0.8, len(sizes))
    scales = np.linspace(0.7, 1.3, len(sizes))

    def draw(k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        X = rng.normal(shifts[k], scales[k], size=(n, D))
        p = 1.0 / (1.0 + np.exp(-(X @ truth[:D] + truth[D])))
        y = (rng.uniform(size=n) < p).astype(np.float32)
        return X.astype(np.float32), y

    silos = [draw(k, n) for k, n in enumerate(sizes)]
    tests = [draw(k, 2000) for k in range(len(sizes))]
    test = tuple(np.concatenate(parts) for parts in zip(*tests, strict=True))
    return silos, test, truth


def evaluate(
    guide: AutoDiagonalNormal, params: dict, test: tuple, seed: int, num_samples: int = 1000
) -> dict:
    """Test accuracy and mean log posterior-predictive probability of the test labels."""
    samples = guide.sample_posterior(jax.random.key(seed), params, sample_shape=(num_samples,))
    X, y = test
    logits = samples["w"] @ X.T + samples["b"][:, None]
    log_lik = y * jax.nn.log_sigmoid(logits) + (1 - y) * jax.nn.log_sigmoid(-logits)
    log_pred = jax.nn.logsumexp(log_lik, axis=0) - np.log(num_samples)
    prob_one = jnp.mean(jax.nn.sigmoid(logits), axis=0)
    return {
        "accuracy": float(jnp.mean((prob_one > 0.5) == (y > 0.5))),
        "log_likelihood": float(jnp.mean(log_pred)),
    }


def fit_dpsvi(data: tuple, settings: Settings, epsilon: float, delta: float, seed: int) -> tuple:
    """DPSVI on ``data`` in one place at (epsilon, delta), for rounds x local steps.

    Returns the guide, its parameters and the epsilon spent."""
    steps = settings.num_rounds * settings.local_steps
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
        num_steps=steps,
        num_obs_total=len(data[1]),
    )
    result = dpsvi.run(d3p.random.PRNGKey(seed), steps, *data, progress_bar=False)
    return guide, result.params, float(result.epsilon)


def plot(path: str, rows: dict, title: str) -> None:
    """Test accuracy and log-likelihood per method (one point each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    colors = ["tab:blue", "tab:green"] + ["tab:gray"] * (len(names) - 2)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, key, label in (
        (axes[0], "accuracy", "test accuracy"),
        (axes[1], "log_likelihood", "test log-likelihood per record (nats)"),
    ):
        values = [rows[n][key] for n in names]
        ax.scatter(names, values, s=80, c=colors, zorder=3)
        for x, v in enumerate(values):
            ax.annotate(f"{v:.3f}", (x, v), textcoords="offset points", xytext=(0, 8), ha="center")
        span = max(values) - min(values) or 0.01
        ax.set_ylim(min(values) - 0.2 * span, max(values) + 0.3 * span)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=20)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--epsilon", type=float, default=1.0, help="epsilon per record (default 1)")
    parser.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    parser.add_argument("--smoke", action="store_true", help="a short run for CI")
    parser.add_argument("--plot", metavar="PATH", help="save a plot of the scores (PNG)")
    args = parser.parse_args(argv)
    if not args.epsilon > 0:
        parser.error(f"--epsilon must be positive, got {args.epsilon}")
    if not 0 < args.delta < 1:
        parser.error(f"--delta must be in (0, 1), got {args.delta}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the example; return its numbers (also printed)."""
    args = parse_args(argv)
    settings = SMOKE if args.smoke else DEFAULT
    silos, test, _ = make_data(settings.sizes, args.seed)
    total = sum(settings.sizes)
    print(
        f"3 silos of {', '.join(map(str, settings.sizes))} records ({D} features, shifted "
        f"and scaled per silo); {len(test[1])} test records; epsilon = {args.epsilon:g} per "
        f"record at delta = {args.delta:g}; {settings.num_rounds} rounds x "
        f"{settings.local_steps} local steps, q = {settings.q}, C = "
        f"{settings.clipping_threshold}"
    )
    start = time.perf_counter()
    guide = AutoDiagonalNormal(model)
    fed = train_federated(
        model,
        guide,
        Adam(settings.learning_rate),
        silos,
        settings.num_rounds,
        settings.local_steps,
        q=settings.q,
        delta=args.delta,
        clipping_threshold=settings.clipping_threshold,
        epsilon=args.epsilon,
        seed=args.seed,
        progress_bar=not args.smoke,
        num_obs_total=total,  # every silo's ELBO is for the pooled data (public size)
    )
    fed_seconds = time.perf_counter() - start
    # the first round includes Ray's start and the compilation of each silo's step
    later = [r["seconds"] for r in fed.history[1:]] or [fed.history[0]["seconds"]]
    rows = {
        "federated": {**evaluate(guide, fed.params, test, args.seed), "epsilon": max(fed.epsilons)}
    }
    guide, params, eps = fit_dpsvi(
        tuple(np.concatenate(a) for a in zip(*silos, strict=True)),
        settings,
        args.epsilon,
        args.delta,
        args.seed,
    )
    rows["pooled DPSVI"] = {**evaluate(guide, params, test, args.seed), "epsilon": eps}
    for k, silo in enumerate(silos):
        guide, params, eps = fit_dpsvi(silo, settings, args.epsilon, args.delta, args.seed + k + 1)
        rows[f"silo {k} alone (N={len(silo[1])})"] = {
            **evaluate(guide, params, test, args.seed),
            "epsilon": eps,
        }

    print(f"federated: epsilon spent per silo {', '.join(f'{e:.3f}' for e in fed.epsilons)}")
    print(f"{'':28s}{'epsilon':>9s}{'test accuracy':>15s}{'test log-lik':>14s}")
    for name, row in rows.items():
        print(
            f"{name:28s}{row['epsilon']:9.3f}{row['accuracy']:15.3f}{row['log_likelihood']:14.3f}"
        )
    print(
        f"federated run {fed_seconds:.1f} s; first round {fed.history[0]['seconds']:.1f} s "
        f"(Ray start, compilation), later rounds {np.median(later):.2f} s (median)"
    )
    result = {
        "epsilon": args.epsilon,
        "delta": args.delta,
        "epsilons": fed.epsilons,
        "rows": rows,
        "round_seconds": [r["seconds"] for r in fed.history],
    }
    if args.plot:
        title = (
            f"Logistic regression across 3 silos, epsilon = {args.epsilon:g} per record "
            f"(delta = {args.delta:g}), N = {total}"
        )
        plot(args.plot, rows, title)
        print(f"wrote {args.plot}")
    result["seconds"] = time.perf_counter() - start
    print(f"done in {result['seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main()
