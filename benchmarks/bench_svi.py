# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""DPSVI.update against numpyro.infer.SVI.update: time per step on the workloads of issue 6.

W1: Bayesian logistic regression, N = 100,000, d = 100, q = 0.01, AutoDiagonalNormal, Adam(1e-3),
C = 2, dp_scale = 1. W2: the same with d = 1,000, N = 20,000. W3: a Bayesian neural network
50-100-1 (5,201 weights, 10,402 variational parameters), N = 50,000, q = 0.01.

Both run ``steps`` updates inside one jitted ``lax.fori_loop`` on the same fixed batch of the
expected size q * N. DPSVI uses the secure generator (d3p.random, hardened noise). The
"poisson" column also draws a Poisson batch (d3p.minibatch, secure) inside the loop, with
the structural size at the 1 - 1e-6 quantile. The "whole-ELBO" column is the d3p 0.2 style
path (every example's entire ELBO vmapped, here via TraceMeanField_ELBO, which DPSVI does not
split). DPSVI uses its default per-example gradient chunking. The "floor" column (W1, W2)
is a hand-written JAX loop doing only what any per-example clipping step must do (see
``logistic_clip_floor``). d3p 0.2 on its old stack measured 50x (W1), 13x (W2) and 170x
(W3) SVI's time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal

import d3p.random
from benchmarks._common import format_table, time_call
from d3p.minibatch import poisson_batchify_data
from d3p.svi import DPSVI

CLIP, DP_SCALE, STEP_SIZE = 2.0, 1.0, 1e-3


def logistic_model(x, y, N):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(x.shape[1]), 1.0).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=x @ w + b), obs=y)


def bnn_model(x, y, N, hidden=100):
    d = x.shape[1]
    w1 = numpyro.sample("w1", dist.Normal(jnp.zeros((d, hidden)), 1.0).to_event(2))
    b1 = numpyro.sample("b1", dist.Normal(jnp.zeros(hidden), 1.0).to_event(1))
    w2 = numpyro.sample("w2", dist.Normal(jnp.zeros(hidden), 1.0).to_event(1))
    b2 = numpyro.sample("b2", dist.Normal(0.0, 1.0))
    logits = jnp.tanh(x @ w1 + b1) @ w2 + b2
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def make_data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=d).astype(np.float32) / np.sqrt(d)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-x @ w))).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def _loop(update, state, steps):
    return jax.jit(lambda s: jax.lax.fori_loop(0, steps, lambda i, s: update(i, s), s))


def _per_step(fn, state, steps, repeats):
    return time_call(lambda: fn(state), repeats=repeats)["median_s"] / steps


def logistic_clip_floor(xb, yb, steps):
    """A jitted loop of the bare minimum of a private step of W1/W2, written by hand in JAX.

    Mean-field normal over (w, b), one reparameterised sample, per-example gradients of the
    likelihood by ``vmap(grad)``, clipping, sum, threefry noise, SGD: no numpyro, no secure
    generator, no prior/entropy term. A floor for any DPSVI built on materialised
    per-example gradients, to read the DPSVI/SVI ratio against.
    """
    d = xb.shape[1]

    def example_loss(loc, raw_scale, eps, x, y):
        z = loc + jax.nn.softplus(raw_scale) * eps
        logit = x @ z[:d] + z[d]
        return jnp.logaddexp(0.0, logit) - y * logit

    per_example = jax.vmap(jax.grad(example_loss, (0, 1)), (None, None, None, 0, 0))

    def step(i, state):
        loc, raw_scale, key = state
        key, eps_key, noise_key = jax.random.split(key, 3)
        eps = jax.random.normal(eps_key, (d + 1,))
        g_loc, g_scale = per_example(loc, raw_scale, eps, xb, yb)
        norm = jnp.sqrt(jnp.sum(g_loc**2, 1) + jnp.sum(g_scale**2, 1))
        factor = jnp.minimum(1.0, CLIP / norm)
        noise = DP_SCALE * CLIP * jax.random.normal(noise_key, (2, d + 1))
        loc = loc - STEP_SIZE * (factor @ g_loc + noise[0])
        raw_scale = raw_scale - STEP_SIZE * (factor @ g_scale + noise[1])
        return loc, raw_scale, key

    state = (jnp.zeros(d + 1), jnp.zeros(d + 1), jax.random.PRNGKey(0))
    return _loop(step, state, steps), state


def bench_workload(name, model, n, d, q, steps, repeats, whole_elbo):
    x, y = make_data(n, d)
    batch = int(round(q * n))
    xb, yb = x[:batch], y[:batch]
    guide = AutoDiagonalNormal(model)
    optim = numpyro.optim.Adam(STEP_SIZE)
    row = {"workload": name, "N": n, "d": d, "batch": batch}

    svi = SVI(model, guide, optim, Trace_ELBO(), N=n)
    svi_state = svi.init(jax.random.PRNGKey(0), xb, yb)
    row["params"] = int(sum(v.size for v in jax.tree.leaves(svi.get_params(svi_state))))
    svi_fn = _loop(lambda i, s: svi.update(s, xb, yb)[0], svi_state, steps)
    svi_t = _per_step(svi_fn, svi_state, steps, repeats)
    row["svi_ms"] = 1e3 * svi_t

    dpsvi = DPSVI(model, guide, optim, Trace_ELBO(), CLIP, DP_SCALE, N=n)
    state = dpsvi.init(d3p.random.PRNGKey(1), xb, yb)
    dp_fn = _loop(lambda i, s: dpsvi.update(s, xb, yb)[0], state, steps)
    row["dpsvi_ms"] = 1e3 * _per_step(dp_fn, state, steps, repeats)
    row["ratio"] = row["dpsvi_ms"] / row["svi_ms"]
    if model is logistic_model:
        floor_fn, floor_state = logistic_clip_floor(xb, yb, steps)
        row["floor_ms"] = 1e3 * _per_step(floor_fn, floor_state, steps, repeats)
        row["ratio_floor"] = row["floor_ms"] / row["svi_ms"]

    batch_init, get_batch = poisson_batchify_data((x, y), q, 1 - 1e-6)
    _, batch_state = batch_init(d3p.random.PRNGKey(2))
    dpsvi_p = DPSVI(
        model, guide, optim, Trace_ELBO(), CLIP, DP_SCALE, expected_batch_size=q * n, N=n
    )
    state_p = dpsvi_p.init(d3p.random.PRNGKey(1), xb, yb)

    def poisson_step(i, s):
        (bx, by), mask = get_batch(i, batch_state)
        return dpsvi_p.update(s, bx, by, mask=mask)[0]

    poisson_fn = _loop(poisson_step, state_p, steps)
    row["poisson_rows"] = int(get_batch(0, batch_state)[1].shape[0])
    row["dpsvi_poisson_ms"] = 1e3 * _per_step(poisson_fn, state_p, steps, repeats)
    row["ratio_poisson"] = row["dpsvi_poisson_ms"] / row["svi_ms"]

    if whole_elbo:
        dpsvi_w = DPSVI(model, guide, optim, TraceMeanField_ELBO(), CLIP, DP_SCALE, N=n)
        state_w = dpsvi_w.init(d3p.random.PRNGKey(1), xb, yb)
        whole_fn = _loop(lambda i, s: dpsvi_w.update(s, xb, yb)[0], state_w, steps)
        row["whole_elbo_ms"] = 1e3 * _per_step(whole_fn, state_w, steps, repeats)
        row["ratio_whole_elbo"] = row["whole_elbo_ms"] / row["svi_ms"]
    row["backend"] = jax.default_backend()
    return row


def run(quick: bool) -> list[dict]:
    """Time DPSVI vs SVI on W1-W3 (quick: smaller data, fewer steps, no whole-ELBO column)."""
    steps, repeats = (20, 3) if quick else (200, 5)
    scale = 10 if quick else 1
    workloads = [
        ("W1 logreg", logistic_model, 100_000 // scale, 100, 0.01),
        ("W2 logreg", logistic_model, 20_000 // scale, 1_000 // scale, 0.01),
        ("W3 BNN 50-100-1", bnn_model, 50_000 // scale, 50, 0.01),
    ]
    return [
        bench_workload(name, model, n, d, q, steps, repeats, whole_elbo=not quick)
        for name, model, n, d, q in workloads
    ]


if __name__ == "__main__":
    import sys

    print(format_table(run(quick="--quick" in sys.argv)))
