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
split). DPSVI uses its default per-example gradient chunking. The "no_noise" column is
DPSVI with ``dp_scale=0`` (everything but the hardened noise; not private). The "floor"
column is a hand-written JAX loop doing only what a per-example clipping step built on
materialised per-example gradients must do (see ``clip_floor``); DPSVI's weighted clipping
materialises none for the weight matrices, so it can beat it. d3p 0.2 on its old stack
measured 50x (W1), 13x (W2) and 170x (W3) SVI's time.

W4 and W5 are networks registered with ``numpyro.module`` (point-estimated weights, no
guide latents): W4 the 50-100-1 network of W3 written with ``jax.example_libraries.stax``,
W5 the VAE of ``examples/vae.py`` on the binarised 8x8 digits (batch 144 = q * N with
q = 0.1). Only SVI, DPSVI and DPSVI without noise are timed; ``ratio_vs_w3`` divides their
DPSVI/SVI ratio by W3's (target: at most 1.5).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.example_libraries import stax
from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal

import d3p.random
from benchmarks._common import format_table, time_interleaved
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


def stax_bnn_model(x, y, N, hidden=100):
    """W3's network as a stax module: weights are parameters (point estimates)."""
    net = stax.serial(stax.Dense(hidden), stax.Tanh, stax.Dense(1))
    logits = numpyro.module("net", net, (-1, x.shape[1]))(x)[:, 0]
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def empty_guide(x, y, N):
    pass


def load_vae_example():
    """examples/vae.py as a module (the examples directory is not a package)."""
    path = Path(__file__).resolve().parent.parent / "examples" / "vae.py"
    spec = importlib.util.spec_from_file_location("d3p_example_vae", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=d).astype(np.float32) / np.sqrt(d)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-x @ w))).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def _loop(update, state, steps):
    return jax.jit(lambda s: jax.lax.fori_loop(0, steps, lambda i, s: update(i, s), s))


def logistic_loss(z, x, y):
    """-log Bernoulli(y | sigmoid(x . w + b)) of one example, z = (w, b)."""
    logit = x @ z[:-1] + z[-1]
    return jnp.logaddexp(0.0, logit) - y * logit


def bnn_loss(z, x, y, hidden=100):
    """The same for bnn_model's network, z = (w1, b1, w2, b2) flattened."""
    d = x.shape[0]
    w1 = z[: d * hidden].reshape(d, hidden)
    b1, w2 = z[d * hidden : d * hidden + hidden], z[d * hidden + hidden : -1]
    logit = jnp.tanh(x @ w1 + b1) @ w2 + z[-1]
    return jnp.logaddexp(0.0, logit) - y * logit


def clip_floor(example_loss, num_latents, xb, yb, steps):
    """A jitted loop of the bare minimum of a private step on materialised gradients.

    Mean-field normal over the latents, one reparameterised sample ``z`` shared by the
    batch, per-example gradients of the likelihood with respect to ``z`` by ``vmap(grad)``,
    each example's norm over (loc, raw scale) from them (the guide is elementwise), clipping,
    sum, threefry noise, SGD; chunks of examples as DPSVI's default on CPU: no numpyro, no
    secure generator, no prior/entropy term. A floor for any DPSVI built on materialised
    per-example gradients, to read the DPSVI/SVI ratio against.
    """
    batch = xb.shape[0]
    k = max(1, min(batch, 2**20 // (2 * num_latents)))
    while batch % k:
        k -= 1
    chunks = (xb.reshape(batch // k, k, -1), yb.reshape(batch // k, k))
    per_example = jax.vmap(jax.grad(example_loss), (None, 0, 0))

    def step(i, state):
        loc, raw_scale, key = state
        key, eps_key, noise_key = jax.random.split(key, 3)
        eps = jax.random.normal(eps_key, (num_latents,))
        z = loc + jax.nn.softplus(raw_scale) * eps
        to_scale = eps * jax.nn.sigmoid(raw_scale)  # d z / d raw_scale
        weight = 1.0 + to_scale**2

        def chunk(total, xy):
            g = per_example(z, *xy)
            factor = jnp.minimum(1.0, CLIP / jnp.sqrt(jnp.sum(g * g * weight, 1)))
            return total + factor @ g, None

        g_sum = jax.lax.scan(chunk, jnp.zeros(num_latents), chunks)[0]
        noise = DP_SCALE * CLIP * jax.random.normal(noise_key, (2, num_latents))
        loc = loc - STEP_SIZE * (g_sum + noise[0])
        raw_scale = raw_scale - STEP_SIZE * (g_sum * to_scale + noise[1])
        return loc, raw_scale, key

    state = (jnp.zeros(num_latents), jnp.zeros(num_latents), jax.random.PRNGKey(0))
    return _loop(step, state, steps), state


def bench_workload(name, model, n, d, q, steps, repeats, whole_elbo):
    x, y = make_data(n, d)
    batch = int(round(q * n))
    xb, yb = x[:batch], y[:batch]
    guide = AutoDiagonalNormal(model)
    optim = numpyro.optim.Adam(STEP_SIZE)
    row = {"workload": name, "N": n, "d": d, "batch": batch}
    loops = {}  # column -> (jitted loop of `steps` updates, its initial state)

    svi = SVI(model, guide, optim, Trace_ELBO(), N=n)
    svi_state = svi.init(jax.random.PRNGKey(0), xb, yb)
    row["params"] = int(sum(v.size for v in jax.tree.leaves(svi.get_params(svi_state))))
    loops["svi"] = _loop(lambda i, s: svi.update(s, xb, yb)[0], svi_state, steps), svi_state

    dpsvi = DPSVI(model, guide, optim, Trace_ELBO(), CLIP, DP_SCALE, N=n)
    state = dpsvi.init(d3p.random.PRNGKey(1), xb, yb)
    loops["dpsvi"] = _loop(lambda i, s: dpsvi.update(s, xb, yb)[0], state, steps), state
    quiet = DPSVI(model, guide, optim, Trace_ELBO(), CLIP, 0.0, N=n)
    state_q = quiet.init(d3p.random.PRNGKey(1), xb, yb)
    loops["dpsvi_no_noise"] = (
        _loop(lambda i, s: quiet.update(s, xb, yb)[0], state_q, steps),
        state_q,
    )
    floor_loss = logistic_loss if model is logistic_model else bnn_loss
    loops["floor"] = clip_floor(floor_loss, row["params"] // 2, xb, yb, steps)

    batch_init, get_batch = poisson_batchify_data((x, y), q, 1 - 1e-6)
    _, batch_state = batch_init(d3p.random.PRNGKey(2))
    dpsvi_p = DPSVI(
        model, guide, optim, Trace_ELBO(), CLIP, DP_SCALE, expected_batch_size=q * n, N=n
    )
    state_p = dpsvi_p.init(d3p.random.PRNGKey(1), xb, yb)

    def poisson_step(i, s):
        (bx, by), mask = get_batch(i, batch_state)
        return dpsvi_p.update(s, bx, by, mask=mask)[0]

    loops["dpsvi_poisson"] = _loop(poisson_step, state_p, steps), state_p
    row["poisson_rows"] = int(get_batch(0, batch_state)[1].shape[0])

    if whole_elbo:
        dpsvi_w = DPSVI(model, guide, optim, TraceMeanField_ELBO(), CLIP, DP_SCALE, N=n)
        state_w = dpsvi_w.init(d3p.random.PRNGKey(1), xb, yb)
        whole_fn = _loop(lambda i, s: dpsvi_w.update(s, xb, yb)[0], state_w, steps)
        loops["whole_elbo"] = whole_fn, state_w

    return _time_loops(row, loops, steps, repeats)


def _time_loops(row: dict, loops: dict, steps: int, repeats: int) -> dict:
    """Time ``loops`` (column -> (jitted loop, state)) interleaved; per-step ms and ratios
    to the ``"svi"`` column go into ``row``."""
    seconds = time_interleaved(
        {col: functools.partial(fn, s) for col, (fn, s) in loops.items()}, repeats
    )
    for col, t in seconds.items():
        row[f"{col}_ms"] = 1e3 * t / steps
        if col != "svi":
            row[f"ratio_{col}"] = t / seconds["svi"]
    row["backend"] = jax.default_backend()
    return row


#: The workloads of issue 6: (name, model, N, d, q); shared with benchmarks/bench_loop.py.
WORKLOADS = (
    ("W1 logreg", logistic_model, 100_000, 100, 0.01),
    ("W2 logreg", logistic_model, 20_000, 1_000, 0.01),
    ("W3 BNN 50-100-1", bnn_model, 50_000, 50, 0.01),
)


def workloads(quick: bool) -> list[tuple]:
    """:data:`WORKLOADS`; with ``quick``, N divided by 10 and d at most 100."""
    if not quick:
        return list(WORKLOADS)
    return [(name, model, n // 10, min(d, 100), q) for name, model, n, d, q in WORKLOADS]


def bench_module_workload(name, model, guide, batch, n, kwargs, steps, repeats):
    """SVI, DPSVI and DPSVI without noise on one fixed ``batch`` of a model without guide
    latents for the network (numpyro.module weights), interleaved."""
    optim = numpyro.optim.Adam(STEP_SIZE)
    row = {"workload": name, "N": n, "d": int(batch[0].shape[1]), "batch": batch[0].shape[0]}
    loops = {}
    svi = SVI(model, guide, optim, Trace_ELBO(), **kwargs)
    svi_state = svi.init(jax.random.PRNGKey(0), *batch)
    row["params"] = int(sum(v.size for v in jax.tree.leaves(svi.get_params(svi_state))))
    loops["svi"] = _loop(lambda i, s: svi.update(s, *batch)[0], svi_state, steps), svi_state
    for col, dp_scale in (("dpsvi", DP_SCALE), ("dpsvi_no_noise", 0.0)):
        dpsvi = DPSVI(model, guide, optim, Trace_ELBO(), CLIP, dp_scale, **kwargs)
        state = dpsvi.init(d3p.random.PRNGKey(1), *batch)
        loops[col] = _loop(lambda i, s, d=dpsvi: d.update(s, *batch)[0], state, steps), state
    return _time_loops(row, loops, steps, repeats)


def module_workloads(quick: bool, steps: int, repeats: int) -> list[dict]:
    """W4 (W3's network through numpyro.module) and W5 (the VAE example)."""
    n, d = (5_000, 50) if quick else (50_000, 50)
    x, y = make_data(n, d)
    batch = int(round(0.01 * n))
    w4 = bench_module_workload(
        "W4 stax 50-100-1",
        stax_bnn_model,
        empty_guide,
        (x[:batch], y[:batch]),
        n,
        {"N": n},
        steps,
        repeats,
    )
    vae = load_vae_example()
    digits, _ = vae.load_digits_binary(0)
    batch = int(round(0.1 * len(digits)))
    w5 = bench_module_workload(
        "W5 VAE 8x8 digits",
        vae.model,
        vae.guide,
        (jnp.asarray(digits[:batch]),),
        len(digits),
        {"num_obs_total": len(digits)},
        steps,
        repeats,
    )
    return [w4, w5]


def run(quick: bool) -> list[dict]:
    """Time DPSVI vs SVI on W1-W5 (quick: smaller data, fewer steps, no whole-ELBO column)."""
    steps, repeats = (20, 3) if quick else (200, 5)
    rows = [
        bench_workload(name, model, n, d, q, steps, repeats, whole_elbo=not quick)
        for name, model, n, d, q in workloads(quick)
    ]
    w3_ratio = rows[-1]["ratio_dpsvi"]
    for row in module_workloads(quick, steps, repeats):
        row["ratio_vs_w3"] = row["ratio_dpsvi"] / w3_ratio
        rows.append(row)
    return rows


if __name__ == "__main__":
    import sys

    print(format_table(run(quick="--quick" in sys.argv)))
