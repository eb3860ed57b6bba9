# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""The ChaCha20 block function (RFC 8439) in ``jax.numpy`` uint32 arithmetic.

A ChaCha20 *state* is a ``uint32`` array of shape (4, 4): row 0 holds the
constants ``"expand 32-byte k"``, rows 1-2 the 256-bit key, ``state[3, 0]``
the 32-bit block counter and ``state[3, 1:]`` the 96-bit nonce (RFC 8439,
section 2.3). The block function maps a state to 16 pseudo-random words; the
stream of a state is the concatenation of the blocks for counter values
``state[3, 0], state[3, 0] + 1, ...`` (modulo 2**32).

The rounds are elementwise uint32 operations on vectors of block counters;
rotations are written as two shifts and an or, which XLA's CPU and GPU back ends
lower to native rotate instructions. Looped (on CPU, see ``_block_columns``), the
states are one (16, n) array whose four quarter rounds of a half round run at once
(``_block_rows``); unrolled, sixteen word vectors (``_block_words``).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

#: The four constant words of row 0: ASCII "expand 32-byte k", little-endian (RFC 8439, 2.3).
CONSTANTS = np.array([0x61707865, 0x3320646E, 0x79622D32, 0x6B206574], dtype=np.uint32)

# Column rounds, then diagonal rounds (RFC 8439, section 2.3: "inner_block").
_QUARTER_ROUNDS = (
    (0, 4, 8, 12),
    (1, 5, 9, 13),
    (2, 6, 10, 14),
    (3, 7, 11, 15),
    (0, 5, 10, 15),
    (1, 6, 11, 12),
    (2, 7, 8, 13),
    (3, 4, 9, 14),
)


def _rotl(x: jax.Array, n: int) -> jax.Array:
    """Rotate the uint32 words ``x`` left by ``n`` bits."""
    return (x << np.uint32(n)) | (x >> np.uint32(32 - n))


def _quarter_round(
    a: jax.Array, b: jax.Array, c: jax.Array, d: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The ChaCha quarter round (RFC 8439, section 2.1)."""
    a = a + b
    d = _rotl(d ^ a, 16)
    c = c + d
    b = _rotl(b ^ c, 12)
    a = a + b
    d = _rotl(d ^ a, 8)
    c = c + d
    b = _rotl(b ^ c, 7)
    return a, b, c, d


def _double_round(x: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """One column round and one diagonal round (RFC 8439, section 2.3)."""
    x = list(x)
    for i, j, k, m in _QUARTER_ROUNDS:
        x[i], x[j], x[k], x[m] = _quarter_round(x[i], x[j], x[k], x[m])
    return tuple(x)


def _block_words(words: list[jax.Array]) -> list[jax.Array]:
    """The block function on 16 uint32 word arrays of one shape, its ten double rounds
    written out as straight-line code, which XLA can fuse into one kernel."""
    x = tuple(words)
    for _ in range(10):
        x = _double_round(x)
    return [xi + wi for xi, wi in zip(x, words, strict=True)]


# Order of the 16 state rows in which the diagonal quarter rounds (0, 5, 10, 15),
# (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14) act on rows (i, 4 + i, 8 + i, 12 + i), as the
# column rounds do in the natural order (RFC 8439, section 2.3), and its inverse.
_DIAGONAL_ORDER = np.array([0, 1, 2, 3, 5, 6, 7, 4, 10, 11, 8, 9, 15, 12, 13, 14], np.int32)
_NATURAL_ORDER = np.argsort(_DIAGONAL_ORDER).astype(np.int32)


def _half_round(x: jax.Array) -> jax.Array:
    """The quarter rounds on rows ``(i, 4 + i, 8 + i, 12 + i)``, i = 0..3, of a (16, n) state."""
    return jnp.concatenate(_quarter_round(x[:4], x[4:8], x[8:12], x[12:]))


def _double_round_rows(_, x: jax.Array) -> jax.Array:
    """:func:`_double_round` on a (16, n) state: the column round on its rows as they are,
    the diagonal round on them permuted to :data:`_DIAGONAL_ORDER` (a constant-index gather)."""
    return _half_round(_half_round(x)[_DIAGONAL_ORDER])[_NATURAL_ORDER]


def _block_rows(words: jax.Array) -> jax.Array:
    """The block function on a (16, n) uint32 array of states (one per column), looped.

    The loop carries one (16, n) array. On a 2-core x86-64 CPU this compiled 2.5-3.5x
    faster than carrying four (4, n) row groups rotated by concatenation (0.35 s instead
    of 0.6-1.3 s at 13 to 65,536 blocks) and ran up to 2x faster (98 instead of 159 us at
    1,300 blocks, 3.7 instead of 7.0 ms at 65,536; 16-word layout: 205 us, 7.7 ms), so
    it serves every size.
    """
    return lax.fori_loop(0, 10, _double_round_rows, words) + words


def _block_columns(states: jax.Array, unroll: bool | None) -> jax.Array:
    """The block function on a (16, n) array of states, looped or unrolled.

    ``unroll=None`` unrolls the rounds on GPUs and other accelerators, where every loop
    iteration costs at least a kernel launch (JAX lowers its own threefry rounds the same
    way: rolled on CPU only), and loops on CPU, where a loop of 64-block draws compiled
    in 0.3 s looped against 6 s unrolled and ran 0.009-0.011 against 0.021-0.023 ms per
    step (``python -m benchmarks --only random`` times both).
    Looped, the states stay one (16, n) array (:func:`_block_rows`). The results are
    identical.
    """
    if unroll is None:
        unroll = jax.default_backend() != "cpu"
    if not unroll:
        return _block_rows(states)
    return jnp.stack(_block_words(list(states)))


@jax.jit
def block(state: jax.Array) -> jax.Array:
    """Compute one ChaCha20 block.

    Parameters
    ----------
    state : jax.Array
        ``uint32`` array of shape (4, 4), the ChaCha20 input state.

    Returns
    -------
    jax.Array
        ``uint32`` array of shape (4, 4): the serialised block, word ``i`` at
        ``[i // 4, i % 4]``.
    """
    return _block_columns(jnp.reshape(state, (16, 1)), None).reshape(4, 4)


def _stream_columns(state: jax.Array, num_blocks: int, unroll: bool | None) -> jax.Array:
    """The first ``num_blocks`` blocks of the stream of ``state`` as the columns of a
    (16, num_blocks) array."""
    states = jnp.broadcast_to(jnp.reshape(state, (16, 1)), (16, num_blocks))
    states = states.at[12].add(jnp.arange(num_blocks, dtype=jnp.uint32))
    return _block_columns(states, unroll)


@partial(jax.jit, static_argnums=(1, 2))
def _blocks(state: jax.Array, num_blocks: int, unroll: bool | None = None) -> jax.Array:
    """The first ``num_blocks`` blocks of the stream of ``state``, shape (num_blocks * 16,)."""
    return _stream_columns(state, num_blocks, unroll).T.reshape(-1)


@partial(jax.jit, static_argnums=1)
def stream_blocks(state: jax.Array, num_blocks: int) -> jax.Array:
    """The first ``num_blocks`` blocks of the ChaCha20 stream of ``state``, one per column.

    Word ``j`` of block ``b`` (stream word ``16 * b + j``) is at ``[j, b]``. This is the
    layout the block function computes in, so unlike :func:`stream_words` it needs no
    transpose; samplers that only need independent words (e.g. ``hardened_normal``)
    read it directly.

    Parameters
    ----------
    state : jax.Array
        ``uint32`` array of shape (4, 4); ``state[3, 0]`` is the first block counter.
    num_blocks : int
        Static number of 16-word blocks.

    Returns
    -------
    jax.Array
        ``uint32`` array of shape ``(16, num_blocks)``.
    """
    return _stream_columns(state, num_blocks, None)


def stream_words(state: jax.Array, num_words: int) -> jax.Array:
    """The first ``num_words`` uint32 words of the ChaCha20 stream of ``state``.

    Parameters
    ----------
    state : jax.Array
        ``uint32`` array of shape (4, 4); ``state[3, 0]`` is the first block counter.
    num_words : int
        Static number of 32-bit words to produce.

    Returns
    -------
    jax.Array
        ``uint32`` array of shape ``(num_words,)``, in stream order.
    """
    return _blocks(state, -(-num_words // 16))[:num_words]
