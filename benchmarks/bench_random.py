# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Benchmark: d3p.random (ChaCha20 in JAX) against jax.random (threefry).

Rows: 32-bit words (``random_bits`` vs ``jax.random.bits``), standard normals
(``normal`` vs ``jax.random.normal``) and the hardened privacy-noise sampler
(``hardened_normal``, against ``jax.random.normal``). Each function is jitted and
timed after compilation; ``ratio`` is d3p's time over the baseline's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import d3p.random as dr
from benchmarks._common import format_table, time_call


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
    ]


if __name__ == "__main__":
    import sys

    print(format_table(run(quick="--quick" in sys.argv)))
