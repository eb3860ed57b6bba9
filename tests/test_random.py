# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Tests of d3p.random (ChaCha20) and d3p.random.debug."""

import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import d3p.random as dr
from d3p.random import _sampling, chacha
from tests.conftest import DATA_DIR

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import d3p.random.debug as dbg

REFERENCE = json.loads((DATA_DIR / "chacha_reference.json").read_text())
CASES = REFERENCE["cases"]
SUITES = [dr, dbg]
N_STAT = 100_000


def _seed(case):
    s = case["seed"]
    return int(s["int"]) if "int" in s else bytes.fromhex(s["bytes_hex"])


def _expected(entry):
    if "values" in entry:
        values = np.array(entry["values"], dtype=entry["dtype"])
    else:
        values = np.array([float.fromhex(h) for h in entry["hex"]], dtype=entry["dtype"])
    return values.reshape(entry["shape"])


def _assert_bits_equal(actual, entry):
    expected = _expected(entry)
    assert np.asarray(actual).dtype == expected.dtype
    np.testing.assert_array_equal(np.asarray(actual), expected)


def _assert_normal_equal(actual, entry):
    """Normals: bit-exact on CPU (where the reference was made); elsewhere erf_inv is
    a different polynomial evaluation (seen on an H100: 1 ulp), so allow 2 ulp."""
    if jax.default_backend() == "cpu":
        _assert_bits_equal(actual, entry)
    else:
        np.testing.assert_array_max_ulp(np.asarray(actual), _expected(entry), maxulp=2)


def _check_common_vectors(case):
    """The vectors that must match in both x64 modes."""
    key = dr.PRNGKey(_seed(case))
    _assert_bits_equal(key, case["key"])
    for width in (8, 16, 32):
        _assert_bits_equal(dr.random_bits(key, width, (37,)), case[f"random_bits_{width}_(37,)"])
    _assert_bits_equal(dr.random_bits(key, 32, (3, 5)), case["random_bits_32_(3,5)"])
    _assert_bits_equal(dr.random_bits(key, 32, 40), case["random_bits_32_(40,)"])
    _assert_bits_equal(dr.split(key, 3), case["split_3"])
    chained = dr.split(dr.split(key, 2)[1], 4)[3]
    _assert_bits_equal(dr.random_bits(chained, 32, (8,)), case["split_chain_bits32_(8,)"])
    _assert_bits_equal(dr.fold_in(key, 7), case["fold_in_7"])
    _assert_bits_equal(dr.fold_in(key, 123456), case["fold_in_123456"])
    _assert_bits_equal(dr.uniform(key, (9,), jnp.float32), case["uniform_f32_(9,)"])
    _assert_normal_equal(dr.normal(key, (9,), jnp.float32), case["normal_float32_(9,)"])
    return key


@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c["seed"]))
def test_reference_vectors_x64(case):
    # The reference was produced with jax_enable_x64=True: every vector must match.
    with jax.enable_x64(True):
        key = _check_common_vectors(case)
        _assert_bits_equal(dr.random_bits(key, 64, (37,)), case["random_bits_64_(37,)"])
        _assert_bits_equal(
            dr.uniform(key, (5,), jnp.float32, -3.0, 2.0), case["uniform_f32_(5,)_[-3,2)"]
        )
        _assert_bits_equal(dr.uniform(key, (9,), jnp.float64), case["uniform_f64_(9,)"])
        _assert_normal_equal(dr.normal(key, (9,), jnp.float64), case["normal_float64_(9,)"])


def test_reference_vectors_x32():
    with jax.enable_x64(False):
        for case in CASES:
            key = _check_common_vectors(case)
            # x32 has no wide float for the range map, so u * 5 and the sum - 3 are
            # rounded separately: each rounding of a value below 8 in magnitude is at
            # most half a float32 ulp of [4, 8), 2**-22; the reference rounded once.
            expected = _expected(case["uniform_f32_(5,)_[-3,2)"])
            actual = np.asarray(dr.uniform(key, (5,), jnp.float32, -3.0, 2.0))
            np.testing.assert_allclose(actual, expected, rtol=0, atol=2 * 2.0**-22)


def test_rfc8439_block_function():
    # RFC 8439, section 2.3.2: key 00:01:..:1f, counter 1,
    # nonce 00:00:00:09:00:00:00:4a:00:00:00:00.
    key_words = np.frombuffer(bytes(range(32)), dtype="<u4")
    nonce = np.frombuffer(bytes.fromhex("000000090000004a00000000"), dtype="<u4")
    state = np.concatenate([chacha.CONSTANTS, key_words, [1], nonce]).astype(np.uint32)
    expected = [
        0xE4E7F110, 0x15593BD1, 0x1FDD0F50, 0xC47120A3,
        0xC7F4D1C7, 0x0368C033, 0x9AAA2204, 0x4E6CD4C3,
        0x466482D2, 0x09AA9F07, 0x05D7C214, 0xA2028BD9,
        0xD19C12B5, 0xB94E16DE, 0xE883D0CB, 0x4E3C50A2,
    ]  # fmt: skip
    out = chacha.block(jnp.asarray(state.reshape(4, 4)))
    np.testing.assert_array_equal(np.asarray(out).reshape(-1), np.array(expected, np.uint32))
    # The stream's second block (counter + 1) is the block function at counter 2.
    state2 = state.copy()
    state2[12] = 2
    np.testing.assert_array_equal(
        chacha.stream_words(jnp.asarray(state.reshape(4, 4)), 32)[16:],
        np.asarray(chacha.block(jnp.asarray(state2.reshape(4, 4)))).reshape(-1),
    )
    # Both ways of running the rounds (unrolled off CPU, looped on CPU) give the RFC block.
    for unroll in (True, False):
        words = chacha._blocks(jnp.asarray(state.reshape(4, 4)), 3, unroll)
        np.testing.assert_array_equal(words[:16], np.array(expected, np.uint32))
        np.testing.assert_array_equal(
            words, chacha.stream_words(jnp.asarray(state.reshape(4, 4)), 48)
        )


def test_chacha_looped_matches_unrolled():
    # The looped (16, n) layout (CPU) and the unrolled 16-word layout (other backends) give
    # the same words, here on a draw whose counter wraps past 2**32 and on one of more than
    # a thousand blocks.
    state = dr.PRNGKey(123).at[3, 0].set(np.uint32(2**32 - 2))
    looped = chacha._blocks.__wrapped__(state, 5, False)
    np.testing.assert_array_equal(looped, chacha._blocks.__wrapped__(state, 5, True))
    np.testing.assert_array_equal(looped[48:64], chacha.block(state.at[3, 0].set(1)).reshape(-1))
    many = chacha._blocks(dr.PRNGKey(7), 1100, False)
    np.testing.assert_array_equal(many, chacha._blocks(dr.PRNGKey(7), 1100, True))


def test_prngkey_seeds():
    assert dr.PRNGKey(2**256 + 5).tolist() == dr.PRNGKey(5).tolist()
    assert dr.PRNGKey(-1).tolist() == dr.PRNGKey(2**256 - 1).tolist()
    assert dr.PRNGKey(np.int64(42)).tolist() == dr.PRNGKey(42).tolist()
    assert dr.PRNGKey(b"\x01").tolist() == dr.PRNGKey(b"\x01" + bytes(31)).tolist()
    a, b = dr.PRNGKey(), dr.PRNGKey()
    assert a.dtype == jnp.uint32 and a.shape == (4, 4)
    assert not np.array_equal(a[1:3], b[1:3])  # fresh OS entropy: 2**-256 chance to fail
    np.testing.assert_array_equal(a[0], chacha.CONSTANTS)


@pytest.mark.parametrize(
    "seed, err",
    [(1.5, TypeError), ("1", TypeError), (True, TypeError), (bytes(33), ValueError)],
)
def test_prngkey_bad_seed(seed, err):
    with pytest.raises(err, match="seed"):
        dr.PRNGKey(seed)


@pytest.mark.parametrize("suite", SUITES, ids=["chacha", "debug"])
def test_bad_input(suite):
    key = suite.PRNGKey(0)
    with pytest.raises(ValueError, match="bit_width"):
        suite.random_bits(key, 12, (3,))
    with pytest.raises(ValueError, match="shape"):
        suite.uniform(key, (2, -1))
    with pytest.raises(TypeError, match="dtype"):
        suite.uniform(key, (2,), jnp.int32)
    with pytest.raises(TypeError, match="dtype"):
        suite.normal(key, (2,), jnp.uint8)
    with pytest.raises(TypeError, match="dtype"):
        suite.hardened_normal(key, (2,), "not a dtype")
    with pytest.raises(TypeError, match="dtype"):
        suite.randint(key, (2,), 0, 5, jnp.float32)
    with pytest.raises(ValueError, match="minval < maxval"):
        suite.randint(key, (2,), 5, 5)
    with pytest.raises(TypeError, match="minval"):
        suite.randint(key, (2,), 0.5, 5)
    with pytest.raises(TypeError, match="key"):
        suite.uniform(jnp.zeros((3,), jnp.uint32))
    with jax.enable_x64(False), pytest.raises(ValueError, match="jax_enable_x64"):
        suite.random_bits(key, 64, (3,))


def test_fold_in_bad_data():
    key = dr.PRNGKey(0)
    with pytest.raises(ValueError, match="data"):
        dr.fold_in(key, -1)
    with pytest.raises(ValueError, match="data"):
        dr.fold_in(key, 2**32)
    with pytest.raises(TypeError, match="data"):
        dr.fold_in(key, 1.0)


def test_debug_warns_on_import():
    import importlib

    with pytest.warns(UserWarning, match="not be used for real data"):
        importlib.reload(dbg)


def test_jit_vmap(x64):
    key = dr.PRNGKey(3)
    keys = dr.split(key, 3)

    def draws(k, data):
        k2 = dr.fold_in(k, data)
        return (
            dr.uniform(k2, (5,)),
            dr.normal(k2, (5,)),
            dr.hardened_normal(k2, (5,)),
            dr.randint(k2, (5,), -3, 1000),
            dr.random_bits(k2, 16, (5,)),
            dr.split(k2, 2),
            dr.convert_to_jax_rng_key(k2),
        )

    eager = [draws(k, 11) for k in keys]
    jitted = jax.jit(jax.vmap(draws, in_axes=(0, None)))(keys, jnp.uint32(11))
    for i in range(3):
        for n, (e, j) in enumerate(zip(eager[i], jitted, strict=True)):
            if n in (1, 2):
                # erf_inv is a polynomial that XLA may contract differently when fused
                # into a larger jitted computation: equal up to 4 ulp.
                np.testing.assert_array_max_ulp(np.asarray(e), np.asarray(j[i]), maxulp=4)
            else:
                np.testing.assert_array_equal(np.asarray(e), np.asarray(j[i]))
    u = eager[0][0]
    assert u.dtype == (jnp.float64 if x64 else jnp.float32)


def test_randint_ranges(x64):
    key = dr.PRNGKey(5)
    x = dr.randint(key, (1000,), -(2**40), 2**40, jnp.int32)  # clamped to the int32 range
    assert x.dtype == jnp.int32
    assert np.asarray(x).min() < -(2**30) and np.asarray(x).max() > 2**30
    y = dr.randint(key, (1000,), 250, 1000, jnp.uint8)  # maxval above 255 admits 255
    assert set(np.unique(np.asarray(y))) <= set(range(250, 256))
    assert 255 in np.asarray(y)
    # traced bounds
    z = jax.jit(lambda lo, hi: dr.randint(key, (1000,), lo, hi))(jnp.int32(-2), jnp.int32(3))
    assert set(np.unique(np.asarray(z))) == set(range(-2, 3))


def _ks_ok(sample, cdf):
    # KS test at significance 1e-4 with N_STAT samples: a correct sampler fails
    # with probability 1e-4; the fixed seeds make it deterministic.
    return stats.kstest(np.asarray(sample, np.float64), cdf).pvalue > 1e-4


@pytest.mark.parametrize("suite", SUITES, ids=["chacha", "debug"])
def test_statistics(suite):
    key = suite.PRNGKey(2026)
    k1, k2, k3, k4 = suite.split(key, 4)
    u = np.asarray(suite.uniform(k1, (N_STAT,)), np.float64)
    # mean of U(0,1): standard error sqrt(1/12/N); allow 5 standard errors.
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / N_STAT)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert _ks_ok(u, "uniform")
    k5 = suite.fold_in(key, 5)
    samplers = ((suite.normal, k2), (suite.hardened_normal, k3), (suite.hardened_normal_sum4, k5))
    for sampler, k in samplers:
        z = np.asarray(sampler(k, (N_STAT,)), np.float64)
        assert abs(z.mean()) < 5 / math.sqrt(N_STAT)
        # variance of N(0,1) sample variance: 2/N; allow 5 standard errors.
        assert abs(z.var() - 1.0) < 5 * math.sqrt(2 / N_STAT)
        assert _ks_ok(z, "norm")
    # randint on [0, 3 * 2**30): modulo reduction of 32-bit words would give the
    # values below 2**30 probability 2/4 instead of 1/3 (a 50% bias).
    r = np.asarray(suite.randint(k4, (N_STAT,), 0, 3 * 2**30, jnp.uint32), np.float64)
    frac_low = (r < 2**30).mean()
    assert abs(frac_low - 1 / 3) < 5 * math.sqrt(2 / 9 / N_STAT)  # 5 sigma of a binomial
    assert _ks_ok(r / (3 * 2**30), "uniform")


def test_hardened_normal_escapes_the_plain_value_set():
    # In float32 the plain sampler's output is a function of 23 random mantissa bits, so it
    # takes at most 2**23 values; build that whole set by running its transform on every
    # possible word. Every plain sample must lie in it (the check can fail), while most
    # hardened samples must not: measured 88% of 2**18 seed-3 samples lie outside; the
    # binomial standard error is about 0.07%, so 80% is a bound far below any sampling
    # fluctuation, and a hardened sampler that only permuted the plain values would fail it.
    words = jnp.arange(2**23, dtype=jnp.uint32) << 9  # the 23 mantissa bits of a float32

    def every_uniform(key, shape, dtype, minval, maxval):
        return _sampling.uniform_from_bits(lambda *_: words, key, shape, dtype, minval, maxval)

    with jax.enable_x64(False):
        values = _sampling.normal_from_uniform(every_uniform, None, (2**23,), jnp.float32)
        plain_set = np.unique(np.asarray(values))
        k1, k2 = dr.split(dr.PRNGKey(3))
        plain = np.asarray(dr.normal(k1, (2**18,), jnp.float32))
        hardened = np.asarray(dr.hardened_normal(k2, (2**18,), jnp.float32))
    assert np.isin(plain, plain_set).all()
    assert np.mean(~np.isin(hardened, plain_set)) > 0.8


def _box_muller_reference(words, nbits):
    """float64 recomputation of a Box-Muller half pair from ``(q, angle)`` word arrays."""
    wq, wa = (np.asarray(w).astype(object) for w in words)  # exact Python ints
    q = (wq.astype(np.float64) + 0.5) * 2.0**-nbits
    rho = np.sqrt(-np.log(q))
    fbits = nbits - 3
    k = (wa >> fbits).astype(np.int64)
    phi = (wa & ((1 << fbits) - 1)).astype(np.float64) * 2.0**-fbits * np.pi / 4
    theta = np.where(k % 2 == 0, k * np.pi / 4 + phi, (k + 1) * np.pi / 4 - phi)
    return rho * np.cos(theta), rho * np.sin(theta)


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_hardened_normal_construction(x64):
    # The sampler is pinned by recomputing it from the stream in float64 (64-bit words:
    # w[j] << 32 | w[j + 8] of each block): with b blocks, block i's 16 words are column i
    # of W = stream.reshape(b, 16).T; rows split in four (q and angle words of term A, then
    # of term B) give x and y of two Box-Muller halves, and the values are the rows
    # xA + xB, then yA + yB, flattened row-major. A wrong word, octant, sign, scale or
    # order moves values by O(1); float32 rounding and the polynomials move them by at
    # most a few ulp (measured max difference 1.9e-6 here).
    shape = (3, 1365)  # 4095 values: not a multiple of a block's 8 (float32) or 4
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        nbits, per_block = (64, 4) if x64 else (32, 8)
        key = dr.PRNGKey(11)
        got = np.asarray(dr.hardened_normal(key, shape, dtype), np.float64)
        assert got.dtype == np.float64 and got.shape == shape
        b = -(-4095 // per_block)
        w = np.asarray(dr.random_bits(key, 32, (b, 16))).T.astype(object)
        if x64:
            w = (w[:8] << 32) | w[8:]
        quarter = len(w) // 4
        xa, ya = _box_muller_reference(w[: 2 * quarter].reshape(2, quarter, b), nbits)
        xb, yb = _box_muller_reference(w[2 * quarter :].reshape(2, quarter, b), nbits)
        expected = np.concatenate([xa + xb, ya + yb]).reshape(-1)[:4095].reshape(shape)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 if x64 else 1e-5)
    # the debug suite runs the same construction on its own words
    words = np.asarray(jax.random.bits(dbg.PRNGKey(5), (16, 2), jnp.uint32))
    xa, ya = _box_muller_reference(words[:8].reshape(2, 4, 2), 32)
    xb, yb = _box_muller_reference(words[8:].reshape(2, 4, 2), 32)
    expected = np.concatenate([xa + xb, ya + yb]).reshape(-1)[:13]
    with jax.enable_x64(False):
        got = np.asarray(dbg.hardened_normal(dbg.PRNGKey(5), (13,), jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_sin_cos_octant_accuracy():
    # The polynomials replace sin and cos on [0, pi/4]: within 1.1 ulp of the exact values
    # in float32 (measured 1.10) and 1 ulp of numpy's in float64.
    for dtype, maxulp in ((np.float32, 2), (np.float64, 1)):
        with jax.enable_x64(dtype == np.float64):
            phi = np.linspace(0, np.pi / 4, 100_001).astype(dtype)
            sin, cos = map(np.asarray, _sampling.sin_cos_octant(jnp.asarray(phi)))
        exact = phi.astype(np.float64)
        np.testing.assert_array_max_ulp(sin, np.sin(exact).astype(dtype), maxulp=maxulp)
        np.testing.assert_array_max_ulp(cos, np.cos(exact).astype(dtype), maxulp=maxulp)


def _one_block(q_words, angle_words):
    """A block source giving one block whose terms A and B both use the given words."""
    column = np.concatenate([q_words, angle_words, q_words, angle_words]).astype(np.uint32)
    return lambda _key, num_blocks: jnp.asarray(column[:, None])


def test_hardened_normal_tail_reach():
    # The largest magnitude: both terms at q = 2**-33 (word 0) and angle 0 or pi
    # (octants 0 and 4), i.e. 2 sqrt(33 log 2) = 9.57 standard deviations (the two-erfinv
    # sampler stopped at 7.67, the plain one at 5.42); finite. The last word (q rounds to
    # 1) gives radius 0, not NaN; octant 2 at angle 0 is pi/2 (cosine -0, sine 1).
    big = 2 * np.sqrt(33 * np.log(2))
    with jax.enable_x64(False):
        z = _sampling.hardened_normal(
            _one_block([0, 0, 2**32 - 1, 1], [0, 4 << 29, 0, 2 << 29]), None, (8,), jnp.float32
        )
    z = np.asarray(z)
    second = 2 * np.sqrt(-np.log(1.5 * 2.0**-32))
    np.testing.assert_allclose(z, [big, -big, 0, 0, 0, 0, 0, second], rtol=1e-6, atol=1e-6)
    assert np.isfinite(z).all() and big > 9.5
    # float64: 64-bit words from rows j and j + 8 of the block, 2 sqrt(65 log 2) = 13.4
    column = np.zeros((16, 1), np.uint32)
    column[[3, 11]] = 4 << 29  # the angle word of term B: octant 4 (high word row 3)
    with jax.enable_x64(True):
        z = _sampling.hardened_normal(lambda *_: jnp.asarray(column), None, (4,), jnp.float64)
    np.testing.assert_allclose(np.asarray(z)[:2], [2 * np.sqrt(65 * np.log(2)), 0], atol=1e-12)


@pytest.mark.parametrize("y", [1e-3, 0.3, 1.0, 2.0, 3.0, 4.0, 4.5])
def test_box_muller_term_reaches_every_float(y):
    # Each term alone reaches every float32 of its range, tails included: for the q word
    # whose radius is about y / cos(phi_t), the angle words around arccos(y / radius) give
    # every float in [y, y + 64 ulp]. The angle of a float32 uniform times 2 pi (a grid
    # of 2**-23 turns: the low 9 of the 29 angle bits dropped) misses some (checked too).
    phi_t = np.pi / 8 if y < 4 else np.pi / 16  # the radius stops at sqrt(33 log 2) = 4.78
    w = int(np.exp(-((y / np.cos(phi_t)) ** 2)) * 2.0**32)

    def term(angle_words):
        with jax.enable_x64(False):
            x, _ = _sampling.box_muller_halves(
                jnp.full(angle_words.shape, w, jnp.uint32), jnp.asarray(angle_words), jnp.float32
            )
        return np.asarray(x)

    radius = float(term(np.zeros(1, np.uint32))[0])  # angle 0: x is the radius
    f0 = int(np.arccos(y / radius) / (np.pi / 4) * 2**29)
    lo = np.float32(y)
    hi = lo + 64 * np.spacing(lo)
    for step in (1, 2**9):
        angle = (f0 // step + np.arange(-(2**17), 2**17)) * step
        x = term(angle.astype(np.uint32))
        assert x.min() < lo and x.max() > hi  # the enumeration spans the window
        reached = len(np.unique(x[(x >= lo) & (x <= hi)]))
        if step == 1:
            assert reached == 65, f"{65 - reached} floats unreachable near {y}"
    assert reached < 60, reached


def test_hardened_normal_collisions_as_if_every_float_reachable():
    # If every float near v is reachable with probability about pdf(v) * ulp, the number of
    # equal pairs among N draws falling in [a, b) (one binade, ulp U, both signs) is about
    # C(N, 2) * sum_f p_f**2 = C(N, 2) * 4 U * integral_a^b pdf(z)**2 dz. A sampler that
    # reaches only a fraction of the floats repeats values proportionally more often; the
    # plain sampler, checked too, does (it reaches about half the floats near 1.5 and 3%
    # near 3). Bounds: 1.25x the expectation plus 5 Poisson standard deviations.
    n = 2**22
    with jax.enable_x64(False):
        hardened = np.abs(np.asarray(dr.hardened_normal(dr.PRNGKey(21), (n,), jnp.float32)))
        plain = np.abs(np.asarray(dr.normal(dr.PRNGKey(21), (n,), jnp.float32)))

    def pairs(v, a, b):
        _, counts = np.unique(v[(v >= a) & (v < b)], return_counts=True)
        return int((counts * (counts - 1) // 2).sum())

    for a, b in ((1.0, 1.5), (2.5, 3.5)):
        ulp = float(np.spacing(np.float32(a)))
        z = np.linspace(a, b, 10_001)
        integral = np.trapezoid(stats.norm.pdf(z) ** 2, z)
        expected = n * (n - 1) / 2 * 4 * ulp * integral
        bound = 1.25 * expected + 5 * math.sqrt(expected)
        assert pairs(hardened, a, b) < bound, (a, b, pairs(hardened, a, b), expected)
        assert pairs(plain, a, b) > 1.5 * bound


def test_random_bits_widths_uniform():
    # Each bit of the 8/16-bit outputs must be a fair coin (5 sigma of a binomial).
    key = dr.PRNGKey(9)
    for width in (8, 16):
        x = np.asarray(dr.random_bits(key, width, (N_STAT // width,)))
        bits = (x[:, None] >> np.arange(width)) & 1
        n = x.shape[0]
        assert np.all(np.abs(bits.mean(axis=0) - 0.5) < 5 * math.sqrt(0.25 / n))


def test_convert_to_jax_rng_key():
    key = dr.PRNGKey(1)
    jkey = dr.convert_to_jax_rng_key(key)
    assert jkey.shape == (2,) and jkey.dtype == jnp.uint32
    np.testing.assert_array_equal(jkey, dr.random_bits(key, 32, (2,)))
    assert jax.random.normal(jkey, (3,)).shape == (3,)


def test_typed_key():
    key = dr.PRNGKey(42)
    typed = dr.to_jax_typed_key(key)
    np.testing.assert_array_equal(jax.random.uniform(typed, (9,)), dr.uniform(key, (9,)))
    np.testing.assert_array_equal(jax.random.key_data(jax.random.split(typed, 3)), dr.split(key, 3))
    np.testing.assert_array_equal(
        jax.random.key_data(jax.random.fold_in(typed, 7)), dr.fold_in(key, 7)
    )
    seeded = jax.random.key(42, impl=dr.chacha20_impl)
    np.testing.assert_array_equal(jax.random.key_data(seeded), key)
