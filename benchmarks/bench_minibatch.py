# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Time one Poisson minibatch draw (expected batch 1000) as the data set grows.

Rows: ``d3p.minibatch.poisson_batchify_data`` with both rng suites, and the
d3p 0.2 approach as the baseline (one uniform per record from ``jax.random``,
then a sort to collect the selected indices; cost O(N log N) per step). The
structural batch size is the 0.999 quantile of Binomial(N, q), as a user would
choose it. Times are per ``get_batch`` call, jitted, including the gather of a
one-column float32 data set.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

from benchmarks._common import format_table, time_call
from d3p import minibatch

EXPECTED_BATCH = 1000
QUANTILE = 0.999
SUITES = ("d3p.random", "d3p.random.debug")


def _baseline(data: jax.Array, q: float, size: int):
    """d3p 0.2 style: a uniform per record, then sort the selected indices to the front."""
    n = data.shape[0]

    def get_batch(i, key):
        selected = jax.random.uniform(jax.random.fold_in(key, i), (n,)) < q
        idx = jnp.argsort(~selected, stable=True)[:size]
        mask = jnp.arange(size) < jnp.sum(selected)
        return jnp.where(mask[:, None], data[idx], 0.0), mask

    return jax.jit(get_batch), jax.random.PRNGKey(0)


def _d3p(data: jax.Array, q: float, suite_name: str):
    suite = importlib.import_module(suite_name)
    init, get_batch = minibatch.poisson_batchify_data((data,), q, QUANTILE, rng_suite=suite)
    return jax.jit(get_batch), init(suite.PRNGKey(0))[1]


def run(quick: bool) -> list[dict]:
    """One row per (N, sampler): ms per draw (median), ratio to baseline and to smallest N."""
    sizes = (10**4, 10**5) if quick else (10**5, 10**6, 10**7)
    repeats = 3 if quick else 20
    rows = []
    for n in sizes:
        q = EXPECTED_BATCH / n
        data = jnp.zeros((n, 1), jnp.float32)
        samplers = {suite: _d3p(data, q, suite) for suite in SUITES}
        fn, state = samplers[SUITES[0]]
        size = jax.eval_shape(fn, 1, state)[1].shape[0]
        fn, state = _baseline(data, q, size)
        base = time_call(lambda fn=fn, state=state: fn(1, state), repeats=repeats)["median_s"]
        rows.append({"N": n, "sampler": "d3p-0.2 baseline", "ms": base * 1e3, "vs_baseline": 1.0})
        for suite, (fn, state) in samplers.items():
            t = time_call(lambda fn=fn, state=state: fn(1, state), repeats=repeats)["median_s"]
            rows.append({"N": n, "sampler": suite, "ms": t * 1e3, "vs_baseline": t / base})
    smallest = {r["sampler"]: r["ms"] for r in rows if r["N"] == sizes[0]}
    for r in rows:
        r["vs_smallest_N"] = r["ms"] / smallest[r["sampler"]]
    return rows


if __name__ == "__main__":
    print(format_table(run(quick=False)))
