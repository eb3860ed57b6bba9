# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Tests of the jaxpr analysis behind DPSVI's weighted clipping (d3p._ghost, d3p._clipping).

The privacy-relevant property is that the weighted clipping never under-estimates a
per-example norm: its clipped sums are checked against per-example gradients materialised
with ``vmap(grad)``, and the structural analyses must answer "no" whenever unsure.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3p._clipping import weighted_clipping
from d3p._ghost import coordinatewise_support, plan_taps

# ----------------------------------------------------------------- coordinatewise maps


def mean_field(params, eps):
    """A mean-field sample: loc + softplus(raw) * eps, unpacked and transformed per site."""
    z = params["loc"] + jax.nn.softplus(params["raw"]) * eps
    return {"a": z[:6].reshape(2, 3), "b": jnp.exp(z[6:8]), "c": jax.nn.sigmoid(z[8])}


def test_mean_field_sample_is_coordinatewise():
    params = {"loc": jnp.zeros(9), "raw": jnp.ones(9)}
    eps = jnp.linspace(-1.0, 1.0, 9)
    support = coordinatewise_support(lambda p: mean_field(p, eps), params)
    assert support is not None and support.shape == (18,) and support.all()
    # the same through the linear map J t, which is what DPSVI analyses
    _, linear = jax.linearize(lambda p: mean_field(p, eps), params)
    assert coordinatewise_support(linear, params) is not None
    # an unused parameter entry is not in the support
    support = coordinatewise_support(lambda p: mean_field(p, eps)["b"], params)
    assert support is not None and support.sum() == 4


@pytest.mark.parametrize(
    "fn",
    [
        lambda p: p["loc"] * jnp.sum(p["raw"]),  # a reduction mixes entries
        lambda p: p["loc"] @ jnp.ones((9, 9)),  # a matrix product mixes entries
        lambda p: {"x": p["loc"], "y": p["loc"][:2] * 2},  # one entry feeds two outputs
        lambda p: jnp.broadcast_to(p["raw"][0], (3,)),  # one entry broadcast to three
        lambda p: jnp.cumsum(p["loc"]),  # unrecognised primitive
        lambda p: p["loc"] + p["raw"][::-1] * jnp.roll(p["loc"], 1),  # shifted partners
    ],
    ids=["sum", "matmul", "two-outputs", "broadcast", "cumsum", "roll"],
)
def test_mixing_maps_are_not_coordinatewise(fn):
    params = {"loc": jnp.arange(9.0), "raw": jnp.ones(9)}
    assert coordinatewise_support(fn, params) is None


def test_custom_derivative_is_analysed_through_the_linear_map():
    # The primal is elementwise but the custom derivative mixes entries: only the linear
    # map (the J that autodiff applies) tells the truth, which is why DPSVI analyses it.
    @jax.custom_jvp
    def doubled(x):
        return 2 * x

    @doubled.defjvp
    def _(primals, tangents):
        return doubled(primals[0]), 2 * tangents[0] + jnp.roll(tangents[0], 1)

    x = jnp.arange(4.0)
    assert coordinatewise_support(doubled, x) is not None
    _, linear = jax.linearize(doubled, x)
    assert coordinatewise_support(linear, x) is None


# ----------------------------------------------------------------- taps and clipping


def mlp_loss(diff, example, index):
    """-log Bernoulli(y | network(x)) for one example (leading axis 1)."""
    x, y = example
    hidden = jnp.tanh(x @ diff["w1"] + diff["b1"])
    logit = hidden @ diff["w2"] + diff["s"]
    return jnp.sum(jnp.logaddexp(0.0, logit) - y * logit)


def twice_used_loss(diff, example, index):
    x, y = example
    logit = x @ diff["w1"][:, 0] + (2 * x) @ diff["w1"][:, 1] + diff["s"]
    return jnp.sum((logit - y) ** 2)


def sequence_loss(diff, example, index):
    """Each example is a (3, d) matrix: the per-example gradient of w1 is not rank one."""
    x, y = example
    hidden = jnp.tanh(x[0] @ diff["w1"] + diff["b1"])
    return jnp.sum((hidden @ diff["w2"] + diff["s"] - y) ** 2)


def make_problem(loss, rows=9, d=4, h=5, seed=0, sequence=False):
    rng = np.random.default_rng(seed)
    diff = {
        "w1": jnp.asarray(rng.normal(size=(d, h)), jnp.float32),
        "b1": jnp.asarray(rng.normal(size=h), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=h), jnp.float32),
        "s": jnp.asarray(0.3, jnp.float32),
    }
    weights = jax.tree.map(
        lambda a: jnp.asarray(rng.uniform(0.5, 3.0, np.shape(a)), jnp.float32), diff
    )
    shape = (rows, 1, 3, d) if sequence else (rows, 1, d)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    x = x.at[2].multiply(40.0)  # a large example: the clip is active
    y = jnp.asarray(rng.integers(0, 2, (rows, 1)), jnp.float32)
    return diff, weights, (x, y)


def scaled_by(weights):
    """The linear map ``M`` with ``M^T M = diag(weights)`` that the clipping sums through."""
    return lambda tree: jax.tree.map(lambda g, w: g * jnp.sqrt(w), tree, weights)


def reference(loss, diff, weights, example, mask, c):
    """Materialised per-example gradients, clipped by their weighted norm, summed."""
    rows = mask.shape[0]
    losses, grads = jax.vmap(jax.value_and_grad(loss), (None, 0, 0))(
        diff, example, jnp.arange(rows)
    )
    sq = sum(
        jnp.sum((w * g * g).reshape(rows, -1), 1)
        for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(weights), strict=True)
    )
    finite = jnp.isfinite(sq)
    ok = mask & finite
    factor = jnp.where(ok, jnp.minimum(1.0, c / jnp.sqrt(jnp.where(finite, sq, 1.0))), 0.0)
    total = jax.tree.map(
        lambda g: jnp.tensordot(factor, jnp.where(ok.reshape(-1, *[1] * (g.ndim - 1)), g, 0), 1),
        grads,
    )
    return total, jnp.sum(jnp.where(ok, losses, 0.0)), int(jnp.sum(mask & ~finite)), factor


@pytest.mark.parametrize(
    "loss, sequence, ghosts",
    [
        (mlp_loss, False, {"w1", "w2"}),
        (twice_used_loss, False, set()),
        (sequence_loss, True, set()),
    ],
    ids=["mlp", "leaf-used-twice", "sequence-example"],
)
# the branch for a batch with a NaN row: every row rebuilt, mapped and clipped exactly, or
# (exact_by_rows) the non-finite rows dropped from the book-kept sums
@pytest.mark.parametrize("exact_by_rows", [False, True], ids=["mapped-rows", "by-rows"])
def test_weighted_clipping_matches_materialised_gradients(loss, sequence, ghosts, exact_by_rows):
    diff, weights, (x, y) = make_problem(loss, sequence=sequence)
    x = x.at[5].set(jnp.nan)  # a non-finite example: dropped and counted
    x = x.at[7].set(jnp.inf)  # a padded example: masked, not counted
    mask = jnp.arange(x.shape[0]) != 7
    c = 0.7
    banned = jax.tree.map(lambda _: False, diff)
    chunk, entries = weighted_clipping(
        loss, diff, weights, banned, (x[0], y[0]), c, scaled_by(weights), True, exact_by_rows
    )
    total, loss_sum, bad = jax.jit(chunk)((x, y), jnp.arange(x.shape[0]), mask)
    expected, expected_loss, expected_bad, factor = reference(loss, diff, weights, (x, y), mask, c)
    assert int(jnp.sum((factor > 0) & (factor < 1))) >= 1  # the clip is active
    expected = scaled_by(weights)(expected)
    for name in diff:
        np.testing.assert_allclose(total[name], expected[name], rtol=2e-5, atol=1e-6)
    assert float(loss_sum) == pytest.approx(float(expected_loss), rel=1e-5)
    assert int(bad) == expected_bad == 1
    leaves, treedef = jax.tree.flatten(diff)
    closed = jax.make_jaxpr(lambda *a: loss(treedef.unflatten(a[:4]), (a[4], a[5]), a[6]))(
        *leaves, x[0], y[0], 0
    )
    names = sorted(diff)  # flattening order of the dict
    plan = plan_taps(closed, range(4))
    assert {names[g.leaf] for g in plan.ghosts} == ghosts
    dense_entries = sum(leaves[i].size for i in plan.dense)
    assert entries == dense_entries + sum(g.contracted + g.free for g in plan.ghosts)


def test_dead_uses_do_not_block_a_tap():
    # numpyro traces compute prior densities and validity checks that the loss never reads
    def loss(diff, example, index):
        x, y = example
        _unused = jnp.sum(diff["w1"] ** 2) + jnp.isfinite(diff["w2"]).sum()
        return jnp.sum(((x @ diff["w1"]) @ diff["w2"] - y) ** 2)

    diff, _, (x, y) = make_problem(loss)
    leaves, treedef = jax.tree.flatten(diff)
    closed = jax.make_jaxpr(lambda *a: loss(treedef.unflatten(a[:4]), (a[4], a[5]), a[6]))(
        *leaves, x[0], y[0], 0
    )
    plan = plan_taps(closed, range(4))
    # both weights are tapped despite their dead uses; the unused leaves are left out
    assert {sorted(diff)[g.leaf] for g in plan.ghosts} == {"w1", "w2"}
    assert plan.dense == ()


def test_by_rows_refuses_weights_that_may_be_untrusted():
    # the by-rows branch forms only the clipping factors: it has no exact path for
    # weights that underflowed, so it must not be built with a traced trust flag
    diff, weights, (x, y) = make_problem(mlp_loss)
    banned = jax.tree.map(lambda _: False, diff)
    with pytest.raises(ValueError, match="exact_by_rows"):
        weighted_clipping(
            mlp_loss,
            diff,
            weights,
            banned,
            (x[0], y[0]),
            1.0,
            scaled_by(weights),
            jnp.array(True),
            exact_by_rows=True,
        )


def test_banned_leaf_read_by_the_loss_disables_the_weighted_path():
    diff, weights, (x, y) = make_problem(mlp_loss)
    banned = {**jax.tree.map(lambda _: False, diff), "b1": True}
    built = weighted_clipping(
        mlp_loss, diff, weights, banned, (x[0], y[0]), 1.0, scaled_by(weights)
    )
    assert built is None


# weights of 2 (a weight matrix), and NumPy ones (known while tracing: no weight matrix)
@pytest.mark.parametrize("weight", [2.0, 1.0], ids=["weighted", "unit"])
# one output (the gradient x_i delta_i formed row by row) or two (norms of x and delta)
@pytest.mark.parametrize("outputs", [(), (2,)], ids=["one-output", "two-outputs"])
def test_tiny_inputs_with_huge_output_gradients_are_clipped(weight, outputs):
    # x_i = 1e-20 and y_i = 1e25: the gradient x_i delta_i of the tapped weight is about
    # 4e5 although x_i^2 = 1e-40 flushes to zero in float32. The weighted norm must still
    # see it: the example contributes at most C, exactly as with materialised gradients.
    def loss(diff, example, index):
        x, y = example
        return jnp.sum((x @ diff["w"] - y) ** 2)

    d = 3
    diff = {"w": jnp.ones((d, *outputs), jnp.float32)}
    weights = {"w": jnp.full((d, *outputs), weight, jnp.float32)}
    if weight == 1.0:
        weights = {"w": np.ones((d, *outputs), np.float32)}
    x = jnp.full((4, 1, d), 1e-20, jnp.float32).at[0].set(1.0)
    y = jnp.full((4, 1, *outputs), 1e25, jnp.float32).at[0].set(0.0)
    c = 1.0
    mapping = scaled_by(weights)
    chunk, _ = weighted_clipping(loss, diff, weights, {"w": False}, (x[0], y[0]), c, mapping)
    mask = jnp.ones(4, bool)
    total, _, bad = jax.jit(chunk)((x, y), jnp.arange(4), mask)
    expected, _, _, factor = reference(loss, diff, weights, (x, y), mask, c)
    assert int(bad) == 0 and float(jnp.max(factor[1:])) < 1e-5  # all three are clipped
    np.testing.assert_allclose(total["w"], mapping(expected)["w"], rtol=1e-5)
    # each example's weighted norm is at most C
    assert float(jnp.sqrt(jnp.sum(total["w"] ** 2))) <= 4 * c * (1 + 1e-6)
