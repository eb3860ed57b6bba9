# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Tests of d3p.optimizers (ADADP)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO

import d3p.random
from d3p.optimizers import ADADP, ADADPState, adadp, optax_adadp


def _two_steps(triple, x0, g0, g1, jit=False):
    init, update, get_params = triple
    if jit:
        update = jax.jit(update)
    s0 = init(x0)
    s1 = update(jnp.array(0), g0, s0)
    s2 = update(jnp.array(1), g1, s1)
    return s0, s1, s2, get_params


@pytest.mark.parametrize("jit", [False, True])
def test_lr_adaptation_hand_computed(jit):
    # x0 = 1, lr = 0.1, g0 = 2, g1 = 4:
    #   even step: x_stepped = 1 - 0.1 * 2 = 0.8, x = 1 - 0.05 * 2 = 0.9, x_prev = 1
    #   odd step:  x_half = 0.9 - 0.05 * 4 = 0.7, err = |0.8 - 0.7| / max(1, 0.7) = 0.1
    x0, g0, g1 = jnp.array([1.0]), jnp.array([2.0]), jnp.array([4.0])

    # tol = 1: sqrt(1 / 0.1) = 3.16 is clipped to alpha_max = 1.1 -> lr 0.11; accepted
    s0, s1, s2, get_params = _two_steps(adadp(0.1, tol=1.0), x0, g0, g1, jit)
    np.testing.assert_allclose(s0.lr, 0.1, rtol=1e-6)
    np.testing.assert_allclose(s1.x, [0.9], rtol=1e-6)
    np.testing.assert_allclose(s1.x_stepped, [0.8], rtol=1e-6)
    np.testing.assert_allclose(s1.x_prev, [1.0])
    np.testing.assert_allclose(s1.lr, 0.1, rtol=1e-6)
    np.testing.assert_allclose(s2.lr, 0.11, rtol=1e-6)
    np.testing.assert_allclose(get_params(s2), [0.7], rtol=1e-6)

    # tol = 0.01, wide alpha bounds: factor sqrt(0.01 / 0.1) = 0.316228 -> lr 0.0316228;
    # err 0.1 > tol so the pair is rejected and x returns to x0
    _, _, s2, get_params = _two_steps(
        adadp(0.1, tol=0.01, alpha_min=0.1, alpha_max=10.0), x0, g0, g1, jit
    )
    np.testing.assert_allclose(s2.lr, 0.0316228, rtol=1e-5)
    np.testing.assert_allclose(get_params(s2), [1.0])

    # same without the stability check: lr alike, but the step is kept
    _, _, s2, get_params = _two_steps(
        adadp(0.1, tol=0.01, stability_check=False, alpha_min=0.1, alpha_max=10.0),
        x0,
        g0,
        g1,
        jit,
    )
    np.testing.assert_allclose(s2.lr, 0.0316228, rtol=1e-5)
    np.testing.assert_allclose(get_params(s2), [0.7], rtol=1e-6)

    # tol = 0.0081: sqrt(0.081) = 0.2846 is clipped to alpha_min = 0.9 -> lr 0.09
    _, _, s2, _ = _two_steps(adadp(0.1, tol=0.0081), x0, g0, g1, jit)
    np.testing.assert_allclose(s2.lr, 0.09, rtol=1e-6)


def test_error_is_relative_and_pooled_over_leaves(x64):
    # lr = 1, tol = 2, both leaves g0 = 2, g1 = 4; the error of an entry is relative to the
    # full step's result x_stepped (d3p 0.2):
    #   leaf a, x0 = 1:  x_stepped = -1, x_half = 1 - 1 - 2 = -2, |diff| / max(1, 1) = 1
    #   leaf b, x0 = 10: x_stepped = 8,  x_half = 10 - 1 - 2 = 7, |diff| / max(1, 8) = 1/8
    #   err = sqrt(1 + 1/64) = 1.0077822 <= tol, factor = sqrt(2 / err) = 1.4087426
    x0 = {"a": jnp.array([1.0]), "b": jnp.array([[10.0]])}
    g0 = jax.tree.map(lambda v: 2 * jnp.ones_like(v), x0)
    g1 = jax.tree.map(lambda v: 4 * jnp.ones_like(v), x0)
    _, _, s2, get_params = _two_steps(
        adadp(1.0, tol=2.0, alpha_min=0.1, alpha_max=10.0), x0, g0, g1
    )
    np.testing.assert_allclose(s2.lr, 1.4087426, rtol=1e-6)
    np.testing.assert_allclose(get_params(s2)["a"], [-2.0])
    np.testing.assert_allclose(get_params(s2)["b"], [[7.0]])
    assert s2.lr.dtype == jnp.result_type(float)
    assert get_params(s2)["b"].dtype == x0["b"].dtype


def _hand_built_state(lr):
    """d3p 0.2-style state ``(i, (x, lr, x_stepped, x_prev))`` of plain tuples on a 93-element
    tree, before an odd step: x = 0, x_stepped = -2, x_prev = 0.5 everywhere."""
    tree = {"a": jnp.zeros(3), "b": jnp.zeros((10, 9))}
    x_stepped = jax.tree.map(lambda v: v - 2.0, tree)
    x_prev = jax.tree.map(lambda v: v + 0.5, tree)
    return 1, (tree, lr, x_stepped, x_prev)


@pytest.mark.parametrize("jit", [False, True])
def test_hand_built_state_with_python_float_lr(jit):
    # Odd step, lr = 1, g = 2 on all 93 entries: x_half = x - lr / 2 * g = -1, and every entry
    # contributes ((x_stepped - x_half) / max(1, |x_stepped|))**2 = (-1 / 2)**2 = 1/4, so
    #   err = sqrt(93 / 4) = 4.8218254
    # tol = 5: factor = sqrt(5 / 4.8218254) = 1.018308251 (inside [0.9, 1.1]); err <= tol, so
    # the step is kept (x = -1). tol = 4: factor = sqrt(4 / 4.8218254) = 0.9108032; err > tol,
    # so the pair is rejected and x returns to x_prev = 0.5.
    for tol, factor, x_new in [(5.0, 1.018308251, -1.0), (4.0, 0.9108032, 0.5)]:
        opt = ADADP(step_size=0.1, tol=tol)
        state = _hand_built_state(1.0)
        g = jax.tree.map(lambda v: jnp.full_like(v, 2.0), state[1][0])
        update = jax.jit(opt.update) if jit else opt.update
        i, new = update(g, state)
        assert int(i) == 2
        np.testing.assert_allclose(new.lr, factor, rtol=1e-6)
        for leaf in jax.tree.leaves(opt.get_params((i, new))):
            np.testing.assert_allclose(leaf, x_new)
        # the next (even) step runs on the returned state
        i, new = update(g, (i, new))
        assert int(i) == 3


def test_non_finite_gradient_rejects_pair():
    x0 = jnp.array([1.0, 2.0])
    g1 = jnp.array([jnp.nan, 1.0])
    _, _, s2, get_params = _two_steps(adadp(0.1), x0, jnp.ones(2), g1)
    # a NaN error counts as a rejection with the smallest factor alpha_min = 0.9
    np.testing.assert_allclose(s2.lr, 0.09, rtol=1e-6)
    np.testing.assert_allclose(get_params(s2), x0)


def test_numpyro_optimiser_state_layout_and_svi():
    opt = ADADP(step_size=0.1)
    i, state = opt.init({"w": jnp.zeros(2)})
    assert int(i) == 0 and isinstance(state, ADADPState)
    x, lr, x_stepped, x_prev = state  # d3p 0.2 layout
    np.testing.assert_allclose(lr, 0.1, rtol=1e-6)
    np.testing.assert_array_equal(x_stepped["w"], 0.0)
    np.testing.assert_array_equal(x_prev["w"], x["w"])

    # SVI fit of a Normal(2, 0.5) target with a point-mass guide: the ELBO gradient
    # (loc - 2) / 0.25 is deterministic, so ADADP must reach the optimum loc = 2
    def model():
        numpyro.sample("z", dist.Normal(2.0, 0.5))

    def guide():
        loc = numpyro.param("loc", 0.0)
        numpyro.sample("z", dist.Delta(loc))

    svi = SVI(model, guide, ADADP(step_size=0.05, tol=1.0), Trace_ELBO())
    result = svi.run(jax.random.key(0), 100, progress_bar=False)
    assert abs(float(result.params["loc"]) - 2.0) < 1e-4


def test_optax_transformation_matches_triple():
    x0 = {"a": jnp.array([1.0, -3.0]), "b": jnp.array(10.0)}
    grads = [jax.tree.map(lambda v, k=k: (k + 1.0) * jnp.ones_like(v), x0) for k in range(6)]
    init, update, get_params = adadp(0.2, tol=0.05)
    state = init(x0)
    tx = optax_adadp(0.2, tol=0.05)
    params, ostate = x0, tx.init(x0)
    for i, g in enumerate(grads):
        state = update(jnp.array(i), g, state)
        updates, ostate = jax.jit(tx.update)(g, ostate, params)
        params = optax.apply_updates(params, updates)
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6), params, state.x)
        np.testing.assert_allclose(ostate.lr, state.lr, rtol=1e-6)
    with pytest.raises(ValueError, match="params"):
        tx.update(grads[0], ostate)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"step_size": 0.0}, "step_size"),
        ({"step_size": -1.0}, "step_size"),
        ({"step_size": math.inf}, "step_size"),
        ({"tol": 0.0}, "tol"),
        ({"tol": -0.5}, "tol"),
        ({"alpha_min": 1.2, "alpha_max": 1.1}, "alpha_min"),
        ({"alpha_min": 0.0}, "alpha_min"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    for make in (ADADP, adadp, optax_adadp):
        with pytest.raises(ValueError, match=match):
            make(**kwargs)


def test_bad_hyperparameter_types():
    with pytest.raises(TypeError, match="step_size"):
        adadp(step_size="0.1")
    with pytest.raises(TypeError, match="stability_check"):
        adadp(stability_check=1)


def test_usable_with_dpsvi():
    from d3p.svi import DPSVI

    def model(x, N=1):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        with numpyro.plate("data", N, subsample_size=x.shape[0]):
            numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x, N=1):
        loc = numpyro.param("loc", 0.0)
        numpyro.sample("mu", dist.Normal(loc, 0.1))

    x = jnp.linspace(1.0, 3.0, 8)
    dpsvi = DPSVI(model, guide, ADADP(step_size=0.01), Trace_ELBO(), 10.0, 1.0, N=8)
    state = dpsvi.init(d3p.random.PRNGKey(0), x)
    for _ in range(2):
        state, _ = dpsvi.update(state, x)
    i, adadp_state = state.optim_state
    assert int(i) == 2 and isinstance(adadp_state, ADADPState)
    # after one even/odd pair the learning rate was adapted by a factor in [0.9, 1.1]
    lr = float(adadp_state.lr)
    assert lr != 0.01 and 0.009 - 1e-9 <= lr <= 0.011 + 1e-9
