# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""DPSVI on the model kinds of issue 15: networks (pytree param sites), tuple params, flow
guides and data-free factors outside the data plate; and (issue 25) the network modules of
numpyro.contrib.module today: flax nnx (nnx_module, random_nnx_module) and equinox
(eqx_module, random_eqx_module)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.example_libraries import stax
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoBNAFNormal, AutoDiagonalNormal, AutoIAFNormal, AutoNormal
from numpyro.optim import SGD

from d3p import _clipping, _mechanism
from d3p.random import debug
from d3p.svi import DPSVI

try:
    import flax.linen as nn
except ImportError:  # without the 'nn' extra the flax cases skip
    nn = None
try:
    from flax import nnx
except ImportError:  # without the 'nn' extra the nnx cases skip
    nnx = None
try:
    import equinox as eqx
except ImportError:  # without the 'nn' extra the equinox cases skip
    eqx = None

N, B, D = 100, 8, 3

if nn is not None:

    class FlaxMLP(nn.Module):
        """Dense(5) - tanh - Dense(1), the flax twin of the stax network below."""

        @nn.compact
        def __call__(self, h):
            return nn.Dense(1)(nn.tanh(nn.Dense(5)(h)))


if nnx is not None:

    class NnxMLP(nnx.Module):
        """Linear(5) - tanh - Linear(1) in flax nnx (eagerly initialised, as nnx_module wants)."""

        def __init__(self, rngs):
            self.hidden = nnx.Linear(D, 5, rngs=rngs)
            self.out = nnx.Linear(5, 1, rngs=rngs)

        def __call__(self, h):
            return self.out(jnp.tanh(self.hidden(h)))


def data(n=B):
    rng = np.random.default_rng(0)
    return (
        jnp.asarray(rng.normal(size=(n, D)), jnp.float32),
        jnp.asarray(rng.normal(size=n), jnp.float32),
    )


def stax_model(x, y):
    net = numpyro.module("net", stax.serial(stax.Dense(5), stax.Tanh, stax.Dense(1)), (-1, D))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(net(x)[:, 0], 1.0), obs=y)


def flax_model(x, y):
    from numpyro.contrib.module import flax_module

    net = flax_module("net", FlaxMLP(), input_shape=(1, D))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(net(x)[:, 0], 1.0), obs=y)


def flax_case():
    pytest.importorskip("flax.linen", reason="the flax case needs the 'nn' extra")
    return flax_model, empty_guide


def nnx_model(x, y):
    from numpyro.contrib.module import nnx_module

    net = nnx_module("net", NnxMLP(nnx.Rngs(0)))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(net(x)[:, 0], 1.0), obs=y)


def random_nnx_model(x, y):
    # a Bayesian network: every weight a latent with a Normal(0, 1) prior
    from numpyro.contrib.module import random_nnx_module

    net = random_nnx_module("net", NnxMLP(nnx.Rngs(0)), dist.Normal(0.0, 1.0))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(net(x)[:, 0], 1.0), obs=y)


def eqx_mlp():
    """Linear(5) - tanh - Linear(1) in equinox; it maps one record, hence the vmap below."""
    return eqx.nn.MLP(D, 1, 5, 1, activation=jnp.tanh, key=jax.random.key(0))


def eqx_model(x, y):
    from numpyro.contrib.module import eqx_module

    net = eqx_module("net", eqx_mlp())
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(jax.vmap(net)(x)[:, 0], 1.0), obs=y)


def random_eqx_model(x, y):
    from numpyro.contrib.module import random_eqx_module

    net = random_eqx_module("net", eqx_mlp(), dist.Normal(0.0, 1.0))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(jax.vmap(net)(x)[:, 0], 1.0), obs=y)


def nnx_case(random=False):
    pytest.importorskip("flax.nnx", reason="the nnx cases need the 'nn' extra")
    if random:
        return random_nnx_model, AutoNormal(random_nnx_model)
    return nnx_model, empty_guide


def eqx_case(random=False):
    pytest.importorskip("equinox", reason="the equinox cases need the 'nn' extra")
    if random:
        return random_eqx_model, AutoNormal(random_eqx_model)
    return eqx_model, empty_guide


def tuple_model(x, y):
    w, b = numpyro.param("wb", (jnp.zeros(D), jnp.zeros(())))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w + b, 1.0), obs=y)


def linear_model(x, y):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(D), 1.0).to_event(1))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)


def factor_model(x, y):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(D), 1.0).to_event(1))
    numpyro.factor("ridge", -10 * jnp.sum(w**2))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)


def data_factor_model(x, y):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(D), 1.0).to_event(1))
    numpyro.factor("pooled", -jnp.sum((x @ w) ** 2))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)


def conv_model(x, y):
    # a convolution over the D features: its kernel meets the data in conv_general_dilated,
    # which the weighted clipping does not recognise
    conv = stax.GeneralConv(("NHC", "HIO", "NHC"), 2, (2,))
    net = stax.serial(conv, stax.Tanh, stax.Flatten, stax.Dense(1))
    h = numpyro.module("net", net, (-1, D, 1))(x[:, :, None])
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(h[:, 0], 1.0), obs=y)


def empty_guide(x, y):
    pass


CASES = {
    "stax": lambda: (stax_model, empty_guide),
    "conv": lambda: (conv_model, empty_guide),
    "flax": flax_case,
    "nnx": nnx_case,
    "nnx_random": lambda: nnx_case(random=True),
    "eqx": eqx_case,
    "eqx_random": lambda: eqx_case(random=True),
    "tuple": lambda: (tuple_model, empty_guide),
    "iaf": lambda: (linear_model, AutoIAFNormal(linear_model, num_flows=1, hidden_dims=[4])),
    "bnaf": lambda: (linear_model, AutoBNAFNormal(linear_model, num_flows=1, hidden_factors=[2])),
    "factor": lambda: (factor_model, AutoDiagonalNormal(factor_model)),
}


def kinds(default):
    """Every model kind; those not in ``default`` (the slower ones) marked slow."""
    return [k if k in default else pytest.param(k, marks=pytest.mark.slow) for k in sorted(CASES)]


@pytest.mark.parametrize("kind", kinds({"stax", "flax", "nnx", "eqx", "tuple", "iaf", "factor"}))
def test_model_kind_trains(kind):
    # these crashed in DPSVI.init before (pytree param sites; factor outside the plate)
    model, guide = CASES[kind]()
    x, y = data()
    dpsvi = DPSVI(model, guide, SGD(1e-3), Trace_ELBO(), 1.0, 1.0, rng_suite=debug)
    state = dpsvi.init(debug.PRNGKey(0), x, y)
    state, loss = jax.jit(dpsvi.update)(state, x, y)
    assert jnp.isfinite(loss)
    leaves = jax.tree.leaves(dpsvi.get_params(state))
    assert leaves and all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves)


@pytest.mark.parametrize("kind", kinds({"tuple", "iaf", "factor"}))  # networks: the examples
def test_model_kind_trains_with_run(kind):
    # DPSVI.run (Poisson batches of the N records, accounting) on the same model kinds
    model, guide = CASES[kind]()
    x, y = data(N)
    dpsvi = DPSVI(model, guide, SGD(1e-3), Trace_ELBO(), 1.0, 1.0, rng_suite=debug)
    result = dpsvi.run(debug.PRNGKey(0), 3, x, y, q=B / N, delta=1e-3, progress_bar=False)
    assert 0 < float(result.epsilon) < np.inf
    leaves = jax.tree.leaves(result.params)
    assert leaves and all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves)


def test_factor_reading_the_data_outside_the_plate_is_refused():
    x, y = data()
    guide = AutoDiagonalNormal(data_factor_model)
    dpsvi = DPSVI(data_factor_model, guide, SGD(1e-3), Trace_ELBO(), 1.0, 1.0, rng_suite=debug)
    with pytest.raises(ValueError, match="do not grow with the batch size but read the data"):
        dpsvi.init(debug.PRNGKey(0), x, y)


# ------------------------------------------------------------------ privacy, per model kind

C = 0.05  # small enough that most examples' gradients are clipped in these models


def privacy_setup(kind, dp_scale=0.0):
    """DPSVI with SGD(1) (the parameter change is minus the gradient), its first state and a
    function returning the change of one step from that state for a batch and a mask."""
    model, guide = CASES[kind]()
    x, y = data()
    dpsvi = DPSVI(
        model, guide, SGD(1.0), Trace_ELBO(), C, dp_scale, rng_suite=debug, expected_batch_size=B
    )
    state = dpsvi.init(debug.PRNGKey(3), x, y)
    before = dpsvi.optim.get_params(state.optim_state)

    @jax.jit
    def change(state, x, y, mask):
        new_state, _ = dpsvi.update(state, x, y, mask=mask)
        after = dpsvi.optim.get_params(new_state.optim_state)
        return jax.tree.map(jnp.subtract, after, before)

    return dpsvi, state, change, (model, guide, x, y)


def flat(tree):
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def brute_force_data_grads(dpsvi, state, model, guide, x, y):
    """Per-example gradients of each example's data term (unit plate scale) by vmap(grad).

    With DPSVI's key for the step, an example's whole single-example loss minus the loss of
    the model with the observation blocked (the global terms: prior, guide entropy, factor)
    is its data term times the plate scale N.
    """
    params = dpsvi.optim.get_params(state.optim_state)
    elbo_key = _mechanism.step_keys(debug, state.rng_key)[2]
    blocked = numpyro.handlers.block(model, hide=["y"])

    def loss(m, p, xi, yi):
        return Trace_ELBO().loss(elbo_key, dpsvi.constrain_fn(p), m, guide, xi, yi)

    def data_grad(xi, yi):
        g = jax.grad(lambda p: loss(model, p, xi, yi) - loss(blocked, p, xi, yi))(params)
        return flat(g) / N

    return jax.vmap(data_grad)(x[:, None], y[:, None])


@pytest.mark.parametrize("kind", kinds({"stax", "flax", "nnx", "eqx", "tuple"}))
def test_clipped_contributions_and_replace_one_bound(kind):
    # dp_scale = 0, SGD(1): the change of a step is N / B * (sum of clipped per-example
    # gradients) + the global gradient (expected_batch_size = B). A step with only example
    # i in the mask, minus the step with none, is therefore N / B * (i's clipped gradient);
    # it must match the brute-force per-example gradient clipped to C (float32 tolerance
    # relative to C). Replacing one record by an outlier then moves the step by at most
    # 2 * C * N / B, although the outlier's own gradient is far larger.
    dpsvi, state, change, (model, guide, x, y) = privacy_setup(kind)
    grads = brute_force_data_grads(dpsvi, state, model, guide, x, y)
    norms = jnp.linalg.norm(grads, axis=1)
    assert int(jnp.sum(norms > C)) >= B // 2  # the clip is active
    expected = grads * jnp.minimum(1.0, C / norms)[:, None]
    none = flat(change(state, x, y, jnp.zeros(B, bool)))
    one_hot = jnp.eye(B, dtype=bool)
    each = jax.vmap(lambda m: flat(change(state, x, y, m)))(one_hot)
    contributions = -(each - none) * B / N
    np.testing.assert_allclose(contributions, expected, atol=1e-5 * C)

    everyone = jnp.ones(B, bool)
    x_out, y_out = x.at[0].set(30.0), y.at[0].set(-1e3)
    outlier_grads = brute_force_data_grads(dpsvi, state, model, guide, x_out, y_out)
    raw_move = jnp.linalg.norm(outlier_grads[0] - grads[0]) * N / B
    moved = jnp.linalg.norm(
        flat(change(state, x_out, y_out, everyone)) - flat(change(state, x, y, everyone))
    )
    assert float(raw_move) > 10 * 2 * C * N / B  # unclipped, the outlier would move it far
    assert float(moved) <= 2 * C * N / B * (1 + 1e-5)


@pytest.mark.parametrize("kind", kinds({"stax", "tuple"}))
def test_every_parameter_leaf_gets_noise_of_the_documented_scale(kind):
    # With an empty mask a step is noise * N / B + the global gradient; the same step with
    # dp_scale = 0 (same key) is the global gradient alone. Their difference, over K keys,
    # must be N(0, (dp_scale * C * N / B)^2) in every entry of every leaf. The sample
    # standard deviation of n normals has relative sd 1 / sqrt(2 n): we allow 5 of those
    # per leaf (n = K * leaf size >= K), and the mean 5 / sqrt(n) standard deviations.
    dp_scale, num_keys = 1.5, 256
    _, state, noisy, _ = privacy_setup(kind, dp_scale)
    x, y = data()
    _, _, clean, _ = privacy_setup(kind)
    keys = debug.split(debug.PRNGKey(0), num_keys)
    empty = jnp.zeros(B, bool)

    def noise(key):
        s = state._replace(rng_key=key)
        return jax.tree.map(jnp.subtract, noisy(s, x, y, empty), clean(s, x, y, empty))

    samples = jax.vmap(noise)(keys)
    target = dp_scale * C * N / B
    for path, leaf in jax.tree_util.tree_leaves_with_path(samples):
        n = leaf.size
        std = float(jnp.std(leaf))
        assert abs(std / target - 1) < 5 / np.sqrt(2 * n), (path, std, target)
        assert abs(float(jnp.mean(leaf))) < 5 * target / np.sqrt(n), path


def weighted_and_exact_steps(monkeypatch, kind):
    """The tap plan of ``kind``'s weighted clipping, and its step's change with the weighted
    and with the exact path (every per-example gradient materialised), on one state."""
    plans = []
    original = _clipping.plan_taps

    def spy(*args):
        plans.append(original(*args))
        return plans[-1]

    monkeypatch.setattr(_clipping, "plan_taps", spy)
    _, state, change, (_, _, x, y) = privacy_setup(kind)
    everyone = jnp.ones(B, bool)
    weighted = flat(change(state, x, y, everyone))
    monkeypatch.setattr(_clipping, "weighted_global_clipping", lambda *args: None)
    _, _, exact_change, _ = privacy_setup(kind)
    exact = flat(exact_change(state, x, y, everyone))
    (plan,) = plans
    leaf_shapes = [v.aval.shape for v in plan.closed.jaxpr.invars]
    ghosts = sorted(leaf_shapes[g.leaf] for g in plan.ghosts)
    dense = sorted(leaf_shapes[i] for i in plan.dense)
    return ghosts, dense, weighted, exact


@pytest.mark.parametrize("kind", ["stax", "flax", "nnx", "eqx"])
def test_dense_layers_take_the_weighted_path(monkeypatch, kind):
    # The weighted clipping recognises the Dense layers of stax, flax (linen and nnx) and
    # equinox networks: their kernels meet the example only in one dot_general each, so their
    # per-example gradients are never materialised (the biases are). The step must equal the
    # exact path's up to float32 rounding. Equinox stores its weights as (out, in) and maps
    # one record (vmap), so its kernels enter the product transposed.
    ghosts, dense, weighted, exact = weighted_and_exact_steps(monkeypatch, kind)
    assert ghosts == ([(1, 5), (5, 3)] if kind == "eqx" else [(D, 5), (5, 1)])
    assert dense == [(1,), (5,)]
    scale = float(jnp.max(jnp.abs(exact)))
    np.testing.assert_allclose(weighted, exact, rtol=1e-5, atol=1e-5 * scale)


def test_unrecognised_layers_take_the_exact_path(monkeypatch):
    # Only the Dense kernel is tapped; the convolution's kernel and every bias get their
    # per-example gradients in full, and the step equals the exact path's.
    ghosts, dense, weighted, exact = weighted_and_exact_steps(monkeypatch, "conv")
    assert ghosts == [(2 * (D - 1), 1)]
    assert dense == [(1,), (1, 1, 2), (2, 1, 2)]
    scale = float(jnp.max(jnp.abs(exact)))
    np.testing.assert_allclose(weighted, exact, rtol=1e-5, atol=1e-5 * scale)
