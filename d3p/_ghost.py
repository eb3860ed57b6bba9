# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Per-example gradient norms without per-example gradients, by reading the jaxpr.

Used by :class:`d3p.svi.DPSVI`. Two structural facts, each established from the jaxpr of a
function (never from values, and conservatively: anything not recognised means "no"):

* :func:`coordinatewise_support`: every output entry of the guide's map from variational
  parameters to the global sample depends on its own set of parameter entries, disjoint
  from every other output entry's set (a mean-field guide with elementwise transforms).
  Then ``J J^T`` is diagonal, and the norm of ``J^T d`` is ``sqrt(sum_j a_j d_j^2)`` with
  ``a = diag(J J^T) = J J^T 1``: two passes of the guide per step, not one per example.
  DPSVI analyses the guide's linearisation ``t -> J t``, the map autodiff applies, so
  custom derivative rules are judged by what they compute.
* :func:`plan_taps`: an input of the per-example loss that reaches the loss only as one
  operand of one ``dot_general`` whose other operand, for a single example, is a vector
  ``x`` (every free dimension of size 1). Its per-example gradient is then the outer
  product of ``x`` and ``delta``, the gradient of the loss with respect to that
  ``dot_general``'s output, so its weighted squared norm is ``(x^2)^T A (delta^2)`` and the
  weighted sum over examples is ``X^T diag(w) Delta``: no ``examples x weights`` array.
  ``delta`` is obtained by adding a zero "tap" to the ``dot_general``'s output and
  differentiating with respect to the tap (Goodfellow 2015, "Efficient per-example gradient
  computations", arXiv:1510.01799, for the outer-product form).

Every other input the loss uses gets its per-example gradient in full ("dense").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, Var

__all__ = ["GhostDot", "TapPlan", "coordinatewise_support", "plan_taps", "tapped_eval"]

# primitives that act entry by entry (output entry i reads only input entries i, after
# broadcasting scalars)
_ELEMENTWISE = frozenset(
    "abs acos acosh add add_any asin asinh atan atan2 atanh cbrt ceil clamp "
    "convert_element_type copy copy_p cos cosh digamma div erf erf_inv erfc exp exp2 "
    "expm1 floor igamma igammac "
    "integer_pow is_finite lgamma log log1p logistic max min mul neg nextafter pow "
    "reduce_precision rem round rsqrt select_n sign sin sinh sqrt square sub tan tanh "
    "eq ne lt le gt ge and or not xor".split()
)
# primitives that wrap a jaxpr called on the same operands (custom-derivative calls are
# judged by their primal; a linearisation has their derivative rules inlined already)
_CALLS = frozenset(
    {"jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint"}
    | {"custom_jvp_call", "custom_vjp_call"}
)


class _Unsupported(Exception):
    """The jaxpr uses something the structural analysis does not recognise."""


def _inner(eqn: Any) -> tuple[Jaxpr, list] | None:
    """(jaxpr, consts) called by a call-like ``eqn`` on its operands, else None."""
    name = eqn.primitive.name
    if name not in _CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = eqn.params.get(key)
        if isinstance(inner, ClosedJaxpr):
            inner, consts = inner.jaxpr, list(inner.consts)
        elif isinstance(inner, Jaxpr):
            consts = []
        else:
            continue
        if len(inner.invars) == len(eqn.invars) and len(inner.outvars) == len(eqn.outvars):
            return inner, consts
    return None


def _live(jaxpr: Jaxpr) -> list[bool]:
    """Which equations contribute to the outputs (effects are ignored: values only)."""
    needed = {v for v in jaxpr.outvars if isinstance(v, Var)}
    live = [False] * len(jaxpr.eqns)
    for i in reversed(range(len(jaxpr.eqns))):
        eqn = jaxpr.eqns[i]
        if any(v in needed for v in eqn.outvars):
            live[i] = True
            needed.update(v for v in eqn.invars if isinstance(v, Var))
    return live


# ----------------------------------------------------------------- coordinatewise guides


def _broadcast_in_dim(m: np.ndarray, shape: Sequence[int], dims: Sequence[int]) -> np.ndarray:
    expanded = [1] * len(shape)
    for axis, size in zip(dims, m.shape, strict=True):
        expanded[axis] = size
    return np.broadcast_to(m.reshape(expanded), tuple(shape))


def _structural(eqn: Any, maps: list[np.ndarray | None]) -> np.ndarray:
    """Apply a data-movement primitive to integer index arrays (numpy, no tracing)."""
    name, p = eqn.primitive.name, eqn.params
    out_shape = eqn.outvars[0].aval.shape
    if name == "concatenate":
        parts = [
            np.full(v.aval.shape, -1) if m is None else m
            for v, m in zip(eqn.invars, maps, strict=True)
        ]
        return np.concatenate(parts, axis=p["dimension"])
    (m,) = maps
    if name == "reshape" and p.get("dimensions") is None:
        return m.reshape(out_shape)
    if name == "squeeze":
        return m.reshape(out_shape)
    if name == "transpose":
        return np.transpose(m, p["permutation"])
    if name == "broadcast_in_dim":
        return _broadcast_in_dim(m, p["shape"], p["broadcast_dimensions"])
    if name == "slice":
        strides = p["strides"] or (1,) * m.ndim
        index = tuple(
            slice(a, b, s)
            for a, b, s in zip(p["start_indices"], p["limit_indices"], strides, strict=True)
        )
        return m[index]
    if name == "rev":
        return np.flip(m, p["dimensions"])
    raise _Unsupported(name)


_STRUCTURAL = frozenset(
    {"concatenate", "reshape", "squeeze", "transpose", "broadcast_in_dim", "slice", "rev"}
)


def _merge(maps: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    unique: dict[bytes, np.ndarray] = {}
    for m in maps:
        unique.setdefault(m.tobytes() + bytes(str(m.shape), "ascii"), m)
    return tuple(unique.values())


def _index_maps(jaxpr: Jaxpr, consts_maps: list, in_maps: list) -> list:
    """Propagate, per variable, the parameter entries each of its entries depends on.

    A variable's value is a tuple of integer arrays of its shape (entry = global index of
    a parameter entry it depends on, -1 = none), or None when it depends on no parameter.
    """
    env: dict[Var, Any] = {}
    for v, m in zip(jaxpr.constvars, consts_maps, strict=True):
        env[v] = m
    for v, m in zip(jaxpr.invars, in_maps, strict=True):
        env[v] = m

    def read(v: Any) -> Any:
        return None if isinstance(v, Literal) else env.get(v)

    for eqn, live in zip(jaxpr.eqns, _live(jaxpr), strict=True):
        if not live:
            continue
        ins = [read(v) for v in eqn.invars]
        if all(m is None for m in ins):
            for v in eqn.outvars:
                env[v] = None
            continue
        inner = _inner(eqn)
        name = eqn.primitive.name
        if inner is not None:
            outs = _index_maps(inner[0], [None] * len(inner[1]), ins)
        elif name in _ELEMENTWISE:
            shape = eqn.outvars[0].aval.shape
            try:
                merged = [np.broadcast_to(a, shape) for m in ins if m is not None for a in m]
            except ValueError as err:
                raise _Unsupported(name) from err
            outs = [_merge(merged)]
        elif name in _STRUCTURAL:
            width = max(len(m) for m in ins if m is not None)
            outs = [
                _merge(
                    [
                        _structural(eqn, [None if m is None else m[k % len(m)] for m in ins])
                        for k in range(width)
                    ]
                )
            ]
        else:
            raise _Unsupported(name)
        for v, m in zip(eqn.outvars, outs, strict=True):
            env[v] = m
    return [read(v) for v in jaxpr.outvars]


def coordinatewise_support(fn: Any, *args: Any) -> np.ndarray | None:
    """Which input entries ``fn``'s outputs depend on, if the dependence is coordinatewise.

    Returns a boolean array over the entries of ``jax.tree.leaves(args)`` (concatenated,
    flattened) marking the entries some output depends on, provided that no input entry
    feeds more than one output entry; otherwise (or if the jaxpr holds anything the
    analysis does not recognise) None. Structural: an entry counts as a dependency whenever
    the computation reads it, whatever its value.
    """
    closed = jax.make_jaxpr(fn)(*args)
    sizes = [math.prod(v.aval.shape) for v in closed.jaxpr.invars]
    offsets = np.cumsum([0, *sizes])
    in_maps = [
        (np.arange(o, o + n).reshape(v.aval.shape),)
        for v, o, n in zip(closed.jaxpr.invars, offsets[:-1], sizes, strict=True)
    ]
    try:
        out_maps = _index_maps(closed.jaxpr, [None] * len(closed.consts), in_maps)
    except _Unsupported:
        return None
    entry_offset = 0
    owner = np.full(offsets[-1], -1)  # input entry -> the output entry that reads it
    for v, maps in zip(closed.jaxpr.outvars, out_maps, strict=True):
        size = math.prod(v.aval.shape)
        if maps is not None:
            entries = np.arange(entry_offset, entry_offset + size)
            for m in maps:
                flat = m.reshape(-1)
                used = flat >= 0
                taken = owner[flat[used]]
                if np.any((taken >= 0) & (taken != entries[used])):
                    return None
                # an input entry read twice by one output entry is fine; by two is not
                pairs = np.unique(np.stack([flat[used], entries[used]]), axis=1)
                if len(np.unique(pairs[0])) != pairs.shape[1]:
                    return None
                owner[flat[used]] = entries[used]
        entry_offset += size
    return owner >= 0


# ----------------------------------------------------------------- taps on dot_general


class GhostDot(NamedTuple):
    """How input ``leaf`` meets the example data in equation ``eqn`` (a ``dot_general``).

    ``side`` is the leaf's operand position (0 or 1); the other operand, per example, has
    only size-1 free dimensions. ``leaf_perm`` orders the leaf's axes as (contracted axes
    in contraction order, free axes), ``other_perm`` the other operand's axes as
    (contracted axes in the same order, its free axes).
    """

    leaf: int
    eqn: int
    side: int
    leaf_perm: tuple[int, ...]
    other_perm: tuple[int, ...]
    contracted: int  # product of the contracted axis sizes
    free: int  # product of the leaf's free axis sizes

    def leaf_matrix(self, a: jax.Array) -> jax.Array:
        """(contracted, free) view of a leaf-shaped array."""
        return jnp.transpose(a, self.leaf_perm).reshape(self.contracted, self.free)

    def from_matrix(self, m: jax.Array, leaf_shape: Sequence[int]) -> jax.Array:
        """Inverse of :meth:`leaf_matrix`."""
        permuted = tuple(leaf_shape[i] for i in self.leaf_perm)
        return jnp.transpose(m.reshape(permuted), np.argsort(self.leaf_perm))

    def rows(self, other: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per-example ``x`` (rows, contracted) and ``delta`` (rows, free) from the batch."""
        rows = other.shape[0]
        x = jnp.transpose(other, (0, *(1 + i for i in self.other_perm)))
        return x.reshape(rows, self.contracted), delta.reshape(rows, self.free)


class TapPlan(NamedTuple):
    """The equations of the per-example loss to tap, and the dense inputs."""

    closed: ClosedJaxpr
    live: tuple[bool, ...]
    ghosts: tuple[GhostDot, ...]
    dense: tuple[int, ...]  # differentiable inputs used otherwise (full per-example grads)


def _ghost_dot(jaxpr: Jaxpr, leaf: int, eqn_index: int, side: int) -> GhostDot | None:
    eqn = jaxpr.eqns[eqn_index]
    (contract, batch) = eqn.params["dimension_numbers"]
    if any(batch):
        return None
    leaf_var, other_var = eqn.invars[side], eqn.invars[1 - side]
    leaf_contract, other_contract = (contract[0], contract[1])[:: 1 if side == 0 else -1]
    other_shape = other_var.aval.shape
    other_free = [i for i in range(len(other_shape)) if i not in other_contract]
    if math.prod(other_shape[i] for i in other_free) != 1:
        return None
    leaf_shape = leaf_var.aval.shape
    leaf_free = [i for i in range(len(leaf_shape)) if i not in leaf_contract]
    return GhostDot(
        leaf=leaf,
        eqn=eqn_index,
        side=side,
        leaf_perm=(*leaf_contract, *leaf_free),
        other_perm=(*other_contract, *other_free),
        contracted=math.prod(leaf_shape[i] for i in leaf_contract),
        free=math.prod(leaf_shape[i] for i in leaf_free),
    )


def plan_taps(closed: ClosedJaxpr, differentiable: Sequence[int]) -> TapPlan:
    """Classify the inputs ``differentiable`` (positions) of a scalar per-example loss.

    An input used (by live equations) only as one operand of a single ``dot_general``
    with no batch dimensions, against an operand whose free dimensions all have size 1,
    becomes a :class:`GhostDot`; any other used input is dense; unused inputs are left out.
    """
    jaxpr = closed.jaxpr
    live = _live(jaxpr)
    uses: dict[Var, list[tuple[int, int]]] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        if live[i]:
            for pos, v in enumerate(eqn.invars):
                if isinstance(v, Var):
                    uses.setdefault(v, []).append((i, pos))
    outputs = {v for v in jaxpr.outvars if isinstance(v, Var)}
    ghosts, dense = [], []
    tapped: set[int] = set()
    for leaf in differentiable:
        var = jaxpr.invars[leaf]
        found = uses.get(var, [])
        if not found and var not in outputs:
            continue
        ghost = None
        if len(found) == 1 and var not in outputs and jnp.issubdtype(var.aval.dtype, jnp.floating):
            eqn_index, side = found[0]
            if jaxpr.eqns[eqn_index].primitive.name == "dot_general" and eqn_index not in tapped:
                ghost = _ghost_dot(jaxpr, leaf, eqn_index, side)
        if ghost is None:
            dense.append(leaf)
        else:
            ghosts.append(ghost)
            tapped.add(ghost.eqn)
    return TapPlan(closed, tuple(live), tuple(ghosts), tuple(dense))


def tapped_eval(
    plan: TapPlan, args: Sequence[Any], taps: dict[int, jax.Array]
) -> tuple[Any, dict[int, jax.Array]]:
    """Evaluate the loss with ``taps[eqn]`` added to the output of each tapped equation.

    Returns the loss and, per tapped equation, the operand that is not the ghost leaf.
    """
    jaxpr = plan.closed.jaxpr
    env: dict[Var, Any] = dict(zip(jaxpr.constvars, plan.closed.consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    sides = {g.eqn: g.side for g in plan.ghosts}
    others = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, Literal) else env[v]

    for i, eqn in enumerate(jaxpr.eqns):
        if not plan.live[i]:
            continue
        invals = [read(v) for v in eqn.invars]
        with eqn.ctx.manager:
            out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        if i in taps:
            out = out + taps[i]
            others[i] = invals[1 - sides[i]]
        outs = out if eqn.primitive.multiple_results else [out]
        env.update(zip(eqn.outvars, outs, strict=True))
    (loss,) = [read(v) for v in jaxpr.outvars]
    return loss, others
