# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""The whole private training loop against numpyro's SVI (issue 17), on bench_svi's workloads.

Per workload (W1-W3 of :data:`benchmarks.bench_svi.WORKLOADS` with AutoDiagonalNormal,
and the networks W4 and W5 of bench_svi with their guides; Adam(1e-3), C = 2,
dp_scale = 1, secure generator and hardened noise), with the structural batch size ``B`` of
``DPSVI.run``'s default (the ``1 - 1e-6`` quantile of Binomial(N, q)):

* ``loop``: a jitted ``fori_loop`` whose step draws a secure Poisson batch
  (``d3p.minibatch.poisson_batchify_data``) and calls ``DPSVI.update``, against the same
  loop with ``numpyro.infer.SVI.update`` on a ``jax.random.randint`` batch of ``B`` rows
  (ms per step and ratio; target at most 2x).
* ``run``: ``DPSVI.run`` (no progress bar) per step, from the difference of runs of
  ``S`` and ``2 S`` steps with the persistent compilation cache on (each call traces and
  compiles anew; the cache and the difference leave the steps), and its ratio to the
  hand loop's per-step time measured the same way alongside, in CPU seconds (target
  within 10%).
* ``first``: wall-clock and process CPU seconds of the first call (tracing, compilation
  and one step) of each loop, with the number of steps a traced argument so the same
  program then runs the timed steps; and of ``DPSVI.run(num_steps=1)`` (initialisation
  and privacy accounting included; ``accounting_s`` is the accountant's part). The
  ratios to SVI's loop are of CPU seconds, which other jobs on a shared machine do not
  inflate (target at most 2.5x).
* stage rows: the hand loop's step cut after each stage, every prefix a jitted loop of
  its own that ends in the optimiser update (so no work is dropped, or hoisted out of
  the loop as invariant): the draw with its gather (``get_batch``, minus the optimiser
  timed alone), the global part, the per-example part (clipped sum), the noise, and the
  rest of ``DPSVI.update`` (normalising, loss, count), each the difference of two
  prefixes; and, timed alone, ``randint`` with its gather (SVI's batch) and SVI's
  backward pass (the gradient of numpyro's ELBO on a fixed batch, minus the optimiser):
  ``per_example_over_backward`` is the per-example part over it (target at most 1.3).

All loops of one workload are timed interleaved (:func:`benchmarks._common.time_interleaved`).
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from jax.experimental.compilation_cache import compilation_cache
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal

import d3p.random
from benchmarks._common import block, format_table, time_interleaved
from benchmarks.bench_svi import (
    CLIP,
    DP_SCALE,
    STEP_SIZE,
    empty_guide,
    load_vae_example,
    make_data,
    stax_bnn_model,
    workloads,
)
from d3p import _mechanism, minibatch
from d3p._clipping import clipped_sum
from d3p.svi import DPSVI

QUANTILE = 1 - 1e-6  # DPSVI.run's default structural batch size
DELTA = 1e-6


def _counted_loop(step):
    """``jit(state, n) -> state`` after ``n`` (traced) steps, so one program serves any n."""
    return jax.jit(lambda s, n: jax.lax.fori_loop(0, n, step, s))


def _seconds(fn) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``fn()`` (whose result is waited for)."""
    wall, cpu = time.perf_counter(), time.process_time()
    block(fn())
    return time.perf_counter() - wall, time.process_time() - cpu


def _run_seconds(dpsvi: DPSVI, data: tuple, q: float, num_steps: int) -> tuple[float, float]:
    """Wall-clock and CPU seconds of ``DPSVI.run`` (no progress bar) for ``num_steps`` steps."""
    key = d3p.random.PRNGKey(3)
    return _seconds(
        lambda: dpsvi.run(key, num_steps, *data, q=q, delta=DELTA, progress_bar=False).state
    )


def _checksum(batch) -> jax.Array:
    """A sum over every entry of ``batch``, so that a loop must gather all of it."""
    return sum(jnp.sum(a) for a in jax.tree.leaves(batch))


def _prefix_step(dpsvi, get_batch, batch_state, upto):
    """The hand loop's step cut after stage ``upto`` (0: draw and gather, 1: global part,
    2: clipped sum, 3: noise), then the optimiser on the gradient it has so far (plus
    1e-30 times the batch's checksum, so that no prefix skips the gather)."""

    def step(i, state):
        batch, mask = get_batch(i, batch_state)
        new_key, jax_key, noise_key, params, kwargs, layout = _mechanism._inputs(
            dpsvi, state, batch, {}
        )
        grads = jax.tree.map(jnp.zeros_like, params)
        if upto >= 1:
            sample, _, grads = _mechanism._linearised_global_part(
                dpsvi, params, jax_key, batch, kwargs, layout
            )
        if upto >= 2:

            def example(p, v, ex, j):
                obs_scale = state.observation_scale
                return _mechanism._example_loss(
                    dpsvi, p, v, jax_key, ex, kwargs, j, obs_scale, layout
                )

            grad_sum = clipped_sum(example, params, sample, batch, mask, CLIP)[0]
            if upto >= 3:
                noise = _mechanism._noise(dpsvi, noise_key, grad_sum)
                grad_sum = jax.tree.map(jnp.add, grad_sum, noise)
            grads = jax.tree.map(jnp.add, grads, grad_sum)
        check = 1e-30 * _checksum(batch)
        grads = jax.tree.map(lambda g: g + check, grads)
        # the next key as in DPSVI.update: with a fixed key, XLA would hoist the noise
        return state._replace(
            optim_state=_mechanism._optim_update(dpsvi.optim, grads, state.optim_state),
            rng_key=new_key,
        )

    return step


class _Workload(NamedTuple):
    """One workload's DPSVI, data and Poisson parameters, for the later ``run`` timings."""

    dpsvi: DPSVI
    data: tuple
    q: float
    loop: tuple  # the hand loop and its initial state


def workload_specs(quick: bool) -> list[tuple]:
    """(name, model, guide, data, q, static kwargs) of W1-W3 and the networks W4, W5."""
    specs = [
        (name, model, AutoDiagonalNormal(model), make_data(n, d), q, {"N": n})
        for name, model, n, d, q in workloads(quick)
    ]
    n = 5_000 if quick else 50_000
    specs.append(
        ("W4 stax 50-100-1", stax_bnn_model, empty_guide, make_data(n, 50), 0.01, {"N": n})
    )
    vae = load_vae_example()
    digits = jnp.asarray(vae.load_digits_binary(0)[0])
    kwargs = {"num_obs_total": len(digits)}
    specs.append(("W5 VAE 8x8 digits", vae.model, vae.guide, (digits,), 0.1, kwargs))
    return specs


def bench_workload(
    name, model, guide, data, q, kwargs, steps, repeats
) -> tuple[dict, dict, _Workload]:
    """The loop row (without the ``run`` steps) and the stage row of one workload."""
    n = data[0].shape[0]
    size = minibatch.structural_batch_size(n, q, QUANTILE)
    optim = numpyro.optim.Adam(STEP_SIZE)
    batch_init, get_batch = minibatch.poisson_batchify_data(data, q, size)
    _, batch_state = batch_init(d3p.random.PRNGKey(2))
    first_batch, _ = get_batch(0, batch_state)

    svi = SVI(model, guide, optim, Trace_ELBO(), **kwargs)
    svi_state = svi.init(jax.random.PRNGKey(0), *first_batch)
    jax_key = jax.random.PRNGKey(4)

    def randint_batch(i):
        idx = jax.random.randint(jax.random.fold_in(jax_key, i), (size,), 0, n)
        return tuple(a[idx] for a in data)

    def svi_step(i, s):
        return svi.update(s, *randint_batch(i))[0]

    dpsvi = DPSVI(
        model, guide, optim, Trace_ELBO(), CLIP, DP_SCALE, expected_batch_size=q * n, **kwargs
    )
    state = dpsvi.init(d3p.random.PRNGKey(1), *first_batch)

    def dpsvi_step(i, s):  # as a hand loop draws: from the state's key
        batch, m = get_batch(0, dpsvi.batch_key(s))
        return dpsvi.update(s, *batch, mask=m)[0]

    def svi_backward_step(i, s):  # SVI's forward and backward pass on a fixed batch
        params = svi.optim.get_params(s)
        grads = jax.grad(
            lambda p: Trace_ELBO().loss(
                jax.random.fold_in(jax_key, i),
                svi.constrain_fn(p),
                model,
                guide,
                *first_batch,
                **kwargs,
            )
        )(params)
        return svi.optim.update(grads, s)

    def optim_step(i, s):
        params = dpsvi.optim.get_params(s)
        return _mechanism._optim_update(dpsvi.optim, jax.tree.map(lambda p: 1e-3 * p, params), s)

    loops = {  # name -> (loop, initial state)
        "svi": (_counted_loop(svi_step), svi_state),
        "dpsvi": (_counted_loop(dpsvi_step), state),
        **{
            stage: (_counted_loop(_prefix_step(dpsvi, get_batch, batch_state, upto)), state)
            for upto, stage in enumerate(("draw", "global", "clip", "noise"))
        },
        "optim": (_counted_loop(optim_step), state.optim_state),
        "svi_backward": (_counted_loop(svi_backward_step), svi_state.optim_state),
        "randint": (_counted_loop(lambda i, c: c + _checksum(randint_batch(i))), 0.0),
    }
    # first call (trace, compile, one step); CPU seconds are what a quiet machine would
    # take (compilation runs on one thread), wall seconds include other jobs' load
    first = {key: _seconds(functools.partial(loop, s, 1)) for key, (loop, s) in loops.items()}
    ms = {
        key: 1e3 * t / steps
        for key, t in time_interleaved(
            {key: functools.partial(loop, s, steps) for key, (loop, s) in loops.items()},
            repeats,
        ).items()
    }
    run_first = _run_seconds(dpsvi, data, q, 1)
    # the same DPSVI again, same shapes: reuses the compiled chunk (issue 25)
    run_second = _run_seconds(dpsvi, data, q, 1)
    start = time.perf_counter()
    dpsvi.get_epsilon(DELTA, q, num_iter=1, dataset_size=n, max_batch_size=size)
    accounting = time.perf_counter() - start

    loop_row = {
        "workload": name,
        "N": n,
        "d": int(np.prod(data[0].shape[1:])),
        "B": size,
        "svi_ms": ms["svi"],
        "dpsvi_ms": ms["dpsvi"],
        "loop_ratio": ms["dpsvi"] / ms["svi"],
        "svi_first_s": first["svi"][0],
        "dpsvi_first_s": first["dpsvi"][0],
        "run_first_s": run_first[0],
        "svi_first_cpu_s": first["svi"][1],
        "dpsvi_first_cpu_s": first["dpsvi"][1],
        "run_first_cpu_s": run_first[1],
        "run_second_s": run_second[0],
        "compile_ratio": first["dpsvi"][1] / first["svi"][1],
        "run_compile_ratio": run_first[1] / first["svi"][1],
        "accounting_s": accounting,
    }
    stage_row = {
        "workload": name,
        "draw_gather_ms": ms["draw"] - ms["optim"],
        "global_ms": ms["global"] - ms["draw"],
        "per_example_ms": ms["clip"] - ms["global"],
        "noise_ms": ms["noise"] - ms["clip"],
        "optim_ms": ms["optim"],
        "rest_ms": ms["dpsvi"] - ms["noise"],
        "dpsvi_step_ms": ms["dpsvi"],
        "randint_gather_ms": ms["randint"],
        "svi_step_ms": ms["svi"],
        "svi_backward_ms": ms["svi_backward"] - ms["optim"],
        "per_example_over_backward": (ms["clip"] - ms["global"])
        / (ms["svi_backward"] - ms["optim"]),
    }
    return loop_row, stage_row, _Workload(dpsvi, data, q, loops["dpsvi"])


def _run_step_ms(work: _Workload, steps: int, repeats: int) -> tuple[float, float]:
    """Milliseconds per step of ``DPSVI.run`` and its ratio to the hand loop's.

    Each is the difference between calls of ``steps`` and ``2 * steps`` steps, median over
    ``repeats`` rounds that time the four calls in turn; ``run``'s programs are first put
    into the persistent compilation cache (its tracing and fixed costs per call remain,
    alike in both). Returns the wall-clock milliseconds of ``run`` and the ratio of the
    CPU times, which other jobs on a shared machine do not inflate.
    """
    for num_steps in (steps, 2 * steps):
        _run_seconds(*work[:3], num_steps)
    loop, state = work.loop
    walls, ratios = [], []
    for _ in range(repeats):
        hand = [_seconds(functools.partial(loop, state, k)) for k in (steps, 2 * steps)]
        ran = [_run_seconds(*work[:3], k) for k in (steps, 2 * steps)]
        walls.append(ran[1][0] - ran[0][0])
        ratios.append((ran[1][1] - ran[0][1]) / (hand[1][1] - hand[0][1]))
    return 1e3 * statistics.median(walls) / steps, statistics.median(ratios)


def run(quick: bool) -> dict[str, list[dict]]:
    """The loop table and the stage table of W1-W5 (quick: W1 only with N / 10, fewer steps)."""
    steps, repeats = (10, 3) if quick else (100, 5)
    run_seconds = 0.5 if quick else 2.0  # of steps per timed run call, to outweigh its jitter
    chosen = workload_specs(quick)
    chosen = chosen[:1] if quick else chosen
    rows = [bench_workload(*w, steps, repeats) for w in chosen]
    # only now, after every first-call timing: later compilations of a program come from disk
    with tempfile.TemporaryDirectory() as cache:
        compilation_cache.set_cache_dir(cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        compilation_cache.reset_cache()  # the choice "no cache" was made at the first compile
        for loop_row, _, work in rows:
            run_steps = max(steps, round(1e3 * run_seconds / loop_row["dpsvi_ms"]))
            loop_row["run_ms"], loop_row["run_over_loop"] = _run_step_ms(work, run_steps, repeats)
            loop_row["run_steps_per_s"] = 1e3 / loop_row["run_ms"]
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
    return {"loop": [r for r, _, _ in rows], "stages (ms per step)": [r for _, r, _ in rows]}


if __name__ == "__main__":
    import sys

    for title, table in run(quick="--quick" in sys.argv).items():
        print(f"\n{title}\n{format_table(table)}")
