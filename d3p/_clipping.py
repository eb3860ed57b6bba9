# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Clipping per-example gradients to an L2 norm and summing them (used by DPSVI).

Two ways to get the per-example norms: from materialised per-example gradients
(:func:`clip_and_sum`), or, for a mean-field guide, from per-example gradients with respect
to the shared global sample weighted by ``diag(J J^T)``, with the gradients of inputs that
meet the data in a ``dot_general`` never materialised (:func:`weighted_clipping`, see
:mod:`d3p._ghost`). In both, a row that is masked out or holds NaN/inf contributes nothing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from d3p._ghost import plan_taps, tapped_eval

__all__ = ["all_finite", "chunked_sum", "clip_and_sum", "weighted_clipping"]


def _dot(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
    # full float32/float64 precision: reduced-precision matmuls (e.g. TF32 on GPUs) would
    # round each clipped gradient to about 1e-3 relative error, enough to exceed C (the
    # norms themselves are elementwise reductions, always at full precision)
    return jnp.einsum(subscripts, a, b, precision=jax.lax.Precision.HIGHEST)


def _clip_factors(
    sq_norm: jax.Array, exact_rows: Callable, mask: jax.Array, c: float, dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Clipping weights ``min(1, c / norm)`` of rows with squared norms ``sq_norm``.

    ``exact_rows()`` returns which rows have only finite entries and an upper bound on
    each row's norm; it runs only when some ``sq_norm`` is not finite (NaN/inf entries, or
    an overflowing sum). Rows that are masked out or not finite get weight 0. Returns the
    weights, the contributing rows, and whether ``exact_rows`` was needed.
    """
    any_bad = jnp.any(~jnp.isfinite(sq_norm))
    rows = sq_norm.shape[0]
    finite, norm = jax.lax.cond(
        any_bad, exact_rows, lambda: (jnp.ones(rows, bool), jnp.sqrt(sq_norm))
    )
    ok = mask & finite
    return jnp.where(ok, jnp.minimum(1.0, c / norm), 0.0).astype(dtype), ok, any_bad


def clip_and_sum(
    grads: Any, losses: jax.Array, mask: jax.Array, c: float, parts: Any = None
) -> tuple[Any, jax.Array, jax.Array]:
    """Clip per-example gradients (leading axis) to L2 norm ``c`` and sum the valid rows.

    A row contributes nothing if it is masked out or its gradient holds NaN or infinity
    (such valid rows are counted). ``parts``, if given, is a tree of per-example arrays
    that a linear map sends to ``grads`` row by row; the clipping weights are then summed
    over ``parts`` instead of ``grads`` (the map applied to the result is the clipped sum;
    the caller must check that it is finite). Returns the weighted sum (of ``grads`` or
    ``parts``, without the leading axis), the sum of the contributing rows' losses and
    the count.
    """
    rows = mask.shape[0]
    flat = [g.reshape(rows, -1) for g in jax.tree.leaves(grads)]
    flat_parts = [] if parts is None else [g.reshape(rows, -1) for g in jax.tree.leaves(parts)]
    parts = grads if parts is None else parts
    sq_norm = sum((jnp.sum(g * g, axis=1) for g in flat), jnp.zeros(rows, losses.dtype))

    def exact_rows():
        entries = flat + flat_parts
        finite = functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(g), 1) for g in entries])
        peak = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(g), 1) for g in flat])
        # huge but finite gradients overflow the sum of squares: bound the norm instead
        bound = peak * math.sqrt(sum(g.shape[1] for g in flat))
        return finite, jnp.where(jnp.isfinite(sq_norm), jnp.sqrt(sq_norm), bound)

    factor, ok, any_bad = _clip_factors(sq_norm, exact_rows, mask, c, losses.dtype)
    part_sum = jax.tree.map(lambda g: _weighted_rows(factor, ok, any_bad, g), parts)
    loss_sum = jnp.sum(jnp.where(ok, losses, 0.0))
    return part_sum, loss_sum, jnp.sum(mask & ~ok, dtype=jnp.int32)


def _weighted_rows(factor: jax.Array, ok: jax.Array, any_bad: jax.Array, g: jax.Array) -> Any:
    """``sum_b factor_b g_b`` over the leading axis, rows not ``ok`` left out entirely."""
    rows = factor.shape[0]
    flat_g = g.reshape(rows, -1)
    # one cond per leaf: on XLA:CPU this kept W3 of benchmarks/bench_svi.py 1.8x faster
    # than a single cond over the whole tree (which changed how the producers fused)
    total = jax.lax.cond(
        any_bad,
        lambda: _dot("b,bp->p", factor, jnp.where(ok[:, None], flat_g, 0)),
        lambda: _dot("b,bp->p", factor, flat_g),
    )
    return total.reshape(g.shape[1:]).astype(g.dtype)


def all_finite(tree: Any) -> jax.Array:
    """Whether every entry of every leaf of ``tree`` is finite."""
    return functools.reduce(
        jnp.logical_and, [jnp.all(jnp.isfinite(t)) for t in jax.tree.leaves(tree)], True
    )


def chunked_sum(chunk: Callable, xs: Any, k: int) -> Any:
    """Sum of ``chunk(*x)`` over consecutive chunks of ``k`` rows of ``xs`` (zero-padded).

    Padded rows must be masked out by ``chunk`` (``xs`` carries the mask as last entry).
    """
    rows = xs[-1].shape[0]
    num_chunks = -(-rows // k)
    pad = num_chunks * k - rows

    def to_chunks(x):
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
        return x.reshape(num_chunks, k, *x.shape[1:])

    xs = jax.tree.map(to_chunks, xs)
    shapes = jax.eval_shape(chunk, *jax.tree.map(lambda x: x[0], xs))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(carry, x):
        return jax.tree.map(jnp.add, carry, chunk(*x)), None

    return jax.lax.scan(body, zeros, xs)[0]


def _outer_sq_norm(x: jax.Array, d: jax.Array, w: jax.Array) -> jax.Array:
    """``sum_jk w_jk (x_bj d_bk)^2`` per row ``b``, never under-stated by underflow.

    ``x`` and ``d`` are squared separately, so a tiny ``x_bj`` whose square flushes to
    zero (XLA flushes subnormals) could hide a large product with a huge ``d_bk``. Each
    row is therefore scaled to a largest entry of 1 first, and the most the remaining
    flushed terms can add (each below the smallest normal float) is added back.
    """
    sx, sd = jnp.max(jnp.abs(x), 1), jnp.max(jnp.abs(d), 1)
    xs = x / jnp.where(sx > 0, sx, 1)[:, None]
    ds = d / jnp.where(sd > 0, sd, 1)[:, None]
    tiny = jnp.finfo(w.dtype).tiny
    flushed = w.size * tiny * jnp.maximum(1.0, jnp.max(w))
    scaled = jnp.sum(_dot("bc,cf->bf", xs * xs, w) * ds * ds, 1) + flushed
    return (sx * sd * jnp.sqrt(scaled)) ** 2


def weighted_clipping(
    loss: Callable, diff: Any, weights: Any, banned: Any, example: tuple, c: float
) -> tuple[Callable, int] | None:
    """Clipping of ``loss``'s per-example gradients w.r.t. ``diff``, norms weighted by ``weights``.

    ``loss(diff, example, index)`` is the loss of one example (arrays with a leading axis of
    size 1, as ``example``). Row ``i``'s clipping norm is ``sqrt(sum(weights * g_i**2))``
    over all leaves, where ``g_i`` is its gradient with respect to ``diff``: the norm of
    ``M g_i`` for any linear ``M`` with ``M^T M = diag(weights)`` (the caller's map to the
    parameters). ``banned`` (bools like ``diff``) marks leaves the loss must not read.

    Returns ``(chunk, entries)``: ``chunk(example_rows, index, mask)`` gives the
    weighted sum like ``diff`` (to be mapped by ``M``; the caller checks it is finite), the
    contributing rows' loss sum and the count of valid rows with non-finite gradients, and
    ``entries`` is the number of per-example values a chunk holds per row. None if a banned
    leaf is read.
    """
    diff_leaves, diff_def = jax.tree.flatten(diff)
    weight_leaves = diff_def.flatten_up_to(weights)
    banned_leaves = diff_def.flatten_up_to(banned)
    n = len(diff_leaves)
    ex_leaves, ex_def = jax.tree.flatten(example)

    def flat_loss(*leaves):
        return loss(diff_def.unflatten(leaves[:n]), ex_def.unflatten(leaves[n:-1]), leaves[-1])

    # the index is traced with the dtype of the jnp.arange that the chunks receive
    closed = jax.make_jaxpr(flat_loss)(*diff_leaves, *ex_leaves, jnp.arange(1)[0])
    plan = plan_taps(closed, range(n))
    ghosts = plan.ghosts
    if any(banned_leaves[i] for i in (*plan.dense, *(g.leaf for g in ghosts))):
        return None
    taps = [closed.jaxpr.eqns[g.eqn].outvars[0].aval for g in ghosts]
    ghost_weights = [g.leaf_matrix(weight_leaves[g.leaf]) for g in ghosts]
    dense_weights = [weight_leaves[i].reshape(-1) for i in plan.dense]

    def per_example(ex_leaves_i, index):
        def tapped(tap_values, dense_values):
            inputs = [*diff_leaves, *ex_leaves_i, index]
            for pos, value in zip(plan.dense, dense_values, strict=True):
                inputs[pos] = value
            out, others = tapped_eval(
                plan, inputs, {g.eqn: t for g, t in zip(ghosts, tap_values, strict=True)}
            )
            return out, [others[g.eqn] for g in ghosts]

        zeros = [jnp.zeros(t.shape, t.dtype) for t in taps]
        dense = [diff_leaves[i] for i in plan.dense]
        (value, others), (deltas, grads) = jax.value_and_grad(tapped, (0, 1), has_aux=True)(
            zeros, dense
        )
        return value, deltas, grads, others

    def chunk(ex_args, index, mask):
        losses, deltas, grads, others = jax.vmap(per_example)(jax.tree.leaves(ex_args), index)
        rows = mask.shape[0]
        xd = [g.rows(o, d) for g, o, d in zip(ghosts, others, deltas, strict=True)]
        flat = [g.reshape(rows, -1) for g in grads]
        sq_norm = jnp.zeros(rows, losses.dtype)
        for g, w in zip(flat, dense_weights, strict=True):
            sq_norm = sq_norm + jnp.sum(w * g * g, 1)
        for (x, d), w in zip(xd, ghost_weights, strict=True):
            sq_norm = sq_norm + _outer_sq_norm(x, d, w)

        def exact_rows():
            entries = flat + [e for pair in xd for e in pair]
            finite = functools.reduce(
                jnp.logical_and,
                [jnp.all(jnp.isfinite(e), 1) for e in entries],
                jnp.ones(rows, bool),
            )

            def peak(e):
                return jnp.max(jnp.abs(e), 1)

            # huge but finite gradients overflow the weighted sum of squares: bound the
            # norm by the sum over leaves of (largest entry x sqrt(max weight x entries))
            bound = jnp.zeros(rows, losses.dtype)
            for g, w in zip(flat, dense_weights, strict=True):
                bound = bound + peak(g) * jnp.sqrt(jnp.max(w) * w.size)
            for (x, d), w in zip(xd, ghost_weights, strict=True):
                bound = bound + peak(x) * peak(d) * jnp.sqrt(jnp.max(w) * w.size)
            return finite, jnp.where(jnp.isfinite(sq_norm), jnp.sqrt(sq_norm), bound)

        factor, ok, any_bad = _clip_factors(sq_norm, exact_rows, mask, c, losses.dtype)
        sums = [jnp.zeros_like(leaf) for leaf in diff_leaves]
        for i, g in zip(plan.dense, grads, strict=True):
            sums[i] = _weighted_rows(factor, ok, any_bad, g)
        for g, (x, d) in zip(ghosts, xd, strict=True):
            x_w = jnp.where(ok[:, None], x, 0) * factor[:, None]
            total = _dot("bc,bf->cf", x_w, jnp.where(ok[:, None], d, 0))
            sums[g.leaf] = g.from_matrix(total, diff_leaves[g.leaf].shape).astype(
                diff_leaves[g.leaf].dtype
            )
        loss_sum = jnp.sum(jnp.where(ok, losses, 0.0))
        return diff_def.unflatten(sums), loss_sum, jnp.sum(mask & ~ok, dtype=jnp.int32)

    entries = sum(leaf.size for i, leaf in enumerate(diff_leaves) if i in plan.dense)
    return chunk, entries + sum(g.contracted + g.free for g in ghosts)
