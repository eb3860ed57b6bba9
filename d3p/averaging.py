# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Iterate averaging: statistics of the trace of the variational parameters.

The last iterate of DP-VI carries the noise of the last steps. Averaging the iterates
over a window past convergence (or an exponential moving average) reduces that noise, and
the fluctuation of the iterates in the window estimates how much noise is left: DPVIm
(Jälkö, Prediger, Honkela, Kaski, TMLR 2023, arXiv:2210.15961) averages the parameter
trace, in the unconstrained space the optimiser works in, and estimates the DP noise of
the parameters from the spread of the trace past convergence.
:class:`d3p.noise_aware.NoiseAwarePosterior` builds on the statistics kept here.

**Privacy.** Everything here is a function of the iterates, which are differentially
private: post-processing, at no privacy cost. It never sees the data, and the epsilon of
a run does not change with averaging.

The functions are pure and work on pytrees of arrays (numpyro/optax style: a
``NamedTuple`` state, ``init`` and ``update``), un-jitted in a Python loop and inside
``jax.jit`` or ``jax.lax.fori_loop``. They take the *unconstrained* parameters,
``dpsvi.optim.get_params(state.optim_state)``; :func:`constrained_mean` maps the average
to the constrained parameters. :meth:`d3p.svi.DPSVI.run` keeps them for you with its
``average`` argument.

Example: a hand loop that averages its last 500 of 2000 steps in 10 blocks

.. code-block:: python

    from d3p import averaging

    stats = None
    for t in range(2000):
        batch = get_batch(0, dpsvi.batch_key(state))
        state, loss = dpsvi.update(state, *batch)
        if t == 1500:
            stats = averaging.init(dpsvi.optim.get_params(state.optim_state), block_size=50)
        if t >= 1500:
            stats = averaging.update(stats, dpsvi.optim.get_params(state.optim_state))
    params = averaging.constrained_mean(stats, dpsvi.constrain_fn)

or, in one call, ``dpsvi.run(key, 2000, *data, q=q, delta=delta, average=0.25)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from d3p import _validation

__all__ = [
    "EMA",
    "EMAState",
    "IterateStats",
    "Window",
    "constrained_mean",
    "ema_init",
    "init",
    "update",
    "variance",
    "variance_of_mean",
]

# --------------------------------------------------------------------------------------------
# What to average (the ``average`` argument of DPSVI.run)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Window:
    """Average the iterates of the last ``fraction`` of a run's steps.

    Parameters
    ----------
    fraction : float
        In (0, 1]: the window is the last ``ceil(fraction * num_steps)`` steps of the run.
        Choose it so that the window starts past convergence (e.g. 0.5).
    num_blocks : int
        The window is cut into this many blocks of equal length (>= 2) for the batch-means
        estimate of the noise left in the average (:func:`variance_of_mean`). More blocks
        give a less noisy estimate; each block must still be much longer than the
        correlation time of the iterates (tens of steps for Adam). Default 10.
    """

    fraction: float
    num_blocks: int = 10

    def __post_init__(self) -> None:
        fraction = _validation.real(self.fraction, "fraction", 0.0, 1.0, closed_high=True)
        object.__setattr__(self, "fraction", fraction)
        object.__setattr__(self, "num_blocks", _validation.count(self.num_blocks, "num_blocks", 2))

    def length(self, num_steps: int) -> int:
        """The number of steps in the window of a run of ``num_steps`` steps (>= 1)."""
        # rounded first, so that 0.1 * 1000 = 100.00000000000001 is a window of 100 steps
        return min(num_steps, max(1, math.ceil(round(self.fraction * num_steps, 9))))


@dataclasses.dataclass(frozen=True)
class EMA:
    """An exponential moving average of all iterates of a run, with ``decay`` in (0, 1).

    Iterate ``t`` of ``T`` has weight proportional to ``decay ** (T - t)``: the average
    reaches back about ``1 / (1 - decay)`` steps. The weights are normalised from the
    first step on (as Adam's bias correction does), so early iterates never count as zero.
    """

    decay: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", _validation.real(self.decay, "decay", 0.0, 1.0))


def as_spec(average: Any) -> Window | EMA | None:
    """``average`` of :meth:`d3p.svi.DPSVI.run` as a :class:`Window` or :class:`EMA`.

    None stays None; a number is :class:`Window`'s fraction.
    """
    if average is None or isinstance(average, Window | EMA):
        return average
    if isinstance(average, bool) or not hasattr(average, "__float__"):
        raise TypeError(
            "average must be None, a fraction in (0, 1] of the last steps, "
            f"d3p.averaging.Window or d3p.averaging.EMA; got {average!r}"
        )
    return Window(average)


# --------------------------------------------------------------------------------------------
# States
# --------------------------------------------------------------------------------------------


class IterateStats(NamedTuple):
    """Statistics of the iterates of a window (a pytree; see :func:`init`, :func:`update`).

    Every parameter field has the tree structure of the (unconstrained) parameters.

    Attributes
    ----------
    count
        Number of iterates added (int32 array).
    mean
        Their mean (the averaged parameters).
    m2
        Sum of squared deviations from the mean (Welford's algorithm); see :func:`variance`.
    last
        The iterate added last.
    block_size
        Number of consecutive iterates per block (int32 array, >= 1).
    block_sum
        Sum of the iterates of the current, incomplete block.
    num_blocks
        Number of complete blocks (int32 array).
    block_mean, block_m2
        Mean of the complete blocks' means and their sum of squared deviations; see
        :func:`variance_of_mean`.
    """

    count: jax.Array
    mean: Any
    m2: Any
    last: Any
    block_size: jax.Array
    block_sum: Any
    num_blocks: jax.Array
    block_mean: Any
    block_m2: Any


class EMAState(NamedTuple):
    """State of an exponential moving average (a pytree; see :func:`ema_init`, :func:`update`).

    Attributes
    ----------
    count
        Number of iterates added (int32 array).
    decay
        The decay in (0, 1) (array).
    mean
        The moving average (normalised weights; zeros before the first iterate).
    """

    count: jax.Array
    decay: jax.Array
    mean: Any


def _zeros(params: Any) -> Any:
    return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.result_type(x, float)), params)


def init(params: Any, block_size: int = 1) -> IterateStats:
    """Empty window statistics for iterates shaped like ``params`` (their values unused).

    ``block_size`` (int >= 1): iterates per block of the batch-means estimate
    :func:`variance_of_mean`, e.g. the window length divided by 10.
    """
    block_size = _validation.count(block_size, "block_size", allow_float=False)
    zeros = _zeros(params)
    none = jnp.zeros((), jnp.int32)
    return IterateStats(
        none, zeros, zeros, zeros, jnp.asarray(block_size, jnp.int32), zeros, none, zeros, zeros
    )


def ema_init(params: Any, decay: float) -> EMAState:
    """An empty moving average with ``decay`` in (0, 1) of iterates shaped like ``params``."""
    decay = _validation.real(decay, "decay", 0.0, 1.0)
    return EMAState(
        jnp.zeros((), jnp.int32), jnp.asarray(decay, jnp.result_type(float)), _zeros(params)
    )


def _toward(mean: Any, params: Any, weight: Any) -> Any:
    """``mean + weight * (params - mean)``, leaf by leaf (a running weighted mean)."""
    return jax.tree.map(lambda m, x: m + weight * (x - m), mean, params)


def _welford(mean: Any, m2: Any, count: Any, params: Any) -> tuple[Any, Any]:
    """Mean and sum of squared deviations after adding ``params`` as the ``count``-th value."""
    new_mean = _toward(mean, params, 1.0 / count)
    new_m2 = jax.tree.map(lambda s, x, m, n: s + (x - m) * (x - n), m2, params, mean, new_mean)
    return new_mean, new_m2


def _check_tree(state: Any, params: Any) -> None:
    if jax.tree.structure(state.mean) != jax.tree.structure(params):
        raise ValueError(
            "params must have the tree structure of the parameters the state was initialised "
            f"with: {jax.tree.structure(state.mean)}, got {jax.tree.structure(params)}"
        )


def update(state: IterateStats | EMAState, params: Any, include: Any = True) -> Any:
    """``state`` with the iterate ``params`` (unconstrained) added.

    ``include`` (a bool, or a traced boolean inside ``jit``): if False, the state is
    returned unchanged, so a ``fori_loop`` can add only the iterates of its window.
    """
    if not isinstance(state, IterateStats | EMAState):
        raise TypeError(
            "state must be d3p.averaging.IterateStats (init) or EMAState (ema_init), "
            f"got {type(state).__name__}"
        )
    _check_tree(state, params)
    count = state.count + 1
    if isinstance(state, EMAState):
        # the weight that keeps the weights normalised: (1 - d) / (1 - d ** count) (1 at first)
        weight = (1 - state.decay) / (1 - state.decay**count)
        new = state._replace(count=count, mean=_toward(state.mean, params, weight))
    else:
        mean, m2 = _welford(state.mean, state.m2, count, params)
        block_sum = jax.tree.map(jnp.add, state.block_sum, params)
        full = count % state.block_size == 0
        num_blocks = state.num_blocks + full.astype(jnp.int32)
        block_mean, block_m2 = _welford(
            state.block_mean,
            state.block_m2,
            jnp.maximum(num_blocks, 1),
            jax.tree.map(lambda s: s / state.block_size, block_sum),
        )
        new = IterateStats(
            count,
            mean,
            m2,
            params,
            state.block_size,
            _where(full, _zeros(block_sum), block_sum),
            num_blocks,
            _where(full, block_mean, state.block_mean),
            _where(full, block_m2, state.block_m2),
        )
    if include is True:
        return new
    return _where(include, new, state)


def _where(condition: Any, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b).astype(b.dtype), new, old)


def variance(stats: IterateStats) -> Any:
    """Sample variance of the iterates (``ddof=1``), per coordinate, in unconstrained units
    squared: how much one iterate fluctuates around the window's mean. NaN below 2 iterates.
    """
    _check_stats(stats)
    return _sample_variance(stats.m2, stats.count, 1)


def variance_of_mean(stats: IterateStats) -> Any:
    """Batch-means estimate of the variance of the window's mean, per coordinate.

    The variance of the complete blocks' means divided by their number: consecutive
    iterates are correlated, so the variance of one iterate divided by the number of
    iterates would understate it; block means of blocks much longer than the correlation
    time are nearly independent. Unconstrained units squared; NaN below 2 blocks. It
    treats the window's iterates as stationary (past convergence).
    """
    _check_stats(stats)
    return _sample_variance(stats.block_m2, stats.num_blocks, stats.num_blocks)


def _sample_variance(m2: Any, n: jax.Array, divisor: Any) -> Any:
    """``m2 / (n - 1) / divisor`` (NaN where ``n < 2``)."""
    return jax.tree.map(lambda s: jnp.where(n >= 2, s / ((n - 1) * divisor), jnp.nan), m2)


def _check_stats(stats: Any) -> None:
    if not isinstance(stats, IterateStats):
        raise TypeError(
            "stats must be d3p.averaging.IterateStats (a window's statistics; an "
            f"exponential moving average keeps no spread), got {type(stats).__name__}"
        )


def constrained_mean(state: IterateStats | EMAState, constrain_fn: Callable) -> dict:
    """The averaged parameters, constrained: ``constrain_fn(state.mean)``.

    ``constrain_fn``: :attr:`d3p.svi.DPSVI.constrain_fn`. Averaging happens in the
    unconstrained space the optimiser works in (as DPVIm does), so an averaged positive
    scale is a geometric-like mean, never outside its support.
    """
    if not isinstance(state, IterateStats | EMAState):
        raise TypeError(
            f"state must be d3p.averaging.IterateStats or EMAState, got {type(state).__name__}"
        )
    if not callable(constrain_fn):
        raise TypeError(f"constrain_fn must be callable (dpsvi.constrain_fn), got {constrain_fn!r}")
    return constrain_fn(state.mean)
