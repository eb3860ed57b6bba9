# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Tests of d3p.modelling."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.handlers import seed, trace
from numpyro.infer.util import log_density

from d3p import modelling
from d3p.gmm import GaussianMixture

GMM = GaussianMixture(jnp.array([[-3.0], [3.0]]), jnp.ones((2, 1)), jnp.array([0.4, 0.6]))


def model(N):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.param("unused_param", 1.0)
    numpyro.deterministic("twice_mu", 2 * mu)
    numpyro.sample("x", dist.Normal(mu, 1.0).expand([N]).to_event(1))
    numpyro.sample("c", GMM)


def guide(N):
    loc = numpyro.param("loc", 0.0)
    scale = numpyro.param("scale", 1.0, constraint=dist.constraints.positive)
    numpyro.sample("mu", dist.Normal(loc, scale))


PARAMS = {"loc": jnp.array(5.0), "scale": jnp.array(0.1)}


def test_get_samples_from_trace():
    tr = trace(seed(model, jax.random.key(0))).get_trace(3)
    samples = modelling.get_samples_from_trace(tr)
    assert set(samples) == {"mu", "x", "c"}
    np.testing.assert_array_equal(samples["x"], tr["x"]["value"])
    with_int = modelling.get_samples_from_trace(tr, with_intermediates=True)
    value, (z,) = with_int["c"]
    np.testing.assert_array_equal(value, samples["c"])
    assert z.shape == () and int(z) in (0, 1)
    assert with_int["mu"][1] == []


@pytest.mark.parametrize("jit", [False, True])
def test_sample_prior_predictive(jit):
    def draw(key, substitutes=None, with_intermediates=False):
        return modelling.sample_prior_predictive(
            key, model, (4,), substitutes=substitutes, with_intermediates=with_intermediates
        )

    f = jax.jit(draw, static_argnums=2) if jit else draw
    s = f(jax.random.key(1))
    assert s["x"].shape == (4,) and s["mu"].shape == () and s["c"].shape == (1,)
    # substituted sites take the given value and the rest is sampled given it
    fixed = f(jax.random.key(1), {"mu": jnp.array(100.0)})
    assert float(fixed["mu"]) == 100.0
    assert np.all(np.abs(np.asarray(fixed["x"]) - 100.0) < 6.0)
    with_int = f(jax.random.key(1), None, True)
    np.testing.assert_allclose(with_int["c"][0], s["c"])
    (z,) = with_int["c"][1]
    assert z.shape == () and int(z) in (0, 1)
    assert with_int["mu"] == (s["mu"], [])


def test_intermediates_identify_components():
    s = modelling.sample_multi_prior_predictive(
        jax.random.key(2), 400, model, (1,), with_intermediates=True
    )
    c, (z,) = s["c"]
    assert c.shape == (400, 1) and z.shape == (400,)
    # component j has mean 6 j - 3 and sd 1: every draw lies within 6 sd of its component
    np.testing.assert_array_less(np.abs(np.asarray(c[:, 0]) - (6.0 * np.asarray(z) - 3.0)), 6.0)


@pytest.mark.parametrize("jit", [False, True])
def test_sample_posterior_predictive(jit):
    def draw(key):
        return modelling.sample_posterior_predictive(key, model, (3,), guide, (3,), PARAMS)

    f = jax.jit(draw) if jit else draw
    s = f(jax.random.key(3))
    assert set(s) == {"mu", "x", "c"}
    # mu ~ Normal(5, 0.1) from the guide's params, x ~ Normal(mu, 1) given that mu
    assert abs(float(s["mu"]) - 5.0) < 0.6
    assert s["x"].shape == (3,)
    with_int = modelling.sample_posterior_predictive(
        jax.random.key(3), model, (3,), guide, (3,), PARAMS, with_intermediates=True
    )
    np.testing.assert_allclose(with_int["mu"][0], draw(jax.random.key(3))["mu"])
    assert len(with_int["c"][1]) == 1


def test_multi_posterior_statistics_and_chunking():
    n = 2000
    s = modelling.sample_multi_posterior_predictive(
        jax.random.key(4), n, simple_model, (3,), guide, (3,), PARAMS, chunk_size=300
    )
    assert s["mu"].shape == (n,) and s["x"].shape == (n, 3)
    mu, x = np.asarray(s["mu"], np.float64), np.asarray(s["x"], np.float64)
    # mean of n Normal(5, 0.1) draws: 5 standard errors 0.1 / sqrt(n)
    assert abs(mu.mean() - 5.0) < 5 * 0.1 / np.sqrt(n)
    # x - mu ~ Normal(0, 1), 3n values: 5 standard errors 1 / sqrt(3 n)
    assert abs((x - mu[:, None]).mean()) < 5 / np.sqrt(3 * n)
    # sd of the mu draws: 5 standard errors of a normal sample sd, 0.1 / sqrt(2 n)
    assert abs(mu.std() - 0.1) < 5 * 0.1 / np.sqrt(2 * n)


def simple_model(N):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("x", dist.Normal(mu, 1.0).expand([N]).to_event(1))


def test_multi_prior_chunking_does_not_change_draws():
    def draw(key, chunk_size):
        return modelling.sample_multi_prior_predictive(
            key, 23, simple_model, (2,), chunk_size=chunk_size
        )

    key = jax.random.key(5)
    a, b = draw(key, 7), jax.jit(draw, static_argnums=1)(key, 1024)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert a["x"].shape == (23, 2)
    # independent draws, not one draw repeated
    assert len(np.unique(np.asarray(a["mu"]))) == 23


def test_multi_bad_n():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="n must be"):
        modelling.sample_multi_prior_predictive(key, 0, model, (2,))
    with pytest.raises(TypeError, match="n must be"):
        modelling.sample_multi_prior_predictive(key, 2.5, model, (2,))
    with pytest.raises(ValueError, match="chunk_size"):
        modelling.sample_multi_posterior_predictive(
            key, 3, model, (2,), guide, (2,), PARAMS, chunk_size=0
        )


def data_model(shape, scale=1.0):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    numpyro.sample("obs", dist.Normal(mu, scale).expand(shape).to_event(2))


def test_make_observed_model_and_map_args_obs_to_shape():
    obs = jnp.array([[0.5, 1.0, -1.0], [2.0, 0.0, 1.0]])
    args, kwargs, observations = modelling.map_args_obs_to_shape(obs, 7, scale=2.0)
    assert args == ((2, 3), 7) and kwargs == {"scale": 2.0}
    assert observations["obs"] is obs

    observed = modelling.make_observed_model(data_model, modelling.map_args_obs_to_shape)
    tr = trace(seed(observed, jax.random.key(0))).get_trace(obs, scale=2.0)
    assert tr["obs"]["is_observed"] and not tr["mu"]["is_observed"]
    np.testing.assert_array_equal(tr["obs"]["value"], obs)

    # the log joint is prior(mu) + sum of the Normal(mu, 2) log-likelihoods
    def joint(o):
        return log_density(observed, (o,), {"scale": 2.0}, {"mu": jnp.array(0.3)})[0]

    expected = jax.scipy.stats.norm.logpdf(0.3, 0.0, 10.0) + jnp.sum(
        jax.scipy.stats.norm.logpdf(obs, 0.3, 2.0)
    )
    np.testing.assert_allclose(joint(obs), expected, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(joint)(obs), expected, rtol=1e-6)
    # per-example evaluation as in DPSVI: under vmap a row regains its (1, d) shape
    per_row = jax.vmap(joint)(obs)
    prior = jax.scipy.stats.norm.logpdf(0.3, 0.0, 10.0)
    np.testing.assert_allclose(
        per_row - prior, jnp.sum(jax.scipy.stats.norm.logpdf(obs, 0.3, 2.0), axis=1), rtol=1e-5
    )
