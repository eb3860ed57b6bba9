# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Clipping per-example gradients to an L2 norm and summing them (used by DPSVI).

Two ways to get the per-example norms: from materialised per-example gradients
(:func:`clip_and_sum`), or, for a mean-field guide, from per-example gradients with respect
to the shared global sample weighted by ``diag(J J^T)``, with the gradients of inputs that
meet the data in a ``dot_general`` never materialised (:func:`weighted_clipping`, see
:mod:`d3p._ghost`). In both, a row that is masked out or holds NaN/inf contributes nothing.
:func:`clipped_sum` is the engine DPSVI calls: it picks the way for a step, chunks the
batch and maps sums through the step's shared sample of the global latents
(:class:`GlobalSample`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from d3p._ghost import coordinatewise_support, plan_taps, tapped_eval

__all__ = [
    "GlobalSample",
    "add_examples_axis",
    "all_finite",
    "chunked_sum",
    "clip_and_sum",
    "clipped_sum",
    "linearised_global_sample",
    "weighted_clipping",
    "weighted_global_clipping",
]

# Default number of per-example gradient entries (rows x parameters) computed at once on CPU.
# Chunks of about 4 MiB (float32) stay in cache: 2-4x faster than one large batch for a
# 10,000-parameter model. On GPUs the sequential chunks were slower, so the default there is
# the whole batch.
_AUTO_CHUNK_ENTRIES = 2**20
# name of the vmapped axis of row groups in chunked_sum
_GROUP_AXIS = "d3p_row_groups"


def _dot(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
    # full float32/float64 precision: reduced-precision matmuls (e.g. TF32 on GPUs) would
    # round each clipped gradient to about 1e-3 relative error, enough to exceed C (the
    # norms themselves are elementwise reductions, always at full precision)
    return jnp.einsum(subscripts, a, b, precision=jax.lax.Precision.HIGHEST)


def _clip_factors(
    sq_norm: jax.Array,
    exact_rows: Callable,
    mask: jax.Array,
    c: float,
    dtype: Any,
    always_exact: bool = False,
    group_axis: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | bool]:
    """Clipping weights ``min(1, c / norm)`` of rows with squared norms ``sq_norm``.

    ``exact_rows()`` returns which rows have only finite entries and an upper bound on
    each row's norm; it runs only when some ``sq_norm`` is not finite (NaN/inf entries, or
    an overflowing sum), or always with ``always_exact`` (no branch: for code that is
    itself a rarely taken branch). Rows that are masked out or not finite get weight 0.
    Returns the weights, the contributing rows, and whether ``exact_rows`` was needed.
    ``group_axis``: the vmapped axis (of :func:`chunked_sum`) over which to agree on it.
    """
    rows = sq_norm.shape[0]
    if always_exact:
        any_bad = True  # static: no branch in the sums either
        finite, norm = exact_rows()
    else:
        any_bad = _any_over(jnp.any(~jnp.isfinite(sq_norm)), group_axis)
        finite, norm = jax.lax.cond(
            any_bad, exact_rows, lambda: (jnp.ones(rows, bool), jnp.sqrt(sq_norm))
        )
    ok = mask & finite
    return jnp.where(ok, jnp.minimum(1.0, c / norm), 0.0).astype(dtype), ok, any_bad


def _any_over(flag: jax.Array, group_axis: str | None) -> jax.Array:
    """``flag``, or whether it holds anywhere along the vmapped ``group_axis``."""
    if group_axis is None:
        return flag
    return jax.lax.pmax(flag.astype(jnp.int32), group_axis) > 0


def clip_and_sum(
    grads: Any,
    losses: jax.Array,
    mask: jax.Array,
    c: float,
    always_exact: bool = False,
    group_axis: str | None = None,
) -> tuple[Any, jax.Array, jax.Array]:
    """Clip per-example gradients (leading axis) to L2 norm ``c`` and sum the valid rows.

    A row contributes nothing if it is masked out or its gradient holds NaN or infinity
    (such valid rows are counted). ``always_exact``, ``group_axis``: see
    :func:`_clip_factors`. Returns
    the clipped sum (without the leading axis), the sum of the contributing rows' losses
    and the count.
    """
    rows = mask.shape[0]
    flat = [g.reshape(rows, -1) for g in jax.tree.leaves(grads)]
    sq_norm = sum((jnp.sum(g * g, axis=1) for g in flat), jnp.zeros(rows, losses.dtype))

    def exact_rows():
        finite = functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(g), 1) for g in flat])
        peak = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(g), 1) for g in flat])
        # huge but finite gradients overflow the sum of squares: bound the norm instead
        bound = peak * math.sqrt(sum(g.shape[1] for g in flat))
        return finite, jnp.where(jnp.isfinite(sq_norm), jnp.sqrt(sq_norm), bound)

    factor, ok, any_bad = _clip_factors(
        sq_norm, exact_rows, mask, c, losses.dtype, always_exact, group_axis
    )
    total = jax.tree.map(lambda g: _weighted_rows(factor, ok, any_bad, g), grads)
    loss_sum = jnp.sum(jnp.where(ok, losses, 0.0))
    return total, loss_sum, jnp.sum(mask & ~ok, dtype=jnp.int32)


def _weighted_rows(
    factor: jax.Array, ok: jax.Array, any_bad: jax.Array | bool, g: jax.Array
) -> Any:
    """``sum_b factor_b g_b`` over the leading axis, rows not ``ok`` left out entirely
    (``any_bad`` True: always by masking, no branch)."""
    rows = factor.shape[0]
    flat_g = g.reshape(rows, -1)
    if any_bad is True:
        total = _dot("b,bp->p", factor, jnp.where(ok[:, None], flat_g, 0))
        return total.reshape(g.shape[1:]).astype(g.dtype)
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


def chunked_sum(chunk: Callable, xs: Any, k: int, groups: int = 1) -> Any:
    """Sum of ``chunk(*x)`` over consecutive chunks of ``k`` rows of ``xs`` (zero-padded).

    Padded rows must be masked out by ``chunk`` (``xs`` carries the mask as last entry).
    With ``groups > 1``, ``chunk`` must take the keyword ``group_axis``.
    With ``groups > 1`` the rows are first split into that many equal consecutive groups,
    each chunked on its own and summed at the end: when the rows are sharded across
    ``groups`` devices, each device then sums its own rows and only the group sums are
    reduced across devices (the rows are never gathered).
    """
    if groups > 1:
        # a chunk's data-dependent branch must stay a branch under the vmap: chunks get
        # the axis's name to agree on their predicate across groups (jax.lax.pmax)
        grouped = functools.partial(chunk, group_axis=_GROUP_AXIS)
        split = jax.tree.map(lambda x: x.reshape(groups, -1, *x.shape[1:]), xs)
        partial = jax.vmap(lambda x: chunked_sum(grouped, x, k), axis_name=_GROUP_AXIS)(split)
        return jax.tree.map(lambda s: jnp.sum(s, 0, dtype=s.dtype), partial)
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


def _outer_sq_norm(x: jax.Array, d: jax.Array, w: jax.Array | None) -> jax.Array:
    """``sum_jk w_jk (x_bj d_bk)^2`` per row ``b``, never under-stated by underflow.

    ``w`` None means all weights 1: the norm is then ``|x_b|^2 |d_b|^2``, with no product
    of ``x^2`` and a weight matrix (a matrix product as large as the layer's own).

    ``x`` and ``d`` are squared separately, so a tiny ``x_bj`` whose square flushes to
    zero (XLA flushes subnormals) could hide a large product with a huge ``d_bk``. Each
    row is therefore scaled to a largest entry of 1 first, and the most the remaining
    flushed terms can add (each below the smallest normal float) is added back.

    With one free column (``d`` of shape (rows, 1)) the row's gradient ``x_b d_b`` is no
    larger than ``x`` itself: it is formed and squared in one pass, where only terms below
    the smallest normal float can flush (added back as above), so no scaling is needed.
    """
    tiny = jnp.finfo(x.dtype).tiny
    if d.shape[1] == 1:
        g = x * d
        if w is None:
            return jnp.sum(g * g, 1) + x.shape[1] * tiny
        flushed = w.size * tiny * jnp.maximum(1.0, jnp.max(w))
        return jnp.sum(w[:, 0] * g * g, 1) + flushed
    sx, sd = jnp.max(jnp.abs(x), 1), jnp.max(jnp.abs(d), 1)
    xs = x / jnp.where(sx > 0, sx, 1)[:, None]
    ds = d / jnp.where(sd > 0, sd, 1)[:, None]
    if w is None:
        flushed = x.shape[1] * d.shape[1] * tiny
        scaled = jnp.sum(xs * xs, 1) * jnp.sum(ds * ds, 1) + flushed
        return (sx * sd * jnp.sqrt(scaled)) ** 2
    flushed = w.size * tiny * jnp.maximum(1.0, jnp.max(w))
    scaled = jnp.sum(_dot("bc,cf->bf", xs * xs, w) * ds * ds, 1) + flushed
    return (sx * sd * jnp.sqrt(scaled)) ** 2


def _all_ones(w: Any) -> bool:
    """Whether ``w`` is a concrete array of ones (static: known while tracing)."""
    return isinstance(w, np.ndarray) and bool(np.all(w == 1))


def weighted_clipping(
    loss: Callable,
    diff: Any,
    weights: Any,
    banned: Any,
    example: tuple,
    c: float,
    mapping: Callable,
    trusted: Any = True,
    exact_by_rows: bool = False,
) -> tuple[Callable, int] | None:
    """Clipping of ``loss``'s per-example gradients w.r.t. ``diff``, norms weighted by ``weights``.

    ``loss(diff, example, index)`` is the loss of one example (arrays with a leading axis of
    size 1, as ``example``). Row ``i``'s clipping norm is ``sqrt(sum(weights * g_i**2))``
    over all leaves, where ``g_i`` is its gradient with respect to ``diff``: the norm of
    ``M g_i`` for the linear ``M = mapping`` with ``M^T M = diag(weights)``, which the
    caller guarantees. Weight leaves that are NumPy arrays of ones are used as such while
    tracing (no product with them). ``banned`` (bools like ``diff``) marks leaves the loss
    must not read.

    Book-keeping (Bu et al. 2023, arXiv:2210.00038): one backward pass over the chunk gives
    each row's dense gradients and, for inputs tapped by :func:`d3p._ghost.plan_taps`, the
    activations ``x`` and output gradients ``delta``; both the norms and the clipped sum
    ``M (sum_i w_i g_i)`` (one product with ``M``) are formed from them. Where that cannot
    be trusted (``trusted`` is False, a valid row's weighted norm is not finite, or the
    mapped sum is not finite), one data-dependent branch computes the chunk exactly from
    the same parts, without a second backward pass: it maps every row's gradient, rebuilt
    from ``x``, ``delta`` and the dense gradients, by ``M`` and clips the mapped gradients
    (:func:`clip_and_sum`); or, with ``exact_by_rows`` (for an ``M`` that keeps a sum of
    rows of weighted norm at most ``c`` finite, and weights that are always trusted:
    ``trusted`` must then be True), only drops the non-finite rows and bounds the norms
    that overflowed: the branch then forms the clipping factors only, and the sums are
    formed once after it.

    Returns ``(chunk, entries)``: ``chunk(example_rows, index, mask, group_axis=None)``
    (``group_axis``: see :func:`chunked_sum`) gives the mapped clipped sum, the
    contributing rows' loss sum and the count of valid rows with non-finite gradients;
    ``entries`` is the number of per-example values the fast path holds per row. None if
    a banned leaf is read.
    """
    if exact_by_rows and trusted is not True:
        raise ValueError("exact_by_rows needs weights that are always trusted (trusted=True)")
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
    # concrete all-one weights (NumPy arrays) are known while tracing: no product with them
    ghost_weights = [
        None if _all_ones(weight_leaves[g.leaf]) else g.leaf_matrix(weight_leaves[g.leaf])
        for g in ghosts
    ]
    dense_weights = [weight_leaves[i].reshape(-1) for i in plan.dense]
    mapped_entries = sum(math.prod(s.shape) for s in jax.tree.leaves(jax.eval_shape(mapping, diff)))

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

    def rebuilt(grads_i, xd_i):
        """Row ``i``'s gradient with respect to ``diff``, mapped by ``M``."""
        leaves = [jnp.zeros_like(leaf) for leaf in diff_leaves]
        for i, g in zip(plan.dense, grads_i, strict=True):
            leaves[i] = g
        for g, (x, d) in zip(ghosts, xd_i, strict=True):
            leaf = diff_leaves[g.leaf]
            leaves[g.leaf] = g.from_matrix(jnp.outer(x, d), leaf.shape).astype(leaf.dtype)
        return mapping(diff_def.unflatten(leaves))

    def mapped_rows_chunk(grads, xd, losses, mask):
        # (a loss that reads no leaf has no parts: the size is then the losses')
        mapped = jax.vmap(rebuilt, axis_size=losses.shape[0])(grads, xd)
        return clip_and_sum(mapped, losses, mask, c, always_exact=True)

    def book_sums(factor, rows_ok, grads, xd):
        """``M (sum_i factor_i g_i)`` over ``rows_ok``, from the book-kept parts; other rows
        are zeroed, so that not even their NaN reaches the sums."""
        rows, valid = factor.shape[0], rows_ok[:, None]
        sums = [jnp.zeros_like(leaf) for leaf in diff_leaves]
        for i, g in zip(plan.dense, grads, strict=True):
            g_rows = jnp.where(valid, g.reshape(rows, -1), 0)
            sums[i] = _dot("b,bp->p", factor, g_rows).reshape(g.shape[1:])
        for g, (x, d) in zip(ghosts, xd, strict=True):
            # the clipping factors scale the narrower side of the outer products
            if d.shape[1] <= x.shape[1]:
                d = d * factor[:, None]
            else:
                x = x * factor[:, None]
            x, d = jnp.where(valid, x, 0), jnp.where(valid, d, 0)
            sums[g.leaf] = g.from_matrix(_dot("bc,bf->cf", x, d), diff_leaves[g.leaf].shape)
        sums = [s.astype(leaf.dtype) for s, leaf in zip(sums, diff_leaves, strict=True)]
        return mapping(diff_def.unflatten(sums))

    def chunk(ex_args, index, mask, group_axis=None):
        losses, deltas, grads, others = jax.vmap(per_example)(jax.tree.leaves(ex_args), index)
        rows = mask.shape[0]
        xd = [g.rows(o, d) for g, o, d in zip(ghosts, others, deltas, strict=True)]
        sq_norm = jnp.zeros(rows, losses.dtype)
        for g, w in zip(grads, dense_weights, strict=True):
            sq_norm = sq_norm + jnp.sum(w * g.reshape(rows, -1) ** 2, 1)
        for (x, d), w in zip(xd, ghost_weights, strict=True):
            sq_norm = sq_norm + _outer_sq_norm(x, d, w)

        def exact_rows():
            """Which rows are finite, and bounds on their norms where the sum overflowed."""
            flat = [g.reshape(rows, -1) for g in grads]
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
                top, size = (1.0, x.shape[1] * d.shape[1]) if w is None else (jnp.max(w), w.size)
                bound = bound + peak(x) * peak(d) * jnp.sqrt(top * size)
            return finite, jnp.where(jnp.isfinite(sq_norm), jnp.sqrt(sq_norm), bound)

        if exact_by_rows:
            # rows clipped to c stay finite through M, and a row with a finite norm has
            # finite entries: only the clipping factors need a branch (for non-finite
            # norms), the sums are formed once after it
            factor, ok, _ = _clip_factors(
                sq_norm, exact_rows, mask, c, losses.dtype, group_axis=group_axis
            )
            loss_sum = jnp.sum(jnp.where(ok, losses, 0.0))
            return book_sums(factor, ok, grads, xd), loss_sum, jnp.sum(mask & ~ok, dtype=jnp.int32)

        # the fast path needs every valid row finite (rows are excluded only by the exact
        # branch)
        factor = jnp.where(mask, jnp.minimum(1.0, c / jnp.sqrt(sq_norm)), 0.0).astype(losses.dtype)
        fast = book_sums(factor, mask, grads, xd)
        bad = ~(trusted & jnp.all(jnp.isfinite(sq_norm) | ~mask) & all_finite(fast))

        def exact():
            parts = (grads, xd, losses, mask)
            k = _rows_per_chunk(None, rows, mapped_entries)
            return (
                mapped_rows_chunk(*parts) if k >= rows else chunked_sum(mapped_rows_chunk, parts, k)
            )

        return jax.lax.cond(
            _any_over(bad, group_axis),
            exact,
            lambda: (fast, jnp.sum(jnp.where(mask, losses, 0.0)), jnp.zeros((), jnp.int32)),
        )

    entries = sum(leaf.size for i, leaf in enumerate(diff_leaves) if i in plan.dense)
    return chunk, entries + sum(g.contracted + g.free for g in ghosts)


# --------------------------------------------------------------------------------------------
# The engine: clipped sums of a batch through the step's shared global sample
# --------------------------------------------------------------------------------------------


class GlobalSample(NamedTuple):
    """A step's shared sample ``v = g(params)`` of the global latents and its linear maps."""

    values: dict
    jvp: Callable  # tangent of params -> J_g t
    vjp: Callable  # cotangent of v -> J_g^T u


def linearised_global_sample(fn: Callable, params: Any) -> tuple[GlobalSample, jax.Array, Any]:
    """The global sample of ``fn(params) = (values, loss)`` with its linear maps, ``loss``
    and the gradient of ``loss``.

    One linearisation serves the products with ``J_g`` and ``J_g^T`` of the step and the
    gradient of the global term (the guide's forward pass runs once per step).
    """
    (values, loss), linear = jax.linearize(fn, params)

    def values_part(t):
        return linear(t)[0]

    # transposing each output's map on its own lets JAX skip the other's cotangent
    (grads,) = jax.linear_transpose(lambda t: linear(t)[1], params)(jnp.ones_like(loss))
    vjp = jax.linear_transpose(values_part, params)
    return GlobalSample(values, jvp=values_part, vjp=lambda u: vjp(u)[0]), loss, grads


def add_examples_axis(args: tuple) -> tuple:
    """(B, ...) -> (B, 1, ...): vmapping over axis 0 then yields batches of one example."""
    return tuple(None if a is None else a[:, None] for a in args)


def _rows_per_chunk(chunk_size: int | None, rows: int, entries_per_row: int) -> int:
    """Rows computed at once: ``chunk_size``, or by default on CPU about ``2**20``
    per-example entries, elsewhere all ``rows``."""
    if chunk_size is not None:
        return chunk_size
    if jax.default_backend() != "cpu":
        return rows
    return max(1, _AUTO_CHUNK_ENTRIES // max(1, entries_per_row))


def clipped_sum(
    example: Callable,
    params: Any,
    sample: GlobalSample | None,
    args: tuple,
    mask: jax.Array,
    c: float,
    chunk_size: int | None = None,
    weighted: bool = True,
    groups: int = 1,
) -> tuple[Any, jax.Array, jax.Array]:
    """Sum of per-example gradients clipped to L2 norm ``c``, loss sum and non-finite count.

    ``example(params, values, example_args, index)`` is the loss of one example (a batch of
    one, from :func:`add_examples_axis`); ``values`` are ``sample.values`` (None without a
    sample). The loss depends on the params directly and through the shared global sample
    ``v = g(params)``; the gradient that is clipped is the full ``d_params + J_g^T d_v``.
    Where ``weighted`` and the guide allow it (:func:`weighted_global_clipping`), the norms
    and the clipped sum ``sum_i w_i d_params_i + J_g^T (sum_i w_i d_v_i)`` (linearity) come
    from one backward pass per chunk, with one vector-Jacobian product of ``g`` per chunk,
    and an exact branch for chunks where that cannot be trusted (:func:`weighted_clipping`).
    Else the full gradients are formed, with one vector-Jacobian product per example, and
    clipped (:func:`clip_and_sum`).

    Rows where ``mask`` is False, or whose gradient holds NaN/inf, contribute nothing; the
    latter (valid rows) are counted. ``chunk_size`` rows are computed at a time (None: on
    CPU about 2**20 per-example entries per chunk, elsewhere the whole batch). ``groups``
    (dividing the batch size) is the number of devices the rows are sharded across: chunks
    are then formed within each device's rows (:func:`chunked_sum`).
    """
    values = None if sample is None else sample.values
    through_global = bool(jax.tree.leaves(values))

    def over_chunks(chunk, entries_per_row):
        rows = mask.shape[0] // groups
        k = _rows_per_chunk(chunk_size, rows, entries_per_row)
        return chunk(*xs) if k >= rows else chunked_sum(chunk, xs, k, groups)

    xs = (add_examples_axis(args), jnp.arange(mask.shape[0]), mask)
    built = weighted_global_clipping(example, params, sample, args, c) if weighted else None
    if built is not None:
        return over_chunks(*built)

    per_example = jax.vmap(jax.value_and_grad(example, argnums=(0, 1)), in_axes=(None, None, 0, 0))

    def full_chunk(ex_args, index, chunk_mask, group_axis=None):
        losses, (grads, d_values) = per_example(params, values, ex_args, index)
        if through_global:
            grads = jax.tree.map(jnp.add, grads, jax.vmap(sample.vjp)(d_values))
        return clip_and_sum(grads, losses, chunk_mask, c, group_axis=group_axis)

    num_params = sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(params))
    return over_chunks(full_chunk, num_params)


def weighted_global_clipping(
    example: Callable, params: Any, sample: GlobalSample | None, args: tuple, c: float
) -> tuple[Callable, int] | None:
    """The per-example clipping of :func:`clipped_sum` without per-example VJPs, if possible.

    For a guide whose global sample ``v = g(params)`` is coordinatewise in the params
    (:func:`d3p._ghost.coordinatewise_support`: mean-field guides with elementwise
    transforms), ``J_g J_g^T`` is diagonal, so the norm of the full per-example gradient
    ``M (d_params, d_v)`` with ``M = [I, J_g^T]`` is a weighted norm of ``(d_params, d_v)``
    with weights ``1`` and ``diag(J_g J_g^T)``, provided the data terms read no parameter
    that ``g`` reads. Returns the chunk function and its entries per row
    (:func:`weighted_clipping`, mapping by ``M``); None when any of this does not hold.
    """
    if sample is None:
        return None
    support = coordinatewise_support(sample.jvp, params)
    if support is None:
        return None
    values = sample.values
    # for coordinatewise g, J J^T 1 is diag(J J^T)
    gram_diag = sample.jvp(sample.vjp(jax.tree.map(jnp.ones_like, values)))
    # an entry below the smallest normal float may have been rounded or flushed to
    # zero, which would under-state norms: such steps take the exact branch instead
    precise = functools.reduce(
        jnp.logical_and,
        [jnp.all(a >= jnp.finfo(a.dtype).tiny) for a in jax.tree.leaves(gram_diag)],
        jnp.array(True),
    )
    leaves, treedef = jax.tree.flatten(params)
    offsets = np.cumsum([0, *(math.prod(jnp.shape(leaf)) for leaf in leaves)])
    read_by_g = [bool(support[a:b].any()) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

    def full_gradient(diff):
        d_params, d_values = diff
        if not jax.tree.leaves(values):
            return d_params
        return jax.tree.map(jnp.add, d_params, sample.vjp(d_values))

    return weighted_clipping(
        lambda diff, ex, i: example(diff[0], diff[1], ex, i),
        (params, values),
        (jax.tree.map(lambda p: np.ones(jnp.shape(p), p.dtype), params), gram_diag),
        (treedef.unflatten(read_by_g), jax.tree.map(lambda _: False, values)),
        tuple(None if a is None else a[:1] for a in args),
        c,
        mapping=full_gradient,
        # without global latents M is the identity on the params, whose weights are 1
        trusted=precise if jax.tree.leaves(values) else True,
        exact_by_rows=not jax.tree.leaves(values),
    )
