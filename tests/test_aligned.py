# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Tests of DPSVI's aligned gradients (DPVIm; d3p._aligned).

The released vector of a step is read off the parameter change of SGD with step 1: the
change is ``N / b * gradient + global gradient``, and the gradient of a released
coordinate (a location, or a parameter the data terms read directly) is its released
value. References are built independently from numpyro's Trace_ELBO with the step's key:
an example's data-term gradient is that of its single-example loss minus the loss with
the observations blocked (the global terms), divided by the plate scale N.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import Trace_ELBO, TraceMeanField_ELBO, init_to_value
from numpyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

import d3p.random
from d3p import _mechanism
from d3p.svi import DPSVI

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import d3p.random.debug as debug

N, D, B, C = 1000, 3, 8, 0.5
LOCS = ("s_loc", "w_loc")
RELEASED = ("bias", "s_loc", "w_loc")  # read directly by the data terms, and the locations


def model(x, y, N=N):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(x.shape[1]), 1.0).to_event(1))
    s = numpyro.sample("s", dist.LogNormal(0.0, 1.0))
    bias = numpyro.param("bias", 0.1)
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w + bias, s), obs=y)


def guide(x, y, N=N):
    """Hand-written mean-field Gaussian guide: w = loc + scale * eta, s = exp(loc + scale * eta)."""
    positive = dist.constraints.softplus_positive
    w_loc = numpyro.param("w_loc", jnp.zeros(x.shape[1]))
    w_scale = numpyro.param("w_scale", jnp.full(x.shape[1], 0.5), constraint=positive)
    s_loc = numpyro.param("s_loc", 0.0)
    s_scale = numpyro.param("s_scale", 0.3, constraint=positive)
    numpyro.sample("w", dist.Normal(w_loc, w_scale).to_event(1))
    numpyro.sample("s", dist.LogNormal(s_loc, s_scale))


def data(n, d=D, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ np.linspace(2.0, -2.0, d) + 0.5 + rng.normal(size=n)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def make(dp_scale, the_guide=guide, aligned=LOCS, suite=debug, optim=None, c=C, expected=B):
    return DPSVI(
        model,
        the_guide,
        optim or numpyro.optim.SGD(1.0),
        Trace_ELBO(),
        c,
        dp_scale,
        rng_suite=suite,
        expected_batch_size=expected,
        aligned_gradients=aligned,
    )


def sgd_step(dpsvi):
    """Jitted ``(state, x, y, mask) -> (parameter change, new state)`` of SGD(1)."""

    def step(state, x, y, mask):
        new, _ = dpsvi.update(state, x, y, mask=mask)
        before, after = (dpsvi.optim.get_params(s.optim_state) for s in (state, new))
        return jax.tree.map(jnp.subtract, before, after), new

    return jax.jit(step)


def step_keys(dpsvi, state):
    """The jax key of the next step's ELBO (its global sample), and the step's params."""
    keys = _mechanism.step_keys(dpsvi.rng_suite, state.rng_key)
    return dpsvi.rng_suite.convert_to_jax_rng_key(keys[2]), dpsvi.optim.get_params(
        state.optim_state
    )


def global_reference(dpsvi, state, x, y, the_model=model, the_guide=guide):
    """The gradient of the global terms and the guide's sample of the global latents at
    the next step's key (numpyro's Trace_ELBO with the observations blocked)."""
    elbo_key, params = step_keys(dpsvi, state)
    blocked = numpyro.handlers.block(the_model, hide=["y"])

    @jax.jit
    def reference(params):
        constrained = dpsvi.constrain_fn(params)
        global_grad = jax.grad(
            lambda p: Trace_ELBO().loss(
                elbo_key, dpsvi.constrain_fn(p), blocked, the_guide, x[:1], y[:1]
            )
        )(params)
        # the guide draws with the second half of the ELBO key (numpyro's Trace_ELBO)
        seeded = numpyro.handlers.seed(
            numpyro.handlers.substitute(the_guide, data=constrained),
            jax.random.split(elbo_key)[1],
        )
        trace = numpyro.handlers.trace(seeded).get_trace(x[:1], y[:1])
        return global_grad, {k: v["value"] for k, v in trace.items() if v["type"] == "sample"}

    return *reference(params), params


def data_reference(dpsvi, state, x, y, global_grad):
    """Per-example data-term gradients (rows x unconstrained params) at the next step's key."""
    elbo_key, params = step_keys(dpsvi, state)

    def loss(p, xi, yi):
        return Trace_ELBO().loss(elbo_key, dpsvi.constrain_fn(p), model, guide, xi, yi)

    per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))(
        params, x[:, None], y[:, None]
    )
    return jax.tree.map(lambda g, g0: (g - g0) / N, per_example, global_grad)


def released(delta, global_grad):
    """The released vector (float64, RELEASED order) from an SGD(1) parameter change."""
    parts = [(delta[k] - global_grad[k]) * B / N for k in RELEASED]
    return np.concatenate([np.ravel(np.asarray(p, np.float64)) for p in parts])


def rows(grads):
    return np.concatenate(
        [np.asarray(grads[k], np.float64).reshape(B, -1) for k in RELEASED], axis=1
    )


@pytest.fixture(scope="module")
def exact_step():
    """dp_scale=0; a batch with a huge-gradient row (1), one whose squared norm overflows
    float32 (0), a NaN row (4) and a masked row (6)."""
    x, y = data(B)
    x = x.at[0].multiply(1e14).at[1].multiply(1e6)
    mask = jnp.arange(B) != 6
    dpsvi = make(0.0)
    state = dpsvi.init(debug.PRNGKey(3), x, y)
    x = x.at[4].set(jnp.nan)
    global_grad, sample, params = global_reference(dpsvi, state, x, y)
    data_grads = data_reference(dpsvi, state, x, y, global_grad)
    return state, x, y, mask, sgd_step(dpsvi), (data_grads, global_grad, sample, params)


def test_released_sum_is_the_sum_of_clipped_vectors_and_one_row_moves_it_by_at_most_c(
    exact_step,
):
    state, x, y, mask, step, (data_grads, global_grad, _, _) = exact_step
    per_row = rows(data_grads)
    norms = np.linalg.norm(per_row, axis=1)
    valid = np.asarray(mask) & np.all(np.isfinite(per_row), axis=1)
    assert norms[0] > 1e20 and 1e10 < norms[1] < 1e18  # huge but finite
    assert np.sum(valid & (norms > C)) >= 4  # the clip binds on ordinary rows too
    delta, new_state = step(state, x, y, mask)
    got = released(delta, global_grad)
    assert int(new_state.num_nonfinite_grads) == 1  # the NaN row, not the masked one

    changes = []
    for i in range(B):  # remove row i: the released vector moves by at most C
        without, _ = step(state, x, y, mask & (jnp.arange(B) != i))
        changes.append(got - released(without, global_grad))
        assert np.linalg.norm(changes[i]) <= C * (1 + 1e-5), (i, changes[i])
    # row 0's squared norm overflows: its norm is bounded from above (it is scaled by less
    # than C / norm), so it moves the sum along its own gradient by at most C
    cosine = changes[0] @ per_row[0] / (np.linalg.norm(changes[0]) * norms[0])
    assert cosine == pytest.approx(1.0, abs=1e-5) and np.linalg.norm(changes[0]) > 0.01 * C
    # every other row is clipped exactly: the sum is that of the clipped vectors
    exact = valid & (np.arange(B) != 0)
    factor = np.where(exact, np.minimum(1.0, C / np.where(exact, norms, 1.0)), 0.0)
    expected = changes[0] + np.sum(np.where(exact[:, None], per_row, 0.0) * factor[:, None], 0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * C)
    for i in range(1, B):
        assert np.linalg.norm(changes[i]) == pytest.approx(
            min(C, norms[i]) if exact[i] else 0.0, abs=1e-5 * C
        )


def test_scale_gradient_is_derived_from_the_released_location_gradient(exact_step):
    # DPVIm: the scale gradient is the location gradient times eta times the scale's
    # derivative (softplus' = sigmoid); the location gets exactly its released value
    state, x, y, mask, step, (_, global_grad, sample, params) = exact_step
    delta, _ = step(state, x, y, mask)
    got = released(delta, global_grad)
    w_loc, s_loc = got[1 + 1 :], got[1]
    assert np.all(np.abs(w_loc) > 1e-3) and abs(s_loc) > 1e-3
    eta_w = (sample["w"] - params["w_loc"]) / jax.nn.softplus(params["w_scale"])
    eta_s = (jnp.log(sample["s"]) - params["s_loc"]) / jax.nn.softplus(params["s_scale"])
    for name, loc, eta in (("w_scale", w_loc, eta_w), ("s_scale", s_loc, eta_s)):
        derived = N / B * loc * eta * jax.nn.sigmoid(params[name]) + global_grad[name]
        np.testing.assert_allclose(delta[name], derived, rtol=1e-5, atol=1e-5)


NOISY_D, NOISY_SIGMA = 1000, 0.7


@pytest.fixture(
    scope="module",
    params=[debug, pytest.param(d3p.random, marks=pytest.mark.slow)],
    ids=["debug", "secure"],
)
def noisy_step(request):
    """A pure-noise step (all rows masked) with 1 + 1 + 1000 released coordinates."""
    suite = request.param
    x, y = data(B, d=NOISY_D, seed=1)
    dpsvi = make(NOISY_SIGMA, suite=suite)
    state = dpsvi.init(suite.PRNGKey(5), x, y)
    delta, new_state = sgd_step(dpsvi)(state, x, y, jnp.zeros(B, bool))
    return dpsvi, state, new_state, delta, global_reference(dpsvi, state, x, y)


def test_noise_only_on_released_coordinates_with_std_sigma_c(noisy_step):
    # The released vector (bias, s_loc, w_loc) is exactly sigma C times the hardened normal
    # draw of the step's noise key, and the scales receive no noise of their own (their
    # gradient is the derived one).
    dpsvi, state, _, delta, (global_grad, sample, params) = noisy_step
    got = np.concatenate([np.ravel((delta[k] - global_grad[k]) * B / N) for k in RELEASED])
    n = got.size
    assert n == 1 + 1 + NOISY_D
    # seeded statistical check: the sample std of n normals has relative std 1/sqrt(2n),
    # the mean has std sigma C / sqrt(n); both allowed 5 of those (n = 1002 coordinates)
    target = NOISY_SIGMA * C
    assert abs(np.std(got) / target - 1) < 5 / math.sqrt(2 * n)
    assert abs(np.mean(got)) < 5 * target / math.sqrt(n)
    # the draw, in the ravelled order of the released tree: bias, then the sites s and w
    noise_key = _mechanism.step_keys(dpsvi.rng_suite, state.rng_key)[3]
    draw = dpsvi.rng_suite.hardened_normal(noise_key, (n,), jnp.float32) * target
    np.testing.assert_allclose(got, draw, rtol=1e-4, atol=1e-4 * target)
    eta_w = (sample["w"] - params["w_loc"]) / jax.nn.softplus(params["w_scale"])
    derived = N / B * got[2:] * eta_w * jax.nn.sigmoid(params["w_scale"])
    np.testing.assert_allclose(
        delta["w_scale"] - global_grad["w_scale"], derived, rtol=1e-4, atol=1e-4 * target
    )


def tiny_model(x, y, N=N):
    u = numpyro.sample("u", dist.Exponential(1.0))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(u * x[:, 0], 1.0), obs=y)


def tiny_guide(x, y, N=N, u_loc=0.0):
    loc = numpyro.param("u_loc", u_loc)
    scale = numpyro.param("u_scale", 0.1, constraint=dist.constraints.softplus_positive)
    numpyro.sample("u", dist.LogNormal(loc, scale))


@pytest.mark.filterwarnings("ignore:Out-of-support")  # the reference's prior at u = 0
@pytest.mark.parametrize(
    "u_loc", [-85.0, pytest.param(-200.0, marks=pytest.mark.slow)], ids=["overflow", "underflow"]
)
def test_post_processing_never_poisons_the_optimiser(u_loc):
    # u = exp(u_loc + ...): t = du/du_loc = u is ~1e-37 (a noise of ~1e3 divided by it
    # overflows) or exactly 0 (float32 underflow). The derived gradient of u's location and
    # scale is then 0, not inf/NaN: the parameter change is the global gradient alone.
    x, y = data(B)
    the_guide = lambda x, y, N=N: tiny_guide(x, y, N, u_loc)  # noqa: E731
    dpsvi = DPSVI(
        tiny_model,
        the_guide,
        numpyro.optim.SGD(1.0),
        Trace_ELBO(),
        1.0,
        1e3,
        rng_suite=debug,
        expected_batch_size=float(B),
        aligned_gradients=["u_loc"],
    )
    state = dpsvi.init(debug.PRNGKey(0), x, y)
    delta, new_state = sgd_step(dpsvi)(state, x, y, jnp.ones(B, bool))
    for name in ("u_loc", "u_scale"):
        assert bool(jnp.isfinite(delta[name]))
    global_grad = global_reference(dpsvi, state, x, y, tiny_model, the_guide)[0]
    for name in ("u_loc", "u_scale"):
        np.testing.assert_allclose(delta[name], global_grad[name], rtol=1e-6)
    assert int(new_state.num_nonfinite_grads) == 0


# ------------------------------------------------------------------------------ training

START = init_to_value(values={"w": jnp.zeros(D), "s": jnp.array(1.0)})  # as the hand guide
GUIDES = {
    "hand": lambda: (guide, LOCS),
    "AutoNormal": lambda: (AutoNormal(model, init_loc_fn=START), True),
    "AutoDiagonalNormal": lambda: (AutoDiagonalNormal(model, init_loc_fn=START), True),
}
DEFAULT = {("AutoNormal", "python")}  # the others: 20-30 s each


def training_cases():
    for kind in GUIDES:
        for mode in ("run", "python", "fori"):
            marks = () if (kind, mode) in DEFAULT else (pytest.mark.slow,)
            yield pytest.param(kind, mode, marks=marks, id=f"{kind}-{mode}")


@pytest.mark.parametrize("kind, mode", list(training_cases()))
def test_trains(kind, mode):
    # the negative ELBO of the whole data set (numpyro, 16 particles) at the initial and the
    # trained parameters: the guides start at w = 0 (about 5000; about 1400 at the optimum),
    # and 60 private steps (sigma = 1) must get well below the start
    the_guide, aligned = GUIDES[kind]()
    x, y = data(N, seed=2)
    steps, q, delta = 60, 0.05, 1e-5
    expected = None if mode == "run" else B  # run normalises by q * N
    dpsvi = make(1.0, the_guide, aligned, optim=numpyro.optim.Adam(0.1), c=2.0, expected=expected)
    state = dpsvi.init(debug.PRNGKey(1), x[:B], y[:B])
    initial = dpsvi.get_params(state)
    if mode == "run":
        result = dpsvi.run(
            debug.PRNGKey(1), steps, x, y, q=q, max_batch_size=120, delta=delta, progress_bar=False
        )
        state = result.state
        # accounting unchanged: the plain mechanism's epsilon for the same steps
        plain = make(1.0, the_guide, False, c=2.0)
        assert result.epsilon == pytest.approx(
            plain.get_epsilon(delta, q, num_iter=steps, dataset_size=N, max_batch_size=120),
            rel=1e-9,
        )
    elif mode == "python":
        xs, ys = np.asarray(x), np.asarray(y)  # numpy batches: no eager slicing ops
        for i in range(steps):
            state, _ = dpsvi.update(state, xs[i * B : (i + 1) * B], ys[i * B : (i + 1) * B])
    else:

        def body(i, s):
            xb, yb = (jax.lax.dynamic_slice_in_dim(a, i * B, B) for a in (x, y))
            return dpsvi.update(s, xb, yb)[0]

        state = jax.jit(lambda s: jax.lax.fori_loop(0, steps, body, s))(state)
    assert int(state.num_steps) == steps

    @jax.jit
    def loss(params):
        elbo = Trace_ELBO(num_particles=16)
        return elbo.loss(jax.random.PRNGKey(0), params, model, the_guide, x, y)

    first, last = float(loss(initial)), float(loss(dpsvi.get_params(state)))
    assert np.isfinite(last) and last < 0.5 * first, (first, last)


def test_accounting_is_that_of_the_plain_mechanism(noisy_step):
    # the aligned step is recorded, and accounted, as the plain Gaussian mechanism's
    aligned, _, state, _, _ = noisy_step
    plain = make(NOISY_SIGMA, aligned=False)
    assert _mechanism.update_mechanism(aligned) == _mechanism.update_mechanism(plain)
    kwargs = dict(q=B / N, dataset_size=N, max_batch_size=B)
    epsilon = aligned.get_epsilon(1e-5, state=state, **kwargs)
    assert epsilon == pytest.approx(plain.get_epsilon(1e-5, num_iter=1, **kwargs), rel=1e-12)


# ------------------------------------------------------------------------------ refusals


def point_model(x, y, N=N):
    w = numpyro.param("w", jnp.zeros(x.shape[1]))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)


def shared_loc_guide(x, y, N=N):
    """Each entry of w depends on two location entries (of w_loc and of shift)."""
    shift = numpyro.param("shift", jnp.zeros(x.shape[1]))
    w_loc = numpyro.param("w_loc", jnp.zeros(x.shape[1]))
    numpyro.sample("w", dist.Normal(w_loc + shift, 1.0).to_event(1))
    numpyro.sample("s", dist.LogNormal(0.0, 1.0))


def reading_model(x, y, N=N):
    """The likelihood reads the guide's location parameter directly."""
    w = numpyro.sample("w", dist.Normal(jnp.zeros(x.shape[1]), 1.0).to_event(1))
    s = numpyro.sample("s", dist.LogNormal(0.0, 1.0))
    w_loc = numpyro.param("w_loc", jnp.full(x.shape[1], 0.2))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ (w + w_loc), s), obs=y)


@pytest.mark.parametrize(
    "make_guide, aligned, loss, match",
    [
        (lambda: guide, LOCS, TraceMeanField_ELBO(), "Trace_ELBO"),
        (lambda: guide, LOCS, Trace_ELBO(num_particles=2), "num_particles"),
        (lambda: AutoMultivariateNormal(model), True, Trace_ELBO(), "AutoNormal"),
        (lambda: guide, True, Trace_ELBO(), "AutoNormal"),
        (lambda: guide, "w_loc", Trace_ELBO(), "string"),
        (lambda: guide, [], Trace_ELBO(), "non-empty"),
        (lambda: guide, ["w_loc", "w_loc"], Trace_ELBO(), "twice"),
    ],
    ids=["not-split-elbo", "particles", "true-for-full-rank", "true-for-hand", "string"]
    + ["empty", "duplicate"],
)
def test_refused_at_construction(make_guide, aligned, loss, match):
    with pytest.raises(ValueError, match=f"aligned_gradients.*{match}"):
        DPSVI(model, make_guide(), numpyro.optim.SGD(1.0), loss, C, 1.0, aligned_gradients=aligned)


def test_option_type():
    with pytest.raises(TypeError, match="aligned_gradients"):
        make(1.0, aligned=1)
    assert make(1.0, aligned=["w_loc"]).aligned_gradients == ("w_loc",)
    assert make(1.0, aligned=False).aligned_gradients is False


@pytest.mark.parametrize(
    "the_model, the_guide, aligned, match",
    [
        (model, AutoMultivariateNormal(model), ["auto_loc"], "not mean-field"),
        pytest.param(
            model,
            AutoLowRankMultivariateNormal(model),
            ["auto_loc"],
            "not mean-field",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            model,
            AutoIAFNormal(model),
            ["auto_arn__0$params"],
            "not mean-field",
            marks=pytest.mark.slow,
        ),
        (point_model, lambda x, y, N=N: None, ["w"], "no global latent"),
        (model, guide, ["w_loc", "nope"], "not parameters"),
        (model, guide, ["w_loc", "bias"], "not read by the guide"),
        (model, guide, ["w_loc"], "exactly one"),  # s depends on no declared location
        (model, shared_loc_guide, ["w_loc", "shift"], "exactly one"),
        (reading_model, guide, LOCS, "read parameters of the global"),
    ],
    ids=[
        "full-rank",
        "low-rank",
        "flow",
        "no-global-latents",
        "unknown-name",
        "not-a-location",
        "sample-without-location",
        "two-locations-per-entry",
        "data-reads-location",
    ],
)
def test_refused_at_init(the_model, the_guide, aligned, match):
    x, y = data(B)
    dpsvi = DPSVI(
        the_model,
        the_guide,
        numpyro.optim.SGD(1.0),
        Trace_ELBO(),
        C,
        1.0,
        rng_suite=debug,
        aligned_gradients=aligned,
    )
    with pytest.raises(ValueError, match=f"aligned_gradients.*{match}"):
        dpsvi.init(debug.PRNGKey(0), x, y)


def test_refused_at_update_of_a_state_it_did_not_init():
    x, y = data(B)
    the_guide = AutoMultivariateNormal(model)
    plain = DPSVI(model, the_guide, numpyro.optim.SGD(1.0), Trace_ELBO(), C, 1.0, rng_suite=debug)
    state = plain.init(debug.PRNGKey(0), x, y)
    aligned = DPSVI(
        model,
        the_guide,
        numpyro.optim.SGD(1.0),
        Trace_ELBO(),
        C,
        1.0,
        rng_suite=debug,
        aligned_gradients=["auto_loc"],
    )
    with pytest.raises(ValueError, match="aligned_gradients.*not mean-field"):
        aligned.update(state, x, y)
