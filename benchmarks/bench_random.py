# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Benchmark: d3p.random (ChaCha20 in JAX) against jax.random (threefry).

Rows: 32-bit words (``random_bits`` vs ``jax.random.bits``), standard normals
(``normal`` vs ``jax.random.normal``) and the hardened privacy-noise sampler
(``hardened_normal``, and d3p 0.3.0's ``hardened_normal_sum4``, against
``jax.random.normal``). Each function is jitted and
timed after compilation; ``ratio`` is d3p's time over the baseline's. Then
``hardened_normal`` against ``d3p.random.normal`` as DPSVI draws its noise: ``n``
values per step of a jitted loop, each step's draw summed (``baseline_s`` is
``normal``'s time per step). The last row times small ChaCha draws in a loop with the
double rounds unrolled and looped.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import d3p.random as dr
from benchmarks._common import format_table, time_call, time_interleaved
from d3p.random import chacha


def _row(name: str, n: int, ours, baseline, key, jax_key) -> dict:
    ours_t = time_call(lambda: ours(key))["median_s"]
    base_t = time_call(lambda: baseline(jax_key))["median_s"]
    return {
        "what": name,
        "n": n,
        "d3p_s": ours_t,
        "jax_s": base_t,
        "ratio": ours_t / base_t,
        "d3p_Msamples_per_s": n / ours_t / 1e6,
    }


def _noise_row(n: int, steps: int) -> dict:
    """``hardened_normal`` vs ``normal`` of ``n`` values per step inside a jitted loop."""
    key = dr.PRNGKey(0)

    def loop(sampler):
        def body(i, total):
            return total + jnp.sum(sampler(dr.fold_in(key, i), (n,)))

        return jax.jit(lambda: jax.lax.fori_loop(0, steps, body, 0.0))

    times = time_interleaved({"ours": loop(dr.hardened_normal), "base": loop(dr.normal)})
    return {
        "what": "hardened_normal vs d3p.random.normal, per step of a jitted loop",
        "n": n,
        "d3p_s": times["ours"] / steps,
        "baseline_s": times["base"] / steps,
        "ratio": times["ours"] / times["base"],
    }


def _unroll_row(num_blocks: int, steps: int) -> dict:
    """Small ChaCha draws inside a jitted loop, as in a DPSVI step: unrolled vs looped rounds.

    ``d3p.random`` unrolls the double rounds off CPU only (see ``chacha._block_words``);
    this row measures both choices on the current backend, compilation included.
    """
    row = {"what": f"{num_blocks} ChaCha blocks x {steps} steps: unrolled vs fori_loop"}
    for unroll, name in ((True, "unrolled"), (False, "looped")):

        def body(i, state, unroll=unroll):
            return chacha._blocks(state, num_blocks, unroll)[:16].reshape(4, 4)

        loop = jax.jit(lambda s, body=body: jax.lax.fori_loop(0, steps, body, s))
        start = time.perf_counter()
        jax.block_until_ready(loop(dr.PRNGKey(0)))
        row[f"{name}_compile_s"] = time.perf_counter() - start
        timing = time_call(lambda loop=loop: loop(dr.PRNGKey(0)))
        row[f"{name}_step_ms"] = 1e3 * timing["median_s"] / steps
    row["ratio"] = row["unrolled_step_ms"] / row["looped_step_ms"]
    return row


def run(quick: bool) -> list[dict]:
    """Time 10M draws (1M with ``quick``); one row per sampler."""
    n = 1_000_000 if quick else 10_000_000
    key = dr.PRNGKey(0)
    jax_key = jax.random.PRNGKey(0)
    return [
        _row(
            "random_bits(32) vs jax.random.bits",
            n,
            jax.jit(lambda k: dr.random_bits(k, 32, (n,))),
            jax.jit(lambda k: jax.random.bits(k, (n,), jnp.uint32)),
            key,
            jax_key,
        ),
        _row(
            "normal vs jax.random.normal",
            n,
            jax.jit(lambda k: dr.normal(k, (n,))),
            jax.jit(lambda k: jax.random.normal(k, (n,))),
            key,
            jax_key,
        ),
        _row(
            "hardened_normal vs jax.random.normal",
            n,
            jax.jit(lambda k: dr.hardened_normal(k, (n,))),
            jax.jit(lambda k: jax.random.normal(k, (n,))),
            key,
            jax_key,
        ),
        _row(
            "hardened_normal_sum4 (0.3.0) vs jax.random.normal",
            n,
            jax.jit(lambda k: dr.hardened_normal_sum4(k, (n,))),
            jax.jit(lambda k: jax.random.normal(k, (n,))),
            key,
            jax_key,
        ),
        # W3 of the svi section has 10,402 variational parameters
        *(_noise_row(size, 20 if quick else 100) for size in (10_000, 100_000, 1_000_000)),
        # a W1 DPSVI step draws about 51 blocks of noise words
        _unroll_row(64, 20 if quick else 200),
    ]


if __name__ == "__main__":
    import sys

    print(format_table(run(quick="--quick" in sys.argv)))
