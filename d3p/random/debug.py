# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""A fast, NOT secure rng suite with the API of :mod:`d3p.random`, over ``jax.random``.

Keys are raw ``uint32[2]`` threefry keys. Threefry is not a cryptographically
secure generator, so noise and batches drawn from this suite carry no privacy
guarantee: use it for debugging and tests only, never on real data.
"""

from __future__ import annotations

import operator
import secrets
import warnings
from collections.abc import Sequence
from typing import TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from d3p.random import _sampling

warnings.warn(
    "d3p.random.debug uses JAX's threefry generator, which is not cryptographically "
    "secure: it must not be used for real data (no privacy guarantee)",
    UserWarning,
    stacklevel=2,
)

#: Type of a debug key: a raw ``uint32`` array of shape (2,).
PRNGState: TypeAlias = jax.Array

__all__ = [
    "PRNGState",
    "PRNGKey",
    "split",
    "fold_in",
    "rekey",
    "random_bits",
    "uniform",
    "normal",
    "hardened_normal",
    "hardened_normal_sum4",
    "randint",
    "convert_to_jax_rng_key",
]


def _check_key(key) -> jax.Array:
    if jnp.shape(key) != (2,) or jnp.result_type(key) != jnp.uint32:
        raise TypeError(
            "key must be a d3p.random.debug key: a uint32 array of shape (2,), got "
            f"{jnp.result_type(key)} array of shape {jnp.shape(key)}"
        )
    return jnp.asarray(key)


def PRNGKey(seed: int | bytes | None = None) -> PRNGState:  # noqa: N802 (d3p 0.2 name)
    """Create a debug key.

    Parameters
    ----------
    seed : int, bytes or None
        An int, or bytes (at most 32, read big-endian), taken modulo ``2**64``
        (threefry keys have 64 bits); ``None`` draws one from the OS.

    Returns
    -------
    PRNGState
        ``uint32`` array of shape (2,), equal to ``jax.random.PRNGKey(seed)`` for
        seeds in ``[0, 2**63)``.
    """
    if seed is None:
        value = secrets.randbits(64)
    elif isinstance(seed, bytes | bytearray):
        if len(seed) > 32:
            raise ValueError(f"seed must be at most 32 bytes, got {len(seed)}")
        value = int.from_bytes(seed, "big")
    elif isinstance(seed, bool):
        raise TypeError("seed must be an int, bytes or None, got a bool")
    else:
        try:
            value = operator.index(seed)
        except TypeError:
            raise TypeError(
                f"seed must be an int, bytes or None, got {type(seed).__name__}"
            ) from None
    value %= 1 << 64
    return jnp.asarray(np.array([value >> 32, value & 0xFFFFFFFF], dtype=np.uint32))


def split(key: PRNGState, num: int = 2) -> PRNGState:
    """``num`` new keys, shape ``(num, 2)`` (``jax.random.split``)."""
    (num,) = _sampling.check_shape(num)
    return jax.random.split(_check_key(key), num)


def fold_in(key: PRNGState, data) -> PRNGState:
    """A new key from ``key`` and integer ``data`` (``jax.random.fold_in``)."""
    return jax.random.fold_in(_check_key(key), data)


def rekey(key: PRNGState) -> PRNGState:
    """A new key from ``key`` (``jax.random.split(key, 1)[0]``; no forward secrecy)."""
    return jax.random.split(_check_key(key), 1)[0]


def random_bits(key: PRNGState, bit_width: int, shape: int | Sequence[int]) -> jax.Array:
    """Random ``uint{bit_width}`` values of ``shape`` (``jax.random.bits``)."""
    bit_width = _sampling.check_bit_width(bit_width)
    shape = _sampling.check_shape(shape)
    return jax.random.bits(_check_key(key), shape, _sampling.uint_dtype(bit_width))


def uniform(
    key: PRNGState, shape: int | Sequence[int] = (), dtype=float, minval=0.0, maxval=1.0
) -> jax.Array:
    """Uniform floats in ``[minval, maxval)``, as :func:`d3p.random.uniform`."""
    key = _check_key(key)
    shape = _sampling.check_shape(shape)
    dtype = _sampling.check_float_dtype(dtype, "uniform")
    return _sampling.uniform_from_bits(random_bits, key, shape, dtype, minval, maxval)


def normal(key: PRNGState, shape: int | Sequence[int] = (), dtype=float) -> jax.Array:
    """Standard normals (``jax.random.normal``)."""
    shape = _sampling.check_shape(shape)
    dtype = _sampling.check_float_dtype(dtype, "normal")
    return jax.random.normal(_check_key(key), shape, dtype)


def hardened_normal(key: PRNGState, shape: int | Sequence[int] = (), dtype=float) -> jax.Array:
    """Standard normals by the construction of :func:`d3p.random.hardened_normal`."""
    key = _check_key(key)
    shape = _sampling.check_shape(shape)
    dtype = _sampling.check_float_dtype(dtype, "hardened_normal")
    return _sampling.hardened_normal(_block_words, key, shape, dtype)


def _block_words(key: jax.Array, num_blocks: int) -> jax.Array:
    """``num_blocks`` blocks of 16 random words as columns (``jax.random.bits``)."""
    return jax.random.bits(key, (16, num_blocks), jnp.uint32)


def hardened_normal_sum4(key: PRNGState, shape: int | Sequence[int] = (), dtype=float) -> jax.Array:
    """Standard normals by the construction of :func:`d3p.random.hardened_normal_sum4`."""
    key = _check_key(key)
    shape = _sampling.check_shape(shape)
    dtype = _sampling.check_float_dtype(dtype, "hardened_normal_sum4")
    return _sampling.hardened_normal_sum4(normal, key, shape, dtype)


def randint(
    key: PRNGState, shape: int | Sequence[int], minval, maxval, dtype=jnp.int32
) -> jax.Array:
    """Unbiased integers in ``[minval, maxval)``, as :func:`d3p.random.randint`."""
    key = _check_key(key)
    shape = _sampling.check_shape(shape)
    dtype = _sampling.check_int_dtype(dtype, "randint")
    return _sampling.randint(random_bits, fold_in, key, shape, minval, maxval, dtype)


def convert_to_jax_rng_key(key: PRNGState) -> jax.Array:
    """The key itself: debug keys already are raw ``jax.random`` keys."""
    return _check_key(key)
