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

The second table (``noise candidates``) times the constructions measured for issue 28
in the same loop, all interleaved with ``normal`` in every round, and reports the
median, lowest and highest ratio over the rounds: ``hardened_normal`` (Box-Muller
halves in the ChaCha block layout), the two-``erfinv`` sampler it replaced (two whole
words, one normal each, summed) in the stream layout and in the block layout, the
Box-Muller construction on stream-ordered words, ``hardened_normal_sum4`` and the two
words per value alone (the floor of any two-word construction).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import d3p.random as dr
from benchmarks._common import format_table, time_call, time_interleaved
from d3p.random import _sampling, chacha


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


def _erfinv_term(words: jax.Array) -> jax.Array:
    """The replaced sampler's term: ``±sqrt(2) erfinv(u)``, top bit the sign, ``u`` the
    other 31 bits rounded down to 24 significant bits times ``2**-31`` (float32)."""
    m = words & np.uint32(2**31 - 1)
    cut = jnp.maximum(np.uint32(32) - lax.clz(m), np.uint32(24)) - np.uint32(24)
    u = ((m >> cut) << cut).astype(jnp.float32) * np.float32(2.0**-31)
    magnitude = np.float32(np.sqrt(2)) * lax.erf_inv(u)
    return jnp.where(words >= np.uint32(2**31), -magnitude, magnitude)


def _erfinv_pair_stream(key, n: int) -> jax.Array:
    """The two-erfinv sampler of the 0.3.1 development versions (stream-ordered words)."""
    z = _erfinv_term(dr.random_bits(key, 32, (2, n)))
    return (z[0] + z[1]) * np.float32(np.sqrt(0.5))


def _erfinv_pair_blocks(key, n: int) -> jax.Array:
    """The same terms on the words in the ChaCha block layout (rows 0-7 and 8-15)."""
    z = _erfinv_term(chacha.stream_blocks(key, -(-n // 8)))
    return ((z[:8] + z[8:]) * np.float32(np.sqrt(0.5))).reshape(-1)[:n]


def _box_muller_stream(key, n: int) -> jax.Array:
    """``hardened_normal``'s arithmetic on stream-ordered words: row ``j`` holds stream
    words ``j b`` to ``(j + 1) b - 1`` (``random_bits``), as the replaced sampler read them."""
    return _sampling.hardened_normal(
        lambda k, b: dr.random_bits(k, 32, (16, b)), key, (n,), jnp.dtype(jnp.float32)
    )


def _words_only(key, n: int) -> jax.Array:
    """Two words per value in the block layout, converted to floats and nothing else."""
    return chacha.stream_blocks(key, -(-n // 8)).astype(jnp.float32)


_CANDIDATES = {
    "normal": lambda k, n: dr.normal(k, (n,), jnp.float32),
    "hardened_normal": lambda k, n: dr.hardened_normal(k, (n,), jnp.float32),
    "two erfinv, stream layout (replaced)": _erfinv_pair_stream,
    "two erfinv, block layout": _erfinv_pair_blocks,
    "Box-Muller, stream layout": _box_muller_stream,
    "hardened_normal_sum4": lambda k, n: dr.hardened_normal_sum4(k, (n,), jnp.float32),
    "2 words per value only": _words_only,
}


def _candidate_rows(n: int, steps: int, rounds: int) -> list[dict]:
    """Each noise construction against ``normal``, ``n`` values per step of a jitted loop.

    Every round times all candidates interleaved (``time_interleaved``, 3 repeats);
    the ratio to ``normal`` is taken within each round, and its median, minimum and
    maximum over the rounds are reported with the median time per step.
    """
    key = dr.PRNGKey(0)

    def loop(sampler):
        def body(i, total):
            return total + jnp.sum(sampler(dr.fold_in(key, i), n))

        return jax.jit(lambda: jax.lax.fori_loop(0, steps, body, jnp.float32(0.0)))

    fns = {name: loop(sampler) for name, sampler in _CANDIDATES.items()}
    per_round = [time_interleaved(fns, repeats=3) for _ in range(rounds)]
    rows = []
    for name in fns:
        ratios = [t[name] / t["normal"] for t in per_round]
        rows.append(
            {
                "what": name,
                "n": n,
                "ms_per_step": 1e3 * statistics.median(t[name] for t in per_round) / steps,
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
        )
    return rows


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


def run(quick: bool) -> dict[str, list[dict]]:
    """Time 10M draws (1M with ``quick``); one row per sampler. Then the noise candidates."""
    return {
        "d3p.random vs jax.random": _main_rows(quick),
        "noise candidates, per step of a jitted loop": [
            row
            for size, steps in ((10_000, 200), (100_000, 50), (1_000_000, 5))
            for row in _candidate_rows(size, steps // 4 if quick else steps, 3 if quick else 7)
        ],
    }


def _main_rows(quick: bool) -> list[dict]:
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

    if "--candidates" in sys.argv:  # only the noise candidates: --candidates N STEPS ROUNDS
        n, steps, rounds = map(int, sys.argv[sys.argv.index("--candidates") + 1 :][:3])
        print(format_table(_candidate_rows(n, steps, rounds)))
    else:
        for title, rows in run(quick="--quick" in sys.argv).items():
            print(title)
            print(format_table(rows))
