# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""DPSVI and the privacy plan: step counting, cumulative epsilon, budgets, plan-built DPSVI."""

import math
import warnings

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import Trace_ELBO

import d3p._mechanism
import d3p.random
from d3p import minibatch
from d3p.plan import PrivacyBudget, PrivacyPlan
from d3p.svi import DPSVI, DPSVIState

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import d3p.random.debug as debug

N = 200


def point_model(x, y, N=N):
    w = numpyro.param("w", jnp.full(x.shape[1], 0.1))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)


def noise_only_model(x, y, N=N):
    """A parameter vector the likelihood does not depend on: its data gradient is zero."""
    numpyro.param("w", jnp.zeros(4000))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)


def empty_guide(x, y, N=N):
    pass


def data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, n), jnp.float32)
    return x, y


def make(dp_scale=1.0, **kw):
    return DPSVI(
        point_model, empty_guide, numpyro.optim.SGD(0.1), Trace_ELBO(), 1.0, dp_scale, **kw
    )


def test_state_counts_steps_and_a_three_field_state_still_works():
    x, y = data(8)
    dpsvi = make(rng_suite=debug)
    state = dpsvi.init(debug.PRNGKey(0), x, y)
    assert int(state.num_steps) == 0
    step = jax.jit(lambda s: dpsvi.update(s, x, y)[0])
    assert int(step(step(state)).num_steps) == 2
    # d3p 0.2 code builds the state from three values
    old = DPSVIState(state.optim_state, state.rng_key, state.observation_scale)
    assert old.num_steps == 0 and int(step(old).num_steps) == 1
    assert dpsvi.get_epsilon(1e-5, 0.05, state=state) == 0.0  # no step, no privacy spent


def test_cumulative_epsilon_equals_one_run_of_all_steps():
    x, y = data()
    kwargs = dict(q=0.05, delta=1e-5, progress_bar=False)
    dpsvi = make(rng_suite=debug)
    first = dpsvi.run(debug.PRNGKey(0), 5, x, y, **kwargs)
    second = dpsvi.run(debug.PRNGKey(1), 5, x, y, init_state=first.state, **kwargs)
    assert int(second.state.num_steps) == 10
    # what a single run of 10 steps reports (its default truncation at the 1 - 1e-6 quantile)
    size = minibatch.structural_batch_size(N, 0.05, 1 - 1e-6)
    single = dpsvi.get_epsilon(1e-5, 0.05, num_iter=10, dataset_size=N, max_batch_size=size)
    assert second.epsilon == single > first.epsilon
    assert second.dp_event == dp_accounting.SelfComposedDpEvent(
        # add/remove: the larger neighbour has N + 1 records
        dp_accounting.TruncatedSubsampledGaussianDpEvent(N + 1, 0.05, size, 1.0),
        10,
    )
    # a hand-written loop gets the same from the state
    by_state = dpsvi.get_epsilon(
        1e-5, 0.05, state=second.state, dataset_size=N, max_batch_size=size
    )
    assert by_state == second.epsilon
    with pytest.raises(ValueError, match="exactly one"):
        dpsvi.get_epsilon(1e-5, 0.05, num_iter=3, state=second.state)


@pytest.fixture
def no_steps(monkeypatch):
    """Make any training work (init or a step) fail the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("training work started before the budget was checked")

    def install(dpsvi):
        monkeypatch.setattr(d3p._mechanism, "update", forbidden)
        monkeypatch.setattr(dpsvi, "init", forbidden)

    return install


def test_budget_overrun_is_refused_before_any_step(no_steps):
    x, y = data()
    dpsvi = DPSVI.make_private_with_epsilon(
        point_model,
        empty_guide,
        numpyro.optim.SGD(0.1),
        Trace_ELBO(),
        1.0,
        target_epsilon=1.0,
        target_delta=1e-5,
        q=0.05,
        num_steps=10,
        rng_suite=debug,
    )
    # a state built as in d3p 0.2 (three fields) starts the count at 0
    state = dpsvi.init(debug.PRNGKey(0), x, y)
    old = DPSVIState(state.optim_state, state.rng_key, state.observation_scale)
    with pytest.warns(UserWarning, match="no privacy history"):
        first = dpsvi.run(debug.PRNGKey(0), 6, x, y, init_state=old, progress_bar=False)
    assert int(first.state.num_steps) == 6 and first.epsilon <= 1.0
    no_steps(dpsvi)
    with pytest.raises(ValueError, match="taken 6 .this state 6, other runs 0., so at most 4 more"):
        dpsvi.run(debug.PRNGKey(1), 6, x, y, init_state=first.state, progress_bar=False)
    with pytest.raises(ValueError, match="covers 10 steps"):
        dpsvi.run(debug.PRNGKey(1), 11, x, y, progress_bar=False)
    assert dpsvi.get_epsilon(1e-5, state=first.state) == first.epsilon < 1.0
    with pytest.raises(ValueError, match="history records them"):  # contradicts the budget's
        dpsvi.get_epsilon(1e-5, state=first.state, dataset_size=N, max_batch_size=N)


def test_plan_event_sampler_and_noise_agree(monkeypatch, no_steps):
    plan = PrivacyPlan("poisson", N, 2.0, 0.7, num_steps=3, q=0.05)
    dpsvi = DPSVI(
        noise_only_model,
        empty_guide,
        numpyro.optim.SGD(1.0),
        Trace_ELBO(),
        plan=plan,
        rng_suite=debug,
    )
    assert (dpsvi.clipping_threshold, dpsvi.dp_scale) == (2.0, 0.7)
    assert dpsvi.expected_batch_size == plan.normaliser == 10.0
    batchers = []
    original = PrivacyPlan.batcher

    def recording(self, dataset, rng_suite=d3p.random):
        batchers.append((self, rng_suite))
        return original(self, dataset, rng_suite)

    monkeypatch.setattr(PrivacyPlan, "batcher", recording)
    x, y = data()
    result = dpsvi.run(debug.PRNGKey(2), 1, x, y, delta=1e-5, progress_bar=False)
    assert batchers == [(plan.with_steps(1), debug)]  # the run drew the plan's batches
    assert result.dp_event == plan.with_steps(1).dp_event()
    assert result.epsilon == plan.with_steps(1).epsilon(1e-5)
    # the data gradient of w is zero: its change is the noise, with standard deviation
    # sigma * C / normaliser times the observation scale N; the sample std of 4000 normals
    # has relative std 1 / sqrt(8000), allow 5 of those
    delta_w = np.asarray(dpsvi.optim.get_params(result.state.optim_state)["w"])
    target = plan.gradient_noise_std * N
    assert abs(delta_w.std() / target - 1) < 5 / math.sqrt(8000)
    assert abs(delta_w.mean()) < 5 * target / math.sqrt(4000)
    # the plan covers 3 steps in all
    second = dpsvi.run(
        debug.PRNGKey(3), 2, x, y, delta=1e-5, init_state=result.state, progress_bar=False
    )
    assert second.epsilon == plan.epsilon(1e-5)
    assert dpsvi.get_epsilon(1e-5, state=second.state) == plan.epsilon(1e-5)
    no_steps(dpsvi)
    with pytest.raises(ValueError, match="at most 0 more"):
        dpsvi.run(debug.PRNGKey(4), 1, x, y, delta=1e-5, init_state=second.state)
    with pytest.raises(ValueError, match="q=0.05"):
        dpsvi.run(debug.PRNGKey(4), 1, x, y, q=0.1, delta=1e-5)


def test_fixed_size_plan_runs_and_reports_its_accounting():
    # fixed-size batches are accounted with the RDP accountant (replace-one relation)
    plan = PrivacyPlan("fixed_size", N, 1.0, 2.0, 4, batch_size=20, relation="substitute")
    assert plan.accountant == "rdp"
    dpsvi = DPSVI(
        point_model, empty_guide, numpyro.optim.SGD(0.1), Trace_ELBO(), plan=plan, rng_suite=debug
    )
    x, y = data()
    result = dpsvi.run(debug.PRNGKey(0), 2, x, y, delta=1e-5, progress_bar=False)
    assert result.epsilon == plan.with_steps(2).epsilon(1e-5, "rdp")
    assert result.dp_event.event == dp_accounting.SampledWithoutReplacementDpEvent(
        N, 20, dp_accounting.GaussianDpEvent(1.0)
    )


def test_plan_and_legacy_arguments_are_exclusive():
    plan = PrivacyPlan("poisson", N, 2.0, 0.7, num_steps=3, q=0.05)
    loss = Trace_ELBO()
    optim = numpyro.optim.SGD(1.0)
    with pytest.raises(TypeError, match="either plan"):
        DPSVI(point_model, empty_guide, optim, loss, 1.0, plan=plan)
    with pytest.raises(TypeError, match="either plan"):
        DPSVI(point_model, empty_guide, optim, loss, plan=plan, expected_batch_size=3.0)
    with pytest.raises(TypeError, match="clipping_threshold and dp_scale"):
        DPSVI(point_model, empty_guide, optim, loss, 1.0)
    with pytest.raises(TypeError, match="PrivacyPlan"):
        DPSVI(point_model, empty_guide, optim, loss, plan={"q": 0.05})


def test_a_budget_builds_the_dpsvi_of_make_private_with_epsilon():
    loss = Trace_ELBO()
    optim = numpyro.optim.SGD(1.0)
    budget = PrivacyBudget.calibrate(1.0, 1e-5, 0.05, 10, 2.0)
    made = DPSVI.make_private_with_epsilon(
        point_model, empty_guide, optim, loss, 2.0, 1.0, 1e-5, 0.05, 10
    )
    assert made.budget == budget and made.plan is None
    assert (made.clipping_threshold, made.dp_scale) == (2.0, budget.noise_multiplier)
    # a budget leaves the data-set size open, so a hand loop may set the normaliser
    built = DPSVI(
        point_model,
        empty_guide,
        optim,
        loss,
        rng_suite=debug,
        plan=budget,
        expected_batch_size=10.0,
    )
    assert built.budget == budget and built.expected_batch_size == 10.0
    with pytest.raises(TypeError, match="either plan or clipping_threshold and dp_scale"):
        DPSVI(point_model, empty_guide, optim, loss, 2.0, plan=budget)
    x, y = data()
    result = built.run(debug.PRNGKey(0), 4, x, y, progress_bar=False)
    assert result.dp_event == budget.plan(N, 4).dp_event()
    assert result.epsilon == budget.plan(N, 4).epsilon(1e-5) and result.delta == 1e-5
    assert built.get_epsilon(1e-5, state=result.state, dataset_size=N) == result.epsilon


def test_variable_length_unpadded_batches_warn_once():
    x, y = data(8)
    dpsvi = make(rng_suite=debug)
    state = dpsvi.init(debug.PRNGKey(0), x, y)
    update = jax.jit(dpsvi.update)  # the check runs when update is traced for a new shape
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state, _ = update(state, x, y)
        state, _ = update(state, x, y)  # same length again: fine
    with pytest.warns(UserWarning, match="mask=.*expected_batch_size=q\\*N"):
        state, _ = update(state, x[:5], y[:5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        update(state, x[:3], y[:3])
    # with a data-independent normaliser the lengths may vary
    fixed = make(rng_suite=debug, expected_batch_size=6.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d3p._mechanism.normaliser(fixed, 8, True)
        d3p._mechanism.normaliser(fixed, 5, True)
