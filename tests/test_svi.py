# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Tests of d3p.svi: DPSVI against numpyro's SVI, clipping, noise, masking and errors.

Most tests use the fast d3p.random.debug suite (jax.random keys) so that the DPSVI key
handling can be matched with numpyro's SVI; the noise tests also run the secure suite.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal

import d3p._mechanism
import d3p.random
import d3p.svi
from d3p import _clipping, _mechanism, dputil, minibatch
from d3p._elbo_split import classify_sites
from d3p.svi import DPSVI, DPSVIState, clip_gradient, full_norm, normalize_gradient

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import d3p.random.debug as debug

N_TOTAL, D, B = 1000, 3, 8


def logreg_model(x, y, N=N_TOTAL):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(x.shape[1]), 1.0).to_event(1))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)


def logreg_guide(x, y, N=N_TOTAL):
    loc = numpyro.param("loc", jnp.zeros(x.shape[1]))
    scale = numpyro.param("scale", jnp.ones(x.shape[1]), constraint=dist.constraints.positive)
    numpyro.sample("w", dist.Normal(loc, scale).to_event(1))


def point_model(x, y, N=N_TOTAL):
    """No latents: the per-example gradient of -log p(y_i | x_i, w) is (sigmoid - y) x."""
    w = numpyro.param("w", jnp.full(x.shape[1], 0.1))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)


def empty_guide(x, y, N=N_TOTAL):
    pass


def noise_only_model(x, y, N=N_TOTAL):
    """A parameter vector the likelihood does not depend on: its data gradient is zero."""
    numpyro.param("w", jnp.zeros(4000))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)


def data(n=B, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, D)), dtype)
    y = jnp.asarray(rng.integers(0, 2, n), dtype)
    return x, y


def tree_max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(u - v)))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def sgd_gradient(dpsvi, state, *args, **kwargs):
    """With SGD(step 1) the parameter change is minus the gradient handed to the optimiser."""
    before = dpsvi.optim.get_params(state.optim_state)
    state, loss = jax.jit(lambda s: dpsvi.update(s, *args, **kwargs))(state)
    after = dpsvi.optim.get_params(state.optim_state)
    return jax.tree.map(lambda a, b: a - b, before, after), state, loss


# ---------------------------------------------------------------------------- helpers


def test_full_norm():
    assert float(full_norm(None)) == 0.0
    assert float(full_norm({})) == 0.0
    tree = {"a": jnp.array([3.0]), "b": [jnp.array([[4.0]])]}
    assert float(full_norm(tree)) == pytest.approx(5.0)
    assert float(full_norm(tree, ord=1)) == pytest.approx(7.0)
    assert float(jax.jit(full_norm)(tree)) == pytest.approx(5.0)


def test_clip_gradient():
    tree = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    clipped = clip_gradient(tree, 1.0)
    assert float(full_norm(clipped)) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(clipped["a"] / clipped["b"], 0.75, rtol=1e-6)
    assert tree_max_diff(clip_gradient(tree, 10.0), tree) == 0.0
    assert tree_max_diff(clip_gradient(tree, math.inf), tree) == 0.0
    assert float(full_norm(jax.jit(clip_gradient)(tree, 2.0))) == pytest.approx(2.0, rel=1e-6)
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="c must be"):
            clip_gradient(tree, bad)


def test_normalize_gradient():
    tree = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    assert float(full_norm(normalize_gradient(tree))) == pytest.approx(1.0, rel=1e-6)
    zero = {"a": jnp.zeros(2)}
    assert float(full_norm(normalize_gradient(zero))) == 0.0


# ---------------------------------------------------------------- equivalence with SVI


def svi_reference(model, guide, optim, dpsvi, state, x, y, loss=None):
    """numpyro SVI started from DPSVI's parameters, and its step with DPSVI's ELBO key.

    ``step(svi_state, dpsvi_state, x, y)`` is numpyro's ``SVI.update`` (optimiser's
    ``eval_and_update`` of the ELBO) with the ELBO key DPSVI's step of ``dpsvi_state`` uses.
    """
    svi = SVI(model, guide, optim, loss or Trace_ELBO())
    svi_state = svi.init(jax.random.PRNGKey(123), x, y, init_params=dpsvi.get_params(state))

    def step(svi_state, dpsvi_state, x, y):
        key = debug.convert_to_jax_rng_key(_mechanism.step_keys(debug, dpsvi_state.rng_key)[2])

        def loss_fn(params):
            value = svi.loss.loss(key, svi.constrain_fn(params), model, guide, x, y)
            return value, None

        (value, _), optim_state = svi.optim.eval_and_update(loss_fn, svi_state.optim_state)
        return svi_state._replace(optim_state=optim_state), value

    return svi, svi_state, jax.jit(step)


@pytest.mark.parametrize(
    "guide_kind, x64, particles",
    [
        ("diag", False, 1),
        ("diag", True, 1),
        ("auto_normal", False, 1),
        ("hand", False, 1),
        ("auto_normal", False, 3),
    ],
    ids=["diag-x32", "diag-x64", "auto_normal-x32", "hand-x32", "auto_normal-x32-3particles"],
)
def test_matches_svi_without_noise_and_clipping(guide_kind, x64, particles):
    # dp_scale=0 and C far above every gradient norm: DPSVI must take numpyro SVI's steps.
    with jax.enable_x64(x64):
        _check_matches_svi(guide_kind, x64, particles)


def _check_matches_svi(guide_kind, x64, particles):
    guide = {
        "diag": lambda: AutoDiagonalNormal(logreg_model),
        "auto_normal": lambda: AutoNormal(logreg_model),
        "hand": lambda: logreg_guide,
    }[guide_kind]()
    x, y = data(dtype=jnp.float64 if x64 else jnp.float32)
    optim = numpyro.optim.Adam(1e-2)
    loss = Trace_ELBO(num_particles=particles)
    dpsvi = DPSVI(logreg_model, guide, optim, loss, 1e8, 0.0, rng_suite=debug)
    state = dpsvi.init(debug.PRNGKey(3), x, y)
    svi, svi_state, svi_step = svi_reference(logreg_model, guide, optim, dpsvi, state, x, y, loss)
    dp_step = jax.jit(dpsvi.update)
    for _ in range(3):
        svi_state, svi_loss = svi_step(svi_state, state, x, y)
        state, loss = dp_step(state, x, y)
        # float32: sums in a different order, relative error ~1e-6; float64 ~1e-14
        assert float(loss) == pytest.approx(float(svi_loss), rel=1e-12 if x64 else 1e-5)
    tol = 1e-12 if x64 else 1e-5
    assert tree_max_diff(dpsvi.get_params(state), svi.get_params(svi_state)) < tol
    assert all(
        leaf.dtype == (jnp.float64 if x64 else jnp.float32)
        for leaf in jax.tree.leaves(dpsvi.get_params(state))
    )


def test_gradient_is_mean_of_per_example_gradients():
    # DPSVI gradient = mean_i grad of the whole single-example ELBO (plate scale N), with the
    # global latent sample shared by all examples; computed here with numpyro's Trace_ELBO.
    x, y = data()
    guide = AutoDiagonalNormal(logreg_model)
    dpsvi = DPSVI(
        logreg_model, guide, numpyro.optim.SGD(1.0), Trace_ELBO(), 1e8, 0.0, rng_suite=debug
    )
    state = dpsvi.init(debug.PRNGKey(5), x, y)
    params = dpsvi.optim.get_params(state.optim_state)
    grad, _, _ = sgd_gradient(dpsvi, state, x, y)
    elbo_key = _mechanism.step_keys(debug, state.rng_key)[2]

    def example_loss(p, xi, yi):
        return Trace_ELBO().loss(elbo_key, dpsvi.constrain_fn(p), logreg_model, guide, xi, yi)

    per_example = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(
        params, x[:, None], y[:, None]
    )
    expected = jax.tree.map(lambda g: jnp.mean(g, axis=0), per_example)
    assert tree_max_diff(grad, expected) < 1e-4 * max(1.0, float(full_norm(expected)))


def test_optax_optimiser_matches_svi():
    x, y = data()
    optim = optax.adam(1e-2)
    dpsvi = DPSVI(logreg_model, logreg_guide, optim, Trace_ELBO(), 1e8, 0.0, rng_suite=debug)
    state = dpsvi.init(debug.PRNGKey(1), x, y)
    svi, svi_state, svi_step = svi_reference(logreg_model, logreg_guide, optim, dpsvi, state, x, y)
    dp_step = jax.jit(dpsvi.update)
    for _ in range(2):
        svi_state, _ = svi_step(svi_state, state, x, y)
        state, _ = dp_step(state, x, y)
    assert tree_max_diff(dpsvi.get_params(state), svi.get_params(svi_state)) < 1e-5


# ---------------------------------------------------------------- clipping and masking


def point_gradients(x, y, w):
    """Per-example gradients of -log Bernoulli(y | sigmoid(x w)): (sigmoid(x w) - y) x."""
    return (jax.nn.sigmoid(x @ w) - y)[:, None] * x


def test_clipping_bound_and_scaling():
    x, y = data()
    x = x.at[0].multiply(1e6)  # one example with a huge gradient
    c = 0.5
    dpsvi = DPSVI(
        point_model,
        empty_guide,
        numpyro.optim.SGD(1.0),
        Trace_ELBO(),
        c,
        0.0,
        rng_suite=debug,
        expected_batch_size=B,
    )
    state = dpsvi.init(debug.PRNGKey(0), x, y)
    grad, _, _ = sgd_gradient(dpsvi, state, x, y)
    g = point_gradients(x, y, jnp.full(D, 0.1))
    norms = jnp.linalg.norm(g, axis=1)
    clipped = g * jnp.minimum(1.0, c / norms)[:, None]
    assert float(jnp.max(jnp.linalg.norm(clipped, axis=1))) <= c * (1 + 1e-6)
    # update = N / B * sum of clipped per-example gradients (clip_unscaled_observations=True)
    np.testing.assert_allclose(grad["w"], N_TOTAL / B * clipped.sum(0), rtol=1e-5)
    # the huge example moves the (unnormalised) sum by at most C
    grad_without, _, _ = sgd_gradient(dpsvi, state, x, y, mask=jnp.arange(B) > 0)
    moved = (grad["w"] - grad_without["w"]) * B / N_TOTAL
    assert float(jnp.linalg.norm(moved)) <= c * (1 + 1e-5)


def biased_logreg_model(x, y, N=N_TOTAL):
    """A global latent ``w`` and a model parameter ``bias`` that the likelihood uses directly."""
    w = numpyro.sample("w", dist.Normal(jnp.zeros(x.shape[1]), 1.0).to_event(1))
    bias = numpyro.param("bias", 0.3)
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=x @ w + bias), obs=y)


def spy_on_weighted_clipping(monkeypatch):
    """Record, per traced update, whether the clipping engine took the weighted path."""
    taken = []
    original = _clipping.weighted_global_clipping

    def spy(*args):
        result = original(*args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(_clipping, "weighted_global_clipping", spy)
    return taken


@pytest.mark.parametrize(
    "guide_class, weighted",
    [(AutoDiagonalNormal, True), (AutoMultivariateNormal, False)],
    ids=["mean-field-weighted", "full-covariance-exact"],
)
@pytest.mark.slow  # 10-19 s each
def test_clipping_through_the_global_sample(monkeypatch, guide_class, weighted):
    # Per-example gradients reach the guide's parameters through the shared global sample
    # and the model parameter directly. Reference, from numpyro's Trace_ELBO with DPSVI's
    # key: each example's data-term gradient is the gradient of its whole single-example
    # loss minus that of the loss with the observed site blocked (the global terms); DPSVI
    # must sum those per-unit-scale gradients clipped to C, times N / B, plus the global
    # gradient. A NaN example must be dropped exactly as a masked one. The mean-field guide
    # takes the weighted path (norms from diag(J J^T)), the full-covariance one the exact
    # path (one vector-Jacobian product per example).
    taken = spy_on_weighted_clipping(monkeypatch)
    x, y = data()
    x = x.at[1].multiply(50.0)
    c = 0.05
    guide = guide_class(biased_logreg_model)
    optim = numpyro.optim.SGD(1.0)
    dpsvi = DPSVI(biased_logreg_model, guide, optim, Trace_ELBO(), c, 0.0, rng_suite=debug)
    state = dpsvi.init(debug.PRNGKey(4), x, y)
    params = dpsvi.optim.get_params(state.optim_state)
    elbo_key = _mechanism.step_keys(debug, state.rng_key)[2]
    blocked = numpyro.handlers.block(biased_logreg_model, hide=["y"])

    def loss(model, p, xi, yi):
        return Trace_ELBO().loss(elbo_key, dpsvi.constrain_fn(p), model, guide, xi, yi)

    per_example = jax.vmap(
        jax.grad(lambda p, xi, yi: loss(biased_logreg_model, p, xi, yi)), in_axes=(None, 0, 0)
    )(params, x[:, None], y[:, None])
    global_grad = jax.grad(lambda p: loss(blocked, p, x[:1], y[:1]))(params)
    data_grads = jax.tree.map(lambda g, g0: (g - g0) / N_TOTAL, per_example, global_grad)
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(B, -1) ** 2, 1) for g in jax.tree.leaves(data_grads)))
    assert int(jnp.sum(norms > c)) >= B - 1  # the clip is active
    factor = jnp.minimum(1.0, c / norms)

    def expected(keep):
        w = jnp.where(keep, factor, 0.0)
        clipped = jax.tree.map(lambda g: jnp.tensordot(w, g, 1), data_grads)
        return jax.tree.map(lambda s, g0: N_TOTAL / B * s + g0, clipped, global_grad)

    grad, _, _ = sgd_gradient(dpsvi, state, x, y)
    scale = float(full_norm(expected(jnp.ones(B, bool))))
    assert tree_max_diff(grad, expected(jnp.ones(B, bool))) < 1e-5 * scale
    grad_nan, state_nan, _ = sgd_gradient(dpsvi, state, x.at[5].set(jnp.nan), y)
    assert tree_max_diff(grad_nan, expected(jnp.arange(B) != 5)) < 1e-5 * scale
    assert int(state_nan.num_nonfinite_grads) == 1
    # every traced update took the expected path (DPSVI caches its compiled step, so the
    # second update, same shapes, may reuse the first trace)
    assert taken and set(taken) == {weighted}


def bnn_model(x, y, N=N_TOTAL, hidden=6):
    w1 = numpyro.sample("w1", dist.Normal(jnp.zeros((x.shape[1], hidden)), 1.0).to_event(2))
    b1 = numpyro.sample("b1", dist.Normal(jnp.zeros(hidden), 1.0).to_event(1))
    w2 = numpyro.sample("w2", dist.Normal(jnp.zeros(hidden), 1.0).to_event(1))
    scale = numpyro.sample("scale", dist.LogNormal(0.0, 1.0))
    mean = jnp.tanh(x @ w1 + b1) @ w2
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(mean, scale), obs=y)


@pytest.mark.slow  # 13-30 s each: several compilations of both clipping paths
@pytest.mark.parametrize("guide_class", [AutoDiagonalNormal, AutoNormal])
def test_weighted_clipping_takes_the_exact_paths_steps(monkeypatch, guide_class):
    # The weighted path (per-example norms from diag(J J^T), weight matrices tapped, never
    # materialised) against the exact path on a network with a constrained latent, an
    # active clip, noise, padded rows and a NaN row: same keys, so the same steps up to
    # float32 rounding (relative 1e-5 after 5 Adam steps).
    x, y = data(n=12, seed=4)
    y = y * 3.0 + x[:, 0]
    x = x.at[3].set(jnp.nan)
    mask = jnp.arange(12) != 7
    results = []
    for weighted in (True, False):
        if not weighted:
            monkeypatch.setattr(_clipping, "weighted_global_clipping", lambda *args: None)
        dpsvi = DPSVI(
            bnn_model,
            guide_class(bnn_model),
            numpyro.optim.Adam(1e-2),
            Trace_ELBO(),
            0.2,
            1.0,
            rng_suite=debug,
            expected_batch_size=11.0,
        )
        state = dpsvi.init(debug.PRNGKey(6), x.at[3].set(0.0), y)
        step = jax.jit(lambda s, dpsvi=dpsvi: dpsvi.update(s, x, y, mask=mask))
        for _ in range(5):
            state, loss = step(state)
        results.append((dpsvi.get_params(state), loss, int(state.num_nonfinite_grads)))
    (params, loss, bad), (exact_params, exact_loss, exact_bad) = results
    assert bad == exact_bad == 5
    assert float(loss) == pytest.approx(float(exact_loss), rel=1e-5)
    assert tree_max_diff(params, exact_params) < 1e-5 * max(1.0, float(full_norm(exact_params)))


def scaled_latent_problem(scale, jac):
    """Guide sample w = a * jac (so J = jac), read by the likelihood as w * scale * x."""

    def model(x, y, N=N_TOTAL):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", N, subsample_size=x.shape[0]):
            numpyro.sample("y", dist.Normal(w * scale * x, 1.0), obs=y)

    def guide(x, y, N=N_TOTAL):
        numpyro.sample("w", dist.Delta(numpyro.param("a", 1.0) * jac))

    return model, guide


def test_clipped_sum_survives_an_overflowing_shortcut():
    # The clipped sum is formed as J^T (sum_i w_i d_v_i) over the per-example gradients d_v
    # with respect to the global sample v = J a (here J = 3e-308, float64). Each full
    # gradient J d_v_i is about 1 and clips fine, but sum_i w_i d_v_i overflows: DPSVI must
    # then fall back to summing the clipped full gradients, not return inf.
    scale, jac = 5e307, 3e-308

    model, guide = scaled_latent_problem(scale, jac)

    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x = jnp.asarray(rng.uniform(0.9, 1.1, B))
        y = jnp.full(B, 3.0)
        dpsvi = DPSVI(model, guide, numpyro.optim.SGD(1.0), Trace_ELBO(), 1.0, 0.0, rng_suite=debug)
        state = dpsvi.init(debug.PRNGKey(0), x, y)
        grad, state, _ = sgd_gradient(dpsvi, state, x, y)
        xs, ys = np.asarray(x), np.asarray(y)
        mean = jac * scale * xs  # w * scale * x at a = 1
        d_v = -(ys - mean) * scale * xs  # per-example d(-log p)/dw
        g = jac * d_v  # full per-example gradients with respect to a
        w = np.minimum(1.0, 1.0 / np.abs(g))
        with np.errstate(over="ignore"):
            assert np.isinf(np.sum(w * d_v))  # the shortcut overflows
        expected = N_TOTAL / B * np.sum(w * g) + jac * jac  # + prior term w * dw/da
        assert float(grad["a"]) == pytest.approx(expected, rel=1e-9)
        assert int(state.num_nonfinite_grads) == 0


def test_weighted_norm_survives_a_subnormal_gram_diagonal():
    # float32, guide sample w = a * 1e-22: diag(J J^T) = 1e-44 is subnormal (XLA flushes
    # it to zero) while the per-example d_v ~ 3e19 makes the full gradient -3e-3, beyond
    # C = 1e-3. Weighted norms would call it 0 and not clip; the step must take the exact
    # path and clip the one example to exactly C.
    jac, scale, c = 1e-22, 1e19, 1e-3

    model, guide = scaled_latent_problem(scale, jac)

    x, y = jnp.ones(1), jnp.full(1, 3.0)
    dpsvi = DPSVI(model, guide, numpyro.optim.SGD(1.0), Trace_ELBO(), c, 0.0, rng_suite=debug)
    state = dpsvi.init(debug.PRNGKey(0), x, y)
    grad, _, _ = sgd_gradient(dpsvi, state, x, y)
    # N / B * clipped gradient; the prior term w * dw/da = 1e-44 is below float32 precision
    assert float(grad["a"]) == pytest.approx(-N_TOTAL * c, rel=1e-5)


def test_clip_scaled_observations():
    # clip_unscaled_observations=False: the clip applies to N * per-example gradient.
    x, y = data()
    c = 3.0
    dpsvi = DPSVI(
        point_model,
        empty_guide,
        numpyro.optim.SGD(1.0),
        Trace_ELBO(),
        c,
        0.0,
        rng_suite=debug,
        clip_unscaled_observations=False,
    )
    state = dpsvi.init(debug.PRNGKey(0), x, y)
    assert float(state.observation_scale) == 1.0
    grad, _, _ = sgd_gradient(dpsvi, state, x, y)
    g = N_TOTAL * point_gradients(x, y, jnp.full(D, 0.1))
    clipped = g * jnp.minimum(1.0, c / jnp.linalg.norm(g, axis=1))[:, None]
    np.testing.assert_allclose(grad["w"], clipped.sum(0) / B, rtol=1e-5)


def test_masked_rows_contribute_nothing_and_nan_rows_are_dropped():
    x, y = data()
    pad = 5
    x_pad = jnp.concatenate([x, jnp.full((pad, D), jnp.nan)])
    y_pad = jnp.concatenate([y, jnp.full((pad,), 1e30)])
    mask = jnp.arange(B + pad) < B
    kw = dict(rng_suite=debug, expected_batch_size=B)
    dpsvi = DPSVI(point_model, empty_guide, numpyro.optim.SGD(1.0), Trace_ELBO(), 0.5, 0.0, **kw)
    state = dpsvi.init(debug.PRNGKey(0), x, y)
    grad, _, _ = sgd_gradient(dpsvi, state, x, y)
    grad_pad, state_pad, loss_pad = sgd_gradient(dpsvi, state, x_pad, y_pad, mask=mask)
    np.testing.assert_array_equal(grad_pad["w"], grad["w"])
    assert int(state_pad.num_nonfinite_grads) == 0  # masked rows are not counted
    # a NaN row that is NOT masked is dropped (contributes zero) and counted
    x_nan = x.at[2].set(jnp.nan)
    keep = jnp.arange(B) != 2
    grad_nan, state_nan, loss_nan = sgd_gradient(dpsvi, state, x_nan, y)
    grad_drop, _, _ = sgd_gradient(dpsvi, state, x, y, mask=keep)
    # the NaN row's step takes the exact branch (each row's gradient summed on its own),
    # the masked one the book-keeping sums: equal up to float32 rounding of the sum, so
    # relative to the gradient's norm (a row that were not dropped would add up to
    # C * N / B = 62.5 to it, or NaN)
    scale = float(jnp.linalg.norm(grad_drop["w"]))
    np.testing.assert_allclose(grad_nan["w"], grad_drop["w"], rtol=0, atol=1e-6 * scale)
    assert int(state_nan.num_nonfinite_grads) == 1
    assert bool(jnp.isfinite(loss_nan))


def test_all_false_mask_is_a_pure_noise_step():
    x, y = data()
    dpsvi = DPSVI(
        logreg_model,
        AutoDiagonalNormal(logreg_model),
        numpyro.optim.Adam(1e-2),
        Trace_ELBO(),
        1.0,
        1.0,
        rng_suite=debug,
        expected_batch_size=4.0,
    )
    state = dpsvi.init(debug.PRNGKey(0), x, y)
    state, loss = jax.jit(dpsvi.update)(state, x * jnp.nan, y, mask=jnp.zeros(B, bool))
    params = dpsvi.get_params(state)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(params))
    assert bool(jnp.isfinite(loss))
    assert int(state.num_nonfinite_grads) == 0


@pytest.mark.slow  # 8 s
def test_chunked_equals_unchunked():
    x, y = data(n=11)
    guide = logreg_guide
    results = []
    for chunk_size in (None, 4):
        dpsvi = DPSVI(
            logreg_model,
            guide,
            numpyro.optim.Adam(1e-2),
            Trace_ELBO(),
            0.3,
            1.0,
            rng_suite=debug,
            chunk_size=chunk_size,
        )
        state = dpsvi.init(debug.PRNGKey(2), x, y)
        state, loss = jax.jit(dpsvi.update)(state, x, y)
        results.append((dpsvi.get_params(state), loss))
    assert tree_max_diff(results[0][0], results[1][0]) < 1e-6
    assert float(results[0][1]) == pytest.approx(float(results[1][1]), rel=1e-5)


# ---------------------------------------------------------------------------- noise


@pytest.mark.parametrize("suite", [debug, d3p.random], ids=["debug", "secure"])
def test_noise_std_is_data_independent(suite):
    # Zero data gradients: the parameter change is pure noise with std
    # dp_scale * C / expected_batch_size * N, whatever the number of valid rows.
    n_rows, expected, dp_scale, c = 16, 10.0, 0.7, 2.0
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n_rows, 1)), jnp.float32)
    y = jnp.asarray(rng.normal(size=n_rows), jnp.float32)
    dpsvi = DPSVI(
        noise_only_model,
        empty_guide,
        numpyro.optim.SGD(1.0),
        Trace_ELBO(),
        c,
        dp_scale,
        rng_suite=suite,
        expected_batch_size=expected,
    )
    state = dpsvi.init(suite.PRNGKey(11), x, y)
    step = jax.jit(lambda s, m: sgd_gradient_pure(dpsvi, s, x, y, m))
    target = dp_scale * c / expected * N_TOTAL
    n = 4000  # parameters per step
    for valid in (0, 3, 16):
        delta, state = step(state, jnp.arange(n_rows) < valid)
        std = float(jnp.std(delta))
        # sample std of n normals has relative std 1/sqrt(2n); allow 5 sigma
        assert abs(std / target - 1) < 5 / math.sqrt(2 * n), (valid, std, target)
        assert abs(float(jnp.mean(delta))) < 5 * target / math.sqrt(n)


def sgd_gradient_pure(dpsvi, state, x, y, mask):
    before = dpsvi.optim.get_params(state.optim_state)["w"]
    state, _ = dpsvi.update(state, x, y, mask=mask)
    return before - dpsvi.optim.get_params(state.optim_state)["w"], state


# ------------------------------------------------------------------------ loops, jit


def test_fori_and_while_loops_and_get_params_in_jit():
    x, y = data()
    guide = AutoNormal(logreg_model)
    dpsvi = DPSVI(
        logreg_model, guide, numpyro.optim.Adam(1e-2), Trace_ELBO(), 1.0, 0.5, rng_suite=debug
    )
    state0 = dpsvi.init(debug.PRNGKey(4), x, y)
    body = lambda i, s: dpsvi.update(s, x, y)[0]  # noqa: E731
    fori = jax.jit(lambda s: jax.lax.fori_loop(0, 3, body, s))(state0)
    _, whiled = jax.jit(
        lambda s: jax.lax.while_loop(
            lambda c: c[0] < 3, lambda c: (c[0] + 1, body(c[0], c[1])), (0, s)
        )
    )(state0)
    python, one_step = state0, jax.jit(body)
    for i in range(3):
        python = one_step(i, python)
    for other in (whiled, python):
        assert tree_max_diff(dpsvi.get_params(fori), dpsvi.get_params(other)) < 1e-6
    jitted = jax.jit(dpsvi.get_params)(fori)
    assert tree_max_diff(jitted, dpsvi.get_params(fori)) == 0.0
    loss = jax.jit(dpsvi.evaluate)(fori, x, y)
    assert bool(jnp.isfinite(loss))


def make_autonormal_logreg():
    guide = AutoNormal(logreg_model)
    return DPSVI(
        logreg_model, guide, numpyro.optim.Adam(1e-2), Trace_ELBO(), 1.0, 0.5, rng_suite=debug
    )


@pytest.fixture
def classified(monkeypatch):
    """A list that grows by one with each site classification DPSVI runs."""
    calls = []
    spy = lambda *a, **k: calls.append(1) or classify_sites(*a, **k)  # noqa: E731
    monkeypatch.setattr(d3p._mechanism, "classify_sites", spy)
    return calls


def test_fresh_instance_steps_a_state_it_did_not_init(classified):
    # the site layout and the parameter constraints are derived from the model, the guide
    # and the shapes when a step needs them: no hidden state from init
    x, y = data(n=N_TOTAL, seed=5)  # the model's plate size: run checks it
    made = make_autonormal_logreg()
    state = made.init(debug.PRNGKey(2), x[:B], y[:B])
    made_step = jax.jit(made.update)(state, x[:B], y[:B])
    assert len(classified) == 1  # at init; the step reuses it (cached on the shapes)
    fresh = make_autonormal_logreg()
    fresh_step = jax.jit(fresh.update)(state, x[:B], y[:B])
    assert len(classified) == 2  # derived while the step was traced
    assert tree_max_diff(fresh_step, made_step) == 0.0


def test_run_from_a_state_on_a_fresh_instance_does_not_init(classified, monkeypatch):
    x, y = data(n=N_TOTAL, seed=5)  # the model's plate size: run checks it
    made = make_autonormal_logreg()
    state = made.init(debug.PRNGKey(2), x[:B], y[:B])
    classified.clear()
    fresh = make_autonormal_logreg()
    monkeypatch.setattr(fresh, "init", lambda *a, **k: pytest.fail("run called init"))
    kw = dict(q=0.05, delta=1e-3, progress_bar=False, init_state=state)
    result = fresh.run(debug.PRNGKey(3), 4, x, y, **kw)
    assert len(classified) == 1  # once, while the step was traced
    expected = made.run(debug.PRNGKey(3), 4, x, y, **kw)
    assert tree_max_diff(result.params, expected.params) == 0.0
    assert float(result.epsilon) == float(expected.epsilon)


# ------------------------------------------------------------------------ local latents


def local_model(x, N=N_TOTAL):
    mu = numpyro.sample("mu", dist.Normal(0.0, 3.0))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        z = numpyro.sample("z", dist.Normal(mu, 1.0))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def local_guide(x, N=N_TOTAL):
    m = numpyro.param("m", 0.5)
    s = numpyro.param("s", 0.5, constraint=dist.constraints.positive)
    numpyro.sample("mu", dist.Normal(m, s))
    a = numpyro.param("a", 0.3)
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("z", dist.Normal(a * x, 0.8))


@pytest.mark.slow  # 10 s
def test_local_latents_classified_and_gradient_unbiased():
    x = jnp.asarray(np.random.default_rng(1).normal(size=6), jnp.float32)
    layout = classify_sites(
        local_model, local_guide, {"m": 0.5, "s": 0.5, "a": 0.3}, jax.random.PRNGKey(0), (x,), {}
    )
    assert layout.model_local == {"z", "x"} and layout.guide_local == {"z"}
    assert layout.observation_scale == N_TOTAL
    # E[DPSVI gradient] = E[SVI gradient] (dp_scale=0, no clipping): compare Monte Carlo
    # means over many keys; tolerance 5 standard errors of the difference.
    optim = numpyro.optim.SGD(1.0)
    dpsvi = DPSVI(local_model, local_guide, optim, Trace_ELBO(), 1e8, 0.0, rng_suite=debug)
    state = dpsvi.init(debug.PRNGKey(0), x)
    svi = SVI(local_model, local_guide, optim, Trace_ELBO())
    svi_state = svi.init(jax.random.PRNGKey(0), x)
    params = dpsvi.optim.get_params(state.optim_state)

    def dp_grad(key):
        new, _ = dpsvi.update(state._replace(rng_key=key), x)
        return jax.tree.map(jnp.subtract, params, dpsvi.optim.get_params(new.optim_state))

    def svi_grad(key):
        new, _ = svi.update(svi_state._replace(rng_key=key), x)
        return jax.tree.map(jnp.subtract, params, svi.optim.get_params(new.optim_state))

    keys = jax.random.split(jax.random.PRNGKey(7), 3000)
    g_dp = jax.jit(jax.vmap(dp_grad))(keys)
    g_svi = jax.jit(jax.vmap(svi_grad))(keys)
    for name in g_dp:
        a, b = g_dp[name], g_svi[name]
        se = jnp.sqrt(jnp.var(a) / a.shape[0] + jnp.var(b) / b.shape[0])
        assert abs(float(jnp.mean(a) - jnp.mean(b))) < 5 * float(se), name


def test_generic_loss_path_runs():
    # TraceMeanField_ELBO is not split: the whole per-example loss is clipped (d3p 0.2 path).
    x, y = data()
    dpsvi = DPSVI(
        logreg_model,
        logreg_guide,
        numpyro.optim.Adam(1e-2),
        TraceMeanField_ELBO(),
        1.0,
        1.0,
        rng_suite=debug,
    )
    state = dpsvi.init(debug.PRNGKey(0), x, y)
    state, loss = jax.jit(dpsvi.update)(state, x, y)
    assert bool(jnp.isfinite(loss))
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(dpsvi.get_params(state)))


# ------------------------------------------------------------------- run and budgets


def test_run_and_privacy_spent():
    x, y = data(n=200, seed=3)
    dpsvi = DPSVI(
        logreg_model,
        logreg_guide,
        numpyro.optim.Adam(1e-2),
        Trace_ELBO(),
        1.0,
        1.1,
        rng_suite=debug,
        N=200,
    )
    result = dpsvi.run(debug.PRNGKey(0), 30, x, y, q=0.05, progress_bar=False, delta=1e-3)
    assert result.losses.shape == (30,)
    assert bool(jnp.all(jnp.isfinite(result.losses)))
    assert isinstance(result.state, DPSVIState)
    # truncated Poisson accounting is at least the plain Poisson epsilon, and close to it
    plain = dpsvi.get_epsilon(1e-3, 0.05, num_iter=30, dataset_size=200, max_batch_size=200)
    assert plain <= result.epsilon < plain * 1.01
    assert result.delta == 1e-3


def test_make_private_with_epsilon_and_run():
    x, y = data(n=200, seed=4)
    dpsvi = DPSVI.make_private_with_epsilon(
        logreg_model,
        logreg_guide,
        numpyro.optim.Adam(1e-2),
        Trace_ELBO(),
        1.0,
        target_epsilon=2.0,
        target_delta=1e-3,
        q=0.05,
        num_steps=20,
        rng_suite=debug,
        N=200,
    )
    eps = dputil.compute_epsilon(dpsvi.dp_scale, 1e-3, 0.05, 20)
    assert 2.0 - 1e-3 - 1e-9 <= eps <= 2.0
    result = dpsvi.run(debug.PRNGKey(1), 20, x, y, progress_bar=False)
    assert result.epsilon <= 2.0 and result.delta == 1e-3
    with pytest.raises(ValueError, match="budget"):
        dpsvi.run(debug.PRNGKey(1), 21, x, y, progress_bar=False)
    with pytest.raises(ValueError, match="budget"):
        dpsvi.run(debug.PRNGKey(1), 10, x, y, q=0.1, progress_bar=False)


def test_get_epsilon_and_delta():
    dpsvi = DPSVI(logreg_model, logreg_guide, numpyro.optim.Adam(1e-2), Trace_ELBO(), 1.0, 1.0)
    untruncated = dict(dataset_size=1000, max_batch_size=1000)
    eps = dpsvi.get_epsilon(1e-5, 0.01, num_epochs=2, **untruncated)
    assert eps == pytest.approx(dputil.compute_epsilon(1.0, 1e-5, 0.01, 200))
    assert dpsvi.get_delta(eps, 0.01, num_iter=200, **untruncated) == pytest.approx(1e-5, rel=1e-2)
    with pytest.raises(ValueError, match="exactly one"):
        dpsvi.get_epsilon(1e-5, 0.01, **untruncated)
    # how batches were drawn is never guessed (d3p 0.3.x returned untruncated Poisson here)
    with pytest.raises(ValueError, match="q, dataset_size and max_batch_size"):
        dpsvi.get_epsilon(1e-5, 0.01, num_iter=200)
    no_noise = DPSVI(logreg_model, logreg_guide, numpyro.optim.Adam(1e-2), Trace_ELBO(), 1.0, 0)
    with pytest.warns(UserWarning, match="NOT differentially private"):
        assert no_noise.get_epsilon(1e-5, 0.01, num_iter=10, **untruncated) == math.inf


def test_get_epsilon_accounts_for_truncated_batches():
    # The numbers of the minibatch guide: sigma 1, q 0.02, 200 steps, N 5000, truncation at
    # the 0.9999 quantile (139 rows) costs epsilon 2.04 instead of 1.85 at delta 1e-5.
    dpsvi = DPSVI(logreg_model, logreg_guide, numpyro.optim.Adam(1e-2), Trace_ELBO(), 1.0, 1.0)
    plain = dpsvi.get_epsilon(1e-5, 0.02, num_iter=200, dataset_size=5000, max_batch_size=5000)
    size = minibatch.structural_batch_size(5000, 0.02, 0.9999)
    truncated = dpsvi.get_epsilon(1e-5, 0.02, num_iter=200, dataset_size=5000, max_batch_size=size)
    assert truncated == dpsvi.get_epsilon(
        1e-5, 0.02, num_iter=200, dataset_size=5000, max_batch_size=0.9999
    )
    assert truncated == pytest.approx(
        dputil.compute_epsilon(
            1.0,
            1e-5,
            0.02,
            200,
            sampling="truncated_poisson",
            dataset_size=5000,
            max_batch_size=size,
        )
    )
    assert truncated > plain * 1.05
    delta = dpsvi.get_delta(truncated, 0.02, num_iter=200, dataset_size=5000, max_batch_size=size)
    assert delta == pytest.approx(1e-5, rel=1e-2)
    # a structural size of N cannot truncate: plain Poisson accounting
    assert plain == pytest.approx(dputil.compute_epsilon(1.0, 1e-5, 0.02, 200))
    with pytest.raises(ValueError, match="dataset_size and max_batch_size"):
        dpsvi.get_epsilon(1e-5, 0.02, num_iter=200, max_batch_size=size)


# ---------------------------------------------------------------------------- errors


def make(model=logreg_model, guide=logreg_guide, c=1.0, dp_scale=1.0, **kw):
    return DPSVI(
        model, guide, numpyro.optim.Adam(1e-2), Trace_ELBO(), c, dp_scale, rng_suite=debug, **kw
    )


@pytest.mark.parametrize("c", [0.0, -1.0, math.inf, math.nan])
def test_bad_clipping_threshold(c):
    with pytest.raises(ValueError, match="clipping_threshold"):
        make(c=c)


@pytest.mark.parametrize("dp_scale", [-0.1, math.inf, math.nan])
def test_bad_dp_scale(dp_scale):
    with pytest.raises(ValueError, match="dp_scale"):
        make(dp_scale=dp_scale)


def test_bad_options():
    with pytest.raises(ValueError, match="chunk_size"):
        make(chunk_size=0)
    with pytest.raises(ValueError, match="expected_batch_size"):
        make(expected_batch_size=-1.0)
    with pytest.raises(TypeError, match="rng_suite"):
        DPSVI(
            logreg_model,
            logreg_guide,
            numpyro.optim.Adam(1e-2),
            Trace_ELBO(),
            1.0,
            1.0,
            rng_suite=np.random,
        )
    with pytest.raises(TypeError, match="per_example_loss"):
        DPSVI(logreg_model, logreg_guide, numpyro.optim.Adam(1e-2), "elbo", 1.0, 1.0)


def test_batch_errors():
    x, y = data()
    dpsvi = make()
    with pytest.raises(ValueError, match="different lengths"):
        dpsvi.init(debug.PRNGKey(0), x, y[:-1])
    state = dpsvi.init(debug.PRNGKey(0), x, y)
    with pytest.raises(ValueError, match="different lengths"):
        dpsvi.update(state, x[:-1], y)
    with pytest.raises(ValueError, match="mask"):
        dpsvi.update(state, x, y, mask=jnp.ones(3, bool))
    with pytest.raises(ValueError, match="q"):
        dpsvi.run(debug.PRNGKey(0), 5, x, y, progress_bar=False, delta=1e-5)
    with pytest.raises(ValueError, match="delta"):
        dpsvi.run(debug.PRNGKey(0), 5, x, y, q=0.5, progress_bar=False)
    with pytest.raises(ValueError, match="delta"):
        dpsvi.run(debug.PRNGKey(0), 5, x, y, q=0.5, progress_bar=False, delta=1.5)
    with pytest.raises(ValueError, match="num_steps"):
        dpsvi.run(debug.PRNGKey(0), 0, x, y, q=0.5, progress_bar=False, delta=1e-5)


def test_mask_without_expected_batch_size_warns_once():
    x, y = data()
    dpsvi = make(model=point_model, guide=empty_guide)
    state = dpsvi.init(debug.PRNGKey(0), x, y)
    with pytest.warns(UserWarning, match="expected_batch_size"):
        dpsvi.update(state, x, y, mask=jnp.ones(B, bool))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dpsvi.update(state, x, y, mask=jnp.ones(B, bool))


def mutable_model(x, y, N=N_TOTAL):
    numpyro.primitives.mutable("count", jnp.zeros(()))
    point_model(x, y, N)


def two_scale_model(x, y, N=N_TOTAL):
    w = numpyro.param("w", jnp.zeros(x.shape[1]))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)
    with numpyro.plate("other", 2 * N, subsample_size=x.shape[0]):
        numpyro.sample("x0", dist.Normal(0.0, 1.0), obs=x[:, 0])


def unplated_model(x, y, N=N_TOTAL):
    w = numpyro.param("w", jnp.zeros(x.shape[1]))
    numpyro.sample("y", dist.Bernoulli(logits=x @ w).to_event(1), obs=y)


def pooled_model(x, y, N=N_TOTAL):
    w = numpyro.param("w", jnp.zeros(x.shape[1]))
    numpyro.sample("ybar", dist.Normal(jnp.mean(x @ w), 1.0), obs=jnp.mean(y))


@pytest.mark.parametrize(
    "model, match",
    [
        (mutable_model, "mutable"),
        (two_scale_model, "different plate scales"),
        (pooled_model, "do not grow with the batch"),
    ],
)
def test_model_errors(model, match):
    x, y = data()
    with pytest.raises(ValueError, match=match):
        make(model=model, guide=empty_guide).init(debug.PRNGKey(0), x, y)


def test_unplated_observations_warn():
    x, y = data()
    with pytest.warns(UserWarning, match="prior is over-weighted"):
        state = make(model=unplated_model, guide=empty_guide).init(debug.PRNGKey(0), x, y)
    assert float(state.observation_scale) == 1.0
