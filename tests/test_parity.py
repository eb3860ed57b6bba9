# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""d3p 0.2 code runs unchanged (issue 16): DPSVI construction, its state, the sigma search
and the data check of DPSVI.run. The d3p.util, ADADP, get_epsilon_R/S and d3p.minibatch
parity tests live with their modules' tests."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import Trace_ELBO
from numpyro.optim import SGD, Adam

import d3p.random
from d3p import dputil
from d3p.svi import DPSVI, DPSVIState, clip_gradient, full_norm

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import d3p.random.debug as debug

N, B = 100, 10


def model(x, num_obs_total=N):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", num_obs_total, subsample_size=x.shape[0]):
        numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def guide(x, num_obs_total=N):
    loc = numpyro.param("loc", 0.0)
    numpyro.sample("mu", dist.Normal(loc, 1.0))


def _data(n=B):
    return jnp.asarray(np.random.default_rng(0).normal(1.0, 1.0, n), jnp.float32)


def test_construct_without_model_guide_loss():
    # d3p 0.2 code builds a bare DPSVI to reuse the helpers and the state type
    bare = DPSVI(None, None, Adam(1e-3), None, 1.0, 1.0, num_obs_total=N, rng_suite=d3p.random)
    assert bare.clipping_threshold == 1.0 and bare.dp_scale == 1.0
    assert bare.static_kwargs == {"num_obs_total": N}
    tree = {"a": jnp.array([3.0]), "b": jnp.array([[4.0]])}
    assert float(full_norm(tree)) == 5.0
    assert float(full_norm(clip_gradient(tree, bare.clipping_threshold))) == pytest.approx(1.0)
    # None for model, guide or loss is refused when first needed, with the usual errors
    with pytest.raises(TypeError, match="model must be a callable"):
        bare.init(d3p.random.PRNGKey(0), _data())
    no_guide = DPSVI(model, None, Adam(1e-3), Trace_ELBO(), 1.0, 1.0)
    with pytest.raises(TypeError, match="guide must be a callable"):
        no_guide.init(d3p.random.PRNGKey(0), _data())
    no_loss = DPSVI(model, guide, Adam(1e-3), None, 1.0, 1.0)
    with pytest.raises(TypeError, match="per_example_loss must be a numpyro ELBO"):
        no_loss.init(d3p.random.PRNGKey(0), _data())
    # any invalid value other than None is still refused at construction
    with pytest.raises(ValueError, match="sum_sites=True"):
        DPSVI(model, guide, Adam(1e-3), Trace_ELBO(sum_sites=False), 1.0, 1.0)
    # update on a hand-built state names the missing part, not "call init"
    state = DPSVIState(Adam(1e-3).init({"loc": jnp.zeros(())}), d3p.random.PRNGKey(0), 1.0)
    with pytest.raises(TypeError, match="model must be a callable"):
        bare.update(state, _data())


def test_init_key_and_observation_scale():
    key = debug.PRNGKey(7)
    dpsvi = DPSVI(model, guide, Adam(1e-3), Trace_ELBO(), 1.0, 1.0, rng_suite=debug)
    state = dpsvi.init(key, _data())
    # a key of the suite's type derived from the given one (d3p 0.2 stored the given key;
    # d3p 0.3.1 rekeys, so a released state cannot recompute what came before), the same
    # for the same key
    assert isinstance(state.rng_key, jax.Array) and state.rng_key.dtype == key.dtype
    assert state.rng_key.shape == key.shape and not np.array_equal(state.rng_key, key)
    np.testing.assert_array_equal(dpsvi.init(key, _data()).rng_key, state.rng_key)
    # the plate scale of one example's observation: plate size N over its batch of 1
    assert float(state.observation_scale) == N
    dpsvi.clip_unscaled_observations = False
    assert float(dpsvi.init(key, _data()).observation_scale) == 1.0


def test_state_built_from_three_values():
    dpsvi = DPSVI(model, guide, SGD(1e-3), Trace_ELBO(), 1.0, 1.0, rng_suite=debug)
    x = _data()
    state = dpsvi.init(debug.PRNGKey(0), x)
    hand = DPSVIState(state.optim_state, state.rng_key, float(state.observation_scale))
    assert hand.optim_state is state.optim_state and int(hand.num_nonfinite_grads) == 0

    def steps(s):
        return jax.lax.fori_loop(0, 3, lambda _, s: dpsvi.update(s, x)[0], s)

    # the hand-built state takes the same steps as the one from init, also in a jitted loop
    ref = dpsvi.get_params(jax.jit(steps)(state))
    out = dpsvi.get_params(jax.jit(steps)(hand))
    np.testing.assert_allclose(out["loc"], ref["loc"], rtol=1e-6)
    assert float(out["loc"]) != float(dpsvi.get_params(state)["loc"])


def test_update_and_evaluate_take_mask_none():
    # d3p 0.2's default mask=None: every row is an example (same step, no normaliser warning)
    dpsvi = DPSVI(model, guide, SGD(1e-3), Trace_ELBO(), 1.0, 1.0, rng_suite=debug)
    x = _data()
    state = dpsvi.init(debug.PRNGKey(0), x)
    ref, ref_loss = dpsvi.update(state, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, loss = dpsvi.update(state, x, mask=None)
        assert float(dpsvi.evaluate(state, x, mask=None)) == float(dpsvi.evaluate(state, x))
    assert float(loss) == float(ref_loss)
    assert float(dpsvi.get_params(out)["loc"]) == float(dpsvi.get_params(ref)["loc"])


@pytest.mark.parametrize(
    "target, delta, q, num_iter",
    [
        (1.0, 1e-5, 0.01, 1000),
        (0.1, 1e-5, 0.01, 1000),
        (30.0, 1e-5, 0.5, 5),
        (2.0, 1e-9, 0.003, 30_000),
    ],
)
@pytest.mark.parametrize(
    "calibrate", [dputil.approximate_sigma, dputil.approximate_sigma_remove_relation]
)
def test_approximate_sigma_maxeval_tol(calibrate, target, delta, q, num_iter):
    # d3p 0.2's keywords and return value (sigma, eps, num_evals)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missed tolerance warns
        sigma, eps, num_evals = calibrate(target, delta, q, num_iter, maxeval=40, tol=1e-4)
    assert abs(eps - target) <= 1e-4
    assert 1 <= num_evals <= 40
    relation = "substitute" if calibrate is dputil.approximate_sigma else "add_remove"
    assert dputil.compute_epsilon(sigma, delta, q, num_iter, relation=relation) == eps


def test_run_refuses_non_finite_data():
    dpsvi = DPSVI(model, guide, SGD(1e-3), Trace_ELBO(), 1.0, 1.0, rng_suite=debug)
    x = _data(N)
    for bad in (jnp.nan, jnp.inf):
        with pytest.raises(ValueError, match="positional argument 0 .* 1 NaN or infinite"):
            dpsvi.run(debug.PRNGKey(0), 2, x.at[3].set(bad), q=0.1, delta=1e-5)
        # as a user passes it: a NumPy array, two bad entries counted
        with pytest.raises(ValueError, match="positional argument 0 .* 2 NaN or infinite"):
            dpsvi.run(debug.PRNGKey(0), 2, np.asarray(x.at[3:5].set(bad)), q=0.1, delta=1e-5)
    assert dpsvi._svi.constrain_fn is None  # refused before any work (init never ran)

    second = DPSVI(lambda x, k: model(x), lambda x, k: guide(x), SGD(1e-3), Trace_ELBO(), 1.0, 1.0)
    with pytest.raises(ValueError, match="positional argument 1 "):
        second.run(debug.PRNGKey(0), 2, jnp.arange(N), x.at[0].set(-jnp.inf), q=0.1, delta=1e-5)
    assert second._svi.constrain_fn is None

    # opting out: the NaN record's gradient is dropped (counted) and the parameters stay finite
    result = dpsvi.run(
        debug.PRNGKey(0),
        5,
        x.at[3].set(jnp.nan),
        q=1.0,
        delta=1e-5,
        progress_bar=False,
        check_finite=False,
    )
    assert int(result.state.num_nonfinite_grads) == 5
    assert bool(jnp.isfinite(result.params["loc"]))
