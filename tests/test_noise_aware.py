# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Tests of d3p.noise_aware: the sampler's shapes and moments, its refusals, and the
coverage of its credible intervals on Bayesian linear regression (exact posterior known)."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from scipy import stats

from d3p import averaging
from d3p.averaging import Window
from d3p.noise_aware import NoiseAwarePosterior
from d3p.svi import DPSVI

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import d3p.random.debug as debug

N, D = 1000, 3


def model(X, y=None, num_obs_total=N):
    """Bayesian linear regression: w ~ N(0, I), y ~ N(X w, 1) (known noise variance)."""
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
    with numpyro.plate("data", num_obs_total, subsample_size=X.shape[0]):
        numpyro.sample("y", dist.Normal(X @ w, 1.0), obs=y)


def hand_guide(X=None, y=None, num_obs_total=N):
    loc = numpyro.param("loc", jnp.zeros(D))
    scale = numpyro.param("scale", jnp.full(D, 0.5), constraint=dist.constraints.positive)
    numpyro.sample("w", dist.Normal(loc, scale).to_event(1))


def initialised(guide):
    """The guide's unconstrained parameters and constrain_fn (no training, no data)."""
    svi = SVI(model, guide, optax.sgd(0.1), Trace_ELBO())
    state = svi.init(jax.random.key(0), jnp.zeros((2, D)), jnp.zeros(2))
    return svi.optim.get_params(state.optim_state), svi.constrain_fn


def window_stats(params, offsets, block_size):
    """Statistics of iterates ``params + offsets[t]`` (every leaf shifted by offsets[t])."""
    stats = averaging.init(params, block_size)
    for offset in offsets:
        stats = averaging.update(stats, jax.tree.map(lambda p, o=offset: p + o, params))
    return stats


@pytest.mark.parametrize(
    "guide_class",
    # AutoNormal's sampler, per site, takes 18-70 s: in the slow run
    [pytest.param(AutoNormal, marks=pytest.mark.slow), AutoDiagonalNormal, None],
)
def test_sampler_shapes_and_moments(guide_class):
    guide = hand_guide if guide_class is None else guide_class(model, init_scale=0.5)
    params, constrain_fn = initialised(guide)
    # 40 iterates in 20 blocks of 2: block means alternate +-0.1, so the batch-means
    # variance of the mean is 0.1**2 * 20/19 / 20 = 1/1900 for every coordinate
    offsets = np.repeat(np.tile([0.1, -0.1], 10), 2)
    stats = window_stats(params, offsets, block_size=2)
    posterior = NoiseAwarePosterior(guide, stats, constrain_fn)
    assert posterior.df == 19.0
    n = 10000
    samples = posterior.sample(jax.random.key(1), (n,))
    assert set(samples) == {"w"} and samples["w"].shape == (n, D)
    assert posterior.sample(jax.random.key(2))["w"].shape == (D,)
    assert posterior.sample(jax.random.key(2), (2, 3))["w"].shape == (2, 3, D)
    # the guide's location, its scale about 0.5 (its unconstrained value also gets the noise),
    # noise variance 1/1900 * df/(df - 2) (Student-t): the mean is 0 within 5 standard
    # errors sqrt(var / n) (seeded: deterministic); the variance within 5 of its standard
    # errors, var * sqrt(2 / n) for a nearly normal sample, widened by 1.5 for the t tails
    w = np.asarray(samples["w"])
    loc_name, scale_name = ("loc", "scale") if guide_class is None else _names(guide)
    loc, scale = np.asarray(posterior.params[loc_name]), np.asarray(posterior.params[scale_name])
    var = scale**2 + 1 / 1900 * 19 / 17
    np.testing.assert_array_less(np.abs(w.mean(0) - loc), 5 * np.sqrt(var / n))
    np.testing.assert_array_less(np.abs(w.var(0) - var), 1.5 * 5 * var * np.sqrt(2 / n))
    # into Predictive: one prediction per posterior sample
    predictions = Predictive(model, posterior_samples=samples)(jax.random.key(3), jnp.ones((4, D)))
    assert predictions["y"].shape == (n, 4)


def _names(guide):
    prefix = "w_auto_" if isinstance(guide, AutoNormal) else "auto_"
    return prefix + "loc", prefix + "scale"


def test_centre_last_uses_the_last_iterate_and_the_trace_variance():
    params, constrain_fn = initialised(AutoDiagonalNormal(model))
    offsets = np.array([0.3, -0.3, 0.3, -0.3, 0.1])
    stats = window_stats(params, offsets, block_size=1)
    posterior = NoiseAwarePosterior(AutoDiagonalNormal(model), stats, constrain_fn, centre="last")
    np.testing.assert_allclose(posterior.loc["auto_loc"], params["auto_loc"] + 0.1, rtol=1e-6)
    np.testing.assert_allclose(posterior.scale["auto_loc"], np.std(offsets, ddof=1), rtol=1e-5)
    assert posterior.df == 4.0


def test_refusals():
    guide = AutoDiagonalNormal(model)
    params, constrain_fn = initialised(guide)
    with pytest.raises(ValueError, match="at least 2 complete blocks"):
        NoiseAwarePosterior(guide, window_stats(params, [0.0, 1.0], 2), constrain_fn)
    stats = window_stats(params, [0.0, 1.0, 0.0], 1)
    with pytest.raises(TypeError, match="exponential moving average keeps no spread"):
        NoiseAwarePosterior(guide, averaging.ema_init(params, 0.9), constrain_fn)
    with pytest.raises(ValueError, match="centre must be one of 'mean', 'last'"):
        NoiseAwarePosterior(guide, stats, constrain_fn, centre="median")
    with pytest.raises(TypeError, match="constrain_fn must be callable"):
        NoiseAwarePosterior(guide, stats, None)
    with pytest.raises(TypeError, match="guide must be"):
        NoiseAwarePosterior(None, stats, constrain_fn)
    dpsvi = DPSVI(model, guide, optax.sgd(0.1), Trace_ELBO(), 1.0, 1.0, rng_suite=debug)
    no_average = type("Result", (), {"iterates": None})()
    with pytest.raises(ValueError, match="run with average=fraction"):
        NoiseAwarePosterior.from_run(dpsvi, no_average)


# ---------------------------------------------------------------- coverage


@pytest.mark.slow  # 50 private runs of 1000 steps: about 2 minutes on 2 shared cores
def test_noise_aware_intervals_cover_the_true_parameters():
    """Bayesian linear regression, w ~ N(0, I) drawn per seed, N = 1000, d = 3, noise
    variance 1 known; DP-VI at epsilon about 2.2 (sigma 3, q 0.05, 1000 steps, delta 1e-5).

    The guide is AutoNormal with its scale held (zero learning rate) at the exact
    posterior's, about 1 / sqrt(N + 1) for unit-variance features (no data read): the
    test measures the DP noise in the locations alone. Trained by vanilla DP-SGD the
    scale's gradient is tiny next to the noise and it random-walks (what DPVIm's aligned
    gradients address). Plain SGD for the locations: Adam's second moment, inflated by
    the large early gradients, keeps the window from being past convergence.
    """
    scale = 1 / math.sqrt(N + 1)
    guide = AutoNormal(model, init_scale=scale)
    optim = optax.multi_transform(
        {"train": optax.sgd(1e-4), "hold": optax.set_to_zero()},
        lambda p: {k: "hold" if k.endswith("_scale") else "train" for k in p},
    )
    dpsvi = DPSVI(model, guide, optim, Trace_ELBO(), 3.0, 3.0, rng_suite=debug)
    seeds, z = 50, stats.norm.ppf(0.95)
    covered = {"plain": [], "averaged": [], "mean": [], "last": []}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        w = rng.normal(size=D)
        X = rng.normal(size=(N, D))
        y = X @ w + rng.normal(size=N)
        result = dpsvi.run(
            debug.PRNGKey(seed),
            1000,
            jnp.asarray(X, jnp.float32),
            jnp.asarray(y, jnp.float32),
            q=0.05,
            delta=1e-5,
            progress_bar=False,
            average=Window(0.5, num_blocks=5),
        )
        # plain DP-VI: the guide's 90 % interval at the last iterate, and at the average
        for name, params in (
            ("plain", dpsvi.get_params(result.state)),
            ("averaged", result.params),
        ):
            loc, sd = np.asarray(params["w_auto_loc"]), np.asarray(params["w_auto_scale"])
            covered[name].append(np.abs(w - loc) < z * sd)
        for centre in ("mean", "last"):
            posterior = NoiseAwarePosterior.from_run(dpsvi, result, centre=centre)
            draws = np.asarray(posterior.sample(jax.random.key(seed), (2000,))["w"])
            low, high = np.quantile(draws, [0.05, 0.95], axis=0)
            covered[centre].append((low < w) & (w < high))
    rate = {name: float(np.mean(c)) for name, c in covered.items()}
    # 150 (seed, coordinate) pairs. The coordinates of one seed share its data set and
    # run, but the design is nearly orthogonal (posterior correlations ~ 1/sqrt(N)) and
    # the DP noise and its estimate are independent per coordinate, so the pairs are
    # treated as independent Bernoulli(0.9) draws: standard deviation
    # sqrt(0.9 * 0.1 / 150) = 0.0245, and the tolerance is 3 of them (0.073).
    tolerance = 3 * math.sqrt(0.9 * 0.1 / (seeds * D))
    assert abs(rate["mean"] - 0.9) < tolerance, rate
    assert abs(rate["last"] - 0.9) < tolerance, rate
    # plain DP-VI's intervals under-cover (the guide's variance ignores the DP noise)
    assert rate["plain"] < 0.9 - tolerance, rate
    assert rate["averaged"] < rate["mean"], rate
