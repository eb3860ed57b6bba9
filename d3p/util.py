# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Small array helpers shared by d3p and the models built on it.

All predicates look only at static properties (shape, dtype), so they give the
same answer for a concrete value and for a tracer of it inside :func:`jax.jit`.
The one exception is a Python scalar passed *as a jit argument*: JAX turns it
into a 0-d tracer, which the predicates treat like any 0-d array (a scalar).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp

import d3p.random

__all__ = [
    "example_count",
    "has_shape",
    "is_array",
    "is_scalar",
    "is_integer",
    "is_int_scalar",
    "normalize",
    "map_over_secondary_dims",
    "unvectorize_shape",
    "unvectorize_shape_1d",
    "unvectorize_shape_2d",
    "unvectorize_shape_3d",
    "sample_from_array",
]


def has_shape(a: Any) -> bool:
    """Whether ``a`` has a ``shape`` attribute (arrays and tracers do, Python numbers not)."""
    return hasattr(a, "shape")


def is_array(a: Any) -> bool:
    """Whether ``a`` is an array with at least one dimension.

    ``False`` for Python scalars and for 0-d arrays, so the answer is the same
    for a value and for its tracer under :func:`jax.jit`.
    """
    return has_shape(a) and len(a.shape) > 0


def is_scalar(x: Any) -> bool:
    """Whether ``x`` is a single number: a Python/NumPy number or an array of exactly one element.

    As in d3p 0.2, the number of dimensions does not matter: arrays of shape
    ``()``, ``(1,)`` and ``(1, 1, 1)`` are all scalars.
    """
    if has_shape(x):
        return math.prod(x.shape) == 1
    return isinstance(x, numbers.Number)


def is_integer(x: Any) -> bool:
    """Whether ``x`` has an integer type (Python ``int`` or integer-dtype array; not bool)."""
    if hasattr(x, "dtype"):
        return bool(jnp.issubdtype(x.dtype, jnp.integer))
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_int_scalar(x: Any) -> bool:
    """Whether ``x`` is a single integer (see :func:`is_scalar` and :func:`is_integer`)."""
    return is_scalar(x) and is_integer(x)


def example_count(a: Any) -> int:
    """Number of examples in ``a``, read as a data set with examples along axis 0.

    Parameters
    ----------
    a : array_like or scalar
        The data.

    Returns
    -------
    int
        ``a.shape[0]``, or 1 for a scalar (a single example).
    """
    shape = jnp.shape(a)
    return shape[0] if len(shape) > 0 else 1


def normalize(x: Any) -> jax.Array:
    """Scale ``x`` to unit L2 norm along its last axis.

    Parameters
    ----------
    x : array_like
        Vector(s) to normalise; leading axes are treated as a batch.

    Returns
    -------
    jax.Array
        ``x / ||x||`` along the last axis, same shape as ``x``. A scalar is its
        own (one-element) vector: it becomes ``x / |x|``, i.e. 1 or -1. An
        all-zero vector has no direction and yields NaN entries (0 / 0).
    """
    x = jnp.asarray(x)
    if x.ndim == 0:
        return x / jnp.abs(x)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def map_over_secondary_dims(
    f: Callable[[jax.Array], jax.Array],
) -> Callable[[jax.Array], jax.Array]:
    """Lift ``f``, reducing a vector of shape ``(a,)`` to a scalar, to arrays ``(a, b1, ..., bk)``.

    Parameters
    ----------
    f : callable
        Function from a 1-d array of shape ``(a,)`` to a scalar (e.g. :func:`jax.numpy.sum`).

    Returns
    -------
    callable
        Function taking ``T`` of shape ``(a, b1, ..., bk)`` and returning the
        array of shape ``(b1, ..., bk)`` whose entry ``[i1, ..., ik]`` is
        ``f(T[:, i1, ..., ik])`` (vectorised with :func:`jax.vmap`); for a 1-d
        ``T`` this is ``f(T)``.
    """

    def mapped(T: jax.Array) -> jax.Array:
        T = jnp.asarray(T)
        if T.ndim == 0:
            raise ValueError("map_over_secondary_dims: T must have at least one dimension")
        flat = T.reshape(T.shape[0], -1)
        return jax.vmap(f, in_axes=1)(flat).reshape(T.shape[1:])

    return mapped


def unvectorize_shape(a: Any, d: int) -> tuple[int, ...]:
    """Shape of ``a`` with the leading axes that :func:`jax.vmap` stripped put back as size 1.

    Parameters
    ----------
    a : array_like
        The (possibly vmapped) value.
    d : int
        Number of dimensions the value has outside ``vmap``, >= 0.

    Returns
    -------
    tuple of int
        ``(1,) * (d - a.ndim) + a.shape`` if ``a`` has fewer than ``d``
        dimensions, else ``a.shape`` unchanged.
    """
    if not isinstance(d, numbers.Integral) or isinstance(d, bool):
        raise TypeError(f"d must be an int >= 0, got {type(d).__name__}")
    if d < 0:
        raise ValueError(f"d must be an int >= 0, got {d}")
    shape = tuple(jnp.shape(a))
    return (1,) * max(d - len(shape), 0) + shape


def unvectorize_shape_1d(a: Any) -> tuple[int, ...]:
    """:func:`unvectorize_shape` with ``d=1``."""
    return unvectorize_shape(a, 1)


def unvectorize_shape_2d(a: Any) -> tuple[int, ...]:
    """:func:`unvectorize_shape` with ``d=2`` (e.g. a data matrix ``(N, features)``)."""
    return unvectorize_shape(a, 2)


def unvectorize_shape_3d(a: Any) -> tuple[int, ...]:
    """:func:`unvectorize_shape` with ``d=3``."""
    return unvectorize_shape(a, 3)


def sample_from_array(
    rng_key: jax.Array, x: Any, n: int, axis: int, rng_suite: ModuleType = d3p.random
) -> jax.Array:
    """Take ``n`` distinct entries of ``x`` along ``axis``, uniformly without replacement.

    Parameters
    ----------
    rng_key : jax.Array
        A key of ``rng_suite``. Which entries are drawn is private (e.g. the
        membership of a minibatch), so use the secure default suite for DP.
    x : array_like
        The array to sample from.
    n : int
        Number of entries to draw, ``1 <= n <= x.shape[axis]`` (static).
    axis : int
        Axis to sample along, in ``[-x.ndim, x.ndim)``.
    rng_suite : module
        :mod:`d3p.random` (secure, default) or :mod:`d3p.random.debug` (not secure).

    Returns
    -------
    jax.Array
        ``x`` with ``axis`` replaced by the ``n`` drawn entries, in random order.
    """
    from d3p.minibatch import sample_without_replacement

    x = jnp.asarray(x)
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"axis must be in [{-x.ndim}, {x.ndim}) for x of shape {x.shape}, got {axis}"
        )
    size = x.shape[axis]
    if not isinstance(n, numbers.Integral) or isinstance(n, bool):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if not 1 <= n <= size:
        raise ValueError(f"n must be in [1, x.shape[axis]={size}], got {n}")
    idx = sample_without_replacement(rng_key, int(n), size, rng_suite=rng_suite)
    return jnp.take(x, idx, axis=axis)
