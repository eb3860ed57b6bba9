# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Minibatch draws: jitted cost against a plain ``randint`` + gather, flatness in N, and
the cost and memory of un-jitted calls from a Python loop (issue 13).

Tables:

* ``jitted``: ms per jitted ``get_batch`` (one-column float32 data set, gather
  included), expected batch 1000, structural size ``M`` the 0.999 quantile of
  Binomial(N, q), at N = 1e5 and 1e7. Rows: the secure Poisson draw
  (``d3p.random``), the same with ``d3p.random.debug``, fixed-size batches without
  replacement (``subsample_batchify_data``, ``M`` rows, secure), and the baselines
  ``jax.random.randint`` of ``M`` indices + gather (threefry, not secure: the
  target is a secure Poisson draw at most 4x this) and ``d3p.random.randint`` + gather
  (the secure generator's own cost). ``vs_randint`` is the ratio to the first
  baseline at the same N, ``vs_smallest_N`` to the same row at the smallest N
  (target within 2x). All rows of one N are timed interleaved.
* ``unjitted``: ms per call of ``get_batch`` called un-jitted in a Python loop (the
  first call, which compiles, excluded).
* ``memory``: resident set size before and after 10,000 un-jitted Poisson draws.
"""

from __future__ import annotations

import importlib
import time

import jax
import jax.numpy as jnp

import d3p.random
from benchmarks._common import block, format_table, time_interleaved
from d3p import minibatch

EXPECTED_BATCH = 1000
QUANTILE = 0.999


def _rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * __import__("os").sysconf("SC_PAGE_SIZE") / 2**20


def _draws(n: int) -> tuple[dict, int]:
    """Jitted draw callables of every row for ``n`` records, and the structural size."""
    q = EXPECTED_BATCH / n
    data = jnp.zeros((n, 1), jnp.float32)
    size = minibatch.structural_batch_size(n, q, QUANTILE)
    fns = {}
    for name in ("d3p.random", "d3p.random.debug"):
        suite = importlib.import_module(name)
        init, get_batch = minibatch.poisson_batchify_data((data,), q, size, rng_suite=suite)
        state = init(suite.PRNGKey(0))[1]
        fn = jax.jit(get_batch)
        fns[f"poisson {name}"] = lambda fn=fn, state=state: fn(1, state)
    init, get_batch = minibatch.subsample_batchify_data((data,), size)
    fn, state = jax.jit(get_batch), init(d3p.random.PRNGKey(0))[1]
    fns["subsample d3p.random"] = lambda fn=fn, state=state: fn(1, state)
    jkey, skey = jax.random.PRNGKey(0), d3p.random.PRNGKey(0)
    plain = jax.jit(lambda k: data[jax.random.randint(k, (size,), 0, n)])
    fns["randint+gather (jax.random)"] = lambda: plain(jkey)
    secure = jax.jit(lambda k: data[d3p.random.randint(k, (size,), 0, n)])
    fns["randint+gather (d3p.random)"] = lambda: secure(skey)
    return fns, size


def _jitted(sizes: tuple[int, ...], repeats: int) -> list[dict]:
    rows = []
    for n in sizes:
        fns, size = _draws(n)
        times = time_interleaved(fns, repeats=repeats, warmup=2)
        base = times["randint+gather (jax.random)"]
        for name, t in times.items():
            rows.append({"N": n, "M": size, "draw": name, "ms": t * 1e3, "vs_randint": t / base})
    smallest = {r["draw"]: r["ms"] for r in rows if r["N"] == sizes[0]}
    for r in rows:
        r["vs_smallest_N"] = r["ms"] / smallest[r["draw"]]
    return rows


def _per_call_ms(fn, calls: int) -> float:
    block(fn(0))  # compile
    start = time.perf_counter()
    for i in range(1, calls + 1):
        block(fn(i))
    return (time.perf_counter() - start) / calls * 1e3


def _unjitted(n: int, calls: int) -> list[dict]:
    data = (jnp.arange(n, dtype=jnp.float32),)
    q = EXPECTED_BATCH / n
    key = d3p.random.PRNGKey(0)
    makers = {
        "poisson_batchify_data": lambda: minibatch.poisson_batchify_data(data, q, QUANTILE),
        "subsample_batchify_data": lambda: minibatch.subsample_batchify_data(data, q=q),
        "split_batchify_data": lambda: minibatch.split_batchify_data(data, q=q),
    }
    rows = []
    for name, make in makers.items():
        init, get_batch = make()
        state = init(key)[1]
        draw_ms = _per_call_ms(lambda i, g=get_batch, s=state: g(i, s), calls)
        init_ms = _per_call_ms(lambda i, f=init: f(key), max(1, calls // 10))
        rows.append({"N": n, "batchifier": name, "get_batch_ms": draw_ms, "init_ms": init_ms})
    return rows


def _memory(n: int, calls: int) -> list[dict]:
    init, get_batch = minibatch.poisson_batchify_data(
        (jnp.arange(n, dtype=jnp.float32),), EXPECTED_BATCH / n, QUANTILE
    )
    state = init(d3p.random.PRNGKey(0))[1]
    for i in range(100):  # compile and warm the allocator
        block(get_batch(i, state))
    before = _rss_mb()
    for i in range(calls):
        block(get_batch(i, state))
    after = _rss_mb()
    return [{"N": n, "calls": calls, "rss_before_mb": before, "rss_after_mb": after,
             "growth_mb": after - before}]  # fmt: skip


def run(quick: bool) -> dict[str, list[dict]]:
    """The three tables (see the module docstring)."""
    sizes = (10**4, 10**5) if quick else (10**5, 10**7)
    return {
        "jitted draw, expected batch 1000": _jitted(sizes, repeats=20 if quick else 200),
        "un-jitted calls from a Python loop": _unjitted(10**5, 20 if quick else 500),
        "memory over un-jitted Poisson draws": _memory(10**5, 1000 if quick else 10_000),
    }


if __name__ == "__main__":
    for title, table in run(quick=False).items():
        print(f"-- {title}\n{format_table(table)}")
