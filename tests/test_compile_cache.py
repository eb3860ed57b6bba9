# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Un-jitted calls in a Python loop reuse compiled programs (issue 13).

Each test makes a few hundred un-jitted calls after one warm-up call and bounds the
number of XLA compilations, not the time. Code that rebuilds a loop body per call
compiles once per call (hundreds); the bound allows a few extra compilations for
JAX-internal variants (e.g. weak types), far below one per call.
"""

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal
from numpyro.optim import Adam

import d3p.random
import d3p.random.debug
from d3p import minibatch as mb
from d3p.svi import DPSVI

CALLS = 100
MAX_COMPILES = 3

DATA = (np.arange(105) + 100, np.ones((105, 2), np.float32))


def _loop(fn, compile_counter):
    """Warm up ``fn(0)``, then return the compilations of ``CALLS`` more calls."""
    jax.block_until_ready(fn(0))
    before = compile_counter.count
    for i in range(1, CALLS + 1):
        jax.block_until_ready(fn(i))
    return compile_counter.count - before


@pytest.mark.parametrize("suite", [d3p.random, d3p.random.debug], ids=["secure", "debug"])
@pytest.mark.parametrize(
    "make",
    [
        lambda s: mb.poisson_batchify_data(DATA, 0.1, 30, rng_suite=s),
        lambda s: mb.poisson_batchify_data(DATA, 0.1, 30, "suppress", rng_suite=s),
        lambda s: mb.subsample_batchify_data(DATA, 10, rng_suite=s),
        lambda s: mb.subsample_batchify_data(DATA, 60, rng_suite=s, return_mask=True),
        lambda s: mb.split_batchify_data(DATA, 10, rng_suite=s),
    ],
    ids=["poisson", "poisson-suppress", "subsample", "subsample-large", "split"],
)
def test_batchifiers_compile_once(make, suite, compile_counter):
    key = suite.PRNGKey(3)
    init, get_batch = make(suite)
    _, state = init(key)
    assert _loop(lambda i: init(suite.fold_in(key, i)), compile_counter) <= MAX_COMPILES
    assert _loop(lambda i: get_batch(i, state), compile_counter) <= MAX_COMPILES


def test_new_batchifier_reuses_compiled_draw(compile_counter):
    """A fresh batchifier over data of the same shape compiles nothing new."""
    key = d3p.random.PRNGKey(0)

    def fresh(i):
        init, get_batch = mb.poisson_batchify_data((DATA[0] + i,), 0.1, 30)
        return get_batch(i, init(key)[1])

    assert _loop(fresh, compile_counter) <= MAX_COMPILES


@pytest.mark.parametrize(
    "suite, call",
    [
        (d3p.random, lambda s, k, i: s.split(k, 3)),
        (d3p.random, lambda s, k, i: s.fold_in(k, i)),
        (d3p.random, lambda s, k, i: s.random_bits(k, 32, (7,))),
        (d3p.random, lambda s, k, i: s.uniform(k, (7,))),
        (d3p.random, lambda s, k, i: s.normal(k, (7,))),
        (d3p.random, lambda s, k, i: s.hardened_normal(k, (7,))),
        (d3p.random, lambda s, k, i: s.randint(k, (7,), 0, 13)),
        (d3p.random, lambda s, k, i: s.randint(k, (7,), 0, i + 1)),
        (d3p.random, lambda s, k, i: s.convert_to_jax_rng_key(k)),
        (d3p.random.debug, lambda s, k, i: s.randint(k, (7,), 0, i + 1)),
    ],
    ids=[
        "split",
        "fold_in",
        "random_bits",
        "uniform",
        "normal",
        "hardened_normal",
        "randint",
        "randint-bounds",
        "convert",
        "debug-randint",
    ],
)
def test_random_functions_compile_once(suite, call, compile_counter):
    key = suite.PRNGKey(5)
    assert _loop(lambda i: call(suite, suite.fold_in(key, i), i), compile_counter) <= MAX_COMPILES


def _model(X, y=None, num_obs_total=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
    with numpyro.plate("batch", num_obs_total, subsample_size=X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)


def _dpsvi():
    # the debug suite compiles faster; the caching does not depend on the suite
    return DPSVI(
        _model,
        AutoDiagonalNormal(_model),
        Adam(1e-3),
        Trace_ELBO(),
        1.0,
        1.0,
        rng_suite=d3p.random.debug,
        expected_batch_size=8.0,
        num_obs_total=100,
    )


def test_dpsvi_update_and_evaluate_compile_once(compile_counter):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(16, 3)).astype(np.float32)
    batch = (X, (X[:, 0] > 0).astype(np.float32))
    mask = np.arange(16) < 10
    key = d3p.random.debug.PRNGKey(1)
    dpsvi = _dpsvi()
    state = dpsvi.init(key, *batch)

    def update(i):
        nonlocal state
        state, loss = dpsvi.update(state, *batch, mask=mask)
        return loss

    assert _loop(update, compile_counter) <= MAX_COMPILES
    evaluate = lambda i: dpsvi.evaluate(state, *batch, mask=mask)  # noqa: E731
    assert _loop(evaluate, compile_counter) <= MAX_COMPILES

    # the cached step must not keep a noise scale the user has changed: a new value is
    # a cache miss, so the step is traced again with it
    dpsvi.dp_scale = 0.5
    before = compile_counter.count
    jax.block_until_ready(dpsvi.update(state, *batch, mask=mask))
    assert compile_counter.count > before
