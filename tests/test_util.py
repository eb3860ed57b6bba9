# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Tests of d3p.util."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import d3p.random
from d3p import util
from d3p.minibatch import sample_without_replacement


def _under_jit(pred, x):
    """Evaluate a static predicate on the tracer of ``x`` inside jit."""
    return bool(jax.jit(lambda a: jnp.asarray(pred(a)))(x))


@pytest.mark.parametrize(
    "value, array, scalar, integer",
    [
        (jnp.ones(3), True, False, False),
        (jnp.ones((2, 2), jnp.int32), True, False, True),
        (jnp.array(2.0), False, True, False),
        (jnp.array(2, jnp.int32), False, True, True),
        (np.arange(3), True, False, True),
        # d3p 0.2: any one-element array is a scalar, whatever its number of dimensions
        (jnp.ones(1), True, True, False),
        (jnp.ones((1, 1, 1, 1)), True, True, False),
        (jnp.ones((1,), jnp.int32), True, True, True),
        (np.ones((1, 1), np.int64), True, True, True),
        (jnp.ones((0,), jnp.int32), True, False, True),
        (np.int64(4), False, True, True),
        (np.float32(4.0), False, True, False),
    ],
)
def test_predicates_plain_and_jit(value, array, scalar, integer):
    for evaluate in (lambda p, x: p(x), _under_jit):
        assert evaluate(util.is_array, value) is array
        assert evaluate(util.is_scalar, value) is scalar
        assert evaluate(util.is_integer, value) is integer
        assert evaluate(util.is_int_scalar, value) is (scalar and integer)
        assert evaluate(util.has_shape, value)


def test_predicates_on_python_scalars():
    assert not util.is_array(3) and not util.is_array(2.5)
    assert not util.has_shape(3)
    assert util.is_scalar(3) and util.is_scalar(2.5) and util.is_scalar(np.float64(2.5))
    assert util.is_integer(3) and not util.is_integer(2.5) and not util.is_integer(True)
    assert util.is_int_scalar(3) and not util.is_int_scalar(2.5)
    assert not util.is_scalar([1, 2]) and not util.is_scalar("a")
    # a Python scalar used inside a jitted function stays a scalar
    assert bool(jax.jit(lambda: jnp.asarray(util.is_array(2.0)))()) is False
    assert bool(jax.jit(lambda: jnp.asarray(util.is_int_scalar(2)))()) is True


@pytest.mark.parametrize("jit", [False, True])
def test_has_shape_is_array_example_count_on_scalars(jit):
    # a Python scalar has no shape; passed through jit it becomes a 0-d tracer, which has one
    def facts(a):
        return util.has_shape(a), util.is_array(a), util.example_count(a)

    if jit:
        out = jax.jit(lambda a: jnp.array(facts(a)))(2.0)
        assert out.tolist() == [True, False, 1]
    else:
        assert facts(2.0) == (False, False, 1)
        assert facts(jnp.array(2.0)) == (True, False, 1)


def test_example_count():
    assert util.example_count(jnp.ones((7, 3))) == 7
    assert util.example_count(np.ones(4)) == 4
    assert util.example_count(2.0) == 1
    assert util.example_count(jnp.array(2.0)) == 1
    out = jax.jit(lambda a: jnp.zeros(util.example_count(a)))(jnp.ones((5, 2)))
    assert out.shape == (5,)


@pytest.mark.parametrize("jit", [False, True])
def test_normalize(jit):
    f = jax.jit(util.normalize) if jit else util.normalize
    x = jnp.array([[3.0, 4.0], [0.0, -2.0]])
    np.testing.assert_allclose(f(x), [[0.6, 0.8], [0.0, -1.0]], rtol=1e-6)
    np.testing.assert_allclose(f(jnp.array([1.0, 2.0, 2.0])), [1 / 3, 2 / 3, 2 / 3], rtol=1e-6)
    # a scalar divided by its L2 norm |x|: its sign (also for a Python scalar)
    np.testing.assert_allclose(f(jnp.array(5.0)), 1.0)
    np.testing.assert_allclose(f(jnp.array(-5.0)), -1.0)
    np.testing.assert_allclose(f(-2.5), -1.0)
    np.testing.assert_allclose(f(3.0), 1.0)


@pytest.mark.parametrize("jit", [False, True])
def test_map_over_secondary_dims(jit):
    # f reduces a vector (a,) to a scalar; T (a, b1, b2) maps to (b1, b2)
    g = util.map_over_secondary_dims(jnp.sum)
    g = jax.jit(g) if jit else g
    T = jnp.arange(24.0).reshape(4, 3, 2) ** 2
    out = g(T)
    assert out.shape == (3, 2)
    np.testing.assert_allclose(out, jnp.sum(T, axis=0), rtol=1e-6)

    def spread(v):
        return jnp.max(v) - jnp.min(v)

    h = util.map_over_secondary_dims(spread)
    T = jnp.array([[1.0, 5.0, -2.0], [4.0, 0.0, 3.0]])  # (a, b1) = (2, 3)
    np.testing.assert_allclose(h(T), [3.0, 5.0, 5.0])
    # a 1-d T has no secondary dimensions: the result is f(T)
    assert float(g(jnp.arange(4.0))) == 6.0
    with pytest.raises(ValueError, match="T"):
        g(jnp.array(1.0))


def test_unvectorize_shape_plain_and_under_vmap():
    a = jnp.ones(3)
    assert util.unvectorize_shape(a, 3) == (1, 1, 3)
    assert util.unvectorize_shape_1d(a) == (3,)
    assert util.unvectorize_shape_2d(a) == (1, 3)
    assert util.unvectorize_shape_3d(jnp.ones((2, 3))) == (1, 2, 3)
    assert util.unvectorize_shape_2d(2.0) == (1, 1)
    assert util.unvectorize_shape_2d(jnp.ones((5, 3))) == (5, 3)
    # at least d dimensions already: the shape is returned unchanged (d3p 0.2)
    assert util.unvectorize_shape(jnp.ones((2, 2)), 1) == (2, 2)
    assert util.unvectorize_shape_1d(jnp.ones((4, 3, 2))) == (4, 3, 2)
    assert util.unvectorize_shape(jnp.ones((2, 2)), 0) == (2, 2)

    # inside vmap (and jit) a row of a (N, d) matrix re-gains its leading axis
    def row_shape(row):
        return jnp.zeros(util.unvectorize_shape_2d(row))

    out = jax.jit(jax.vmap(row_shape))(jnp.ones((4, 3)))
    assert out.shape == (4, 1, 3)
    with pytest.raises(ValueError, match="d must be an int >= 0"):
        util.unvectorize_shape(a, -1)
    with pytest.raises(TypeError, match="d must be an int"):
        util.unvectorize_shape(a, 2.0)


@pytest.mark.parametrize("axis, jit", [(0, False), (-1, True)])
def test_sample_from_array(axis, jit):
    x = jnp.arange(30).reshape(5, 6)
    key = d3p.random.PRNGKey(3)
    n = 4
    f = jax.jit(util.sample_from_array, static_argnums=(2, 3)) if jit else util.sample_from_array
    out = f(key, x, n, axis)
    size = x.shape[axis]
    expected_shape = list(x.shape)
    expected_shape[axis] = n
    assert out.shape == tuple(expected_shape)
    # exactly the slices picked by sample_without_replacement with the same key
    idx = np.asarray(sample_without_replacement(key, n, size))
    np.testing.assert_array_equal(out, np.take(np.asarray(x), idx, axis=axis))
    assert len(set(idx.tolist())) == n


def test_sample_from_array_bad_input():
    x = jnp.ones((3, 4))
    key = d3p.random.PRNGKey(0)
    with pytest.raises(ValueError, match="n must be"):
        util.sample_from_array(key, x, 0, 0)
    with pytest.raises(ValueError, match="n must be"):
        util.sample_from_array(key, x, 4, 0)
    with pytest.raises(TypeError, match="n must be"):
        util.sample_from_array(key, x, 2.0, 0)
    with pytest.raises(ValueError, match="axis must be"):
        util.sample_from_array(key, x, 1, 2)
    with pytest.raises(TypeError, match="axis must be"):
        util.sample_from_array(key, x, 1, None)
