# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Benchmark of posterior quality: DP-VI's posteriors against the non-private ones (issue 27).

Problems with a known answer, each drawn afresh for every seed: the true weights
``w ~ N(0, I_d)`` (the prior), features ``x ~ N(0, (c^2 / d) I_d)`` with ``c = 2`` (so the
linear predictor has standard deviation about ``c`` whatever ``d``, and every record's
gradient about the same norm), ``N`` training and 2000 test records.

* Bayesian logistic regression, ``y ~ Bernoulli(sigmoid(x . w))``, d = 10 and 100,
  N = 10^4 and 10^5. Reference: the optimum of the same model and guide (mean-field
  Gaussian, ``AutoDiagonalNormal``) without DP, "plain SVI to convergence" computed
  deterministically: the ELBO's expected log-likelihood is a one-dimensional Gaussian
  integral per record (``x . w`` is Gaussian under the guide), done by 20-point
  Gauss-Hermite quadrature, and maximised by L-BFGS in float64 (analytic gradients,
  Bonnet's and Price's theorems). ``tests/test_bench_quality.py`` checks it against
  numpyro's SVI.
* Bayesian linear regression, ``y ~ N(x . w, 1)``, d = 10, N = 10^4. Reference: the exact
  posterior ``N(Lambda^-1 X^T y, Lambda^-1)``, ``Lambda = I + X^T X`` (its marginals).

Private training: :class:`d3p.svi.DPSVI` with the same guide, ``Trace_ELBO``, ``Adam(1e-2)``
(the logistic-regression example's rate, not tuned here), clipping threshold ``C = 1``,
Poisson sampling at ``q = 0.01``, 2000 steps (20 epochs at N = 10^4, 2 at 10^5), at
epsilon 0.3, 1 and 3, delta = 1e-5 (add/remove relation). The noise multiplier is
calibrated once per epsilon (:meth:`d3p.plan.PrivacyBudget.calibrate`, so every variant
has the same steps, q and budget) and every run stays within it. The secure generator
(:mod:`d3p.random`) draws batches and noise from ``d3p.random.PRNGKey(seed)``: every
variant sees the same seeds.

Variants (:data:`RUNS`): one training run per seed gives several posteriors. A run with
``average=0.5`` yields the last iterate (``plain``: the state's parameters, identical to
a run without averaging, since averaging is post-processing), the mean of the last half
of the iterates (``averaged``) and :class:`d3p.noise_aware.NoiseAwarePosterior`
(``noise-aware``: the averaged guide widened by the spread of the iterates). The same with
``aligned_gradients=True`` gives ``aligned``, ``aligned+averaged`` and
``aligned+noise-aware``. Variants whose API is missing from this d3p are left out (the
plain run then runs without averaging).

Metrics (each posterior from 4000 draws of ``w``; the reference's analytically):

``mean err``
    relative error of the posterior mean, ``||mu - mu_ref|| / ||mu_ref||``, mean over seeds;
``std err``
    root-mean-square over coordinates of ``log(std / std_ref)`` (0.1: about 10 % off),
    mean over seeds; ``std bias``: the mean of ``log(std / std_ref)`` (negative:
    over-confident);
``cov50``, ``cov90``
    fraction of the true weights (all seeds x coordinates) inside the central 50 % and
    90 % credible intervals. The true weights are drawn from the prior, so the exact
    posterior's intervals cover at their nominal rate on average;
``test ll``
    mean log posterior-predictive density of the held-out records (nats per record).

Grid and cost: 5 problems x 3 epsilons x 2 compiled training programs (plain and aligned;
each ``DPSVI`` is compiled once, 10-25 s, and reused for every seed: only the data arrays,
the key and a fresh copy of the budget change), 2000 steps each (1-4 s per run). Seeds:
12 on logistic regression d = 10, N = 10^4 (the problem of issue 27's targets: 120
intervals per coverage, binomial standard error 2.7 points at 90 %), 8 on linear
regression (80), 4 on the larger problems (40, 400 and 400 intervals). Fewer seeds where
a run costs more: the grid has to fit about 15 minutes on 2 idle cores; measured 879 s
(852 s of CPU time) on the shared 2-core machine under a load of 3-4
(``benchmarks/reference/cpu-2core-quality-2026-12-04.json``; 1590 s under a load of 7-9,
same numbers). ``--quick``: logistic
regression d = 10, N = 10^4 only, at epsilon 1, 2 seeds, 500 steps (about a minute).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import inspect
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import scipy.optimize
import scipy.special
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal
from numpyro.optim import Adam

import d3p.random
from d3p.plan import PrivacyBudget
from d3p.svi import DPSVI

DELTA = 1e-5
EPSILONS = (0.3, 1.0, 3.0)
Q = 0.01
NUM_STEPS = 2000
CLIPPING_THRESHOLD = 2.0  # >= |x| |y - p| of (nearly) every logistic record: no clipping bias
LEARNING_RATE = 1e-2
AVERAGE = 0.5  # the fraction of the last steps averaged
FEATURE_SCALE = 2.0  # c: the linear predictor's standard deviation under the prior
NUM_TEST = 2000
NUM_DRAWS = 4000  # posterior draws per fitted posterior
NOISE_STD = 1.0  # linear regression's observation noise (known)
GAUSS_HERMITE_POINTS = 20
Z50, Z90 = 0.6744897501960817, 1.6448536269514722  # standard normal 75 % and 95 % quantiles


# ------------------------------------------------------------------ problems and data


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: str  # "logistic" or "linear"
    d: int
    n: int
    seeds: int

    @property
    def name(self) -> str:
        return f"{self.kind} regression d={self.d} N={self.n}"


@dataclasses.dataclass(frozen=True)
class Data:
    X: np.ndarray  # (n, d) float32
    y: np.ndarray  # (n,) float32
    X_test: np.ndarray
    y_test: np.ndarray
    w_true: np.ndarray  # (d,) float64


def make_data(problem: Problem, seed: int) -> Data:
    """The data of one seed: true weights from the prior, features scaled by c / sqrt(d)."""
    kind = ("logistic", "linear").index(problem.kind)
    rng = np.random.default_rng([kind, problem.d, problem.n, seed])
    w = rng.normal(size=problem.d)
    scale = FEATURE_SCALE / math.sqrt(problem.d)
    X = rng.normal(scale=scale, size=(problem.n + NUM_TEST, problem.d))
    eta = X @ w
    if problem.kind == "logistic":
        y = (rng.uniform(size=len(eta)) < scipy.special.expit(eta)).astype(np.float64)
    else:
        y = eta + NOISE_STD * rng.normal(size=len(eta))
    f32 = np.float32
    n = problem.n
    return Data(X[:n].astype(f32), y[:n].astype(f32), X[n:].astype(f32), y[n:].astype(f32), w)


def logistic_model(X, y=None, num_obs_total=None):
    """Bayesian logistic regression, standard normal prior on the weights."""
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
    with numpyro.plate("data", num_obs_total, subsample_size=X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)


def linear_model(X, y=None, num_obs_total=None):
    """Bayesian linear regression with known noise, standard normal prior on the weights."""
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
    with numpyro.plate("data", num_obs_total, subsample_size=X.shape[0]):
        numpyro.sample("y", dist.Normal(X @ w, NOISE_STD), obs=y)


MODELS = {"logistic": logistic_model, "linear": linear_model}


# ------------------------------------------------------------------ references


@dataclasses.dataclass(frozen=True)
class Gaussian:
    """A Gaussian posterior of ``w``: its mean and the Cholesky factor of its covariance."""

    mean: np.ndarray
    chol: np.ndarray

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.sum(self.chol**2, axis=1))

    def sample(self, seed: int, num: int) -> np.ndarray:
        z = np.random.default_rng(seed).normal(size=(num, len(self.mean)))
        return self.mean + z @ self.chol.T


def exact_linear_posterior(X: np.ndarray, y: np.ndarray) -> Gaussian:
    """The exact posterior of linear regression: precision ``I + X^T X / s^2``."""
    X, y = X.astype(np.float64), y.astype(np.float64)
    precision = np.eye(X.shape[1]) + X.T @ X / NOISE_STD**2
    cov = np.linalg.inv(precision)
    mean = cov @ (X.T @ y) / NOISE_STD**2
    return Gaussian(mean, np.linalg.cholesky(cov))


def mean_field_logistic(X: np.ndarray, y: np.ndarray) -> Gaussian:
    """The optimum of the mean-field Gaussian ELBO of logistic regression (no DP).

    Under ``q(w) = N(mu, diag(s^2))`` the linear predictor of record ``i`` is
    ``N(m_i, v_i)``, ``m = X mu``, ``v = X^2 s^2``; ``E log p(y_i | eta)`` is a 1-D Gaussian
    integral (Gauss-Hermite), with derivative ``E f'`` in ``m_i`` and ``E f'' / 2`` in
    ``v_i`` (Bonnet's and Price's theorems); the KL to the prior ``N(0, I)`` is closed-form.
    """
    X, y = X.astype(np.float64), y.astype(np.float64)
    X2 = X**2
    nodes, weights = np.polynomial.hermite.hermgauss(GAUSS_HERMITE_POINTS)
    weights = weights / math.sqrt(math.pi)
    d = X.shape[1]

    def negative_elbo(theta):
        mu, log_s = theta[:d], theta[d:]
        s2 = np.exp(2 * log_s)
        m, v = X @ mu, X2 @ s2
        eta = m[:, None] + np.sqrt(2 * v)[:, None] * nodes  # (n, points)
        # f(eta) = y eta - softplus(eta); f' = y - sigmoid(eta); f'' = -sigmoid(1 - sigmoid)
        sig = scipy.special.expit(eta)
        f = y[:, None] * eta - np.logaddexp(0.0, eta)
        expected_f = f @ weights
        d_m = (y[:, None] - sig) @ weights
        d_v = -0.5 * (sig * (1 - sig)) @ weights
        kl = 0.5 * np.sum(s2 + mu**2 - 1 - 2 * log_s)
        grad_mu = X.T @ d_m - mu
        grad_log_s = 2 * s2 * (X2.T @ d_v) - (s2 - 1)
        return kl - expected_f.sum(), -np.concatenate([grad_mu, grad_log_s])

    theta0 = np.concatenate([np.zeros(d), np.full(d, math.log(0.1))])
    res = scipy.optimize.minimize(
        negative_elbo, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 5000, "gtol": 1e-8}
    )
    return Gaussian(res.x[:d], np.diag(np.exp(res.x[d:])))


def reference(problem: Problem, data: Data) -> Gaussian:
    if problem.kind == "linear":
        return exact_linear_posterior(data.X, data.y)
    return mean_field_logistic(data.X, data.y)


# ------------------------------------------------------------------ metrics


def predictive_log_likelihood(kind: str, draws: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    """Mean over test records of ``log mean_s p(y | x, w_s)`` (posterior predictive)."""
    return float(_predictive_log_likelihood(kind, jnp.asarray(draws, jnp.float32), X, y))


@functools.partial(jax.jit, static_argnums=0)
def _predictive_log_likelihood(kind, draws, X, y):
    eta = draws @ X.T  # (draws, records)
    if kind == "logistic":
        log_lik = y * jax.nn.log_sigmoid(eta) + (1 - y) * jax.nn.log_sigmoid(-eta)
    else:
        log_lik = dist.Normal(eta, NOISE_STD).log_prob(y)
    log_pred = jax.nn.logsumexp(log_lik, axis=0) - math.log(draws.shape[0])
    return jnp.mean(log_pred)


def draw_summary(draws: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, standard deviation and central 50 % and 90 % intervals of draws ``(S, d)``."""
    lo90, lo50, hi50, hi90 = np.quantile(draws, [0.05, 0.25, 0.75, 0.95], axis=0)
    return {
        "mean": draws.mean(0),
        "std": draws.std(0),
        "lo50": lo50,
        "hi50": hi50,
        "lo90": lo90,
        "hi90": hi90,
    }


def gaussian_summary(posterior: Gaussian) -> dict[str, np.ndarray]:
    """The same summary, analytically, for a Gaussian (marginal intervals)."""
    mean, std = posterior.mean, posterior.std
    return {
        "mean": mean,
        "std": std,
        "lo50": mean - Z50 * std,
        "hi50": mean + Z50 * std,
        "lo90": mean - Z90 * std,
        "hi90": mean + Z90 * std,
    }


def seed_metrics(summary: dict, ref: dict, w_true: np.ndarray) -> dict[str, float]:
    """One seed's errors against the reference and interval hits of the true weights."""
    log_ratio = np.log(summary["std"]) - np.log(ref["std"])
    return {
        "mean_err": float(
            np.linalg.norm(summary["mean"] - ref["mean"]) / np.linalg.norm(ref["mean"])
        ),
        "std_err": float(np.sqrt(np.mean(log_ratio**2))),
        "std_bias": float(np.mean(log_ratio)),
        "hits50": int(np.sum((summary["lo50"] <= w_true) & (w_true <= summary["hi50"]))),
        "hits90": int(np.sum((summary["lo90"] <= w_true) & (w_true <= summary["hi90"]))),
        "num": int(len(w_true)),
    }


def aggregate(per_seed: list[dict]) -> dict[str, float]:
    """Means over seeds; coverage over all seeds x coordinates."""
    num = sum(m["num"] for m in per_seed)
    out = {
        key: float(np.mean([m[key] for m in per_seed]))
        for key in ("mean_err", "std_err", "std_bias")
    }
    out["cov50"] = sum(m["hits50"] for m in per_seed) / num
    out["cov90"] = sum(m["hits90"] for m in per_seed) / num
    out["test_ll"] = float(np.mean([m["test_ll"] for m in per_seed]))
    return out


# ------------------------------------------------------------------ private variants


def has_aligned() -> bool:
    return "aligned_gradients" in inspect.signature(DPSVI.__init__).parameters


def has_averaging() -> bool:
    return "average" in inspect.signature(DPSVI.run).parameters


def has_noise_aware() -> bool:
    return has_averaging() and importlib.util.find_spec("d3p.noise_aware") is not None


def last_iterate(dpsvi: DPSVI, result: Any) -> dict:
    return dpsvi.get_params(result.state)


def averaged(dpsvi: DPSVI, result: Any) -> dict:
    return result.params


def noise_aware(dpsvi: DPSVI, result: Any) -> Any:
    from d3p.noise_aware import NoiseAwarePosterior

    return NoiseAwarePosterior.from_run(dpsvi, result)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run per seed and the posteriors read from its result.

    ``posteriors``: name -> (available, fn(dpsvi, result)) where fn returns the guide's
    constrained parameters, or a sampler ``(jax key, shape) -> {"w": draws}``.
    """

    name: str
    available: Callable[[], bool]
    options: dict  # keyword options of DPSVI
    posteriors: dict[str, tuple[Callable[[], bool], Callable]]


RUNS = (
    Run(
        "plain",
        lambda: True,
        {},
        {
            "plain": (lambda: True, last_iterate),
            "averaged": (has_averaging, averaged),
            "noise-aware": (has_noise_aware, noise_aware),
        },
    ),
    Run(
        "aligned",
        has_aligned,
        {"aligned_gradients": True},
        {
            "aligned": (lambda: True, last_iterate),
            "aligned+averaged": (has_averaging, averaged),
            "aligned+noise-aware": (has_noise_aware, noise_aware),
        },
    ),
)


class Draws:
    """Jitted draws of ``w`` from a guide's parameters or a noise-aware posterior.

    Compiled once per guide (every seed's parameters have the same shapes): un-jitted,
    tracing the guide for every posterior costs more than the draws.
    """

    def __init__(self, guide: Any):
        self.guide = guide
        self._guide_draws = jax.jit(
            lambda key, params: guide.sample_posterior(key, params, sample_shape=(NUM_DRAWS,))
        )
        self._noise_aware_draws = None

    def __call__(self, posterior: Any, seed: int) -> np.ndarray:
        key = jax.random.key(seed)
        if isinstance(posterior, dict):  # the guide's constrained parameters
            samples = self._guide_draws(key, posterior)
        else:
            samples = self._noise_aware(posterior, key)
        return np.asarray(samples["w"], np.float64)

    def _noise_aware(self, posterior: Any, key: jax.Array) -> dict:
        # NoiseAwarePosterior.sample traced with its noise (loc, scale, df) as arguments
        fields = ("loc", "scale", "df")
        if not all(hasattr(posterior, f) for f in fields):
            return posterior.sample(key, (NUM_DRAWS,))
        if self._noise_aware_draws is None:
            template = copy.copy(posterior)

            def draws(key, loc, scale, df):
                p = copy.copy(template)
                p.loc, p.scale, p.df = loc, scale, df
                return p.sample(key, (NUM_DRAWS,))

            self._noise_aware_draws = jax.jit(draws)
        values = [getattr(posterior, f) for f in fields]
        return self._noise_aware_draws(key, *values)


# ------------------------------------------------------------------ the benchmark


@dataclasses.dataclass
class Settings:
    problems: tuple[Problem, ...]
    epsilons: tuple[float, ...]
    num_steps: int


FULL = Settings(
    problems=(
        Problem("logistic", 10, 10_000, seeds=12),
        Problem("logistic", 10, 100_000, seeds=4),
        Problem("logistic", 100, 10_000, seeds=4),
        Problem("logistic", 100, 100_000, seeds=4),
        Problem("linear", 10, 10_000, seeds=8),
    ),
    epsilons=EPSILONS,
    num_steps=NUM_STEPS,
)
QUICK = Settings(
    problems=(Problem("logistic", 10, 10_000, seeds=2),), epsilons=(1.0,), num_steps=500
)


def make_dpsvi(problem: Problem, budget: PrivacyBudget, options: dict) -> tuple[DPSVI, Any]:
    model = MODELS[problem.kind]
    guide = AutoDiagonalNormal(model)
    dpsvi = DPSVI(
        model,
        guide,
        Adam(LEARNING_RATE),
        Trace_ELBO(),
        plan=budget,
        num_obs_total=problem.n,
        **options,
    )
    return dpsvi, guide


def run_problem(problem: Problem, settings: Settings, budgets: dict) -> list[dict]:
    """The rows of one problem: its reference, then each (epsilon, posterior)."""
    datasets = [make_data(problem, seed) for seed in range(problem.seeds)]
    refs, ref_metrics = [], []
    for seed, data in enumerate(datasets):
        ref = reference(problem, data)
        refs.append(gaussian_summary(ref))
        metrics = seed_metrics(refs[-1], refs[-1], data.w_true)
        draws = ref.sample(seed, NUM_DRAWS)
        metrics["test_ll"] = predictive_log_likelihood(
            problem.kind, draws, data.X_test, data.y_test
        )
        ref_metrics.append(metrics)
    reference_name = "exact posterior" if problem.kind == "linear" else "non-private VI"
    rows = [
        {
            "epsilon": "-",
            "variant": reference_name,
            "sigma": 0.0,
            **{k: round(v, 4) for k, v in aggregate(ref_metrics).items()},
            "s first": "-",
            "s/run": "-",
        }
    ]
    for epsilon in settings.epsilons:
        budget = budgets[epsilon]
        for spec in RUNS:
            if not spec.available():
                continue
            posteriors = {k: read for k, (ok, read) in spec.posteriors.items() if ok()}
            averaging = any(read is not last_iterate for read in posteriors.values())
            dpsvi, guide = make_dpsvi(problem, budget, spec.options)
            draw = Draws(guide)
            metrics: dict[str, list] = {name: [] for name in posteriors}
            spent, seconds = [], []
            for seed, data in enumerate(datasets):
                # each seed is a data set of its own, with its own budget (a budget's ledger
                # counts all runs on its data); same plan, so the compiled program is reused
                dpsvi.budget = dataclasses.replace(budget)
                start = time.perf_counter()
                result = dpsvi.run(
                    d3p.random.PRNGKey(seed),
                    settings.num_steps,
                    data.X,
                    data.y,
                    progress_bar=False,
                    **({"average": AVERAGE} if averaging else {}),
                )
                jax.block_until_ready(result.params)
                seconds.append(time.perf_counter() - start)
                spent.append(float(result.epsilon))
                for name, read in posteriors.items():
                    draws = draw(read(dpsvi, result), seed)
                    m = seed_metrics(draw_summary(draws), refs[seed], data.w_true)
                    m["test_ll"] = predictive_log_likelihood(
                        problem.kind, draws, data.X_test, data.y_test
                    )
                    metrics[name].append(m)
            for name, per_seed in metrics.items():
                rows.append(
                    {
                        "epsilon": epsilon,
                        "variant": name,
                        "sigma": round(budget.noise_multiplier, 4),
                        **{k: round(v, 4) for k, v in aggregate(per_seed).items()},
                        # training only; the first run also compiles
                        "s first": round(seconds[0], 1),
                        "s/run": round(float(np.median(seconds[1:] or seconds)), 2),
                        "eps spent": round(max(spent), 4),
                    }
                )
    return rows


def run(quick: bool) -> dict[str, list[dict]]:
    """One titled table per problem; the settings in the titles."""
    settings = QUICK if quick else FULL
    budgets = {
        eps: PrivacyBudget.calibrate(eps, DELTA, Q, settings.num_steps, CLIPPING_THRESHOLD)
        for eps in settings.epsilons
    }
    tables = {}
    for problem in settings.problems:
        start = time.perf_counter()
        rows = run_problem(problem, settings, budgets)
        title = (
            f"{problem.name}, {problem.seeds} seeds, {settings.num_steps} steps, q = {Q}, "
            f"C = {CLIPPING_THRESHOLD}, delta = {DELTA:g} "
            f"({time.perf_counter() - start:.0f} s)"
        )
        tables[title] = rows
        print(f"quality: {title}", flush=True)
    return tables
