# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Bayesian logistic regression with differentially private VI: d3p's main example.

Fits a Bayesian logistic regression (standard normal prior on the weights and the
intercept, mean-field Gaussian guide) with :class:`d3p.svi.DPSVI` on Poisson-sampled
minibatches, with the noise scale calibrated by
:func:`d3p.dputil.approximate_sigma_remove_relation` (through the budget-first
:meth:`d3p.svi.DPSVI.make_private_with_epsilon`) for a target (epsilon, delta) under
the add/remove relation. A non-private :class:`numpyro.infer.SVI` baseline is
trained the same way (same model, guide, optimiser, number of steps and expected
batch size). The script prints the privacy spent, and the test accuracy and test
log-likelihood (mean log posterior-predictive probability per test record) of both.

Data (no download needed):

``breast_cancer`` (default)
    the Wisconsin breast-cancer data set bundled with scikit-learn (569 records,
    30 features, 63 % benign). 80 % train, 20 % test. The features are standardised
    with the training split's mean and standard deviation. That pre-processing
    looks at the private data and is *not* covered by the privacy guarantee; in a
    real deployment use public or domain bounds instead.
``synthetic``
    records drawn from a logistic regression with known weights (features standard
    normal, so no data-dependent pre-processing is needed); the result also
    reports the distance of the posterior means from the true weights.

Better posteriors under DP (see the guide page "Getting good posteriors under DP"):

``--aligned``
    DPVIm's aligned gradients (``DPSVI(..., aligned_gradients=True)``): the guide's
    scales are updated from the privatised location gradients, so their gradients
    take no share of the clipping bound and the noise.
``--noise-aware``
    average the iterates of the last half of the steps (``run(..., average=0.5)``)
    and sample from :class:`d3p.noise_aware.NoiseAwarePosterior`, the averaged guide
    widened by the DP noise left in its parameters; on ``synthetic`` data the script
    also reports how many true weights its 90 % intervals cover.

Both are post-processing or a different use of the same privatised gradients: the
privacy spent is the same.

Run ``python examples/logistic_regression.py --help`` for the options;
``--plot PATH`` trains for a few values of epsilon and plots test accuracy and
log-likelihood against epsilon, DP against the non-private baseline.
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
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal
from numpyro.optim import Adam

import d3p.random
from d3p.noise_aware import NoiseAwarePosterior
from d3p.svi import DPSVI


class Data(NamedTuple):
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    true_weights: np.ndarray | None  # (d + 1,): weights then intercept; None if unknown


class Settings(NamedTuple):
    num_steps: int
    q: float  # Poisson sampling probability of each record per step
    clipping_threshold: float  # C: L2 bound on one record's gradient contribution
    learning_rate: float


DEFAULT = Settings(num_steps=2000, q=0.05, clipping_threshold=2.0, learning_rate=1e-2)
SMOKE = Settings(num_steps=300, q=0.05, clipping_threshold=2.0, learning_rate=3e-2)
PLOT_EPSILONS = (0.1, 0.3, 1.0, 3.0, 10.0)
SMOKE_PLOT_EPSILONS = (10.0,)  # plus --epsilon; every DPSVI.run compiles anew, so keep it short


def model(X: jnp.ndarray, y: jnp.ndarray | None = None, num_obs_total: int | None = None) -> None:
    """Logistic regression; ``num_obs_total`` is the training-set size N (public)."""
    d = X.shape[-1]
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", num_obs_total, subsample_size=X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ w + b), obs=y)


def load_data(name: str, seed: int) -> Data:
    """Load and split a data set (see the module docstring)."""
    rng = np.random.default_rng(seed)
    if name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        X, y = load_breast_cancer(return_X_y=True)
        true_weights = None
    else:
        n, d = 10_000, 10
        true_weights = rng.normal(size=d + 1)
        X = rng.normal(size=(n, d))
        p = 1.0 / (1.0 + np.exp(-(X @ true_weights[:d] + true_weights[d])))
        y = (rng.uniform(size=n) < p).astype(np.float64)
    perm = rng.permutation(len(y))
    n_train = int(0.8 * len(y))
    train, test = perm[:n_train], perm[n_train:]
    X_train, X_test = X[train], X[test]
    if name == "breast_cancer":
        mean, std = X_train.mean(axis=0), X_train.std(axis=0)
        X_train, X_test = (X_train - mean) / std, (X_test - mean) / std
    f32 = np.float32
    return Data(
        X_train.astype(f32),
        y[train].astype(f32),
        X_test.astype(f32),
        y[test].astype(f32),
        true_weights,
    )


class Options(NamedTuple):
    aligned: bool = False  # DPVIm's aligned gradients
    noise_aware: bool = False  # average the last half of the iterates, noise-aware posterior


PLAIN = Options()


def fit_dp(
    data: Data,
    settings: Settings,
    epsilon: float,
    delta: float,
    seed: int,
    progress_bar: bool,
    options: Options = PLAIN,
) -> tuple[Callable, float, float]:
    """Train with DPSVI at the target (epsilon, delta).

    Returns the posterior (``sample(rng_key, sample_shape) -> {"w": ..., "b": ...}``), the
    epsilon spent and the noise scale sigma.
    """
    guide = AutoDiagonalNormal(model)
    # Budget first: sigma (dp_scale) is calibrated with
    # d3p.dputil.approximate_sigma_remove_relation so that num_steps Poisson(q) steps spend
    # at most (epsilon, delta) under the add/remove relation, including the truncation of
    # (very rare) oversized batches; run() then follows exactly that plan.
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
        num_obs_total=len(data.y_train),
        aligned_gradients=options.aligned,
    )
    # The privacy-relevant randomness (minibatches, noise) comes from d3p's secure
    # generator; a fixed seed makes the run reproducible, and must then be kept secret.
    result = dpsvi.run(
        d3p.random.PRNGKey(seed),
        settings.num_steps,
        data.X_train,
        data.y_train,
        progress_bar=progress_bar,
        average=0.5 if options.noise_aware else None,
    )
    if options.noise_aware:
        # the averaged guide, widened by the spread of the averaged iterates: post-processing
        sample = NoiseAwarePosterior.from_run(dpsvi, result).sample
    else:
        sample = guide_sampler(guide, result.params)
    return sample, float(result.epsilon), dpsvi.dp_scale


def guide_sampler(guide: AutoDiagonalNormal, params: dict) -> Callable:
    """The guide's posterior at ``params`` as ``sample(rng_key, sample_shape)``."""
    return lambda key, shape: guide.sample_posterior(key, params, sample_shape=shape)


def fit_nonprivate(data: Data, settings: Settings, seed: int) -> Callable:
    """Train the non-private baseline with SVI on random minibatches of the expected size."""
    n = len(data.y_train)
    batch_size = max(1, round(settings.q * n))
    guide = AutoDiagonalNormal(model)
    svi = SVI(model, guide, Adam(settings.learning_rate), Trace_ELBO(), num_obs_total=n)
    X, y = jnp.asarray(data.X_train), jnp.asarray(data.y_train)
    init_key, loop_key = jax.random.split(jax.random.key(seed))
    state = svi.init(init_key, X[:batch_size], y[:batch_size])

    def step(state, key):
        idx = jax.random.choice(key, n, (batch_size,), replace=False)
        state, loss = svi.update(state, X[idx], y[idx])
        return state, loss

    state, _ = jax.lax.scan(step, state, jax.random.split(loop_key, settings.num_steps))
    return guide_sampler(guide, svi.get_params(state))


def evaluate(sample: Callable, data: Data, seed: int, num_samples: int = 1000) -> dict:
    """Test accuracy and mean log posterior-predictive probability of the test labels.

    On synthetic data also the distance of the posterior mean from the true weights and
    the fraction of them inside the central 90 % credible intervals.
    """
    samples = sample(jax.random.key(seed), (num_samples,))
    logits = samples["w"] @ data.X_test.T + samples["b"][:, None]  # (samples, test records)
    # log p(y | x) = log mean_s p(y | x, w_s), computed stably in log space
    y = data.y_test
    log_lik = y * jax.nn.log_sigmoid(logits) + (1 - y) * jax.nn.log_sigmoid(-logits)
    log_pred = jax.nn.logsumexp(log_lik, axis=0) - np.log(num_samples)
    prob_one = jnp.mean(jax.nn.sigmoid(logits), axis=0)
    result = {
        "accuracy": float(jnp.mean((prob_one > 0.5) == (y > 0.5))),
        "log_likelihood": float(jnp.mean(log_pred)),
    }
    if data.true_weights is not None:
        draws = jnp.concatenate([samples["w"], samples["b"][:, None]], axis=1)
        result["weight_error"] = float(jnp.linalg.norm(draws.mean(0) - data.true_weights))
        lo, hi = jnp.quantile(draws, jnp.array([0.05, 0.95]), axis=0)
        inside = (lo <= data.true_weights) & (data.true_weights <= hi)
        result["coverage90"] = float(jnp.mean(inside))
    return result


def plot(
    path: str,
    rows: list[dict],
    baseline: dict,
    delta: float,
    title: str,
    label_dp: str = "DP-VI (d3p DPSVI)",
) -> None:
    """Test accuracy and log-likelihood against epsilon, DP against non-private."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = [r["epsilon_target"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, label in (
        (axes[0], "accuracy", "test accuracy"),
        (axes[1], "log_likelihood", "test log-likelihood per record (nats)"),
    ):
        ax.plot(eps, [r[key] for r in rows], "o-", label=label_dp)
        ax.axhline(baseline[key], color="k", linestyle="--", label="non-private SVI")
        ax.set_xscale("log")
        ax.set_xlabel(rf"privacy budget $\varepsilon$ (add/remove relation, $\delta$ = {delta:g})")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--epsilon", type=float, default=1.0, help="target epsilon (default 1)")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta (default 1e-5)")
    parser.add_argument(
        "--dataset",
        choices=("breast_cancer", "synthetic"),
        default="breast_cancer",
        help="data set (default: scikit-learn's bundled breast-cancer data)",
    )
    parser.add_argument(
        "--aligned", action="store_true", help="DPVIm's aligned gradients for the guide's scales"
    )
    parser.add_argument(
        "--noise-aware",
        action="store_true",
        help="average the last half of the iterates and sample the noise-aware posterior",
    )
    parser.add_argument("--smoke", action="store_true", help="a few-second run for CI")
    parser.add_argument("--plot", metavar="PATH", help="also sweep epsilon and save a PNG plot")
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
    data = load_data(args.dataset, args.seed)
    n = len(data.y_train)
    print(
        f"data: {args.dataset}, {n} training / {len(data.y_test)} test records, "
        f"{data.X_train.shape[1]} features; {settings.num_steps} steps, q = {settings.q} "
        f"(expected batch {settings.q * n:.0f}), C = {settings.clipping_threshold}"
    )

    options = Options(aligned=args.aligned, noise_aware=args.noise_aware)
    start = time.perf_counter()
    sample, eps_spent, sigma = fit_dp(
        data, settings, args.epsilon, args.delta, args.seed, not args.smoke, options
    )
    dp = evaluate(sample, data, args.seed)
    baseline = evaluate(fit_nonprivate(data, settings, args.seed), data, args.seed)
    print(f"privacy spent: epsilon = {eps_spent:.3f} at delta = {args.delta:g} (add/remove)")
    if data.true_weights is None:
        print("  (training only: standardising features by their own mean/std is not covered)")
    print(f"noise scale sigma = {sigma:.3f}")
    print(f"{'':30s}{'test accuracy':>15s}{'test log-lik':>15s}")
    method = "+".join(
        name for name, on in (("aligned", args.aligned), ("noise-aware", args.noise_aware)) if on
    )
    dp_name = f"DP-VI ({method or 'plain'})"
    for name, res in ((dp_name, dp), ("non-private SVI", baseline)):
        print(f"{name:30s}{res['accuracy']:15.3f}{res['log_likelihood']:15.3f}")
    if data.true_weights is not None:
        print(
            "distance of the posterior mean weights from the true ones: "
            f"DP-VI {dp['weight_error']:.3f}, non-private {baseline['weight_error']:.3f}"
        )
        print(
            "true weights inside the 90 % credible intervals: "
            f"DP-VI {dp['coverage90']:.0%}, non-private {baseline['coverage90']:.0%}"
        )
    result = {
        "dataset": args.dataset,
        "aligned": args.aligned,
        "noise_aware": args.noise_aware,
        "epsilon_target": args.epsilon,
        "epsilon_spent": eps_spent,
        "delta": args.delta,
        "sigma": sigma,
        "dp": dp,
        "nonprivate": baseline,
    }

    if args.plot:
        rows = [{"epsilon_target": args.epsilon, "epsilon_spent": eps_spent, **dp}]
        for eps in SMOKE_PLOT_EPSILONS if args.smoke else PLOT_EPSILONS:
            if eps == args.epsilon:
                continue
            sample, spent, _ = fit_dp(data, settings, eps, args.delta, args.seed, False, options)
            scores = evaluate(sample, data, args.seed)
            rows.append({"epsilon_target": eps, "epsilon_spent": spent, **scores})
            print(f"epsilon {eps:g}: accuracy {scores['accuracy']:.3f}")
        rows.sort(key=lambda r: r["epsilon_target"])
        plot(
            args.plot,
            rows,
            baseline,
            args.delta,
            f"Bayesian logistic regression ({args.dataset}, N = {n})",
            label_dp=f"{dp_name} (d3p DPSVI)",
        )
        print(f"wrote {args.plot}")
        result["sweep"] = rows
    result["seconds"] = time.perf_counter() - start
    print(f"done in {result['seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main()
