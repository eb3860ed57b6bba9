# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Tests of d3p.averaging and DPSVI.run(average=...): iterate statistics are the trace's
statistics, in a Python loop, under jit and fori_loop, and averaging is post-processing
(the same state, history and epsilon with and without it)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal
from numpyro.optim import Adam

from d3p import averaging
from d3p.averaging import EMA, Window
from d3p.svi import DPSVI

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import d3p.random.debug as debug

N, D = 100, 3


def model(x, y, N=N):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(D), 1.0).to_event(1))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)


def data():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.normal(size=(N, D)), jnp.float32), jnp.asarray(
        rng.integers(0, 2, N), jnp.float32
    )


def trace_of(values):
    """A trace of ``{"a": (2,), "b": ()}`` iterates from an array of shape (T, 3)."""
    return [{"a": jnp.asarray(v[:2]), "b": jnp.asarray(v[2])} for v in values]


def stack(trace):
    return {k: np.stack([np.asarray(p[k]) for p in trace]) for k in trace[0]}


def steps(state):
    """A state's arrays but its history's random chain id (fresh in every fresh run)."""
    return state._replace(history=state.history.counts)


def close(a, b, **tol):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), **tol)


# ---------------------------------------------------------------- the statistics


def test_window_statistics_are_the_traces():
    values = np.random.default_rng(1).normal(size=(12, 3)).astype(np.float32)
    trace = trace_of(values)
    stats = averaging.init(trace[0], block_size=4)
    for params in trace:
        stats = averaging.update(stats, params)
    t = stack(trace)
    assert int(stats.count) == 12 and int(stats.num_blocks) == 3
    close(stats.mean, {k: v.mean(0) for k, v in t.items()}, rtol=1e-5)
    close(stats.last, trace[-1])
    close(averaging.variance(stats), {k: v.var(0, ddof=1) for k, v in t.items()}, rtol=1e-4)
    blocks = {k: v.reshape(3, 4, *v.shape[1:]).mean(1) for k, v in t.items()}
    close(
        averaging.variance_of_mean(stats),
        {k: v.var(0, ddof=1) / 3 for k, v in blocks.items()},
        rtol=1e-4,
    )
    # an incomplete block counts in the mean, not in the blocks
    stats = averaging.update(stats, trace[0])
    assert int(stats.num_blocks) == 3 and int(stats.count) == 13
    assert np.isnan(averaging.variance(averaging.init(trace[0]))["b"])


def test_ema_weights():
    values = np.random.default_rng(2).normal(size=(7, 3)).astype(np.float32)
    trace = trace_of(values)
    state = averaging.ema_init(trace[0], 0.8)
    for params in trace:
        state = averaging.update(state, params)
    weights = 0.8 ** np.arange(6, -1, -1)
    expected = (weights[:, None] * values).sum(0) / weights.sum()
    close(state.mean, {"a": expected[:2], "b": expected[2]}, rtol=1e-5)
    # the first iterate has weight 1 (normalised weights, not a decay from zero)
    first = averaging.update(averaging.ema_init(trace[0], 0.99), trace[0])
    close(first.mean, trace[0], rtol=1e-6)


def test_jit_fori_loop_and_python_loop_agree():
    values = np.random.default_rng(3).normal(size=(10, 3)).astype(np.float32)
    trace = trace_of(values)
    stacked = {k: jnp.asarray(v) for k, v in stack(trace).items()}

    def loop(state, start):
        def body(i, s):
            params = jax.tree.map(lambda v: v[i], stacked)
            return averaging.update(s, params, i >= start)

        return jax.lax.fori_loop(0, 10, body, state)

    stats = jax.jit(loop)(averaging.init(trace[0], 2), 4)
    ema = jax.jit(loop)(averaging.ema_init(trace[0], 0.5), 4)
    python_stats = averaging.init(trace[0], 2)
    python_ema = averaging.ema_init(trace[0], 0.5)
    for params in trace[4:]:
        python_stats = averaging.update(python_stats, params)
        python_ema = averaging.update(python_ema, params)
    close(stats, python_stats, rtol=1e-5, atol=1e-6)
    close(ema, python_ema, rtol=1e-5)
    close(averaging.constrained_mean(stats, lambda p: p), python_stats.mean, rtol=1e-5)


def test_validation():
    params = {"a": jnp.zeros(2)}
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        Window(0.0)
    with pytest.raises(ValueError, match="fraction"):
        Window(1.5)
    with pytest.raises(ValueError, match="num_blocks must be an integer >= 2"):
        Window(0.5, 1)
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\)"):
        EMA(1.0)
    with pytest.raises(ValueError, match="decay"):
        averaging.ema_init(params, 0.0)
    with pytest.raises(TypeError, match="average must be None, a fraction"):
        averaging.as_spec("last")
    assert averaging.as_spec(0.25) == Window(0.25)
    assert Window(0.1).length(1000) == 100 and Window(1e-6).length(10) == 1
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        averaging.init(params, 0)
    with pytest.raises(TypeError, match="block_size"):
        averaging.init(params, 2.0)
    with pytest.raises(ValueError, match="tree structure"):
        averaging.update(averaging.init(params), {"b": jnp.zeros(2)})
    with pytest.raises(TypeError, match="state must be"):
        averaging.update(params, params)
    with pytest.raises(TypeError, match="stats must be d3p.averaging.IterateStats"):
        averaging.variance(averaging.ema_init(params, 0.5))
    with pytest.raises(TypeError, match="constrain_fn must be callable"):
        averaging.constrained_mean(averaging.init(params), None)


# ---------------------------------------------------------------- DPSVI.run(average=...)


@pytest.fixture(scope="module")
def dpsvi():
    return DPSVI(
        model,
        AutoDiagonalNormal(model),
        Adam(0.05),
        Trace_ELBO(),
        clipping_threshold=1.0,
        dp_scale=1.0,
        rng_suite=debug,
    )


def run(dpsvi, steps, init_state=None, **options):
    x, y = data()
    return dpsvi.run(
        debug.PRNGKey(7),
        steps,
        x,
        y,
        q=0.1,
        delta=1e-5,
        progress_bar=False,
        init_state=init_state,
        **options,
    )


@pytest.mark.slow  # two compiled run programs (with and without averaging): 25-60 s
def test_run_averages_the_recorded_trace_and_changes_nothing_else(dpsvi):
    plain = run(dpsvi, 12)
    averaged = run(dpsvi, 12, average=Window(0.5, num_blocks=3))
    # post-processing: the same steps, state, losses and privacy
    assert jax.tree.structure(averaged.state) == jax.tree.structure(plain.state)
    close(steps(averaged.state), steps(plain.state), rtol=1e-6)  # history's counts included
    assert averaged.state.history.mechanisms == plain.state.history.mechanisms
    close(averaged.losses, plain.losses, rtol=1e-6)
    assert averaged.epsilon == plain.epsilon and averaged.delta == plain.delta
    assert plain.iterates is None
    # the trace, one step at a time (a continued run is the same run)
    state, trace = None, []
    for _ in range(12):
        state = run(dpsvi, 1, init_state=state).state
        trace.append(dpsvi.optim.get_params(state.optim_state))
    close(steps(state), steps(plain.state), rtol=1e-6)
    window = stack(trace[6:])
    stats = averaged.iterates
    assert int(stats.count) == 6 and int(stats.num_blocks) == 3
    close(stats.mean, {k: v.mean(0) for k, v in window.items()}, rtol=1e-5, atol=1e-6)
    close(stats.last, trace[-1], rtol=1e-6)
    close(averaging.variance(stats), {k: v.var(0, ddof=1) for k, v in window.items()}, rtol=1e-3)
    close(averaged.params, dpsvi.constrain_fn(stats.mean), rtol=1e-6)
    # continuing from the averaged run's state is continuing the last iterate
    continued = run(dpsvi, 2, init_state=averaged.state).state
    close(steps(continued), steps(run(dpsvi, 14).state), rtol=1e-6)


def test_run_refuses_a_bad_average(dpsvi):
    with pytest.raises(ValueError, match="fraction"):
        run(dpsvi, 5, average=2.0)


@pytest.mark.slow  # a third compiled program (about 20 s on 2 shared cores)
def test_run_ema_averages_the_recorded_trace(dpsvi):
    state, trace = None, []
    for _ in range(5):
        state = run(dpsvi, 1, init_state=state).state
        trace.append(dpsvi.optim.get_params(state.optim_state))
    ema = averaging.ema_init(trace[0], 0.7)
    for params in trace:
        ema = averaging.update(ema, params)
    result = run(dpsvi, 5, average=EMA(0.7))
    close(result.iterates.mean, ema.mean, rtol=1e-5, atol=1e-6)
    close(result.params, dpsvi.constrain_fn(ema.mean), rtol=1e-5)
