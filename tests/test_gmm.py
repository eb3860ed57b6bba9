# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Tests of d3p.gmm.GaussianMixture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.distributions import constraints

from d3p.gmm import GaussianMixture

LOCS = np.array([[-4.0, 0.0], [0.0, 3.0], [5.0, -2.0]])
SCALES = np.array([[1.0, 0.5], [0.3, 2.0], [1.5, 1.0]])
PIS = np.array([0.2, 0.5, 0.3])


def _gmm(**kwargs):
    return GaussianMixture(jnp.asarray(LOCS), jnp.asarray(SCALES), jnp.asarray(PIS), **kwargs)


def _reference_log_prob(x):
    """Direct float64 evaluation of log sum_j pi_j prod_i N(x_i | loc_ji, scale_ji)."""
    x = np.asarray(x, np.float64)[..., None, :]
    dens = np.exp(-0.5 * ((x - LOCS) / SCALES) ** 2) / (np.sqrt(2 * np.pi) * SCALES)
    return np.log(np.sum(PIS * np.prod(dens, axis=-1), axis=-1))


def test_basic_properties():
    g = _gmm()
    assert g.num_components == 3
    assert g.event_shape == (2,) and g.batch_shape == ()
    assert g.support is constraints.real_vector
    # mean = sum_j pi_j loc_j = (0.2*-4 + 0.3*5, 0.5*3 + 0.3*-2) = (0.7, 0.9)
    np.testing.assert_allclose(g.mean, [0.7, 0.9], rtol=1e-6)
    # law of total variance, dimension 0:
    #   E[Var] = 0.2*1 + 0.5*0.09 + 0.3*2.25 = 0.92
    #   Var[E] = 0.2*16 + 0.3*25 - 0.7**2 = 10.21        -> 11.13
    # dimension 1: E[Var] = 0.2*0.25 + 0.5*4 + 0.3*1 = 2.35
    #   Var[E] = 0.5*9 + 0.3*4 - 0.9**2 = 4.89            -> 7.24
    np.testing.assert_allclose(g.variance, [11.13, 7.24], rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_log_prob_matches_reference_and_is_stable(jit):
    g = _gmm()
    log_prob = jax.jit(lambda d, x: d.log_prob(x)) if jit else (lambda d, x: d.log_prob(x))
    x = np.array([[0.0, 0.0], [-4.0, 0.5], [5.0, -1.0], [1.0, 2.0]])
    np.testing.assert_allclose(log_prob(g, jnp.asarray(x)), _reference_log_prob(x), rtol=1e-5)
    batched = np.stack([x, x + 1.0])  # shape (2, 4, 2) -> (2, 4)
    out = log_prob(g, jnp.asarray(batched))
    assert out.shape == (2, 4)
    np.testing.assert_allclose(out, _reference_log_prob(batched), rtol=1e-5)
    # far from all components every density underflows to 0 in float32 (a naive
    # log(sum(exp)) gives -inf); log-sum-exp keeps the dominant component's value
    far = jnp.array([200.0, 200.0])
    lp = log_prob(g, far)
    assert np.isfinite(lp)
    comp = np.log(PIS) + np.sum(
        -0.5 * ((200.0 - LOCS) / SCALES) ** 2 - np.log(np.sqrt(2 * np.pi) * SCALES), axis=-1
    )
    np.testing.assert_allclose(lp, np.max(comp) + np.log(np.sum(np.exp(comp - comp.max()))), 1e-5)


def test_single_component_is_a_diagonal_normal():
    g = GaussianMixture(jnp.array([[1.0, -1.0]]), jnp.array([[2.0, 0.5]]), jnp.array([1.0]))
    x = jnp.array([0.3, 0.2])
    expected = jax.scipy.stats.norm.logpdf(x, jnp.array([1.0, -1.0]), jnp.array([2.0, 0.5])).sum()
    np.testing.assert_allclose(g.log_prob(x), expected, rtol=1e-6)


def test_sample_shapes():
    g = _gmm()
    for shape in [(), (5,), (2, 3)]:
        x, (z,) = g.sample_with_intermediates(jax.random.key(0), shape)
        assert x.shape == shape + (2,)
        assert z.shape == shape and jnp.issubdtype(z.dtype, jnp.integer)
        assert g.sample(jax.random.key(1), shape).shape == shape + (2,)
    # under jit, with the distribution itself passed as a pytree argument
    x_jit = jax.jit(lambda d, k: d.sample(k, (2, 3)))(g, jax.random.key(1))
    np.testing.assert_allclose(x_jit, g.sample(jax.random.key(1), (2, 3)), rtol=1e-6)


def test_sample_statistics():
    n = 40_000
    g = _gmm()
    x, (z,) = jax.jit(g.sample_with_intermediates, static_argnums=1)(jax.random.key(42), (n,))
    x, z = np.asarray(x, np.float64), np.asarray(z)
    counts = np.bincount(z, minlength=3)
    # component frequencies: within 5 sigma of Binomial(n, pi_j) / n
    np.testing.assert_array_less(np.abs(counts / n - PIS), 5 * np.sqrt(PIS * (1 - PIS) / n))
    for j in range(3):
        xj = x[z == j]
        # per-component mean: 5 standard errors scale_j / sqrt(n_j)
        np.testing.assert_array_less(np.abs(xj.mean(0) - LOCS[j]), 5 * SCALES[j] / np.sqrt(len(xj)))
    # overall mean: 5 standard errors sqrt(variance / n)
    np.testing.assert_array_less(np.abs(x.mean(0) - g.mean), 5 * np.sqrt(g.variance / n))
    # log_prob on the drawn samples agrees with an independent float64 evaluation
    np.testing.assert_allclose(
        np.mean(g.log_prob(jnp.asarray(x[:1000]))), np.mean(_reference_log_prob(x[:1000])), 1e-5
    )


def test_zero_weight_component_is_never_drawn():
    g = GaussianMixture(jnp.asarray(LOCS), jnp.asarray(SCALES), jnp.array([0.5, 0.0, 0.5]))
    _, (z,) = g.sample_with_intermediates(jax.random.key(0), (2000,))
    assert not np.any(np.asarray(z) == 1)
    assert np.isfinite(g.log_prob(jnp.array([0.0, 3.0])))


def test_validation_errors():
    with pytest.raises(ValueError, match="mixture_probabilities"):
        GaussianMixture(LOCS, SCALES, np.array([0.5, 0.6, 0.3]), validate_args=True)
    with pytest.raises(ValueError, match="mixture_probabilities"):
        GaussianMixture(LOCS, SCALES, np.array([1.2, -0.5, 0.3]), validate_args=True)
    with pytest.raises(ValueError, match="scales"):
        GaussianMixture(LOCS, -SCALES, PIS, validate_args=True)
    # shapes are checked regardless of validate_args
    with pytest.raises(ValueError, match="locs"):
        GaussianMixture(LOCS[0], SCALES[0], PIS)
    with pytest.raises(ValueError, match="scales"):
        GaussianMixture(LOCS, SCALES[:, :1], PIS)
    with pytest.raises(ValueError, match="mixture_probabilities"):
        GaussianMixture(LOCS, SCALES, PIS[:2])
    # valid parameters pass validation
    assert _gmm(validate_args=True).num_components == 3
