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
from scipy import special, stats

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


def test_hardened_normal_construction():
    # The sampler is pinned by recomputing it from the stream in float64: value i is
    # (z(w[0, i]) + z(w[1, i])) / sqrt(2) for the words w = random_bits(key, 32, (2, n)),
    # z(w) = ±sqrt(2) erfinv(u) with the top bit the sign and u the other 31 bits rounded
    # down to 24 significant bits, times 2**-31. XLA's float32 erf_inv is less accurate
    # than scipy's float64 one (measured max difference 1.1e-5 here, at |z| near 3); a
    # wrong word, sign, scale or grid moves values by far more than the 1e-4 allowed.
    key = dr.PRNGKey(11)
    n = 4096
    with jax.enable_x64(False):
        got = np.asarray(dr.hardened_normal(key, (n,), jnp.float32), np.float64)
        words = np.asarray(dr.random_bits(key, 32, (2, n))).astype(np.int64)
    m = words & (2**31 - 1)
    cut = np.maximum(np.floor(np.log2(np.maximum(m, 1))).astype(np.int64) + 1 - 24, 0)
    u = ((m >> cut) << cut) * 2.0**-31
    z = np.where(words >> 31 == 1, -1.0, 1.0) * np.sqrt(2) * special.erfinv(u)
    np.testing.assert_allclose(got, (z[0] + z[1]) / np.sqrt(2), rtol=0, atol=1e-4)


def test_signed_unit_uses_every_bit():
    # u must be the 31 low bits rounded DOWN to a float32 (so never 1.0, where erfinv is
    # infinite), exactly, for words around every truncation boundary and at random.
    rng = np.random.default_rng(0)
    edges = [0, 1, 2**23 - 1, 2**23, 2**24 - 1, 2**24, 2**24 + 1, 2**25 + 3, 2**31 - 1]
    low = np.concatenate([edges, rng.integers(0, 2**31, 10_000)]).astype(np.uint32)
    words = np.concatenate([low, low | np.uint32(2**31)])
    negative, u = _sampling.signed_unit_from_word(jnp.asarray(words), jnp.float32)
    exact = low.astype(np.float64) * 2.0**-31
    nearest = exact.astype(np.float32)
    down = np.where(nearest > exact, np.nextafter(nearest, np.float32(0)), nearest)
    np.testing.assert_array_equal(np.asarray(u), np.concatenate([down, down]))
    np.testing.assert_array_equal(np.asarray(negative), words >= 2**31)
    assert np.asarray(u).max() == np.float32(1 - 2**-24)
    # Every bit counts: the plain uniform's grid of multiples of 2**-23 holds few of the
    # random u (those below 2**-8 are on a grid 2**15 times finer; the fraction on the
    # coarse grid is about 1/2 at [2**-1, 1) and smaller below); measured 0.26 here,
    # bounded at 0.4 (the 10,000 draws give a binomial standard error below 0.005).
    on_coarse_grid = np.asarray(u)[len(edges) : len(low)] * 2**23 % 1 == 0
    assert on_coarse_grid.mean() < 0.4


def test_hardened_normal_tail_reach():
    # The largest magnitude: both terms at u = 1 - 2**-24, i.e. 2 * 5.42 / sqrt(2) = 7.67
    # standard deviations (the plain sampler stops at 5.42); finite, never inf.
    words = jnp.full((2, 3), 2**31 - 1, jnp.uint32).at[:, 1].set(2**32 - 1)
    z = np.asarray(_sampling.hardened_normal(lambda *_: words, None, (3,), jnp.float32))
    expected = 2 * np.sqrt(2) * special.erfinv(1 - 2.0**-24) / np.sqrt(2)
    np.testing.assert_allclose(z, [expected, -expected, expected], rtol=1e-5)
    assert expected > 7.6


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
