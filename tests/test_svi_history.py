# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""The state owns its privacy history: continued runs account what was done, never replay a
batch, and a released state cannot recompute earlier noise (issue 23's cases 1-4)."""

import dataclasses
import pickle
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import Trace_ELBO

import d3p._mechanism
import d3p.random
from d3p import dputil, minibatch
from d3p.history import PrivacyHistory, UnplannedStep
from d3p.plan import PrivacyBudget, PrivacyPlan
from d3p.svi import DPSVI

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import d3p.random.debug as debug

N, D = 200, 2
RUN = dict(delta=1e-5, progress_bar=False)


def model(x, y=None, N=N):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=x[:, :D] @ w), obs=y)


def guide(x, y=None, N=N):
    loc = numpyro.param("loc", jnp.zeros(D))
    numpyro.sample("w", dist.Normal(loc, 0.5).to_event(1))


def data(n=N):
    """Features, then the record id in the last column (the model reads only the first D)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, D)).astype(np.float32)
    y = (x @ np.array([1.0, -1.0]) > 0).astype(np.float32)
    ids = np.arange(n, dtype=np.float32)[:, None]
    return jnp.asarray(np.hstack([x, ids])), jnp.asarray(y)


def make(sigma=1.0, rng_suite=debug, plan=None):
    """A DPSVI with C = 1 and noise ``sigma``, or those of ``plan``."""
    privacy = dict(plan=plan) if plan is not None else dict(clipping_threshold=1.0, dp_scale=sigma)
    optim = numpyro.optim.Adam(1e-2)
    return DPSVI(model, guide, optim, Trace_ELBO(), rng_suite=rng_suite, **privacy)


@pytest.fixture
def recorded(monkeypatch):
    """Every step's batch (ids of its real rows) and noise key, as the step sees them."""
    steps = []
    update = d3p._mechanism.update

    def record(dpsvi, state, args, kwargs, mask, normaliser, mechanism):
        noise_key = d3p._mechanism.step_keys(dpsvi.rng_suite, state.rng_key)[3]

        def keep(n, ids, mask, key):
            steps.append((int(n), frozenset(np.asarray(ids)[np.asarray(mask)].tolist()), key))

        jax.debug.callback(keep, state.num_steps, args[0][:, -1], mask, noise_key, ordered=True)
        return update(dpsvi, state, args, kwargs, mask, normaliser, mechanism)

    monkeypatch.setattr(d3p._mechanism, "update", record)
    return steps


def test_continuation_equals_one_long_run_and_ignores_its_key():
    x, y = data()
    dpsvi = make()
    key = debug.PRNGKey(0)
    first = dpsvi.run(key, 7, x, y, q=0.05, **RUN)
    for k2 in (key, debug.PRNGKey(9)):  # the same key as the first run, and another
        second = dpsvi.run(k2, 5, x, y, q=0.05, init_state=first.state, **RUN)
        whole = dpsvi.run(key, 12, x, y, q=0.05, **RUN)
        assert jax.tree.map(np.testing.assert_array_equal, second.params, whole.params)
        np.testing.assert_array_equal(second.losses, whole.losses[7:])
        np.testing.assert_array_equal(second.state.rng_key, whole.state.rng_key)
        assert second.epsilon == whole.epsilon and second.dp_event == whole.dp_event


@pytest.mark.slow  # 5-8 s each
@pytest.mark.parametrize("governed", ["plan", "budget"])
def test_continuation_equals_one_long_run_under_a_plan_and_a_budget(governed):
    x, y = data()
    if governed == "plan":
        kwargs = dict(plan=PrivacyPlan.poisson(N, 0.05, 1.0, 1.0, 30))
    else:
        kwargs = dict(plan=PrivacyBudget.calibrate(2.0, 1e-5, 0.05, 30, 1.0))
    dpsvi = make(**kwargs)  # one DPSVI: its plan or budget counts all three runs (14 <= 30)
    first = dpsvi.run(debug.PRNGKey(0), 4, x, y, **RUN)
    second = dpsvi.run(debug.PRNGKey(0), 3, x, y, init_state=first.state, **RUN)
    whole = dpsvi.run(debug.PRNGKey(0), 7, x, y, **RUN)
    assert jax.tree.map(np.testing.assert_array_equal, second.params, whole.params)
    assert second.epsilon == whole.epsilon


def test_replay_detector_finds_no_repeated_batch(recorded):
    # Case 1 of issue 23: continuing with the run's own key drew the first run's batches
    # again. Two independent Poisson batches (q = 0.05, N = 200) are equal with probability
    # sum_k P(both hold k)... at most (q**2 + (1-q)**2)**N = 0.905**200 < 2e-8; over the
    # 1,770 pairs of 60 steps below that is < 4e-5, so any repeat means a replay.
    x, y = data()
    dpsvi = make()
    key = debug.PRNGKey(3)
    result = dpsvi.run(key, 20, x, y, q=0.05, **RUN)
    for _ in range(2):
        result = dpsvi.run(key, 20, x, y, q=0.05, init_state=result.state, **RUN)
    assert sorted(n for n, _, _ in recorded) == list(range(60))  # every step seen once
    batches = [b for _, b, _ in recorded if b]
    assert len(batches) >= 55 and len(set(batches)) == len(batches)


@pytest.mark.slow  # 8 s: run and a hand loop
def test_hand_loop_draws_from_the_state_as_run_does(recorded):
    x, y = data()
    plan = PrivacyPlan.poisson(N, 0.05, 1.0, 1.0, 5)
    dpsvi = make(plan=plan)
    result = dpsvi.run(debug.PRNGKey(4), 5, x, y, **RUN)
    run_batches = [b for _, b, _ in recorded]
    recorded.clear()
    _, get_batch = plan.batcher((x, y), debug)
    state = make(plan=plan).init(debug.PRNGKey(4), x[:1], y[:1])
    step = jax.jit(dpsvi.update)
    for _ in range(5):
        (xb, yb), mask = get_batch(0, dpsvi.batch_key(state))
        state, _ = step(state, xb, yb, mask=mask)
    assert [b for _, b, _ in recorded] == run_batches
    assert jax.tree.map(np.testing.assert_allclose, dpsvi.get_params(state), result.params)
    assert dpsvi.get_epsilon(1e-5, state=state) == result.epsilon


def test_released_state_cannot_recompute_earlier_noise(recorded):
    # Case 4: the released state held the ChaCha secret of the run's first key (only the
    # nonce differed), so every batch and noise draw could be recomputed from it. Now each
    # step rekeys: the released secret is fresh. Try what a reader of the code would: derive
    # keys from the released one by split, fold_in and the step's own derivation, and
    # compare the secrets and the noise with those of every step taken.
    x, y = data()
    dpsvi = make(rng_suite=d3p.random)
    result = dpsvi.run(d3p.random.PRNGKey(11), 6, x, y, q=0.05, **RUN)
    released = result.state.rng_key
    used = [np.asarray(key) for _, _, key in recorded]
    secrets = {key[1:3].tobytes() for key in used}
    assert len(secrets) == 6  # every step had its own secret
    candidates = [released, *d3p.random.split(released, 8)]
    candidates += [d3p.random.fold_in(released, i) for i in range(8)]
    candidates += list(d3p._mechanism.step_keys(d3p.random, released))
    noise = {d3p.random.hardened_normal(key, (4,)).tobytes() for key in map(jnp.asarray, used)}
    for candidate in candidates:
        assert np.asarray(candidate)[1:3].tobytes() not in secrets
        assert d3p.random.hardened_normal(candidate, (4,)).tobytes() not in noise


def test_continuation_accounts_the_earlier_steps_as_they_were():
    # Case 2: 300 steps at q = 0.1, then 1 step at q = 0.001 was reported as 301 steps at
    # q = 0.001 (epsilon 0.087). Now the history composes what was done.
    x, y = data()
    dpsvi = make()
    first = dpsvi.run(debug.PRNGKey(0), 30, x, y, q=0.1, **RUN)
    second = dpsvi.run(debug.PRNGKey(0), 1, x, y, q=0.01, init_state=first.state, **RUN)
    runs = [
        PrivacyPlan.poisson(N, 0.1, 1.0, 1.0, 30).accounting(),
        PrivacyPlan.poisson(N, 0.01, 1.0, 1.0, 1).accounting(),
    ]
    assert second.epsilon == pytest.approx(dputil.compose_epsilon(runs, 1e-5), rel=1e-12)
    assert second.epsilon >= first.epsilon
    # another noise multiplier on a DPSVI of its own: composed too
    third = make(sigma=10.0).run(debug.PRNGKey(0), 1, x, y, q=0.1, init_state=first.state, **RUN)
    assert third.epsilon >= first.epsilon
    assert [m.noise_multiplier for m, _ in third.state.history.segments()] == [1.0, 10.0]
    assert make().get_epsilon(1e-5, state=third.state) == third.epsilon


@pytest.mark.slow  # 6 s
def test_a_plan_refuses_a_state_with_other_steps():
    x, y = data()
    first = make(plan=PrivacyPlan.poisson(N, 0.05, 1.0, 0.6, 10)).run(
        debug.PRNGKey(0), 10, x, y, **RUN
    )
    other = make(sigma=20.0, plan=PrivacyPlan.poisson(N, 0.05, 1.0, 20.0, 10))
    with pytest.raises(ValueError, match="other privacy parameters"):
        other.run(debug.PRNGKey(0), 1, x, y, init_state=first.state, **RUN)


def test_a_budget_is_spent_by_fresh_runs_too():
    # Case 3: two fresh runs under one budget each reported epsilon <= the budget, together
    # they spent more. Now the budget counts every run on its data set.
    x, y = data()
    budget = PrivacyBudget.calibrate(1.0, 1e-5, 0.05, 12, 1.0)
    dpsvi = make(plan=budget)
    dpsvi.run(debug.PRNGKey(0), 8, x, y, **RUN)
    with pytest.raises(ValueError, match="other runs 8"):
        dpsvi.run(debug.PRNGKey(1), 8, x, y, **RUN)
    with pytest.raises(ValueError, match="other runs 8"):  # a second DPSVI on the same budget
        make(plan=budget).run(debug.PRNGKey(1), 5, x, y, **RUN)
    dpsvi.run(debug.PRNGKey(1), 4, x, y, **RUN)
    assert budget.steps_spent == 12
    copy = pickle.loads(pickle.dumps(budget))  # the record travels with the budget
    assert copy.steps_spent == 12
    with pytest.raises(ValueError, match="q=0.05, got q=0.5"):
        dpsvi.get_epsilon(1e-5, 0.5, num_iter=10, dataset_size=N)
    with pytest.raises(ValueError, match="changed"):
        changed = make(plan=budget)
        changed.dp_scale = 0.5
        changed.get_epsilon(1e-5, num_iter=10, dataset_size=N)


def test_hand_loop_without_plan_must_say_how_batches_were_drawn():
    # Case 7.1: 10.996 (untruncated) was returned where the truncated batches spend 23.54.
    x, y = data()
    dpsvi = make(sigma=1.0)
    size = minibatch.structural_batch_size(N, 0.1, 0.9)
    _, get_batch = minibatch.poisson_batchify_data((x, y), 0.1, size, rng_suite=debug)
    state = dpsvi.init(debug.PRNGKey(0), x[:1], y[:1])
    for _ in range(3):
        (xb, yb), mask = get_batch(0, dpsvi.batch_key(state))
        state, _ = dpsvi.update(state, xb, yb, mask=mask)
    assert state.history.segments() == [(UnplannedStep(1.0, 1.0), 3)]
    with pytest.raises(ValueError, match="q, dataset_size and max_batch_size"):
        dpsvi.get_epsilon(1e-5, state=state)
    with pytest.raises(ValueError, match="q, dataset_size and max_batch_size"):
        dpsvi.get_epsilon(1e-5, 0.1, state=state)
    eps = dpsvi.get_epsilon(1e-5, 0.1, state=state, dataset_size=N, max_batch_size=size)
    assert eps == PrivacyPlan.poisson(N, 0.1, 1.0, 1.0, 3, max_batch_size=size).epsilon(1e-5)
    assert eps > dputil.compute_epsilon(1.0, 1e-5, 0.1, 3)
    # run cannot account such steps: refused before any work
    with pytest.raises(ValueError, match="DPSVI.update without a plan"):
        dpsvi.run(debug.PRNGKey(0), 1, x, y, q=0.1, init_state=state, **RUN)


def test_history_is_a_pytree_that_records_under_jit():
    plan = PrivacyPlan.poisson(N, 0.05, 1.0, 1.0, 5).with_steps(1)
    history = PrivacyHistory.start().record(plan, 0)
    step = jax.jit(lambda h: h.record(plan))
    out = jax.lax.fori_loop(0, 4, lambda _, h: h.record(plan), step(history))
    assert out.segments() == [(plan, 5)] and out.num_steps == 5
    assert out.record(UnplannedStep(1.0, 2.0)).mechanisms == (plan, UnplannedStep(1.0, 2.0))
    other = PrivacyHistory.start()
    assert not np.array_equal(other.chain, history.chain)  # a fresh chain id per start


@pytest.mark.slow  # un-jitted: about 30 s
def test_rng_suite_never_derives_one_key_two_ways():
    # split(k, n)[15] == fold_in(k, 2) in jax-chacha-prng's stream layout (kept for
    # bit-compatibility): no d3p code may derive keys from one key by more than one of
    # split, fold_in and rekey. Record every derivation of a run (un-jitted, so the keys
    # are values) and of a hand-loop step.
    derived = {}

    def recording(name):
        fn = getattr(d3p.random, name)

        def wrapper(key, *args, **kwargs):
            derived.setdefault(np.asarray(key).tobytes(), set()).add(name)
            return fn(key, *args, **kwargs)

        return wrapper

    suite = types.ModuleType("recording_suite")
    suite.__dict__.update({k: getattr(d3p.random, k) for k in d3p.random.__all__})
    for name in ("split", "fold_in", "rekey", "convert_to_jax_rng_key", "hardened_normal"):
        setattr(suite, name, recording(name))
    x, y = data(40)
    dpsvi = DPSVI(model, guide, numpyro.optim.Adam(1e-2), Trace_ELBO(), 1.0, 1.0, suite, N=40)
    with jax.disable_jit():
        result = dpsvi.run(d3p.random.PRNGKey(1), 2, x, y, q=0.2, **RUN)
        dpsvi.update(result.state, x[:4], y[:4])
    assert len(derived) > 10
    assert d3p.random.split(d3p.random.PRNGKey(1), 16)[15].tobytes() == (
        d3p.random.fold_in(d3p.random.PRNGKey(1), 2).tobytes()
    )  # the overlap this test guards against is real
    assert all(len(uses) == 1 for uses in derived.values()), derived


def test_a_d3p_02_state_is_accepted_with_a_warning():
    x, y = data()
    dpsvi = make()
    state = dpsvi.init(debug.PRNGKey(0), x[:1], y[:1])
    old = type(state)(state.optim_state, state.rng_key, state.observation_scale)
    with pytest.warns(UserWarning, match="no privacy history"):
        new, _ = dpsvi.update(old, x[:4], y[:4])
    # it stays a history-less state (same tree structure in lax loops), counting its steps
    assert new.history is None and int(new.num_steps) == 1
    with pytest.warns(UserWarning, match="no privacy history"):
        eps = dpsvi.get_epsilon(1e-5, 0.02, state=new, dataset_size=N, max_batch_size=N)
    assert eps == PrivacyPlan.poisson(N, 0.02, 1.0, 1.0, 1, max_batch_size=N).epsilon(1e-5)


def test_plan_record_is_not_part_of_equality_or_repr():
    plan = PrivacyPlan.poisson(N, 0.05, 1.0, 1.0, 5)
    assert "_chains" not in repr(plan)
    assert dataclasses.replace(plan).steps_spent == 0 and hash(plan) == hash(plan.with_steps(5))


# ---------------------------------------------------------------- edges the review found


def test_truncated_poisson_accounts_the_larger_add_remove_neighbour():
    # dp-accounting's event with dataset_size=n models n - 1 other records; the neighbour
    # with N + 1 records needs n = N + 1 (epsilon grows with n: 20.02 vs 20.20 at N = 200,
    # q = 0.1, sigma = 1, T = 500, M = 30 in the review).
    kwargs = dict(sampling="truncated_poisson", dataset_size=200, max_batch_size=30)
    event = dputil.training_dp_event(1.0, 0.1, 50, **kwargs)
    assert event.event.dataset_size == 201
    substitute = dputil.training_dp_event(1.0, 0.1, 50, relation="substitute", **kwargs)
    assert substitute.event.dataset_size == 200
    below = dputil.compute_epsilon(1.0, 1e-5, 0.1, 50, **{**kwargs, "dataset_size": 199})
    assert dputil.compute_epsilon(1.0, 1e-5, 0.1, 50, **kwargs) > below


@pytest.mark.parametrize("sigma", [1e-160, 1e-300])
def test_tiny_noise_gives_inf_not_an_overflow(sigma):
    assert dputil.compute_epsilon(sigma, 1e-5, 0.1, 10) == float("inf")
    assert dputil.compute_epsilon(sigma, 1e-5, 0.1, 10, accountant="rdp") == float("inf")
    assert dputil.compute_delta(sigma, 10.0, 0.1, 10) == 1.0


def test_calibrating_a_huge_epsilon_answers_in_seconds():
    import time

    start = time.perf_counter()
    budget = PrivacyBudget.calibrate(1e6, 1e-5, 0.01, 100, 1.0)
    assert time.perf_counter() - start < 30  # was unbounded (each step down in sigma ~16x)
    assert dputil.compute_epsilon(budget.noise_multiplier, 1e-5, 0.01, 100) <= 1e6


def test_below_the_accounted_sigma_the_gaussian_bound_is_an_upper_bound():
    # just above the threshold the PLD accountant runs; the bound below it must not be
    # smaller (it covers every sampling and relation with sensitivity 2C)
    above = dputil.compute_epsilon(0.0501, 1e-5, 1.0, 3, sampling="full_batch")
    below = dputil.compute_epsilon(0.0499, 1e-5, 1.0, 3, sampling="full_batch")
    assert below >= above


def test_max_batch_size_above_n_is_refused():
    x, y = data()
    with pytest.raises(ValueError, match=r"max_batch_size must be in \[1, 200\]"):
        minibatch.poisson_batchify_data((x, y), 0.1, 201)
    with pytest.raises(ValueError, match=r"max_batch_size must be in \[1, 200\]"):
        PrivacyPlan.poisson(N, 0.1, 1.0, 1.0, 5, max_batch_size=1000)
    with pytest.raises(ValueError, match=r"max_batch_size must be in \[1, 200\]"):
        make().run(debug.PRNGKey(0), 1, x, y, q=0.1, max_batch_size=500, **RUN)


def test_float_masks_are_refused():
    x, y = data()
    dpsvi = make()
    state = dpsvi.init(debug.PRNGKey(0), x[:4], y[:4])
    with pytest.raises(TypeError, match="mask must be boolean"):
        dpsvi.update(state, x[:4], y[:4], mask=jnp.array([1.0, 0.5, 0.0, 1.0]))


def test_two_to_the_31_records_are_refused_before_any_copy():
    rows = np.broadcast_to(np.zeros((1, 1), np.float32), (2**31, 1))  # a view, no memory
    with pytest.raises(ValueError, match="at most 2\\*\\*31 - 1"):
        minibatch.poisson_batchify_data((rows,), 1e-6, 10)
    with pytest.raises(ValueError, match="at most 2\\*\\*31 - 1"):
        make().run(debug.PRNGKey(0), 1, rows, rows[:, 0], q=1e-6, **RUN)
    with pytest.raises(ValueError, match="at most 2\\*\\*31 - 1"):
        PrivacyPlan.poisson(2**31, 1e-6, 1.0, 1.0, 5)


def test_d3p_modules_import_one_way():
    # no import circle among d3p's modules (imports at module level and in functions)
    import ast
    import pathlib

    root = pathlib.Path(d3p.random.__file__).parents[1]
    graph = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("d3p"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("d3p"))
        graph[name] = deps
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    # a package importing its own submodules is not a circle (d3p.random -> d3p.random.chacha)
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in graph[m]:
            assert state.get(d) != "open", f"import circle: {' -> '.join([*path, d])}"
            if d not in state:
                visit(d, [*path, d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert "d3p.dputil" not in graph["d3p._fourier_compat"]  # the circle issue 23 found
