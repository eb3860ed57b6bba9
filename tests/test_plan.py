# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Tests of d3p.plan: the privacy plan's validation, event, accounting, sampler, calibration."""

import dataclasses
import math
import pickle

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

import d3p.random.debug
from d3p import dputil, minibatch
from d3p.plan import PrivacyBudget, PrivacyPlan

POISSON = dict(sampling="poisson", dataset_size=1000, clipping_threshold=2.0, num_steps=50, q=0.05)
FIXED = dict(
    sampling="fixed_size",
    dataset_size=1000,
    clipping_threshold=2.0,
    num_steps=50,
    batch_size=100,
    relation="substitute",
)
FULL = dict(sampling="full_batch", dataset_size=1000, clipping_threshold=2.0, num_steps=50)


def test_repr_and_pickle_show_every_privacy_parameter():
    plan = PrivacyPlan(noise_multiplier=1.3, normaliser=40.0, **POISSON)
    text = repr(plan)
    for field in dataclasses.fields(PrivacyPlan):
        if field.repr:  # all but the record of runs (see test_svi_history)
            assert f"{field.name}={getattr(plan, field.name)!r}" in text
    assert "batch_size=" in text and "None" not in text  # defaults are filled in
    copy = pickle.loads(pickle.dumps(plan))
    assert copy == plan and repr(copy) == text
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.noise_multiplier = 0.5


def test_defaults_are_filled_in():
    poisson = PrivacyPlan(noise_multiplier=1.0, **POISSON)
    assert poisson.normaliser == 50.0  # q * N, the expected batch size
    # the 1 - 1e-6 quantile of Binomial(1000, 0.05): mean 50, sd 6.9, so about 50 + 4.8 sd
    assert 80 <= poisson.batch_size <= 90
    fixed = PrivacyPlan(noise_multiplier=1.0, **FIXED)
    assert (fixed.q, fixed.normaliser) == (0.1, 100.0)
    full = PrivacyPlan(noise_multiplier=1.0, **FULL)
    assert (full.q, full.batch_size, full.normaliser) == (1.0, 1000, 1000.0)
    # a plan rebuilt from its own fields is the same plan
    for plan in (poisson, fixed, full):
        assert dataclasses.replace(plan) == plan


BAD = [
    ("sampling", "shuffle", ValueError),
    ("dataset_size", 0, ValueError),
    ("dataset_size", 10.5, ValueError),
    ("clipping_threshold", 0.0, ValueError),
    ("clipping_threshold", math.inf, ValueError),
    ("noise_multiplier", -1.0, ValueError),
    ("noise_multiplier", "1", TypeError),
    ("num_steps", 0, ValueError),
    ("q", 0.0, ValueError),
    ("q", 1.5, ValueError),
    ("batch_size", 0, ValueError),
    ("relation", "remove", ValueError),
    ("normaliser", 0.0, ValueError),
]


@pytest.mark.parametrize("name, value, error", BAD)
def test_bad_fields_are_refused_naming_the_argument(name, value, error):
    with pytest.raises(error, match=name):
        PrivacyPlan(**{"noise_multiplier": 1.0, **POISSON, name: value})


def test_inconsistent_schemes_are_refused():
    with pytest.raises(ValueError, match="relation='substitute'"):
        PrivacyPlan(noise_multiplier=1.0, **{**FIXED, "relation": "add_remove"})
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 1000\]"):
        PrivacyPlan(noise_multiplier=1.0, **{**FIXED, "batch_size": 1001})
    with pytest.raises(ValueError, match="q"):
        PrivacyPlan(noise_multiplier=1.0, **{**POISSON, "q": None})
    with pytest.raises(ValueError, match="q=1"):
        PrivacyPlan(noise_multiplier=1.0, q=0.5, **FULL)


@pytest.mark.parametrize(
    "fields, step",
    [
        (POISSON, "truncated"),
        # batch_size = N never truncates a substitute neighbour (N records); under
        # add/remove the neighbour of N + 1 records may be truncated (accounted as such)
        ({**POISSON, "batch_size": 1000, "relation": "substitute"}, "poisson"),
        (FIXED, "without_replacement"),
        (FULL, "gaussian"),
    ],
    ids=["truncated-poisson", "poisson", "fixed", "full"],
)
def test_dp_event_is_the_mechanism_and_the_reported_epsilon(fields, step):
    sigma, delta = 1.5, 1e-5
    plan = PrivacyPlan(noise_multiplier=sigma, **fields)
    event = plan.dp_event()
    assert event.count == plan.num_steps
    n, q = plan.dataset_size, plan.q
    expected_step = {
        # add/remove: the larger neighbour has N + 1 records (the event counts the one added)
        "truncated": dp_accounting.TruncatedSubsampledGaussianDpEvent(
            n + (plan.relation == "add_remove"), q, plan.batch_size, sigma
        ),
        "poisson": dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
        # replace-one sensitivity of the clipped sum is 2C: dp-accounting reads sigma / 2
        "without_replacement": dp_accounting.SampledWithoutReplacementDpEvent(
            n, plan.batch_size, dp_accounting.GaussianDpEvent(sigma / 2)
        ),
        "gaussian": dp_accounting.GaussianDpEvent(sigma),
    }[step]
    assert event.event == expected_step
    relation = {
        "add_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        "substitute": dp_accounting.NeighboringRelation.REPLACE_ONE,
    }[plan.relation]
    if step == "without_replacement":
        own = rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
        assert plan.epsilon(delta, "rdp") == own.compose(event).get_epsilon(delta)
    else:
        own = pld_privacy_accountant.PLDAccountant(
            relation, value_discretization_interval=dputil.pld_discretization(sigma, q)
        )
        assert plan.epsilon(delta) == pytest.approx(own.compose(event).get_epsilon(delta), rel=1e-6)
    eps = plan.epsilon(delta, "rdp" if step == "without_replacement" else "pld")
    accountant = "rdp" if step == "without_replacement" else "pld"
    assert plan.delta(eps, accountant) == pytest.approx(delta, rel=1e-2)


def test_more_steps_spend_more():
    plan = PrivacyPlan(noise_multiplier=1.5, **POISSON)
    assert (
        plan.with_steps(20).epsilon(1e-5) < plan.epsilon(1e-5) < plan.with_steps(80).epsilon(1e-5)
    )
    assert plan.with_steps(20) == dataclasses.replace(plan, num_steps=20)


def test_no_noise_is_not_private():
    plan = PrivacyPlan(noise_multiplier=0.0, **POISSON)
    assert plan.dp_event() == dp_accounting.NonPrivateDpEvent()
    assert plan.epsilon(1e-5) == math.inf
    assert plan.delta(10.0) == 1.0
    assert plan.gradient_noise_std == 0.0


def test_gradient_noise_std():
    plan = PrivacyPlan(noise_multiplier=1.5, **POISSON)
    assert plan.gradient_noise_std == 1.5 * 2.0 / 50.0


@pytest.mark.parametrize(
    "fields, accountant",
    [(POISSON, "pld"), (FIXED, "rdp"), (FULL, "pld")],
    ids=["poisson", "fixed", "full"],
)
def test_calibrate_spends_at_most_the_target(fields, accountant):
    target, delta, tol = 2.0, 1e-5, 1e-2
    plan = PrivacyPlan.calibrate(target, delta, accountant=accountant, tol=tol, **fields)
    eps = plan.epsilon(delta, accountant)
    assert target - tol <= eps <= target
    assert dataclasses.replace(plan, noise_multiplier=1.0) == PrivacyPlan(
        noise_multiplier=1.0, **fields
    )
    with pytest.raises(TypeError, match="noise_multiplier"):
        PrivacyPlan.calibrate(target, delta, noise_multiplier=1.0, **fields)


def test_poisson_batcher_is_the_accounted_sampler():
    plan = PrivacyPlan(noise_multiplier=1.0, **{**POISSON, "batch_size": 60})
    data = (jnp.arange(1000.0), jnp.ones((1000, 2)))
    init, get_batch = plan.batcher(data, rng_suite=d3p.random.debug)
    _, state = init(d3p.random.debug.PRNGKey(3))
    (x, ones), mask = jax.jit(jax.vmap(get_batch, (0, None)))(jnp.arange(400), state)
    assert x.shape == (400, plan.batch_size) and ones.shape == (400, plan.batch_size, 2)
    for row, valid in zip(np.asarray(x), np.asarray(mask), strict=True):
        assert len(set(row[valid].tolist())) == valid.sum()  # a record at most once
    sizes = np.asarray(mask).sum(axis=1)
    truncated = int(np.sum(sizes == plan.batch_size))
    # batch sizes are Binomial(1000, 0.05) capped at 60: mean 49.9; the mean of 400 draws
    # has sd 6.9 / 20 = 0.35, so 1.5 is more than 4 sd
    assert abs(np.mean(sizes) - 49.9) < 1.5
    assert 0 < truncated < 40  # P(B >= 60) = 0.085: 34 expected, sd 5.6
    with pytest.raises(ValueError, match="dataset_size=1000"):
        plan.batcher((jnp.zeros(999),))


def test_fixed_and_full_batchers():
    data = (jnp.arange(1000.0),)
    fixed = PrivacyPlan(noise_multiplier=1.0, **FIXED)
    init, get_batch = fixed.batcher(data, rng_suite=d3p.random.debug)
    (x,), mask = get_batch(0, init(d3p.random.debug.PRNGKey(0))[1])
    assert x.shape == (100,) and bool(mask.all()) and len(set(np.asarray(x).tolist())) == 100
    full = PrivacyPlan(noise_multiplier=1.0, **FULL)
    init, get_batch = full.batcher(data)
    (x,), mask = get_batch(7, init(d3p.random.PRNGKey(0))[1])
    assert np.array_equal(x, data[0]) and bool(mask.all())


def test_poisson_constructor_takes_a_batch_size_or_a_quantile():
    fields = dict(clipping_threshold=2.0, noise_multiplier=1.0, num_steps=50)
    by_quantile = PrivacyPlan.poisson(1000, 0.05, max_batch_size=0.999, **fields)
    size = minibatch.structural_batch_size(1000, 0.05, 0.999)
    assert by_quantile == PrivacyPlan("poisson", 1000, q=0.05, batch_size=size, **fields)
    assert PrivacyPlan.poisson(1000, 0.05, **fields) == PrivacyPlan(**POISSON, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="q"):
        PrivacyPlan.poisson(1000, 1.5, **fields)


# A budget calibrated to within tol = 1e-4 of epsilon = 1 (q = 0.05, 50 steps, N = 1000):
# truncating at the 1 - 1e-6 quantile (86 rows) costs about 1e-4 of epsilon, which takes this
# budget over; the 1 - 1e-9 quantile (96 rows) fits.
def budget() -> PrivacyBudget:
    return PrivacyBudget.calibrate(1.0, 1e-5, 0.05, 50, 2.0, tol=1e-4)


def test_budget_is_calibrated_for_untruncated_poisson_sampling():
    b = budget()
    untruncated = PrivacyPlan.poisson(
        1000, 0.05, 2.0, b.noise_multiplier, 50, max_batch_size=1000
    ).epsilon(1e-5)
    assert 1.0 - 1e-4 <= untruncated <= 1.0
    assert (b.epsilon, b.delta, b.q, b.num_steps, b.clipping_threshold) == (
        1.0,
        1e-5,
        0.05,
        50,
        2.0,
    )
    text = repr(b)
    for name in ("epsilon", "delta", "q", "num_steps", "clipping_threshold", "noise_multiplier"):
        assert f"{name}=" in text
    assert pickle.loads(pickle.dumps(b)) == b


def test_budget_plans_the_smallest_batch_that_fits():
    b = budget()
    quantiles = (1 - 1e-6, 1 - 1e-9, 1 - 1e-12, 1 - 1e-15)
    sizes = [minibatch.structural_batch_size(1000, 0.05, level) for level in quantiles] + [1000]
    spent = [
        PrivacyPlan.poisson(1000, 0.05, 2.0, b.noise_multiplier, 50, max_batch_size=size).epsilon(
            1e-5
        )
        for size in sizes
    ]
    fits = [size for size, eps in zip(sizes, spent, strict=True) if eps <= 1.0]
    assert spent[0] > 1.0 and fits[0] == sizes[1]  # the case this budget was chosen for
    plan = b.plan(1000)
    assert (plan.sampling, plan.batch_size, plan.num_steps) == ("poisson", fits[0], 50)
    assert plan.epsilon(1e-5) <= 1.0
    # fewer steps would fit the first quantile, but every run under the budget keeps the
    # batch size chosen for all its steps (a continued run then describes the earlier ones)
    assert (
        PrivacyPlan.poisson(
            1000, 0.05, 2.0, b.noise_multiplier, 20, max_batch_size=sizes[0]
        ).epsilon(1e-5)
        <= 1.0
    )
    assert b.plan(1000, num_steps=20) == plan.with_steps(20)
    assert b.plan(1000, max_batch_size=200).batch_size == 200


def test_budget_refuses_plans_beyond_it():
    b = budget()
    with pytest.raises(ValueError, match="max_batch_size=60 the truncated Poisson sampling"):
        b.plan(1000, max_batch_size=60)
    with pytest.raises(ValueError, match="covers 50 steps"):
        b.plan(1000, num_steps=51)
    with pytest.raises(ValueError, match="taken 45, so at most 5 more, got num_steps=6"):
        b.check_steps(45, 6)
    b.check_steps(45, 5)


@pytest.mark.parametrize(
    "name, value",
    [("epsilon", 0.0), ("delta", 1.0), ("q", 0.0), ("num_steps", 0), ("noise_multiplier", 0.0)],
)
def test_bad_budget_fields_are_refused_naming_the_argument(name, value):
    fields = dict(
        epsilon=1.0, delta=1e-5, q=0.05, num_steps=50, clipping_threshold=2.0, noise_multiplier=1.0
    )
    with pytest.raises(ValueError, match=name):
        PrivacyBudget(**{**fields, name: value})
