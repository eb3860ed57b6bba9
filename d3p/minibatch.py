# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Minibatch samplers whose per-batch cost does not grow with the data-set size.

Privacy amplification by subsampling only holds if batches are drawn exactly as
the accountant assumes and from a secure generator, so every random choice here
comes from ``rng_suite`` (:mod:`d3p.random` by default; :mod:`d3p.random.debug`
is fast but not secure).

Design (exact, cost independent of ``N`` for Poisson and fixed-size batches):

* **Poisson batches, sparse path** (used when ``-N log(1 - q)`` plus ten standard
  deviations is at most ``N``, i.e. ``q`` below about 0.6; cost
  O(K log K) with ``K`` about ``q * N``, independent of ``N``). *Poissonisation*:
  draw ``K ~ Poisson(lam)`` with ``lam = -N log(1 - q)``, then ``K`` i.i.d. uniform
  record indices. The number of draws that hit each record are then independent
  Poisson(``lam / N``) variables (splitting property of the Poisson distribution), so
  each record is hit, independently of all others, with probability
  ``1 - exp(-lam / N) = q``: the set of distinct hit records *is* a Poisson sample.
  It is found with one sort of the ``K`` indices (already in increasing order, no
  positions or scatter over ``N`` needed). ``K`` is drawn by inversion of a table of
  ``P(K <= k)`` from ``scipy.stats.poisson`` (see the 64-bit inversion below), cut at a
  length ``kmax`` with ``P(K >= kmax) <= 2**-66``; the indices come from the secure
  stream with unbiased rejection (the stream continues in a further block in the
  rare call where one block is short). The batch is *oversized* when more
  than ``max_batch_size`` distinct records are hit, which happens with probability
  exactly ``P(Binomial(N, q) > max_batch_size)``, the truncation probability the
  accountant assumes. Under ``"truncate"`` an oversized batch keeps
  ``max_batch_size`` records chosen uniformly among the hit ones: the first
  ``max_batch_size`` distinct records in the order of the draws (given the set of hit
  records, every order of their first hits is equally likely, by symmetry); this is
  the truncation assumed by dp-accounting's ``TruncatedSubsampledGaussianDpEvent``.
  A geometric-gap draw (cumulative sums of Geometric(q) gaps) was not used: it needs
  ``log`` of uniforms in float64, which x32 mode does not have, and in float32 the gaps
  would be off by about 1e-7 relative.
* **Poisson batches, dense path** (large ``q``). The number of records in a Poisson
  batch is ``B ~ Binomial(N, q)``, drawn by inversion from ``scipy.stats.binom``;
  given ``B``, the members are a uniformly random subset of that size: the first
  ``B`` entries of a uniformly random *ordered* sample without replacement (every
  prefix of such a sample is a uniform subset of its size). Since ``B`` records
  drawn independently with probability ``q`` form a uniform ``B``-subset, the batch
  has exactly the Poisson distribution; truncation as above.
* **64-bit inversion.** A count with cumulative distribution ``F`` is drawn as the
  number of thresholds ``T_k ~ F(k) * 2**64`` at or below one uniform 64-bit word
  (two 32-bit words, so the comparison is as fine as the float64 table in both x32
  and x64 mode). ``F`` is computed once on the host in float64 (lower half from the
  CDF, upper half from the survival function, so tail probabilities keep their
  relative precision at any ``N``: within 1e-12 of mpmath at ``N = 1e10``). Every
  probability of the drawn count is thus a multiple of ``2**-64``, off by less than
  ``2**-64`` from the float64 value.
* **Ordered sample without replacement** (:func:`sample_without_replacement`):
  the distinct values of an i.i.d. uniform stream over ``[0, N)``, taken in the
  order of their first occurrence, are a uniformly random ordered sample without
  replacement (each new distinct value is uniform over the records not yet seen:
  it is the classic rejection sampler). The stream is drawn in blocks of 32-bit
  words (mapped to ``[0, N)`` by unbiased rejection); repeats are
  found with one stable sort per block, and blocks are drawn in a
  ``lax.while_loop`` until enough distinct values are found (almost always one
  block). Cost O(n log n) per sample, no array of size ``N``. When more than half
  of the records are requested, the stream would need many repeats, and a full
  permutation (cost O(N log N) = O(n log n) there) is used instead.
* **Permutations** (:func:`split_batchify_data`, once per epoch, cost
  O(N log N)): records are sorted by independent uniform 64-bit keys; if two keys
  tie, all keys are redrawn (so the permutation is exactly uniform by symmetry;
  a redraw happens with probability below ``N**2 / 2**65``).

The batch of step ``i`` is derived from ``fold_in(key, i)``, so batches are
reproducible and independent across steps, and ``get_batch`` works with a traced
``i`` inside ``jax.lax.fori_loop``. Padded rows of a batch are zero and masked.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from scipy import stats

import d3p.random
from d3p import _validation

__all__ = [
    "batch_size_to_q",
    "poisson_batchify_data",
    "q_to_batch_size",
    "sample_without_replacement",
    "split_batchify_data",
    "structural_batch_size",
    "subsample_batchify_data",
]

# P(K >= table length) for the count K ~ Poisson(lam) of the sparse Poisson path.
_HIT_TABLE_TAIL = 2.0**-66

Dataset = tuple[jax.Array, ...]
BatchifierInit = Callable[[jax.Array], tuple[int, Any]]
BatchifierGetBatch = Callable[..., Any]

#: Allowed values of ``handle_oversized_batch``.
OVERSIZED_MODES = ("truncate", "suppress")

# --------------------------------------------------------------------------- checks


def _check_dataset(dataset: Any) -> tuple[Dataset, int]:
    """Validate ``dataset`` (non-empty tuple of arrays of equal length); return it and N."""
    if not isinstance(dataset, tuple) or len(dataset) == 0:
        raise ValueError(
            f"dataset must be a non-empty tuple of arrays, got {type(dataset).__name__}"
        )
    for x in dataset:  # before any copy: a view of 2**31 rows must not be materialised
        if np.ndim(x) > 0:
            _validation.check_num_records(np.shape(x)[0], "dataset")
    arrays = tuple(jnp.asarray(x) for x in dataset)
    if any(x.ndim == 0 for x in arrays):
        raise ValueError("dataset arrays must have at least one dimension (the records)")
    lengths = {x.shape[0] for x in arrays}
    if len(lengths) != 1:
        raise ValueError(f"dataset arrays must have equal first dimension, got {sorted(lengths)}")
    n = lengths.pop()
    if n == 0:
        raise ValueError("dataset must contain at least one record, got 0")
    return arrays, n


def _check_count(value: Any, name: str, minimum: int) -> int:
    """An integer (not a float) size or index ``name``, at least ``minimum``."""
    return _validation.count(value, name, minimum, allow_float=False)


def _resolve_batch_size(batch_size: Any, q: Any, n: int, max_size: int | None) -> int:
    """The fixed batch size from exactly one of ``batch_size`` or ``q``, at most ``max_size``."""
    if (batch_size is None) == (q is None):
        raise ValueError("give exactly one of batch_size and q")
    if batch_size is None:
        batch_size = q_to_batch_size(q, n)
        if batch_size < 1:
            raise ValueError(f"q={q} gives an empty batch for {n} records: q must be >= 1/{n}")
    batch_size = _check_count(batch_size, "batch_size", 1)
    if max_size is not None and batch_size > max_size:
        raise ValueError(
            f"batch_size must be in [1, {max_size}] (the number of records), got {batch_size}"
        )
    return batch_size


# ------------------------------------------------------------------ public helpers


def q_to_batch_size(q: float, N: int) -> int:
    """The batch size ``int(N * q)`` for sampling probability ``q`` among ``N`` records."""
    return int(_check_count(N, "N", 1) * _validation.probability(q))


def batch_size_to_q(batch_size: int, N: int) -> float:
    """The sampling probability ``batch_size / N`` of a batch of ``batch_size`` among ``N``."""
    return _check_count(batch_size, "batch_size", 0) / _check_count(N, "N", 1)


# -------------------------------------------------------------------- samplers


def _gather(dataset: Dataset, idx: jax.Array, mask: jax.Array) -> Dataset:
    """Rows ``idx`` of every array; rows where ``mask`` is False are zero."""

    def take(x: jax.Array) -> jax.Array:
        rows = jnp.take(x, idx, axis=0)
        keep = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
        return jnp.where(keep, rows, jnp.zeros_like(rows))

    return tuple(take(x) for x in dataset)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _permutation(rng_key: jax.Array, n: int, rng_suite: ModuleType) -> jax.Array:
    """A uniformly random permutation of ``range(n)`` (int32), by sorting 64-bit keys.

    Keys are redrawn until no two tie, so the permutation is exactly uniform.
    """
    iota = jnp.arange(n, dtype=jnp.int32)

    def body(state: tuple[jax.Array, jax.Array, jax.Array]):
        attempt, _, _ = state
        words = rng_suite.random_bits(rng_suite.fold_in(rng_key, attempt), 32, (2, n))
        hi, lo, perm = lax.sort((words[0], words[1], iota), num_keys=2)
        tie = jnp.any((hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1]))
        return attempt + 1, perm, tie

    init = (jnp.uint32(0), iota, jnp.array(True))
    return lax.while_loop(lambda s: s[2], body, init)[1]


def _first_occurrences(values: jax.Array, valid: jax.Array, sentinel: int) -> jax.Array:
    """Mask of the valid entries whose value does not occur at an earlier valid position."""
    keys = jnp.where(valid, values, sentinel)
    length = keys.shape[0]
    shift = max(length - 1, 1).bit_length()
    if (sentinel + 1) << shift <= 2**32:
        # one single-key sort of value * 2**shift + position (stable by construction);
        # on the CPU several times faster than sorting (value, position) pairs
        iota = jnp.arange(length, dtype=jnp.uint32)
        packed = lax.sort((keys.astype(jnp.uint32) << np.uint32(shift)) | iota)
        sorted_keys = (packed >> np.uint32(shift)).astype(keys.dtype)
        order = (packed & np.uint32((1 << shift) - 1)).astype(jnp.int32)
    else:
        sorted_keys, order = lax.sort(
            (keys, jnp.arange(length, dtype=jnp.int32)), num_keys=1, is_stable=True
        )
    first_sorted = jnp.concatenate([jnp.ones(1, bool), sorted_keys[1:] != sorted_keys[:-1]])
    first_sorted &= sorted_keys != sentinel
    return jnp.zeros_like(first_sorted).at[order].set(first_sorted)


class _StreamState(NamedTuple):
    block: jax.Array  # number of stream blocks drawn so far
    out: jax.Array  # (capacity,) distinct values in order of first occurrence
    count: jax.Array  # number of valid entries of ``out``


@functools.partial(jax.jit, static_argnums=(1, 3, 4))
def _ordered_sample(
    rng_key: jax.Array, capacity: int, target: jax.Array | int, n: int, rng_suite: ModuleType
) -> jax.Array:
    """``capacity`` int32 indices whose first ``target`` entries are a uniform ordered sample.

    ``capacity`` is static, ``target <= min(capacity, n)`` may be traced; entries at
    ``target`` and beyond are unspecified indices in ``[0, n)``.
    """
    if 2 * capacity > n:
        perm = _permutation(rng_key, n, rng_suite)
        return jnp.pad(perm, (0, max(capacity - n, 0)))[:capacity]
    # The stream is made of 32-bit words w; a word is used (as w mod n) only if
    # w >= 2**32 mod n, which leaves a multiple of n equally likely words, so the
    # used words are i.i.d. uniform on [0, n) (rejection inside the stream avoids a
    # nested loop). Block length: the expected number of repeats among
    # ``capacity`` draws is about capacity**2 / (2 n); twice that plus a margin,
    # divided by the acceptance rate, makes one block enough in almost every call
    # (the loop stays exact when it is not).
    reject_below = 2**32 % n
    accept_rate = 1.0 - reject_below / 2**32
    wanted = capacity + min(capacity, 2 * capacity * capacity // n) + 32
    block_len = math.ceil(wanted / accept_rate)
    valid_out = jnp.arange(capacity)

    def body(state: _StreamState) -> _StreamState:
        words = rng_suite.random_bits(rng_suite.fold_in(rng_key, state.block), 32, (block_len,))
        cand = (words % np.uint32(n)).astype(jnp.int32)
        used = words >= np.uint32(reject_below)
        valid = jnp.concatenate([valid_out < state.count, used])
        new = _first_occurrences(jnp.concatenate([state.out, cand]), valid, n)[capacity:]
        pos = jnp.where(new, state.count + jnp.cumsum(new, dtype=jnp.int32) - 1, capacity)
        out = state.out.at[pos].set(cand, mode="drop")
        count = jnp.minimum(state.count + jnp.sum(new, dtype=jnp.int32), capacity)
        return _StreamState(state.block + 1, out, count)

    init = _StreamState(jnp.uint32(0), jnp.zeros(capacity, jnp.int32), jnp.int32(0))
    return lax.while_loop(lambda s: s.count < target, body, init).out


def sample_without_replacement(
    rng_key: jax.Array, n: int, N: int, rng_suite: ModuleType = d3p.random
) -> jax.Array:
    """Draw ``n`` distinct indices from ``[0, N)``, uniformly, without a permutation of ``N``.

    The result is a uniformly random *ordered* sample: every ordering of every
    ``n``-subset is equally likely, so any prefix is itself a uniform sample.
    Cost O(n log n) and memory O(n) when ``n <= N / 2`` (independent of ``N``).

    Parameters
    ----------
    rng_key : jax.Array
        A key of ``rng_suite``.
    n : int
        Number of indices to draw, ``0 <= n <= N`` (static).
    N : int
        Size of the index range, ``N >= 1`` (static).
    rng_suite : module
        :mod:`d3p.random` (secure, default) or :mod:`d3p.random.debug` (not secure).

    Returns
    -------
    jax.Array
        int32 array of shape ``(n,)`` with distinct entries in ``[0, N)``.
    """
    N = _check_count(N, "N", 1)
    n = _check_count(n, "n", 0)
    if n > N:
        raise ValueError(f"n must be in [0, N={N}] when sampling without replacement, got {n}")
    return _ordered_sample(rng_key, n, n, N, rng_suite)


# ------------------------------------------------------------- Poisson sampling


def _binomial_quantile(n: int, q: float, p: float) -> int:
    """The smallest ``k >= 1`` with ``P(B <= k) >= p`` for ``B ~ Binomial(n, q)``."""
    # scipy's ppf searches on the float64 CDF (Boost's regularised incomplete beta, see
    # _size_thresholds); the two steps below make the result exactly the smallest such k
    # for that CDF even if the search ends one off.
    k = int(stats.binom.ppf(p, n, q))
    while stats.binom.cdf(k, n, q) < p:
        k += 1
    while k > 0 and stats.binom.cdf(k - 1, n, q) >= p:
        k -= 1
    return max(1, k)


def _check_max_batch_size(max_batch_size: Any, n: int, q: float) -> int:
    """The structural batch size from an int > 0 or a binomial quantile level in (0, 1)."""
    if isinstance(max_batch_size, float | np.floating):
        p = float(max_batch_size)
        if not 0.0 < p < 1.0:
            raise ValueError(
                "max_batch_size must be a positive integer or a float quantile level in "
                f"(0, 1), got {max_batch_size}"
            )
        return _binomial_quantile(n, q, p)
    size = _check_count(max_batch_size, "max_batch_size", 1)
    if size > n:
        raise ValueError(
            f"max_batch_size must be in [1, {n}] (the number of records; {n} means batches "
            f"are never truncated), got {max_batch_size}"
        )
    return size


def structural_batch_size(N: int, q: float, max_batch_size: int | float) -> int:
    """Rows per batch of :func:`poisson_batchify_data` for ``N`` records and rate ``q``.

    ``max_batch_size`` is an int in [1, N] (returned as is) or a quantile level in (0, 1) of
    the Binomial(N, q) batch size. This is the ``max_batch_size`` that privacy accounting
    of truncated Poisson sampling needs (``sampling="truncated_poisson"`` in
    :func:`d3p.dputil.compute_epsilon`).
    """
    n = _check_count(N, "N", 1)
    return _check_max_batch_size(max_batch_size, n, _validation.probability(q))


def _inversion_thresholds(cdf: np.ndarray, sf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """High and low uint32 words of 64-bit thresholds ``T_k ~ cdf[k] * 2**64``.

    A uniform 64-bit word ``w`` gives the count ``#{k : w >= T_k}``, so
    ``P(count > k) = 1 - T_k / 2**64`` (:func:`_count_below`). Where ``cdf <= 1/2`` the
    threshold is ``floor(cdf * 2**64)``, else ``2**64 - ceil(sf * 2**64)`` from the upper
    tail ``sf = 1 - cdf``, so tail probabilities (the truncation event the accountant
    uses) keep their full float64 relative precision instead of being formed as
    ``1 - cdf``; each is rounded up by less than ``2**-64``.
    """
    lower = np.floor(np.ldexp(np.minimum(cdf, 0.5), 64)).astype(np.uint64)
    # 2**64 - ceil(x) == (2**64 - 1) - (ceil(x) - 1) in uint64; sf == 0 saturates at 2**64 - 1
    tail = np.maximum(np.ceil(np.ldexp(np.minimum(sf, 0.5), 64)), 1.0).astype(np.uint64)
    upper = np.iinfo(np.uint64).max - (tail - np.uint64(1))
    words = np.where(cdf <= 0.5, lower, upper)
    return (words >> np.uint64(32)).astype(np.uint32), words.astype(np.uint32)


def _size_thresholds(n: int, q: float, max_batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds for drawing ``B ~ Binomial(n, q)`` by inversion (dense path).

    ``k`` runs over ``0..max_batch_size`` when a draw can be oversized
    (``max_batch_size < n``), else over ``0..n - 1``. ``P(B <= k)`` and ``P(B > k)`` come
    from ``scipy.stats.binom`` (Boost's regularised incomplete beta, relative error about
    1e-15 at any ``n``; tested against mpmath at ``n = 1e8`` and ``1e10``).
    """
    k = np.arange(min(max_batch_size, n - 1) + 1)
    return _inversion_thresholds(stats.binom.cdf(k, n, q), stats.binom.sf(k, n, q))


def _hit_plan(n: int, q: float) -> tuple[float, int] | None:
    """``(lam, kmax)`` of the sparse Poisson path, or None when it would cost more than ``n``.

    ``lam = -n log(1 - q)`` is the expected number of uniform draws; ``kmax`` is the
    smallest table length found with ``P(Poisson(lam) >= kmax) <= 2**-66`` (about
    ``lam + 9.5 sqrt(lam)``), so capping the count at ``kmax`` changes its law by less
    than the ``2**-64`` rounding of the inversion itself.
    """
    if q >= 1.0:
        return None
    lam = -n * math.log1p(-q)
    kmax = math.ceil(lam + 9.0 * math.sqrt(lam) + 30.0)
    while stats.poisson.sf(kmax - 1, lam) > _HIT_TABLE_TAIL:
        kmax += 1 + math.isqrt(kmax) // 8
    return (lam, kmax) if kmax <= n else None


def _count_below(
    rng_key: jax.Array, thresholds: tuple[jax.Array, jax.Array], rng_suite: ModuleType
) -> jax.Array:
    """A count drawn by inversion: the number of thresholds at or below one 64-bit word."""
    hi, lo = thresholds
    word = rng_suite.random_bits(rng_key, 32, (2,))
    below = (word[0] > hi) | ((word[0] == hi) & (word[1] >= lo))
    return jnp.sum(below, dtype=jnp.int32)


class _HitStream(NamedTuple):
    block: jax.Array  # number of stream blocks drawn so far
    values: jax.Array  # (length,) used draws in stream order (valid below ``filled``)
    filled: jax.Array  # number of valid entries of ``values``


def _distinct_hits(
    stream_key: jax.Array,
    count: jax.Array,
    length: int,
    n: int,
    size: int,
    truncate: bool,
    rng_suite: ModuleType,
) -> tuple[jax.Array, jax.Array]:
    """The distinct values among ``count`` i.i.d. uniform draws from ``[0, n)``.

    Returns ``size`` indices and how many distinct values there are (``drawn``). If
    ``drawn <= size`` (or not ``truncate``) the indices are the first ``size`` distinct
    values in increasing order, padded with 0; else the first ``size`` of them in
    the order of their first occurrence among the draws, a uniform ``size``-subset of
    the distinct values (the draws' law is invariant under relabelling the records, so
    given the set of distinct values every order of first occurrence is equally likely).

    The draws are the 32-bit words ``w`` of the streams of ``fold_in(stream_key, b)``,
    ``b = 0, 1, ...``, in order, a word being used (as ``w mod n``) only if
    ``w >= 2**32 mod n`` (unbiased rejection). Blocks of ``length`` words are drawn in a
    ``lax.while_loop`` until ``count <= length`` used words are found (almost always
    one block). One sort of ``length`` values, no scatter over ``n``.
    """
    reject_below = np.uint32(2**32 % n)

    def more(state: _HitStream) -> _HitStream:
        key = rng_suite.fold_in(stream_key, state.block)
        words = rng_suite.random_bits(key, 32, (length,))
        used = words >= reject_below
        rank = state.filled + jnp.cumsum(used, dtype=jnp.int32)
        pos = jnp.where(used, rank - 1, length)
        values = state.values.at[pos].set((words % np.uint32(n)).astype(jnp.int32), mode="drop")
        return _HitStream(state.block + 1, values, jnp.minimum(rank[-1], length))

    init = _HitStream(jnp.uint32(0), jnp.zeros(length, jnp.int32), jnp.int32(0))
    values = lax.while_loop(lambda s: s.filled < count, more, init).values
    valid = jnp.arange(length) < count
    hits = lax.sort(jnp.where(valid, values, n))
    first = (hits < n) & jnp.concatenate([jnp.ones(1, bool), hits[1:] != hits[:-1]])
    drawn = jnp.sum(first, dtype=jnp.int32)
    idx = _compact(hits, first, size)
    if truncate:
        idx = lax.cond(
            drawn > size,
            lambda: _compact(values, _first_occurrences(values, valid, n), size),
            lambda: idx,
        )
    return idx, drawn


def _compact(values: jax.Array, keep: jax.Array, size: int) -> jax.Array:
    """The first ``size`` entries of ``values`` where ``keep``, in order (padded with 0)."""
    pos = jnp.where(keep, jnp.cumsum(keep, dtype=jnp.int32) - 1, size)
    return jnp.zeros(size, jnp.int32).at[pos].set(values, mode="drop")


def poisson_batchify_data(
    dataset: Dataset,
    q: float,
    max_batch_size: int | float,
    handle_oversized_batch: str = "truncate",
    rng_suite: ModuleType = d3p.random,
    *,
    multiple_of: int = 1,
) -> tuple[BatchifierInit, BatchifierGetBatch]:
    """Poisson subsampling: every record enters a batch independently with probability ``q``.

    This is the sampling assumed by Poisson-subsampled privacy accounting
    (:mod:`d3p.dputil`). Batches have the fixed structural size ``max_batch_size``;
    rows beyond the drawn batch size are zero and masked out; the real rows of a batch
    that was not truncated are in increasing record order (for ``q`` below about 0.6).
    Cost per batch O(q N log(q N)), independent of the number of records ``N`` (see
    the module docstring for the exact method).

    Parameters
    ----------
    dataset : tuple of array
        Arrays with equal first dimension ``N`` (the records).
    q : float
        Inclusion probability of each record, in (0, 1]; the subsampling rate
        used in privacy accounting.
    max_batch_size : int or float
        Structural batch size (int >= 1), or, as a float in (0, 1), that quantile
        of the Binomial(N, q) batch-size distribution.
    handle_oversized_batch : {"truncate", "suppress"}
        What to do when more than ``max_batch_size`` records are drawn:
        ``"truncate"`` keeps ``max_batch_size`` of them chosen uniformly at random
        (account with ``sampling="truncated_poisson"`` in :mod:`d3p.dputil`,
        as :meth:`d3p.svi.DPSVI.run` does); ``"suppress"`` returns an empty batch
        (all-False mask). Suppression is not plain Poisson sampling: adding one record
        can turn a full batch into an empty one, so no dp-accounting event describes
        it and d3p has no accountant for it. Each step differs from untruncated
        Poisson sampling with probability at most ``p = P(Binomial(N, q) > max_batch_size)``,
        so an (epsilon, delta) guarantee of the untruncated run becomes
        (epsilon, delta + (1 + exp(epsilon)) * num_steps * p): use it only with a quantile
        so high that this term is negligible, and add it to delta yourself.
    rng_suite : module
        :mod:`d3p.random` (secure, default) or :mod:`d3p.random.debug` (not secure).
    multiple_of : int
        Keyword-only. Pad every batch with masked-out rows to a multiple of this many rows
        (e.g. the devices of a mesh's ``"data"`` axis). Truncation still happens at
        ``max_batch_size`` rows, so the accounting is unchanged.

    Returns
    -------
    init : callable
        ``init(rng_key) -> (num_batches_per_epoch, state)``, with
        ``num_batches_per_epoch = N // int(q * N)`` (as d3p 0.2; ``N`` if ``q * N < 1``).
        The state is the key itself: in a :class:`~d3p.svi.DPSVI` loop pass
        ``dpsvi.batch_key(state)`` as the state of each step.
        May be called inside ``jit`` with a traced key.
    get_batch : callable
        ``get_batch(i, state) -> (batch, mask)``: the batch (tuple of arrays with
        ``max_batch_size`` rows) of step ``i`` and a bool mask of the real rows.
    """
    arrays, n = _check_dataset(dataset)
    q = _validation.probability(q)
    size = _check_max_batch_size(max_batch_size, n, q)
    if handle_oversized_batch not in OVERSIZED_MODES:
        raise ValueError(
            f"handle_oversized_batch must be one of {OVERSIZED_MODES}, "
            f"got {handle_oversized_batch!r}"
        )
    multiple_of = _check_count(multiple_of, "multiple_of", 1)
    plan = _hit_plan(n, q)
    if plan is None:
        thresholds = _size_thresholds(n, q, size)
        length = 0
    else:
        lam, kmax = plan
        k = np.arange(kmax)
        thresholds = _inversion_thresholds(stats.poisson.cdf(k, lam), stats.poisson.sf(k, lam))
        # enough 32-bit words for kmax used draws in almost every call (else exact fallback)
        length = math.ceil(kmax / (1.0 - (2**32 % n) / 2**32)) + 16
    thresholds = tuple(jnp.asarray(t) for t in thresholds)
    num_batches = n // max(1, int(q * n))
    draw = functools.partial(
        _poisson_batch,
        size=size,
        truncate=handle_oversized_batch == "truncate",
        length=length,
        rng_suite=rng_suite,
    )

    def init(rng_key: jax.Array) -> tuple[int, jax.Array]:
        return num_batches, rng_key

    def get_batch(i: jax.Array | int, state: jax.Array) -> tuple[Dataset, jax.Array]:
        return _pad_rows(*draw(arrays, thresholds, i, state), multiple_of)

    return init, get_batch


def _pad_rows(batch: Dataset, mask: jax.Array, multiple_of: int) -> tuple[Dataset, jax.Array]:
    """``batch`` and ``mask`` padded with masked-out zero rows to a multiple of rows."""
    pad = -mask.shape[0] % multiple_of
    if not pad:
        return batch, mask
    rows = tuple(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in batch)
    return rows, jnp.pad(mask, (0, pad))


@functools.partial(jax.jit, static_argnames=("size", "truncate", "length", "rng_suite"))
def _poisson_batch(
    arrays: Dataset,
    thresholds: tuple[jax.Array, jax.Array],
    i: jax.Array | int,
    state: jax.Array,
    *,
    size: int,
    truncate: bool,
    length: int,
    rng_suite: ModuleType,
) -> tuple[Dataset, jax.Array]:
    """The Poisson batch of step ``i`` (one compiled program per shape and static config).

    ``length > 0``: sparse path (Poissonised hits, see the module docstring), ``thresholds``
    those of the number of draws. ``length == 0``: dense path, ``thresholds`` those of
    the batch size.
    """
    n = arrays[0].shape[0]
    keys = rng_suite.split(rng_suite.fold_in(state, i), 2)
    count = _count_below(keys[0], thresholds, rng_suite)
    if length:
        idx, drawn = _distinct_hits(keys[1], count, length, n, size, truncate, rng_suite)
        oversized = drawn > size
    else:
        drawn = count
        oversized = drawn > size
        # the first entries of a uniform ordered sample are a uniform subset of any size
        idx = _ordered_sample(keys[1], size, jnp.minimum(drawn, size), n, rng_suite)
    kept = jnp.where(oversized, size if truncate else 0, drawn)
    mask = jnp.arange(size) < kept
    return _gather(arrays, idx, mask), mask


# ------------------------------------------------------------ fixed-size batches


def _with_mask(batch: Dataset, return_mask: bool) -> Any:
    """``(batch, all-True mask)`` if ``return_mask``, else ``batch``."""
    if not return_mask:
        return batch
    return batch, jnp.ones(batch[0].shape[0], bool)


def subsample_batchify_data(
    dataset: Dataset,
    batch_size: int | None = None,
    q: float | None = None,
    with_replacement: bool = False,
    rng_suite: ModuleType = d3p.random,
    return_mask: bool = False,
    *,
    multiple_of: int = 1,
) -> tuple[BatchifierInit, BatchifierGetBatch]:
    """Fixed-size uniform subsampling: a fresh random batch of ``batch_size`` records per step.

    Without replacement every ``batch_size``-subset is equally likely (accounted as
    sampling without replacement); with replacement the rows are independent
    uniform draws. Cost per batch O(batch_size log batch_size), independent of N.

    With ``with_replacement=True`` one record can appear several times in a batch, so
    one individual can contribute several clipped gradients to a step: the sensitivity
    is no longer one clipping bound, and **no accountant in d3p covers this sampling**
    (neither :mod:`d3p.dputil` nor :meth:`d3p.svi.DPSVI.get_epsilon`; :meth:`DPSVI.run
    <d3p.svi.DPSVI.run>` always samples Poisson batches). Constructing it warns.

    Parameters
    ----------
    dataset : tuple of array
        Arrays with equal first dimension ``N`` (the records).
    batch_size : int, optional
        Records per batch, in [1, N] without replacement. Give this or ``q``.
    q : float, optional
        Sampling ratio in (0, 1]; the batch size is ``int(N * q)``.
    with_replacement : bool
        Draw the rows independently (duplicates possible; not covered by any accountant
        in d3p, see above).
    rng_suite : module
        :mod:`d3p.random` (secure, default) or :mod:`d3p.random.debug` (not secure).
    return_mask : bool
        Also return an all-True mask, for an interface like the Poisson sampler's.
    multiple_of : int
        Keyword-only, with ``return_mask=True``: pad every batch with masked-out rows to
        a multiple of this many rows (e.g. the devices of a mesh's ``"data"`` axis).

    Returns
    -------
    init : callable
        ``init(rng_key) -> (num_batches_per_epoch, state)`` with
        ``num_batches_per_epoch = N // batch_size`` (at least 1). The state is the key
        itself: in a :class:`~d3p.svi.DPSVI` loop pass ``dpsvi.batch_key(state)``.
    get_batch : callable
        ``get_batch(i, state) -> batch`` (or ``(batch, mask)``) for step ``i``.
    """
    arrays, n = _check_dataset(dataset)
    size = _resolve_batch_size(batch_size, q, n, None if with_replacement else n)
    if with_replacement:
        warnings.warn(
            "subsample_batchify_data(with_replacement=True) can put one record in a batch "
            "several times; no accountant in d3p covers this sampling, so epsilon from "
            "d3p.dputil or DPSVI.get_epsilon does not apply to it",
            UserWarning,
            stacklevel=2,
        )
    multiple_of = _check_count(multiple_of, "multiple_of", 1)
    if multiple_of > 1 and not return_mask:
        raise ValueError("multiple_of pads batches with masked-out rows: pass return_mask=True")
    num_batches = max(1, n // size)
    draw = functools.partial(
        _subsample_batch,
        size=size,
        with_replacement=bool(with_replacement),
        rng_suite=rng_suite,
        return_mask=bool(return_mask),
    )

    def init(rng_key: jax.Array) -> tuple[int, jax.Array]:
        return num_batches, rng_key

    def get_batch(i: jax.Array | int, state: jax.Array) -> Any:
        batch = draw(arrays, i, state)
        return _pad_rows(*batch, multiple_of) if return_mask else batch

    return init, get_batch


@functools.partial(
    jax.jit, static_argnames=("size", "with_replacement", "rng_suite", "return_mask")
)
def _subsample_batch(
    arrays: Dataset,
    i: jax.Array | int,
    state: jax.Array,
    *,
    size: int,
    with_replacement: bool,
    rng_suite: ModuleType,
    return_mask: bool,
) -> Any:
    """The fixed-size batch of step ``i`` (one compiled program per shape and static config)."""
    n = arrays[0].shape[0]
    key = rng_suite.fold_in(state, i)
    if with_replacement:
        idx = rng_suite.randint(key, (size,), 0, n, dtype=jnp.int32)
    else:
        idx = _ordered_sample(key, size, size, n, rng_suite)
    return _with_mask(_gather(arrays, idx, jnp.ones(size, bool)), return_mask)


def split_batchify_data(
    dataset: Dataset,
    batch_size: int | None = None,
    q: float | None = None,
    rng_suite: ModuleType = d3p.random,
    return_mask: bool = False,
) -> tuple[BatchifierInit, BatchifierGetBatch]:
    """Epoch-wise batching: shuffle the records, then take consecutive slices.

    ``init`` draws a uniformly random permutation of all ``N`` records (cost
    O(N log N), once per epoch: call ``init`` at the start of every epoch);
    ``get_batch(i, state)`` returns slice ``i mod num_batches`` of it, so an epoch
    visits every record at most once (the last ``N mod batch_size`` are skipped).
    This is not Poisson sampling: do not account it as such.

    Parameters
    ----------
    dataset : tuple of array
        Arrays with equal first dimension ``N`` (the records).
    batch_size : int, optional
        Records per batch, in [1, N]. Give this or ``q``.
    q : float, optional
        Sampling ratio in (0, 1]; the batch size is ``int(N * q)``.
    rng_suite : module
        :mod:`d3p.random` (secure, default) or :mod:`d3p.random.debug` (not secure).
    return_mask : bool
        Also return an all-True mask, for an interface like the Poisson sampler's.

    Returns
    -------
    init : callable
        ``init(rng_key) -> (num_batches_per_epoch, permutation)`` with
        ``num_batches_per_epoch = N // batch_size``.
    get_batch : callable
        ``get_batch(i, permutation) -> batch`` (or ``(batch, mask)``).
    """
    arrays, n = _check_dataset(dataset)
    size = _resolve_batch_size(batch_size, q, n, n)
    num_batches = n // size

    def init(rng_key: jax.Array) -> tuple[int, jax.Array]:
        return num_batches, _permutation(rng_key, n, rng_suite)

    def get_batch(i: jax.Array | int, state: jax.Array) -> Any:
        return _split_batch(arrays, i, state, size=size, return_mask=bool(return_mask))

    return init, get_batch


@functools.partial(jax.jit, static_argnames=("size", "return_mask"))
def _split_batch(
    arrays: Dataset, i: jax.Array | int, permutation: jax.Array, *, size: int, return_mask: bool
) -> Any:
    """Slice ``i mod num_batches`` of the epoch's permutation, gathered."""
    num_batches = permutation.shape[0] // size
    start = (jnp.asarray(i, jnp.int32) % num_batches) * size
    idx = lax.dynamic_slice_in_dim(permutation, start, size)
    return _with_mask(_gather(arrays, idx, jnp.ones(size, bool)), return_mask)
