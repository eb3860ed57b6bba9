# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""The training loop behind :meth:`d3p.svi.DPSVI.run`.

It plans the run (the DPSVI's plan, its budget's plan for the data, or a Poisson plan),
checks it against the state's history and the plan's record of earlier runs before any
work, draws every step's batch from the state's own key (so a continued run never replays
a batch and does not use its own key), runs the steps in jitted chunks that are compiled
once per shape and reused by later runs, shows a progress bar, and places the work on a
device mesh when one is given. The private step itself is :mod:`d3p._mechanism`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from d3p import _mechanism, _sharding, _validation, averaging, minibatch
from d3p._elbo_split import zero_examples
from d3p.history import (
    PrivacyHistory,
    UnplannedStep,
    plans_dp_event,
    plans_epsilon,
    warn_if_no_history,
    with_history,
)
from d3p.plan import PrivacyBudget, PrivacyPlan

# Most steps in one compiled chunk (their losses are buffered on the device), and the
# number of progress-bar updates a run aims at.
_MAX_CHUNK = 1024
_PROGRESS_UPDATES = 50


# ---------------------------------------------------------------- compile cache


def cached(dpsvi: Any, name: Any, make: Callable[[], Callable]) -> Callable:
    """The function ``make()`` built for ``dpsvi`` under ``name``, built once and reused.

    Rebuilt when anything the traced step reads from ``dpsvi`` changes: objects compared
    by identity (they may hold arrays), settings by value, so a changed ``dp_scale``
    never runs with a stale noise scale.
    """
    objects = (
        dpsvi._svi,
        dpsvi.static_kwargs,
        dpsvi.model,
        dpsvi.guide,
        dpsvi.per_example_loss,
        dpsvi.optim,
        dpsvi.rng_suite,
    )
    settings = (
        dpsvi.dp_scale,
        dpsvi.clipping_threshold,
        dpsvi.chunk_size,
        dpsvi._split_elbo,
        _sharding.context_shards(),
    )
    entry = dpsvi._compiled.get(name)
    if (
        entry is None
        or any(a is not b for a, b in zip(entry[0], objects, strict=True))
        or entry[1] != settings
    ):
        entry = (objects, settings, make())
        dpsvi._compiled[name] = entry
    return entry[2]


def split_kwargs(kwargs: dict) -> tuple[dict, tuple] | None:
    """``(array kwargs, hashable tuple of the others)``, or None if one is unhashable."""
    dynamic = {k: v for k, v in kwargs.items() if _is_array_tree(v)}
    static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in dynamic))
    try:
        hash(static)
    except TypeError:
        return None
    return dynamic, static


def _is_array_tree(value: Any) -> bool:
    leaves = jax.tree.leaves(value)
    return bool(leaves) and all(isinstance(x, jax.Array) or hasattr(x, "__array__") for x in leaves)


def call_compiled(
    dpsvi: Any, name: str, fn: Callable, state: Any, args: tuple, kwargs: dict, *rest: Any
) -> Any:
    """``fn(dpsvi, state, args, kwargs, *rest)`` through a cached ``jax.jit``.

    Called un-jitted in a Python loop, each step then reuses one compiled program per
    input shape instead of recompiling its loops every call. Array-valued keyword
    arguments are traced; the others (e.g. ``num_obs_total``) are static and must be
    hashable, else the call runs un-jitted. A mechanism (a step's plan) at the end of
    ``rest`` is static. Under a mesh with ``Explicit`` axes the call runs with them
    ``Auto`` (:func:`d3p._sharding.with_auto_axes`).
    """
    split = split_kwargs(kwargs)
    if split is None:
        return fn(dpsvi, state, args, kwargs, *rest)
    dynamic, static = split
    statics = rest[-1:] if rest and isinstance(rest[-1], PrivacyPlan | UnplannedStep) else ()
    traced = rest[: len(rest) - len(statics)]

    def make() -> Callable:
        return jax.jit(
            _sharding.with_auto_axes(
                lambda s, a, d, *t: fn(dpsvi, s, a, {**d, **dict(static)}, *t, *statics)
            )
        )

    return cached(dpsvi, (name, static, statics), make)(state, args, dynamic, *traced)


# ---------------------------------------------------------------- planning


def check_governed(dpsvi: Any) -> None:
    """Refuse a clipping threshold or noise changed away from the plan's or budget's."""
    covered = dpsvi.plan or dpsvi.budget
    if (dpsvi.clipping_threshold, dpsvi.dp_scale) != (
        covered.clipping_threshold,
        covered.noise_multiplier,
    ):
        raise ValueError(
            f"clipping_threshold={dpsvi.clipping_threshold} and dp_scale={dpsvi.dp_scale} "
            f"were changed from those of this DPSVI's plan or budget ({covered}); make a "
            "new plan instead"
        )


def privacy_parameters(
    clipping_threshold: Any,
    dp_scale: Any,
    expected_batch_size: Any,
    plan: PrivacyPlan | PrivacyBudget | None,
) -> tuple[float, float, float | None]:
    """``(C, sigma, normaliser)`` of a DPSVI: from ``plan``, or from d3p 0.2's arguments."""
    if plan is not None:
        if not isinstance(plan, PrivacyPlan | PrivacyBudget):
            raise TypeError(
                f"plan must be a d3p.plan.PrivacyPlan or PrivacyBudget, got {type(plan).__name__}"
            )
        given = {"clipping_threshold": clipping_threshold, "dp_scale": dp_scale}
        if isinstance(plan, PrivacyPlan):  # a budget leaves the normaliser open (N unknown)
            given["expected_batch_size"] = expected_batch_size
        if any(v is not None for v in given.values()):
            raise TypeError(
                f"give either plan or {' and '.join(given)}; the plan holds them: {plan}"
            )
        if isinstance(plan, PrivacyPlan):
            expected_batch_size = plan.normaliser
        clipping_threshold, dp_scale = plan.clipping_threshold, plan.noise_multiplier
    if clipping_threshold is None or dp_scale is None:
        raise TypeError("DPSVI needs clipping_threshold and dp_scale, or plan=PrivacyPlan(...)")
    if expected_batch_size is not None:
        expected_batch_size = _validation.real(expected_batch_size, "expected_batch_size", 0.0)
    return (
        _validation.real(clipping_threshold, "clipping_threshold", 0.0),
        _validation.real(dp_scale, "dp_scale", 0.0, closed_low=True),
        expected_batch_size,
    )


def plan_step(
    dpsvi: Any, n: int, q: Any, max_batch_size: Any, delta: Any
) -> tuple[PrivacyPlan, float]:
    """The plan of one step of a run over ``n`` records, and the delta to report at.

    This DPSVI's plan, its budget's plan for ``n`` records, or a Poisson plan at rate
    ``q``; arguments that contradict a plan or budget are refused.
    """
    covered = dpsvi.plan or dpsvi.budget
    if covered is not None:
        check_governed(dpsvi)
        if q is not None and q != covered.q:
            kind = "plan" if covered is dpsvi.plan else "budget"
            raise ValueError(
                f"this DPSVI's privacy {kind} is for q={covered.q}, got q={q} (its "
                "accounting would not describe the run: the budget could be exceeded)"
            )
    if delta is None and dpsvi.budget is None:
        raise ValueError(
            "DPSVI.run needs the delta at which to report the privacy spent, in "
            "(0, 1); choose it well below 1 / N (the number of records), e.g. 1e-5"
        )
    delta = dpsvi.budget.delta if delta is None else _validation.real(delta, "delta", 0, 1)
    if dpsvi.plan is not None:
        if max_batch_size is not None:
            raise ValueError("the plan sets the batch size; do not pass max_batch_size")
        if n != dpsvi.plan.dataset_size:
            raise ValueError(
                f"the data have {n} records but the plan is for dataset_size="
                f"{dpsvi.plan.dataset_size}"
            )
        return dpsvi.plan.with_steps(1), delta
    if dpsvi.budget is not None:
        return dpsvi.budget.plan(n, 1, max_batch_size), delta
    if q is None:
        raise ValueError("DPSVI.run needs the Poisson sampling rate q, in (0, 1]")
    plan = PrivacyPlan.poisson(
        n, q, dpsvi.clipping_threshold, dpsvi.dp_scale, 1, max_batch_size=max_batch_size
    )
    if dpsvi.expected_batch_size is not None and not math.isclose(
        dpsvi.expected_batch_size, plan.normaliser
    ):
        warnings.warn(
            f"DPSVI.run normalises by q * N = {plan.normaliser}, not expected_batch_size="
            f"{dpsvi.expected_batch_size}",
            UserWarning,
            stacklevel=4,
        )
    return plan, delta


# ---------------------------------------------------------------- accounting


def accounted_plans(
    dpsvi: Any,
    q: Any,
    num_epochs: Any,
    num_iter: Any,
    dataset_size: Any,
    max_batch_size: Any,
    state: Any,
) -> list[PrivacyPlan]:
    """The plans :meth:`get_epsilon` composes (empty if no step was taken)."""
    covered = dpsvi.plan or dpsvi.budget
    if covered is not None:
        check_governed(dpsvi)
        if q is not None and q != covered.q:
            raise ValueError(f"this DPSVI's privacy plan or budget has q={covered.q}, got q={q}")
        q = covered.q
    if dpsvi.plan is not None:
        if dataset_size not in (None, dpsvi.plan.dataset_size) or max_batch_size is not None:
            raise ValueError(
                "this DPSVI's plan sets the data-set size and the batch size: give "
                f"neither (plan: {dpsvi.plan})"
            )
    if dpsvi.dp_scale == 0:
        warn_not_private()

    def sampled(step: UnplannedStep | None, n: int) -> PrivacyPlan:
        c, sigma = (
            (dpsvi.clipping_threshold, dpsvi.dp_scale)
            if step is None
            else (step.clipping_threshold, step.noise_multiplier)
        )
        if dpsvi.plan is not None:
            return (
                PrivacyPlan.poisson(
                    dpsvi.plan.dataset_size, q, c, sigma, n, max_batch_size=dpsvi.plan.batch_size
                )
                if dpsvi.plan.sampling == "poisson"
                else dpsvi.plan.with_steps(n)
            )
        size = max_batch_size
        if dpsvi.budget is not None and dataset_size is not None and size is None:
            size = dpsvi.budget.plan(dataset_size).batch_size  # what run draws
        if q is None or dataset_size is None or size is None:
            raise ValueError(
                "how the batches were drawn is unknown: give q, dataset_size and "
                "max_batch_size of the sampler that drew them (max_batch_size="
                "dataset_size if batches were never truncated); got "
                f"q={q!r}, dataset_size={dataset_size!r}, max_batch_size={max_batch_size!r}"
            )
        return PrivacyPlan.poisson(dataset_size, q, c, sigma, n, max_batch_size=size)

    if state is None:
        if (num_epochs is None) == (num_iter is None):
            raise ValueError("give exactly one of num_epochs, num_iter and state")
        if num_epochs is not None:
            if q is None:
                raise ValueError("num_epochs needs the sampling rate q, in (0, 1]")
            num_iter = _validation.real(num_epochs, "num_epochs", 0.0) / q
        steps = math.ceil(_validation.real(num_iter, "num_iter", 0.0))
        return [sampled(None, steps)]
    if num_epochs is not None or num_iter is not None:
        raise ValueError("give exactly one of num_epochs, num_iter and state")
    if state.history is None:
        steps = int(state.num_steps)
        warn_if_no_history(state, stacklevel=4)
        return [sampled(None, steps)] if steps else []
    plans = state.history.plans(sampled)
    for plan in plans:
        if plan.sampling == "poisson" and (
            (q is not None and plan.q != q)
            or (dataset_size is not None and plan.dataset_size != dataset_size)
            or (
                max_batch_size is not None
                and plan.batch_size
                != minibatch.structural_batch_size(plan.dataset_size, plan.q, max_batch_size)
            )
        ):
            raise ValueError(
                f"the state's steps were taken with q={plan.q}, dataset_size="
                f"{plan.dataset_size}, batch size {plan.batch_size} (its history records "
                f"them); got q={q!r}, dataset_size={dataset_size!r}, "
                f"max_batch_size={max_batch_size!r}"
            )
    return plans


def warn_not_private() -> None:
    warnings.warn(
        "dp_scale is 0: no noise is added, the training is NOT differentially private "
        "(epsilon is inf)",
        UserWarning,
        stacklevel=4,
    )


def missing_plate_size(dpsvi: Any, kwargs: dict) -> ValueError | None:
    """The error for a model called without its data-set size (a plate of size None)."""
    try:
        parameters = inspect.signature(dpsvi.model).parameters
    except (TypeError, ValueError):
        return None
    given = {**kwargs, **dpsvi.static_kwargs}
    missing = [
        name
        for name, p in parameters.items()
        if p.default is None and given.get(name) is None and p.kind != p.VAR_POSITIONAL
    ]
    if not missing:
        return None
    return ValueError(
        f"the model's data plate has no size: pass the number of records N as the "
        f"model's keyword {' or '.join(map(repr, missing))} (e.g. DPSVI(..., "
        f"{missing[-1]}=N)); it sets the likelihood's scale and must be the data-set size"
    )


def check_plate(dpsvi: Any, state: Any, n: int) -> None:
    """Refuse a model whose data plate scales one example to other than ``n`` records.

    A wrong data-set size (``num_obs_total``, ``N``) changes what the likelihood means
    and the step size; :meth:`run` knows the number of records, so it checks.
    """
    if not dpsvi.clip_unscaled_observations:
        return
    scale = float(state.observation_scale)
    if not math.isclose(scale, n, rel_tol=1e-6):
        raise ValueError(
            f"the model's data plate scales one example to {scale:g} records, but the "
            f"data have {n}: pass the data-set size N={n} to the model (e.g. "
            "num_obs_total=N, as the plate's size) "
        )


# ---------------------------------------------------------------- the loop


def _chunk(dpsvi: Any, step: PrivacyPlan, kwargs_static: tuple, shards: int | None) -> Callable:
    """A jitted ``(state, data, dynamic kwargs, count, iterates, start) -> (state, losses,
    iterates)`` that takes ``count`` steps (dynamic, at most ``_MAX_CHUNK``); losses beyond
    ``count`` are NaN. ``iterates``: None, or the :mod:`d3p.averaging` state that each
    step's iterate is added to once the state has taken more than ``start`` steps (dynamic,
    so one program serves every window). ``shards``: the size of the mesh's data axis,
    None without a mesh."""
    loss_dtype = jnp.result_type(float)  # the loss's: it is promoted with this dtype
    on_mesh = shards is not None

    def chunk(state, data, dynamic, count, iterates, start):
        kwargs = {**dynamic, **dict(kwargs_static)}
        n = data[0].shape[0]
        # on a mesh the sampler draws row indices (replicated); each device gathers its rows
        rows = (jnp.arange(n, dtype=jnp.int32),) if on_mesh else data
        _, get_batch = step.batcher(rows, dpsvi.rng_suite)

        def body(i, carry):
            state, losses, iterates = carry
            batch, mask = get_batch(0, _mechanism.batch_key(dpsvi.rng_suite, state))
            if on_mesh:
                batch, mask = _sharding.gather_batch(data, batch[0], mask, shards)
            state, loss = _mechanism.update(
                dpsvi, state, batch, kwargs, mask, step.normaliser, step
            )
            if iterates is not None:  # post-processing of the new iterate
                params = dpsvi.optim.get_params(state.optim_state)
                iterates = averaging.update(iterates, params, state.num_steps > start)
            return state, losses.at[i].set(loss.astype(loss_dtype)), iterates

        losses = jnp.full(_MAX_CHUNK, jnp.nan, loss_dtype)
        return jax.lax.fori_loop(0, count, body, (state, losses, iterates))

    return jax.jit(chunk)


def _steps_per_chunk(num_steps: int, progress_bar: bool) -> int:
    if progress_bar:
        return min(_MAX_CHUNK, -(-num_steps // _PROGRESS_UPDATES))
    return min(_MAX_CHUNK, num_steps)


def run(
    dpsvi: Any,
    rng_key: Any,
    num_steps: int,
    args: tuple,
    kwargs: dict,
    *,
    q: Any,
    max_batch_size: Any,
    delta: Any,
    progress_bar: bool,
    init_state: Any,
    init_params: Any,
    mesh: Any,
    check_finite: bool,
    average: Any,
) -> tuple:
    """:meth:`d3p.svi.DPSVI.run` (see there): ``(params, state, losses, epsilon, delta,
    dp_event, iterates)``."""
    num_steps = _validation.count(num_steps, "num_steps")
    average = averaging.as_spec(average)
    shards = None if mesh is None else _sharding.check_mesh(mesh)
    args, n = _validation.batch(args)
    if any(a is None for a in args):
        raise ValueError("DPSVI.run needs every positional argument to be a data array")
    split = split_kwargs(kwargs)
    if split is None:
        raise TypeError("DPSVI.run needs hashable non-array keyword arguments for the model")
    step, delta = plan_step(dpsvi, n, q, max_batch_size, delta)
    if init_state is not None:
        init_state = with_history(init_state, stacklevel=4)
    history = PrivacyHistory.start() if init_state is None else init_state.history
    covered = dpsvi.plan or dpsvi.budget
    if covered is not None:
        covered.charge(history, step, num_steps)
    # the accounting of the state after the run, before any work (refuses what it cannot
    # account, e.g. steps of DPSVI.update without a plan)
    plans = history.record(step, num_steps).plans()
    epsilon = plans_epsilon(plans, delta)
    if check_finite:
        _validation.finite_data(args)

    in_mesh = contextlib.nullcontext()
    if mesh is not None:
        mesh = _sharding.auto_mesh(mesh)
        args = _sharding.place(args, mesh)
        in_mesh = jax.set_mesh(mesh)
    if init_state is None:
        zeros = zero_examples(args, step.batch_size, host=True)
        state = dpsvi.init(rng_key, *zeros, init_params=init_params, **kwargs)
    else:
        state = init_state
    check_plate(dpsvi, state, n)
    state = state._replace(  # counters as arrays (a d3p 0.2 state has plain ints)
        num_nonfinite_grads=jnp.asarray(state.num_nonfinite_grads, jnp.int32),
        num_steps=jnp.asarray(state.num_steps, jnp.int32),
        history=state.history.record(step, 0),
    )
    # the iterates of the window (the last steps of this run), or of the whole run for an
    # EMA: statistics of the private iterates only (post-processing)
    iterates = start = None
    if average is not None:
        params = dpsvi.optim.get_params(state.optim_state)
        start = int(state.num_steps)
        if isinstance(average, averaging.EMA):
            iterates = averaging.ema_init(params, average.decay)
        else:
            window = average.length(num_steps)
            iterates = averaging.init(params, max(1, window // average.num_blocks))
            start += num_steps - window
        start = jnp.asarray(start, jnp.int32)
    if mesh is not None:
        state, iterates = _sharding.place((state, iterates), mesh)

    dynamic, static = split
    per_chunk = _steps_per_chunk(num_steps, progress_bar)
    losses = []
    with in_mesh, tqdm.tqdm(total=num_steps, disable=not progress_bar) as bar:
        fn = cached(
            dpsvi,
            ("run", step, static, shards, type(average)),
            lambda: _chunk(dpsvi, step, static, shards),
        )
        done = 0
        while done < num_steps:
            # the first chunk (one step) pays the compilation: shown apart from the steps,
            # whose rate alone sets the ETA
            count = 1 if done == 0 and progress_bar else min(per_chunk, num_steps - done)
            if done == 0:
                bar.set_description_str("compiling" if progress_bar else None)
            state, buffer, iterates = fn(state, args, dynamic, count, iterates, start)
            chunk_losses = np.asarray(buffer)[:count]  # on the host: no program per length
            losses.append(chunk_losses)
            done += count
            if done == count:
                bar.set_description_str("training")
                bar.reset()
            bar.set_postfix_str(f"loss {float(np.nanmean(chunk_losses)):.4g} (not private)")
            bar.update(count)
    if covered is not None:
        covered.settle(state.history)
    if iterates is None:
        params = dpsvi.get_params(state)
    else:
        params = averaging.constrained_mean(iterates, dpsvi.constrain_fn)
    losses = jnp.asarray(np.concatenate(losses))
    return params, state, losses, epsilon, delta, plans_dp_event(plans), iterates
