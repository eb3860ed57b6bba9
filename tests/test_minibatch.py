# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Tests for d3p.minibatch: exactness of the samplers, the jit/loop contract, bad input.

Statistical tests use fixed seeds. Per-cell checks use 5 standard deviations of
the binomial count being checked; chi-square tests reject at p < 1e-6 (with the
fixed seed a failure means a real distributional error, not bad luck).
"""

import importlib
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from d3p import minibatch as mb

SIGMAS = 5.0
P_REJECT = 1e-6


def _suite(name):
    """The rng suite module ``name``, or skip if it does not provide the interface yet."""
    module = importlib.import_module(name)
    if not all(
        hasattr(module, f) for f in ("PRNGKey", "fold_in", "split", "random_bits", "randint")
    ):
        pytest.skip(f"{name} does not provide the rng_suite interface yet")
    return module


@pytest.fixture(scope="module")
def suite():
    """The suite for the statistical tests: the secure default, which users get."""
    return _suite("d3p.random")


def _draw(get_batch, state, num):
    """Batches of steps 0..num-1 (a sequential map: under vmap the samplers' rare
    branches, lax.cond, would run for every draw)."""
    return jax.jit(lambda s: jax.lax.map(lambda i: get_batch(i, s), jnp.arange(num)))(state)


def _within_binomial(counts, trials, p):
    """Assert every count is within SIGMAS standard deviations of Binomial(trials, p)."""
    sd = math.sqrt(trials * p * (1 - p))
    dev = np.abs(np.asarray(counts) - trials * p)
    assert dev.max() <= SIGMAS * sd, (dev.max(), SIGMAS * sd)


def _chi_square_pvalue(observed, expected):
    """p-value of Pearson's chi-square on counts, pooling cells with expected count < 5."""
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    small = expected < 5
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    stat = ((observed - expected) ** 2 / expected).sum()
    return stats.chi2.sf(stat, len(observed) - 1)


# ----------------------------------------------------------------- Poisson


T_POISSON = 5000


# (N, q, max_batch_size): the dense path (batch size from the binomial table, then a
# uniform subset) and the sparse path (distinct records among Poisson(-N log(1 - q))
# uniform draws); truncation is negligible in both (P(B > max) < 1e-6).
@pytest.fixture(
    scope="module", params=[(40, 0.2, 20, False), (100, 0.08, 25, True)], ids=["dense", "sparse"]
)
def poisson_draws(suite, request):
    """T draws of a Poisson batch: (N, q, M, rows, mask, membership matrix)."""
    n, q, m, sparse = request.param
    assert (mb._hit_plan(n, q) is not None) == sparse
    data = (jnp.arange(1, n + 1),)
    init, get_batch = mb.poisson_batchify_data(data, q, m, rng_suite=suite)
    _, state = init(suite.PRNGKey(11))
    (rows,), mask = _draw(get_batch, state, T_POISSON)
    rows, mask = np.asarray(rows), np.asarray(mask)
    member = np.zeros((T_POISSON, n), bool)
    t_idx = np.repeat(np.arange(T_POISSON), m).reshape(T_POISSON, m)
    member[t_idx[mask], rows[mask] - 1] = True
    return n, q, m, rows, mask, member


def test_poisson_masked_rows_are_zero_and_members_distinct(poisson_draws):
    _, _, _, rows, mask, member = poisson_draws
    assert np.all(rows[~mask] == 0)
    assert np.all(rows[mask] >= 1)
    np.testing.assert_array_equal(member.sum(1), mask.sum(1))  # no duplicates in a batch


def test_poisson_inclusion_frequency(poisson_draws):
    _, q, _, _, _, member = poisson_draws
    # each record's count is Binomial(T, q)
    _within_binomial(member.sum(0), T_POISSON, q)


def test_poisson_pairwise_independence(poisson_draws):
    n, q, _, _, _, member = poisson_draws
    m = member.astype(np.int64)
    joint = (m.T @ m)[np.triu_indices(n, 1)]
    # each pair's co-occurrence count is Binomial(T, q**2) under independence
    _within_binomial(joint, T_POISSON, q**2)


def test_poisson_batch_size_distribution(poisson_draws):
    n, q, m, _, mask, _ = poisson_draws
    sizes = mask.sum(1)
    k = np.arange(m + 1)
    expected = T_POISSON * stats.binom.pmf(k, n, q)
    expected[-1] += T_POISSON * stats.binom.sf(m, n, q)  # truncated
    observed = np.bincount(sizes, minlength=m + 1)
    assert _chi_square_pvalue(observed, expected) > P_REJECT


@pytest.mark.slow
def test_poisson_sparse_large_sample(suite):
    """Sparse path at N = 2000, q = 0.01, 20,000 draws: inclusion, pairs and sizes.

    Per-record counts within 5 sd of Binomial(T, q); the co-occurrence counts of 500
    record pairs within 5 sd of Binomial(T, q**2); sizes chi-square against
    Binomial(N, q) with the truncated mass in the last cell.
    """
    n, q, m, t = 2000, 0.01, 40, 20_000
    assert mb._hit_plan(n, q) is not None
    init, get_batch = mb.poisson_batchify_data((jnp.arange(1, n + 1),), q, m, rng_suite=suite)
    (rows,), mask = _draw(get_batch, init(suite.PRNGKey(21))[1], t)
    rows, mask = np.asarray(rows), np.asarray(mask)
    member = np.zeros((t, n), bool)
    t_idx = np.repeat(np.arange(t), m).reshape(t, m)
    member[t_idx[mask], rows[mask] - 1] = True
    np.testing.assert_array_equal(member.sum(1), mask.sum(1))
    _within_binomial(member.sum(0), t, q)
    a, b = np.arange(0, 1000, 2), np.arange(1, 1000, 2)
    _within_binomial((member[:, a] & member[:, b]).sum(0), t, q**2)
    expected = t * stats.binom.pmf(np.arange(m + 1), n, q)
    expected[-1] += t * stats.binom.sf(m, n, q)
    assert _chi_square_pvalue(np.bincount(mask.sum(1), minlength=m + 1), expected) > P_REJECT


def test_poisson_sparse_truncation(suite):
    """Sparse path: oversized draws happen with P(B > M) and keep a uniform M-subset."""
    n, q, m, t = 60, 0.05, 2, 4000
    assert mb._hit_plan(n, q) is not None
    init, get_batch = mb.poisson_batchify_data((jnp.arange(n),), q, m, "truncate", suite)
    (rows,), mask = _draw(get_batch, init(suite.PRNGKey(6))[1], t)
    rows, mask = np.asarray(rows), np.asarray(mask)
    full = mask.all(1)
    _within_binomial([full.sum()], t, stats.binom.sf(m, n, q) + stats.binom.pmf(m, n, q))
    sizes = np.bincount(mask.sum(1), minlength=m + 1)
    expected = t * stats.binom.pmf(np.arange(m + 1), n, q)
    expected[-1] += t * stats.binom.sf(m, n, q)
    assert _chi_square_pvalue(sizes, expected) > P_REJECT
    # every record equally likely in full batches (uniform M-subsets or Poisson batches)
    counts = np.bincount(rows[full].ravel(), minlength=n)
    assert _chi_square_pvalue(counts, np.full(n, counts.sum() / n)) > P_REJECT
    assert np.all(rows[full][:, 0] != rows[full][:, 1])


def test_poisson_truncation_is_uniform_subset(suite):
    n, q, m, t = 8, 0.9, 3, 5600
    init, get_batch = mb.poisson_batchify_data((jnp.arange(n),), q, m, "truncate", suite)
    (rows,), mask = _draw(get_batch, init(suite.PRNGKey(5))[1], t)
    rows, mask = np.asarray(rows), np.asarray(mask)
    full = mask.all(1)
    p_full = stats.binom.sf(m - 1, n, q)
    _within_binomial([full.sum()], t, p_full)
    # given a full batch, every 3-subset of the 8 records is equally likely (56 cells)
    subsets = {s: i for i, s in enumerate(itertools.combinations(range(n), m))}
    cells = [subsets[tuple(sorted(r))] for r in rows[full]]
    observed = np.bincount(cells, minlength=len(subsets))
    expected = np.full(len(subsets), full.sum() / len(subsets))
    assert _chi_square_pvalue(observed, expected) > P_REJECT


def test_poisson_suppress_empties_exactly_oversized_draws(suite):
    n, q, m, t = 12, 0.5, 6, 4000
    data = (jnp.arange(1, n + 1),)
    key = suite.PRNGKey(8)
    init_t, get_t = mb.poisson_batchify_data(data, q, m, "truncate", suite)
    init_s, get_s = mb.poisson_batchify_data(data, q, m, "suppress", suite)
    (_, mask_t), ((rows_s,), mask_s) = (
        _draw(get_t, init_t(key)[1], t),
        _draw(get_s, init_s(key)[1], t),
    )
    size_t, size_s = np.asarray(mask_t).sum(1), np.asarray(mask_s).sum(1)
    assert np.all(np.asarray(rows_s)[~np.asarray(mask_s)] == 0)
    # same key -> same size draw: suppress differs from truncate only on oversized draws,
    # which truncate reports as full (size m) and suppress as empty
    differs = size_t != size_s
    assert np.all(size_t[differs] == m) and np.all(size_s[differs] == 0)
    # sizes under suppress: P(0) = P(B = 0) + P(B > m), P(k) = P(B = k) otherwise
    expected = t * stats.binom.pmf(np.arange(m + 1), n, q)
    expected[0] += t * stats.binom.sf(m, n, q)
    assert _chi_square_pvalue(np.bincount(size_s, minlength=m + 1), expected) > P_REJECT


def test_poisson_max_of_all_records_never_oversized(suite):
    with pytest.raises(ValueError, match=r"max_batch_size must be in \[1, 5\]"):
        mb.poisson_batchify_data((jnp.arange(1, 6),), 1.0, 8, rng_suite=suite)
    init, get_batch = mb.poisson_batchify_data(
        (jnp.arange(1, 6),), 1.0, 5, rng_suite=suite, multiple_of=4
    )
    (rows,), mask = get_batch(0, init(suite.PRNGKey(0))[1])
    np.testing.assert_array_equal(mask, [True] * 5 + [False] * 3)  # padded to 8 rows
    np.testing.assert_array_equal(np.sort(np.asarray(rows)[:5]), np.arange(1, 6))


def test_poisson_quantile_max_batch_size(suite):
    n, q = 1000, 0.03
    for level in (0.5, 0.99, 0.999999):
        _, get_batch = mb.poisson_batchify_data((jnp.zeros((n, 2)),), q, level, rng_suite=suite)
        _, mask = jax.eval_shape(get_batch, 0, suite.PRNGKey(0))
        assert mask.shape == (int(stats.binom.ppf(level, n, q)),)
        assert mb.structural_batch_size(n, q, level) == mask.shape[0]
    assert mb.structural_batch_size(n, q, 7) == 7


def test_contract_jit_init_and_fori_loop(suite, x64):
    dtype = jnp.float64 if x64 else jnp.float32
    data = (jnp.arange(50, dtype=dtype).reshape(25, 2), jnp.arange(25))
    init, get_batch = mb.poisson_batchify_data(data, np.float64(0.2), np.int64(10), rng_suite=suite)
    num, state = jax.jit(init)(suite.PRNGKey(3))
    assert int(num) == 5

    def total(state):
        return jax.lax.fori_loop(0, 4, lambda i, a: a + get_batch(i, state)[1].sum(), 0)

    looped = jax.jit(total)(state)
    step = jax.jit(get_batch)
    batches = [step(i, state) for i in range(4)]
    assert int(looped) == sum(int(mask.sum()) for _, mask in batches)
    assert batches[0][0][0].dtype == dtype
    # reproducible per step, different across steps
    np.testing.assert_array_equal(step(1, state)[0][1], batches[1][0][1])
    assert not np.array_equal(batches[1][0][1], batches[2][0][1])


# ------------------------------------------------------------ fixed size


@pytest.mark.parametrize("batch_size", [7, 20])  # stream path, permutation path
def test_subsample_without_replacement_uniform(suite, batch_size):
    n, t = 30, 3000
    init, get_batch = mb.subsample_batchify_data(
        (jnp.arange(n),), batch_size=batch_size, rng_suite=suite
    )
    num, state = init(suite.PRNGKey(batch_size))
    assert num == n // batch_size
    (rows,) = _draw(get_batch, state, t)
    rows = np.asarray(rows)
    assert all(len(set(r)) == batch_size for r in rows)
    _within_binomial(np.bincount(rows.ravel(), minlength=n), t, batch_size / n)


def test_subsample_with_replacement_duplicate_rate(suite):
    n, b, t = 20, 5, 4000
    init, get_batch = mb.subsample_batchify_data(
        (jnp.arange(n),), q=0.25, with_replacement=True, rng_suite=suite, return_mask=True
    )
    (rows,), mask = _draw(get_batch, init(suite.PRNGKey(4))[1], t)
    assert np.asarray(mask).all() and rows.shape == (t, b)
    has_dup = np.array([len(set(r)) < b for r in np.asarray(rows)])
    p_dup = 1 - math.prod(1 - j / n for j in range(b))
    _within_binomial([has_dup.sum()], t, p_dup)
    _within_binomial(np.bincount(np.asarray(rows).ravel(), minlength=n), t * b, 1 / n)


@pytest.mark.parametrize("n", [100, 105])
def test_split_epoch_visits_each_record_once(suite, n):
    init, get_batch = mb.split_batchify_data((jnp.arange(n),), batch_size=10, rng_suite=suite)
    num, perm = jax.jit(init)(suite.PRNGKey(1))
    assert int(num) == 10
    (rows,) = _draw(get_batch, perm, 11)
    epoch = np.asarray(rows[:10]).ravel()
    assert len(set(epoch)) == 100  # at most once; exactly once when 10 divides n
    if n == 100:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    np.testing.assert_array_equal(rows[10], rows[0])  # wraps around within the epoch


def test_split_permutations_uniform(suite):
    t = 2400
    init, _ = mb.split_batchify_data((jnp.arange(4),), batch_size=1, rng_suite=suite)
    perms = jax.vmap(lambda k: init(k)[1])(suite.split(suite.PRNGKey(2), t))
    cells = {p: i for i, p in enumerate(itertools.permutations(range(4)))}
    observed = np.bincount([cells[tuple(p)] for p in np.asarray(perms)], minlength=24)
    assert _chi_square_pvalue(observed, np.full(24, t / 24)) > P_REJECT


@pytest.mark.parametrize("n, big_n", [(2, 6), (3, 4)])  # stream path, permutation path
def test_sample_without_replacement_ordered_uniform(suite, n, big_n):
    t = 3000
    keys = suite.split(suite.PRNGKey(n), t)
    draws = np.asarray(jax.vmap(lambda k: mb.sample_without_replacement(k, n, big_n, suite))(keys))
    cells = {p: i for i, p in enumerate(itertools.permutations(range(big_n), n))}
    observed = np.bincount([cells[tuple(d)] for d in draws], minlength=len(cells))
    assert _chi_square_pvalue(observed, np.full(len(cells), t / len(cells))) > P_REJECT


def test_sample_without_replacement_large_range(suite):
    out = mb.sample_without_replacement(suite.PRNGKey(0), 1000, 2**31 - 1, suite)
    assert out.shape == (1000,) and out.dtype == jnp.int32
    assert len(np.unique(out)) == 1000 and int(out.min()) >= 0
    assert mb.sample_without_replacement(suite.PRNGKey(0), 0, 5, suite).shape == (0,)


@pytest.mark.filterwarnings("ignore:d3p.random.debug uses")
@pytest.mark.parametrize("name", ["d3p.random", "d3p.random.debug"])
def test_poisson_batch_with_each_suite(name):
    suite = _suite(name)
    init, get_batch = mb.poisson_batchify_data((jnp.arange(1, 101),), 0.1, 25, rng_suite=suite)
    (rows,), mask = jax.jit(get_batch)(3, init(suite.PRNGKey(0))[1])
    rows, mask = np.asarray(rows), np.asarray(mask)
    assert np.all(rows[~mask] == 0) and len(set(rows[mask])) == mask.sum() > 0


def test_conversions():
    assert mb.q_to_batch_size(np.float32(0.25), 10) == 2
    assert mb.batch_size_to_q(np.int64(5), 20) == 0.25


# ------------------------------------------------------------- bad input

_X = (np.zeros((10, 2)),)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: mb.poisson_batchify_data([np.zeros(3)], 0.1, 2), "dataset"),
        (lambda: mb.poisson_batchify_data((), 0.1, 2), "dataset"),
        (lambda: mb.poisson_batchify_data((np.zeros(3), np.zeros(4)), 0.1, 2), "dataset"),
        (lambda: mb.poisson_batchify_data((np.zeros((0, 2)),), 0.1, 2), "dataset"),
        (lambda: mb.poisson_batchify_data(_X, 0.0, 2), "q"),
        (lambda: mb.poisson_batchify_data(_X, 1.5, 2), "q"),
        (lambda: mb.poisson_batchify_data(_X, float("nan"), 2), "q"),
        (lambda: mb.poisson_batchify_data(_X, 0.1, 0), "max_batch_size"),
        (lambda: mb.poisson_batchify_data(_X, 0.1, 1.0), "max_batch_size"),
        (lambda: mb.poisson_batchify_data(_X, 0.1, 2, "drop"), "handle_oversized_batch"),
        (lambda: mb.structural_batch_size(0, 0.1, 2), "N"),
        (lambda: mb.structural_batch_size(10, 0.0, 2), "q"),
        (lambda: mb.structural_batch_size(10, 0.1, 1.5), "max_batch_size"),
        (lambda: mb.subsample_batchify_data(_X), "batch_size"),
        (lambda: mb.subsample_batchify_data(_X, batch_size=2, q=0.2), "batch_size"),
        (lambda: mb.subsample_batchify_data(_X, batch_size=11), "batch_size"),
        (lambda: mb.subsample_batchify_data(_X, q=-0.1), "q"),
        (lambda: mb.subsample_batchify_data(_X, q=0.01), "q"),
        (lambda: mb.split_batchify_data(_X, batch_size=0), "batch_size"),
        (lambda: mb.split_batchify_data(_X, batch_size=11), "batch_size"),
        (lambda: mb.sample_without_replacement(None, 4, 3), "n"),
        (lambda: mb.sample_without_replacement(None, 1, 0), "N"),
    ],
)
def test_bad_input_raises_value_error(call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: mb.poisson_batchify_data(_X, "0.1", 2), "q"),
        (lambda: mb.poisson_batchify_data(_X, 0.1, "2"), "max_batch_size"),
        (lambda: mb.subsample_batchify_data(_X, batch_size=2.0), "batch_size"),
    ],
)
def test_bad_type_raises_type_error(call, name):
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        call()


# ------------------------------------------------------------ batch-size law


def _mp_binomial_cdf_sf(n, q, ks):
    """``{k: (P(B <= k), P(B > k))}`` for ``B ~ Binomial(n, q)`` with 40 significant digits.

    Independent of scipy: sums the pmf (log-gamma start, then the ratio recurrence) over
    ``mean +- 60 sd``; the mass outside is below 1e-700 (Chernoff), far below the checked
    1e-12.
    """
    import mpmath

    mpmath.mp.dps = 40
    mean, sd = n * q, math.sqrt(n * q * (1 - q))
    lo, hi = max(0, int(mean - 60 * sd)), min(n, int(mean + 60 * sd) + 1)
    q_mp = mpmath.mpf(q)
    log_pmf = (
        mpmath.loggamma(n + 1)
        - mpmath.loggamma(lo + 1)
        - mpmath.loggamma(n - lo + 1)
        + lo * mpmath.log(q_mp)
        + (n - lo) * mpmath.log1p(-q_mp)
    )
    pmf, ratio = mpmath.exp(log_pmf), q_mp / (1 - q_mp)
    partial, cdf = mpmath.mpf(0), {}
    for j in range(lo, hi + 1):
        partial += pmf
        if j in ks:
            cdf[j] = partial
        pmf *= (n - j) * ratio / (j + 1)
    return {k: (cdf[k], partial - cdf[k]) for k in ks}


@pytest.mark.parametrize("n, q", [(10**8, 0.01), (10**10, 1e-5)])
def test_batch_size_table_matches_high_precision(n, q):
    """The size thresholds are within 1e-12 of the exact CDF; tails within 1e-9 relative.

    The old cumulative-sum table was off by 1.3e-7 at n = 1e8, q = 0.01.
    """
    size = mb.structural_batch_size(n, q, 1 - 1e-9)
    hi, lo = mb._size_thresholds(n, q, size)
    thresholds = (hi.astype(np.uint64) << np.uint64(32)) | lo.astype(np.uint64)
    mean, sd = n * q, math.sqrt(n * q * (1 - q))
    ks = {int(mean - 5 * sd), int(mean), int(mean + 2 * sd), int(mean + 5 * sd), size}
    exact = _mp_binomial_cdf_sf(n, q, ks)
    for k, (cdf, sf) in exact.items():
        table_sf = (2**64 - int(thresholds[k])) / 2**64
        assert abs(int(thresholds[k]) / 2**64 - float(cdf)) <= 1e-12, k
        assert abs(table_sf - float(sf)) <= 1e-9 * float(sf) + 2**-64, k
    # the truncation probability at the structural size is at most the quantile's 1e-9
    assert float(exact[size][1]) <= 1e-9


def test_with_replacement_warns_no_accountant():
    with pytest.warns(UserWarning, match="no accountant"):
        mb.subsample_batchify_data((jnp.arange(10),), 3, with_replacement=True)


def test_d3p02_batchifier_contract():
    """d3p 0.2's interface: numpy scalars, init under jit, N // int(q N) Poisson batches."""
    data = (jnp.arange(10.0),)
    key = mb.d3p.random.PRNGKey(1)
    init, get_batch = mb.poisson_batchify_data(data, np.float64(0.15), 0.99)
    assert init(key)[0] == 10 // int(0.15 * 10) == 10
    _, state = jax.jit(init)(key)
    batch, mask = get_batch(np.int64(2), state)
    assert batch[0].shape == mask.shape
    for make in (mb.subsample_batchify_data, mb.split_batchify_data):
        init, get_batch = make(data, np.int64(3))
        num, _ = init(key)
        _, state = jax.jit(init)(key)
        assert num == 3 and isinstance(num, int)

        def rows(s, num=num, get_batch=get_batch):
            return jax.lax.fori_loop(0, num, lambda i, a: a + get_batch(i, s)[0], jnp.zeros(3))

        assert jax.jit(rows)(state).shape == (3,)
        init, _ = make(data, q=np.float32(0.3))
        assert init(key)[0] == 3


def test_first_occurrences_packed_and_pair_sorts_agree():
    """The packed single-key sort and the (value, position) pair sort mark the same entries."""
    rng = np.random.default_rng(0)
    values = jnp.asarray(rng.integers(0, 50, 300), jnp.int32)
    valid = jnp.asarray(rng.random(300) < 0.8)
    packed = mb._first_occurrences(values, valid, 50)  # 51 << 9 fits in 32 bits
    pairs = mb._first_occurrences(values, valid, 2**31 - 1)  # does not: pair sort
    expected = np.zeros(300, bool)
    seen = set()
    for i, (v, ok) in enumerate(zip(np.asarray(values), np.asarray(valid), strict=True)):
        if ok and v not in seen:
            seen.add(v)
            expected[i] = True
    np.testing.assert_array_equal(packed, expected)
    np.testing.assert_array_equal(pairs, expected)


@pytest.mark.parametrize("truncate", [False, True])
def test_distinct_hits_continue_the_stream_and_truncate_in_hit_order(suite, truncate):
    """The used draws run on into further blocks when a block is short, and an oversized
    draw keeps the first distinct values in the order of the draws."""
    n = 2**30 + 1  # words below 2**32 mod n = 2**30 - 3 are rejected: about a quarter
    length, size = 8, 3
    key = suite.PRNGKey(4)
    words = np.concatenate(
        [suite.random_bits(suite.fold_in(key, b), 32, (length,)) for b in range(8)]
    )
    stream = (words[words >= 2**32 % n] % n).astype(np.int64)
    fn = jax.jit(lambda c: mb._distinct_hits(key, c, length, n, size, truncate, suite))
    continued = 0
    for count in range(length + 1):
        continued += int(np.sum(words[:length] >= 2**32 % n) < count)
        idx, drawn = fn(count)
        draws = stream[:count]
        distinct = np.unique(draws)
        assert int(drawn) == len(distinct)
        if truncate and len(distinct) > size:
            _, first = np.unique(draws, return_index=True)
            expected = draws[np.sort(first)][:size]
        else:
            expected = np.pad(distinct[:size], (0, max(0, size - len(distinct))))
        np.testing.assert_array_equal(idx, expected)
    assert continued > 0  # some counts needed a second block
