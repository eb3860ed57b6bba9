# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""The secure random number generator of d3p: ChaCha20 written in JAX.

DP-VI's privacy guarantee assumes that the noise added to gradients and the
choice of minibatch members cannot be predicted by an adversary, so d3p draws
them from ChaCha20 (RFC 8439), a cryptographically secure stream cipher, here
written in plain ``jax.numpy`` uint32 arithmetic (see :mod:`d3p.random.chacha`).
It runs under ``jit``, ``vmap`` and ``lax`` loops on CPU and GPU.

The API and the random streams are those of d3p 0.2 (which used the
jax-chacha-prng package, version 1.4.3): the same seed gives bit-identical keys,
bits, uniforms and normals. A key is a plain ``uint32`` array of shape (4, 4),
the ChaCha20 state: row 0 the constants, rows 1-2 the 256-bit secret key,
``key[3, 0]`` the block counter and ``key[3, 1:]`` the nonce.

* ``random_bits`` returns the stream from the key's counter on: 8- and 16-bit
  values are the little-endian pieces of consecutive words; a 64-bit value
  ``i`` is ``w[i] << 32 | w[h + i]`` with ``h = 8 * ceil(n / 8)`` for ``n`` values.
* ``split(key, num)`` keeps the secret key, sets the counter to 0 and takes the
  nonces of the new keys from the first ``3 * num`` words of the stream.
* ``fold_in(key, data)`` keeps the secret key, sets the counter to 0 and takes
  the nonce from the last three words of the stream block at offset ``data``.
* ``rekey(key)`` (not in jax-chacha-prng) starts a new key whose 256-bit secret is
  the first eight words of the stream: from the new key, ``key`` cannot be
  recomputed (forward secrecy; see :func:`rekey`).

The two derivations of jax-chacha-prng overlap: both read the stream of the key
they are given, so ``split(key, n)[i]`` equals ``fold_in(key, d)`` whenever
``3 i = 16 d + 13`` (e.g. ``split(key, n)[15] == fold_in(key, 2)``, ``[31]`` and 5,
``[47]`` and 8), and ``rekey(key)``'s secret is the nonces of ``split(key, 3)``.
d3p keeps this stream layout for bit-compatibility and never derives keys from one
key by more than one of ``split``, ``fold_in`` and ``rekey`` (tested); do the same
in your own code.

Only the 256-bit secret key must stay secret; counters and nonces are public by
design in ChaCha20. :func:`hardened_normal` is the sampler for privacy noise.
"""

from __future__ import annotations

import operator
import secrets
from collections.abc import Sequence
from functools import partial
from typing import TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import define_prng_impl

from d3p.random import _sampling, chacha

#: Type of a d3p.random key: a ``uint32`` array of shape (4, 4) holding a ChaCha20 state.
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
    "to_jax_typed_key",
    "chacha20_impl",
]

_KEY_SHAPE = (4, 4)
_SEED_BYTES = 32


def _check_key(key) -> jax.Array:
    """Return ``key`` as an array, or raise if it is not a d3p.random key."""
    if jnp.shape(key) != _KEY_SHAPE or jnp.result_type(key) != jnp.uint32:
        raise TypeError(
            "key must be a d3p.random key: a uint32 array of shape (4, 4), got "
            f"{jnp.result_type(key)} array of shape {jnp.shape(key)}"
        )
    return jnp.asarray(key)


def _seed_bytes(seed: int | bytes | None) -> bytes:
    """The 32 key bytes for ``seed`` (see :func:`PRNGKey`)."""
    if seed is None:
        return secrets.token_bytes(_SEED_BYTES)
    if isinstance(seed, bytes | bytearray):
        if len(seed) > _SEED_BYTES:
            raise ValueError(f"seed must be at most {_SEED_BYTES} bytes, got {len(seed)}")
        return bytes(seed).ljust(_SEED_BYTES, b"\0")
    if isinstance(seed, bool):
        raise TypeError("seed must be an int, bytes or None, got a bool")
    try:
        value = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an int, bytes or None, got {type(seed).__name__}") from None
    return (value % (1 << (8 * _SEED_BYTES))).to_bytes(_SEED_BYTES, "big")


def PRNGKey(seed: int | bytes | None = None) -> PRNGState:  # noqa: N802 (d3p 0.2 name)
    """Create a ChaCha20 key.

    Parameters
    ----------
    seed : int, bytes or None
        The 256-bit secret. An int is taken modulo ``2**256`` and written as 32
        big-endian bytes; bytes (at most 32) are padded with zeros at the end;
        ``None`` draws 32 bytes from the operating system (:mod:`secrets`), which
        is what privacy needs: a seed an adversary can guess makes all noise
        predictable.

    Returns
    -------
    PRNGState
        ``uint32`` array of shape (4, 4): constants, the seed bytes read as eight
        little-endian words, counter 0 and nonce 0 (as jax-chacha-prng).
    """
    key_words = np.frombuffer(_seed_bytes(seed), dtype="<u4").astype(np.uint32)
    state = np.concatenate([chacha.CONSTANTS, key_words, np.zeros(4, np.uint32)])
    return jnp.asarray(state.reshape(_KEY_SHAPE))


def _with_nonces(key: jax.Array, nonces: jax.Array) -> jax.Array:
    """Keys sharing ``key``'s secret with counter 0 and the given ``(..., 3)`` nonces."""
    batch = nonces.shape[:-1]
    head = jnp.broadcast_to(key[:3], (*batch, 3, 4))
    counter = jnp.zeros((*batch, 1), jnp.uint32)
    row3 = jnp.concatenate([counter, nonces], axis=-1)[..., None, :]
    return jnp.concatenate([head, row3], axis=-2)


def split(key: PRNGState, num: int = 2) -> PRNGState:
    """Derive ``num`` new keys from ``key``.

    Parameters
    ----------
    key : PRNGState
        The key to split; do not use it again afterwards.
    num : int
        Static number of keys (non-negative).

    Returns
    -------
    PRNGState
        ``uint32`` array of shape ``(num, 4, 4)``.
    """
    key = _check_key(key)
    (num,) = _sampling.check_shape(num)
    return _split(key, num)


# The key functions run as one jitted program each (as jax.random's do): called outside
# jit, as in DPSVI.init and DPSVI.run, one compilation per signature instead of one per
# array operation; inside jit they are inlined. The results are the same.
@partial(jax.jit, static_argnums=1)
def _split(key: jax.Array, num: int) -> jax.Array:
    nonces = chacha.stream_words(key, 3 * num).reshape(num, 3)
    return _with_nonces(key, nonces)


@jax.jit
def _fold_in(key: jax.Array, data: jax.Array) -> jax.Array:
    state = key.at[3, 0].add(data.astype(jnp.uint32))
    nonce = chacha.block(state).reshape(16)[13:]
    return _with_nonces(key, nonce)


def fold_in(key: PRNGState, data) -> PRNGState:
    """Derive a new key from ``key`` and an integer ``data``.

    Parameters
    ----------
    key : PRNGState
        The key.
    data : int or integer array
        A Python int in ``[0, 2**32)`` or an integer scalar array (may be traced;
        taken modulo ``2**32``). Different ``data`` give independent keys.

    Returns
    -------
    PRNGState
        ``uint32`` array of shape (4, 4).
    """
    key = _check_key(key)
    if isinstance(data, bool) or np.ndim(data) != 0:
        raise TypeError(f"fold_in: data must be an integer scalar, got {data!r}")
    if isinstance(data, int) and not 0 <= data < 2**32:
        raise ValueError(f"fold_in: data must be in [0, 2**32), got {data}")
    if not jnp.issubdtype(jnp.result_type(data), jnp.integer):
        raise TypeError(f"fold_in: data must be an integer, got {jnp.result_type(data)}")
    return _fold_in(key, jnp.asarray(data))


def rekey(key: PRNGState) -> PRNGState:
    """A key with a fresh secret: the first eight words of ``key``'s stream, counter and
    nonce 0.

    ChaCha20 is a pseudorandom function of its secret, so the new key reveals nothing
    about ``key`` or about anything drawn from keys that share ``key``'s secret (e.g.
    other keys of the :func:`split` that gave ``key``). :class:`d3p.svi.DPSVI` rekeys its
    state after every step, so a released state cannot recompute earlier noise or
    batches. Use ``key`` for nothing else (see the module notes).

    Parameters
    ----------
    key : PRNGState
        The key to replace; do not use it again.

    Returns
    -------
    PRNGState
        ``uint32`` array of shape (4, 4).
    """
    return _rekey(_check_key(key))


@jax.jit
def _rekey(key: jax.Array) -> jax.Array:
    secret = chacha.stream_words(key, 8)
    return jnp.concatenate([key[0], secret, jnp.zeros(4, jnp.uint32)]).reshape(_KEY_SHAPE)


def random_bits(key: PRNGState, bit_width: int, shape: int | Sequence[int]) -> jax.Array:
    """Uniformly random unsigned integers from the ChaCha20 stream of ``key``.

    Parameters
    ----------
    key : PRNGState
        The key.
    bit_width : int
        8, 16, 32 or 64 (64 needs ``jax_enable_x64``).
    shape : int or sequence of int
        Static output shape.

    Returns
    -------
    jax.Array
        ``uint{bit_width}`` array of ``shape``.
    """
    key = _check_key(key)
    return _random_bits(key, _sampling.check_bit_width(bit_width), _sampling.check_shape(shape))


@partial(jax.jit, static_argnums=(1, 2))
def _random_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    dtype = _sampling.uint_dtype(bit_width)
    n = int(np.prod(shape))
    if bit_width == 64:
        half = 8 * -(-n // 8)
        words = chacha.stream_words(key, 2 * half).astype(dtype)
        values = (words[:half] << np.uint64(32)) | words[half:]
    else:
        per_word = 32 // bit_width
        words = chacha.stream_words(key, -(-n // per_word))
        shifts = np.arange(0, 32, bit_width, dtype=np.uint32)
        values = (words[:, None] >> shifts).astype(dtype)
    return values.reshape(-1)[:n].reshape(shape)


def uniform(
    key: PRNGState,
    shape: int | Sequence[int] = (),
    dtype=float,
    minval=0.0,
    maxval=1.0,
) -> jax.Array:
    """Uniform floats in ``[minval, maxval)`` (bit-compatible with d3p 0.2).

    Parameters
    ----------
    key : PRNGState
        The key.
    shape : int or sequence of int
        Static output shape.
    dtype : floating dtype
        Output dtype; ``float`` means JAX's default (float32, float64 under x64).
    minval, maxval : float or array
        Range, broadcastable to ``shape``.

    Returns
    -------
    jax.Array
        Array of ``shape`` and ``dtype``; values are multiples of ``2**-nmant``
        scaled to the range (``nmant`` mantissa bits of ``dtype``).
    """
    key = _check_key(key)
    shape = _sampling.check_shape(shape)
    dtype = _sampling.check_float_dtype(dtype, "uniform")
    return _sampling.uniform_from_bits(random_bits, key, shape, dtype, minval, maxval)


def normal(key: PRNGState, shape: int | Sequence[int] = (), dtype=float) -> jax.Array:
    """Standard normal samples, bit-compatible with d3p 0.2's ``normal``.

    Computed as ``sqrt(2) * erfinv(u)`` with ``u`` uniform on
    ``[nextafter(-1, 0), 1)``. Use :func:`hardened_normal` for privacy noise: the
    values of this transform have a floating-point structure that can leak.

    Parameters
    ----------
    key : PRNGState
        The key.
    shape : int or sequence of int
        Static output shape.
    dtype : floating dtype
        Output dtype; ``float`` means JAX's default.

    Returns
    -------
    jax.Array
        Array of ``shape`` and ``dtype``.
    """
    key = _check_key(key)
    shape = _sampling.check_shape(shape)
    dtype = _sampling.check_float_dtype(dtype, "normal")
    return _sampling.normal_from_uniform(uniform, key, shape, dtype)


def hardened_normal(key: PRNGState, shape: int | Sequence[int] = (), dtype=float) -> jax.Array:
    """Standard normals hardened against floating-point attacks: use for privacy noise.

    Each value is ``x1 + x2`` for two independent ``N(0, 1/2)`` terms, each a Box-Muller
    half made from two whole random words of the dtype's width (32 bits for float32):
    ``x = sqrt(-log q) cos(theta)`` with ``q = (w + 1/2) 2**-32`` from one word and
    ``theta`` from the other (three bits pick the octant, 29 bits the angle within
    it); the pair's sine half serves another value. Two words per value.

    *What it defends against.* A normal made by transforming one float uniform
    can only take about ``2**nmant`` distinct values, spread unevenly, so many
    floats near a given value are unreachable. Seeing ``f(D) + noise`` then tells an
    adversary which of two neighbouring data sets is consistent with the output
    (Mironov 2012 for the Laplace case; Jin et al. 2021, arXiv 2112.05307, for
    Gaussians, breaking the noise of Opacus, TF Privacy and others). Summing
    independent draws makes essentially every float in the bulk of the
    distribution reachable (Holohan and Braghin 2021, arXiv 2107.10138); here each
    term already has ``2**64`` equally likely inputs and alone reaches every float
    of its range, tails included (``q`` is fine near 0, the angle fine in every
    octant; tested), and the value sums two.

    *What it does not do.* It is not an exact sampler: results are still rounded
    floats, and the rounding when the noise is added to a gradient is not
    addressed. The largest reachable magnitude is ``2 sqrt(33 log 2) = 9.57``
    (float32; 13.4 for float64) standard deviations, against 10.8 for
    :func:`hardened_normal_sum4`; the ideal Gaussian puts mass 1.1e-21 beyond 9.57.
    The branch-free code (no range reduction: the sine and cosine are polynomials
    on one octant) runs in data-independent time.

    *Cost.* Two random words, one ``log``, one ``sqrt`` and two short polynomials per
    value, read in the block layout of the ChaCha20 computation (no transpose): 1.5x
    to 1.75x :func:`normal` inside a jitted loop on a 2-core CPU (see
    ``python -m benchmarks --only random``).

    *Stream.* Value ``i`` of the flattened output, with ``b = ceil(n / 8)`` stream blocks
    for ``n`` values, is row ``i // b`` of block ``i % b`` (float32; see
    ``d3p.random._sampling.hardened_normal`` for the word layout). The stream differs
    from d3p 0.3.0's ``hardened_normal``, which is kept as :func:`hardened_normal_sum4`,
    and from the two-erfinv sampler of the 0.3.1 development versions.

    Parameters
    ----------
    key : PRNGState
        The key.
    shape : int or sequence of int
        Static output shape.
    dtype : floating dtype
        Output dtype; ``float`` means JAX's default.

    Returns
    -------
    jax.Array
        Array of ``shape`` and ``dtype``.
    """
    key = _check_key(key)
    shape = _sampling.check_shape(shape)
    dtype = _sampling.check_float_dtype(dtype, "hardened_normal")
    return _hardened_normal(key, shape, dtype)


@partial(jax.jit, static_argnums=(1, 2))
def _hardened_normal(key: jax.Array, shape: tuple[int, ...], dtype: np.dtype) -> jax.Array:
    return _sampling.hardened_normal(chacha.stream_blocks, key, shape, dtype)


def hardened_normal_sum4(key: PRNGState, shape: int | Sequence[int] = (), dtype=float) -> jax.Array:
    """d3p 0.3.0's hardened normals: ``((z1 + z2) + (z3 + z4)) / 2`` of four :func:`normal`.

    Kept to reproduce results of d3p 0.3.0 (same seed, same stream). Exactly unit
    variance, largest reachable magnitude 10.8 standard deviations in float32, and
    four random words and four ``erfinv`` per value, two or more times the cost of
    :func:`hardened_normal`, which resists the same floating-point attacks.

    Parameters
    ----------
    key : PRNGState
        The key.
    shape : int or sequence of int
        Static output shape.
    dtype : floating dtype
        Output dtype; ``float`` means JAX's default.

    Returns
    -------
    jax.Array
        Array of ``shape`` and ``dtype``.
    """
    key = _check_key(key)
    shape = _sampling.check_shape(shape)
    dtype = _sampling.check_float_dtype(dtype, "hardened_normal_sum4")
    return _sampling.hardened_normal_sum4(normal, key, shape, dtype)


def randint(
    key: PRNGState,
    shape: int | Sequence[int],
    minval,
    maxval,
    dtype=jnp.int32,
) -> jax.Array:
    """Uniform integers in ``[minval, maxval)``, exactly unbiased (rejection sampling).

    Parameters
    ----------
    key : PRNGState
        The key.
    shape : int or sequence of int
        Static output shape.
    minval, maxval : int or integer array
        Bounds (``minval`` inclusive, ``maxval`` exclusive), broadcastable to
        ``shape``; clamped to the range of ``dtype``, and a ``maxval`` above the
        dtype's maximum admits the maximum. Concrete bounds must satisfy
        ``minval < maxval``; traced bounds with ``maxval <= minval`` give ``minval``.
    dtype : integer dtype
        Output dtype (64-bit types need ``jax_enable_x64``).

    Returns
    -------
    jax.Array
        Array of ``shape`` and ``dtype``.
    """
    key = _check_key(key)
    shape = _sampling.check_shape(shape)
    dtype = _sampling.check_int_dtype(dtype, "randint")
    return _sampling.randint(random_bits, fold_in, key, shape, minval, maxval, dtype)


def convert_to_jax_rng_key(key: PRNGState) -> jax.Array:
    """A raw ``uint32[2]`` key for ``jax.random``/numpyro from the first two stream words.

    Randomness drawn with the returned key comes from JAX's threefry generator,
    which is not cryptographically secure: use it for model randomness (e.g. the
    ELBO's Monte Carlo samples), not for privacy noise or batch selection.

    Parameters
    ----------
    key : PRNGState
        The key; do not use it again for other draws.

    Returns
    -------
    jax.Array
        ``uint32`` array of shape (2,).
    """
    return random_bits(key, 32, (2,))


def _typed_seed(seed: jax.Array) -> jax.Array:
    """The key of :func:`PRNGKey` for an integer scalar seed given as an array."""
    seed = jnp.asarray(seed)
    negative = seed < 0
    wide = seed.astype(jnp.uint64) if jax.config.jax_enable_x64 else seed.astype(jnp.uint32)
    low = wide.astype(jnp.uint32)
    if jax.config.jax_enable_x64 and jnp.iinfo(seed.dtype).bits == 64:
        high = (wide >> np.uint64(32)).astype(jnp.uint32)
    else:
        high = jnp.where(negative, np.uint32(0xFFFFFFFF), np.uint32(0))
    fill = jnp.where(negative, np.uint32(0xFFFFFFFF), np.uint32(0))

    def byteswap(w):
        return (
            (w >> np.uint32(24))
            | ((w >> np.uint32(8)) & np.uint32(0xFF00))
            | ((w << np.uint32(8)) & np.uint32(0xFF0000))
            | (w << np.uint32(24))
        )

    key_words = jnp.stack([fill] * 6 + [byteswap(high), byteswap(low)])
    state = jnp.concatenate([jnp.asarray(chacha.CONSTANTS), key_words, jnp.zeros(4, jnp.uint32)])
    return state.reshape(_KEY_SHAPE)


def _typed_split(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return split(key, int(np.prod(shape))).reshape(*shape, *_KEY_SHAPE)


#: ChaCha20 as a JAX PRNG implementation (for ``jax.random.key(seed, impl=chacha20_impl)``).
chacha20_impl = define_prng_impl(
    key_shape=_KEY_SHAPE,
    seed=_typed_seed,
    split=_typed_split,
    random_bits=random_bits,
    fold_in=fold_in,
    name="d3p_chacha20",
    tag="chacha20",
)


def to_jax_typed_key(key: PRNGState) -> jax.Array:
    """Wrap a d3p key as a typed JAX key, so ``jax.random`` functions draw from ChaCha20.

    ``jax.random.uniform(to_jax_typed_key(key), ...)`` then uses this key's
    ChaCha20 stream (bit-identical to :func:`uniform` for float32/float64), and
    numpyro samplers given the typed key draw from ChaCha20 too.
    ``jax.random.key_data`` turns a typed key back into a d3p key.

    Parameters
    ----------
    key : PRNGState
        The key.

    Returns
    -------
    jax.Array
        A scalar typed key with implementation :data:`chacha20_impl`.
    """
    return jax.random.wrap_key_data(_check_key(key), impl=chacha20_impl)
