# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Argument checks and samplers shared by :mod:`d3p.random` and :mod:`d3p.random.debug`.

The samplers here are written against a bit source (``random_bits(key,
bit_width, shape)``) and a key derivation (``fold_in(key, data)``), so both
rng suites get the same distributions from their own generator.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BitSource = Callable[[jax.Array, int, tuple[int, ...]], jax.Array]
#: ``block_words(key, num_blocks)``: ``uint32`` array (16, num_blocks), a block per column.
BlockSource = Callable[[jax.Array, int], jax.Array]
KeyFolder = Callable[[jax.Array, object], jax.Array]

BIT_WIDTHS = (8, 16, 32, 64)
_UINT_DTYPES = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}

#: Number of independent normals summed by :func:`hardened_normal_sum4`.
SUM4_TERMS = 4

#: Random words (of the dtype's width) per value of :func:`hardened_normal`.
HARDENED_WORDS = 2

#: Values of :func:`hardened_normal` per 16-word block, by float width (32 or 64 bits).
HARDENED_PER_BLOCK = {32: 16 // HARDENED_WORDS, 64: 8 // HARDENED_WORDS}


def check_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    """Return ``shape`` as a tuple of non-negative ints or raise ``TypeError``/``ValueError``."""
    if isinstance(shape, int | np.integer):
        shape = (shape,)
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must have non-negative entries, got {dims}")
    return dims


def check_bit_width(bit_width: int) -> int:
    """Validate ``bit_width`` (8, 16, 32 or 64; 64 needs ``jax_enable_x64``)."""
    if isinstance(bit_width, bool) or not isinstance(bit_width, int | np.integer):
        raise TypeError(f"bit_width must be one of {BIT_WIDTHS}, got {bit_width!r}")
    if bit_width not in BIT_WIDTHS:
        raise ValueError(f"bit_width must be one of {BIT_WIDTHS}, got {bit_width}")
    if bit_width == 64 and not jax.config.jax_enable_x64:
        raise ValueError("bit_width=64 needs 64-bit types: enable jax_enable_x64")
    return int(bit_width)


def uint_dtype(bit_width: int) -> np.dtype:
    """The unsigned integer dtype with ``bit_width`` bits."""
    return jnp.dtype(_UINT_DTYPES[bit_width])


def _canonical(dtype, kind: str, name: str, caller: str) -> np.dtype:
    """Canonicalise ``dtype`` for the current x64 mode, warning if it is narrowed."""
    try:
        requested = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be a {kind} dtype, got {dtype!r}") from None
    canonical = jnp.dtype(jax.dtypes.canonicalize_dtype(requested))
    if canonical != requested:
        warnings.warn(
            f"{caller}: {name}={requested} is not available with jax_enable_x64 off; "
            f"using {canonical}",
            stacklevel=3,
        )
    return canonical


def check_float_dtype(dtype, caller: str) -> np.dtype:
    """Validate a floating ``dtype``; the builtin ``float`` means JAX's default float."""
    if dtype is float:
        return jnp.dtype(jnp.result_type(float))
    out = _canonical(dtype, "floating-point", "dtype", caller)
    if not jnp.issubdtype(out, jnp.floating):
        raise TypeError(f"{caller}: dtype must be a floating-point dtype, got {out}")
    return out


def check_int_dtype(dtype, caller: str) -> np.dtype:
    """Validate an integer ``dtype``; the builtin ``int`` means JAX's default int."""
    if dtype is int:
        return jnp.dtype(jnp.result_type(int))
    out = _canonical(dtype, "integer", "dtype", caller)
    if not jnp.issubdtype(out, jnp.integer):
        raise TypeError(f"{caller}: dtype must be an integer dtype, got {out}")
    return out


def uniform_from_bits(
    random_bits: BitSource,
    key: jax.Array,
    shape: tuple[int, ...],
    dtype: np.dtype,
    minval,
    maxval,
) -> jax.Array:
    """Uniform floats in ``[minval, maxval)`` from the mantissa bits of one word per value.

    The top ``nmant`` bits of a ``finfo(dtype).bits``-bit word fill the mantissa of
    a float in [1, 2); subtracting 1 gives a multiple of ``2**-nmant`` in [0, 1),
    which is scaled to the range and kept at or above ``minval`` against rounding.
    (The construction of ``jax.random.uniform`` and jax-chacha-prng.) The affine map
    is evaluated in the widest enabled float (float64 under x64) and rounded once,
    reproducing jax-chacha-prng's fused multiply-add; with x64 off a float32
    result can differ from it in the last bit for ranges other than [0, 1).
    """
    info = jnp.finfo(dtype)
    nbits = info.bits
    minval = jnp.asarray(minval, dtype)
    maxval = jnp.asarray(maxval, dtype)
    if jnp.broadcast_shapes(shape, minval.shape, maxval.shape) != shape:
        raise ValueError(
            f"minval/maxval of shapes {minval.shape}/{maxval.shape} do not broadcast to "
            f"shape {shape}"
        )
    words = random_bits(key, nbits, shape)
    one = np.array(1.0, dtype).view(uint_dtype(nbits))
    mantissa = lax.shift_right_logical(words, np.array(nbits - info.nmant, words.dtype))
    floats = lax.bitcast_convert_type(mantissa | one, dtype) - np.array(1.0, dtype)
    wide = jnp.promote_types(dtype, jnp.result_type(float))
    scaled = floats.astype(wide) * (maxval - minval).astype(wide) + minval.astype(wide)
    return jnp.maximum(minval, scaled.astype(dtype))


def normal_from_uniform(
    uniform: Callable[..., jax.Array], key: jax.Array, shape: tuple[int, ...], dtype: np.dtype
) -> jax.Array:
    """Standard normals as ``sqrt(2) * erfinv(u)``, ``u`` uniform on ``[nextafter(-1, 0), 1)``.

    This is d3p 0.2's ``normal`` (inverse-CDF transform of one uniform per value).
    """
    lo = jnp.nextafter(jnp.array(-1.0, dtype), jnp.array(0.0, dtype))
    u = uniform(key, shape, dtype, lo, 1.0)
    return np.array(np.sqrt(2), dtype) * lax.erf_inv(u)


def hardened_normal_sum4(
    normal: Callable[..., jax.Array], key: jax.Array, shape: tuple[int, ...], dtype: np.dtype
) -> jax.Array:
    """Standard normals as the scaled sum of ``SUM4_TERMS`` independent normals.

    ``(z1 + z2) + (z3 + z4)`` halved has exactly unit variance (the halving is exact
    in binary floating point). Each ``zi`` comes from a transformed uniform and can only
    take a sparse, structured set of floats, which floating-point attacks exploit
    (Mironov 2012; Jin et al. 2021, arXiv 2112.05307); the sum of several
    independent draws reaches essentially every float near its value, following
    Holohan and Braghin (2021, arXiv 2107.10138), the construction of Opacus's
    secure mode. d3p 0.3.0's hardened sampler.
    """
    z = normal(key, (SUM4_TERMS, *shape), dtype)
    return ((z[0] + z[1]) + (z[2] + z[3])) * np.array(0.5, dtype)


# Taylor coefficients of sin(x) / x and cos(x) in x**2, highest first, for x in [0, pi/4]:
# truncation errors 1.8e-9 and 1.2e-10 (float32; its ulp at 0.7 is 6e-8), 8.3e-20 and
# 2.0e-18 (float64; ulp 1.1e-16).
_SIN_TERMS = {32: 5, 64: 9}
_COS_TERMS = {32: 6, 64: 9}


def _taylor(terms: int, odd: bool) -> list[float]:
    return [(-1) ** k / math.factorial(2 * k + odd) for k in reversed(range(terms))]


def sin_cos_octant(phi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``sin(phi)`` and ``cos(phi)`` for ``phi`` in ``[0, pi/4]`` (float32 or float64) by
    polynomials in ``phi**2``: no range reduction, the same operations for every input."""
    nbits = jnp.finfo(phi.dtype).bits
    p2 = phi * phi
    s = np.array(0.0, phi.dtype)
    for a in _taylor(_SIN_TERMS[nbits], True):
        s = s * p2 + np.array(a, phi.dtype)
    c = np.array(0.0, phi.dtype)
    for a in _taylor(_COS_TERMS[nbits], False):
        c = c * p2 + np.array(a, phi.dtype)
    return s * phi, c


def box_muller_halves(q_words: jax.Array, angle_words: jax.Array, dtype: np.dtype):
    """Two independent ``N(0, 1/2)`` arrays ``(rho cos(theta), rho sin(theta))`` from two
    arrays of ``nbits``-bit words (``nbits`` the width of ``dtype``, float32 or float64).

    ``rho = sqrt(-log(q))`` (Box-Muller's radius over ``sqrt(2)``) with
    ``q = (w + 1/2) 2**-nbits`` for the whole word ``w``: on the grid ``2**-nbits`` (fine
    near 0, which sets the tail) and rounded to ``dtype`` near 1, never 0 or above 1.
    ``theta`` is ``k pi/4 + phi`` or ``(k + 1) pi/4 - phi`` (alternating) in octant
    ``k`` (the top three bits), with ``phi = f pi/4 2**-(nbits - 3)`` from the other
    ``nbits - 3`` bits ``f``; sine and cosine of ``phi`` come from
    :func:`sin_cos_octant` and the octant swaps them and sets the signs.
    Branch-free: the same operations for every word.
    """
    nbits = jnp.finfo(dtype).bits
    wtype = q_words.dtype
    itype = jnp.dtype(f"int{nbits}")
    fbits = nbits - 3
    q = q_words.astype(dtype) * np.array(2.0**-nbits, dtype) + np.array(2.0 ** -(nbits + 1), dtype)
    rho = jnp.sqrt(-jnp.log(q))
    f = angle_words & np.array((1 << fbits) - 1, wtype)
    phi = f.astype(itype).astype(dtype) * np.array(np.pi / 4 * 2.0**-fbits, dtype)
    sin, cos = sin_cos_octant(phi)
    # octant bits b0, b1, b2 (from the lowest): swap sine and cosine where b0 ^ b1, negate
    # the cosine where b1 ^ b2 and the sine where b2 (flipping the float's sign bit).
    top = np.array(nbits - 1, wtype)
    swap = lax.shift_right_logical(angle_words ^ (angle_words << np.array(1, wtype)), top - 1)
    swap = (swap & np.array(1, wtype)) != 0
    sign = np.array(1 << (nbits - 1), wtype)
    cos_sign = (angle_words ^ (angle_words << np.array(1, wtype))) & sign
    sin_sign = angle_words & sign
    x = jnp.where(swap, sin, cos) * rho
    y = jnp.where(swap, cos, sin) * rho
    x = lax.bitcast_convert_type(lax.bitcast_convert_type(x, wtype) ^ cos_sign, dtype)
    y = lax.bitcast_convert_type(lax.bitcast_convert_type(y, wtype) ^ sin_sign, dtype)
    return x, y


def hardened_normal(
    block_words: BlockSource, key: jax.Array, shape: tuple[int, ...], dtype: np.dtype
) -> jax.Array:
    """Standard normals as the sum of two independent Box-Muller halves, two words per value.

    Reads ``block_words(key, b)``, ``b`` blocks of 16 32-bit words as the columns of a
    (16, b) array (float64: 64-bit words ``w[j] << 32 | w[j + 8]``, rows 0-7). Per block,
    rows are split in four: the ``q`` and angle words of term A, then of term B
    (:func:`box_muller_halves`); value rows are ``xA + xB`` then ``yA + yB``, i.e. 8
    values per block (float32; 4 for float64), flattened row-major and cut to
    ``shape``. Each value is the sum of two independent ``N(0, 1/2)`` terms, each a
    function of two whole words (``2**64`` equally likely inputs in float32), so exactly
    unit variance up to the words' discretisation. Summing independent draws makes
    essentially every float in the bulk reachable (Holohan and Braghin 2021, arXiv
    2107.10138), which defeats the value-set attacks of Mironov (2012) and Jin et al.
    (2021, arXiv 2112.05307); each term alone already reaches every float of its
    range, tails included, because ``q`` is fine near 0 and the angle has
    ``nbits - 3`` bits per octant (tested). The largest magnitude is
    ``2 sqrt((nbits + 1) log 2)``: 9.57 for float32, 13.4 for float64. Dtypes narrower
    than float32 are computed in float32 and rounded once.
    """
    wide = jnp.promote_types(dtype, jnp.float32)
    nbits = jnp.finfo(wide).bits
    per_block = HARDENED_PER_BLOCK[nbits]
    n = math.prod(shape)
    words = block_words(key, -(-n // per_block))
    if nbits == 64:
        wide_words = words.astype(jnp.uint64)
        words = (wide_words[:8] << np.uint64(32)) | wide_words[8:]
    q_a, angle_a, q_b, angle_b = jnp.split(words, 4)
    x_a, y_a = box_muller_halves(q_a, angle_a, wide)
    x_b, y_b = box_muller_halves(q_b, angle_b, wide)
    z = jnp.concatenate([x_a + x_b, y_a + y_b])
    return z.reshape(-1)[:n].reshape(shape).astype(dtype)


def _static_bound(x, name: str) -> int | None:
    """``x`` as a Python int when it is a concrete integer scalar, else ``None``."""
    if isinstance(x, jax.core.Tracer) or np.ndim(x) != 0:
        return None
    if isinstance(x, bool) or not jnp.issubdtype(np.result_type(x), jnp.integer):
        raise TypeError(f"randint: {name} must be an integer, got {x!r}")
    return operator.index(x)


def _int_bounds(minval, maxval, info: np.iinfo, word: np.dtype) -> tuple[jax.Array, jax.Array]:
    """Clamp ``[minval, maxval)`` to the dtype range; return ``(lo, span)`` as ``word`` ints.

    ``span`` is the number of admissible values modulo ``2**bits(word)`` (so 0 means
    the whole word range). A ``maxval`` above the dtype's maximum admits that
    maximum, as in ``jax.random.randint``.
    """
    modulus = 1 << jnp.iinfo(word).bits
    lo_s, hi_s = _static_bound(minval, "minval"), _static_bound(maxval, "maxval")
    if lo_s is not None and hi_s is not None:
        if lo_s >= hi_s:
            raise ValueError(f"randint: need minval < maxval, got [{lo_s}, {hi_s})")
        lo_s, hi_s = max(lo_s, info.min), min(hi_s, info.max + 1)
        if lo_s >= hi_s:
            raise ValueError(f"randint: [minval, maxval) does not meet the range of {info.dtype}")
        return jnp.asarray(lo_s % modulus, word), jnp.asarray((hi_s - lo_s) % modulus, word)
    minval, maxval = jnp.asarray(minval), jnp.asarray(maxval)
    for name, v in (("minval", minval), ("maxval", maxval)):
        if not jnp.issubdtype(v.dtype, jnp.integer):
            raise TypeError(f"randint: {name} must be an integer, got dtype {v.dtype}")
    wide = jnp.promote_types(maxval.dtype, info.dtype)
    extend = maxval.astype(wide) > jnp.asarray(info.max, wide)
    lo = jnp.clip(minval, info.min, info.max).astype(word)
    hi = jnp.clip(maxval, info.min, info.max).astype(word)
    valid = (minval < maxval) & (extend | (lo != hi))
    span = jnp.where(valid, hi - lo + extend.astype(word), np.array(1, word))
    return lo, span


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _rejection_words(
    random_bits: BitSource, fold_in: KeyFolder, key: jax.Array, shape: tuple[int, ...], span
) -> jax.Array:
    """Uniform words modulo ``span`` (0: the whole word range), by rejection (see :func:`randint`).

    Jitted with the bit source, key folder and shape static, so un-jitted callers
    reuse one compiled loop per shape instead of recompiling its closures each call.
    """
    word = span.dtype
    full_range = span == 0
    safe_span = jnp.where(full_range, np.array(1, word), span)
    threshold = jnp.where(full_range, np.array(0, word), (np.array(0, word) - span) % safe_span)

    def body(state):
        i, out, done = state
        w = random_bits(fold_in(key, i), jnp.iinfo(word).bits, shape)
        accept = (w >= threshold) & ~done
        value = jnp.where(full_range, w, w % safe_span)
        return i + 1, jnp.where(accept, value, out), done | accept

    init = (
        jnp.uint32(0),
        jnp.zeros(shape, word),
        jnp.zeros(shape, bool),
    )
    return lax.while_loop(lambda s: ~jnp.all(s[2]), body, init)[1]


def randint(
    random_bits: BitSource,
    fold_in: KeyFolder,
    key: jax.Array,
    shape: tuple[int, ...],
    minval,
    maxval,
    dtype: np.dtype,
) -> jax.Array:
    """Unbiased uniform integers in ``[minval, maxval)`` by rejection sampling.

    A word ``w`` (32 bits, or 64 for 64-bit dtypes) is accepted when
    ``w >= 2**bits mod span``, which leaves a multiple of ``span`` equally likely
    words, and mapped to ``minval + w % span``. Rejected entries are redrawn from
    ``fold_in(key, round)`` in a ``lax.while_loop`` (jit/vmap safe); each round
    rejects an entry with probability below 1/2, so the expected number of rounds
    is at most about ``log2(size) + 2``. With traced bounds and ``maxval <= minval``
    the result is ``minval`` (the check can only be made for concrete bounds).
    """
    info = jnp.iinfo(dtype)
    word = uint_dtype(64 if info.bits == 64 else 32)
    lo, span = _int_bounds(minval, maxval, info, word)
    if jnp.broadcast_shapes(shape, lo.shape, span.shape) != shape:
        raise ValueError(f"randint: minval/maxval do not broadcast to shape {shape}")
    out = _rejection_words(random_bits, fold_in, key, shape, span)
    return (lo + out).astype(dtype)
