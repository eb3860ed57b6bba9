# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""ADADP: the adaptive learning-rate optimiser of Koskela and Honkela for noisy (DP) gradients.

Reference: A. Koskela and A. Honkela, "Learning rate adaptation for differentially
private learning", AISTATS 2020 (arXiv:1809.03832), Algorithm 1.

Steps come in pairs. On an even step (counter ``i`` even) the optimiser
remembers the current parameters ``x_prev``, computes a full step
``x_stepped = x_prev - lr * g`` and moves to the first half step
``x = x_prev - lr / 2 * g``. On the odd step it takes the second half step
``x_half = x - lr / 2 * g'`` with the new gradient ``g'`` and estimates the
local error as the mixed absolute/relative distance between the two results::

    err = || (x_stepped - x_half) / max(1, |x_stepped|) ||_2     (over all parameters)

The learning rate becomes ``lr * clip(sqrt(tol / err), alpha_min, alpha_max)``
and, with ``stability_check``, the pair of steps is rejected (the parameters
return to ``x_prev``) when ``err > tol``. A non-finite ``err`` counts as a
rejected step with the smallest factor ``alpha_min``.

Only gradients enter the optimiser, so it is post-processing of the privatised
gradients and costs no privacy; note that each pair of steps consumes two
noisy gradients (two DP iterations).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from numpyro.optim import _NumPyroOptim

from d3p import _validation

__all__ = ["ADADP", "ADADPOptaxState", "ADADPState", "adadp", "optax_adadp"]


class ADADPState(NamedTuple):
    """State of :func:`adadp`, in the d3p 0.2 layout ``(x, lr, x_stepped, x_prev)``."""

    #: Current parameters (pytree).
    x: Any
    #: Current learning rate (scalar array).
    lr: jax.Array
    #: Result of the last full step (zeros before the first step).
    x_stepped: Any
    #: Parameters before the last even step (the point a rejected pair returns to).
    x_prev: Any


class _Hyper(NamedTuple):
    tol: float
    stability_check: bool
    alpha_min: float
    alpha_max: float


def _check_hyper(
    step_size: float, tol: float, stability_check: bool, alpha_min: float, alpha_max: float
) -> tuple[float, _Hyper]:
    step_size = _validation.real(step_size, "step_size", 0, math.inf)
    tol = _validation.real(tol, "tol", 0, math.inf)
    alpha_min = _validation.real(alpha_min, "alpha_min", 0, math.inf)
    alpha_max = _validation.real(alpha_max, "alpha_max", 0, math.inf)
    if alpha_min > alpha_max:
        raise ValueError(f"alpha_min must be <= alpha_max, got {alpha_min} > {alpha_max}")
    if not isinstance(stability_check, bool):
        raise TypeError(f"stability_check must be a bool, got {type(stability_check).__name__}")
    return step_size, _Hyper(tol, stability_check, alpha_min, alpha_max)


def _step(x: Any, g: Any, lr: jax.Array) -> Any:
    return jax.tree.map(lambda a, b: a - (lr * b).astype(a.dtype), x, g)


def _local_error(x_full: Any, x_half: Any) -> jax.Array:
    parts = jax.tree.map(
        lambda f, h: jnp.sum(((f - h) / jnp.maximum(1.0, jnp.abs(f))) ** 2), x_full, x_half
    )
    return jnp.sqrt(sum(jax.tree.leaves(parts)))


def _even_step(g: Any, state: ADADPState) -> ADADPState:
    x, lr, _, _ = state
    return ADADPState(_step(x, g, 0.5 * lr), lr, _step(x, g, lr), x)


def _odd_step(g: Any, state: ADADPState, hyper: _Hyper) -> ADADPState:
    x, lr, x_stepped, x_prev = state
    x_half = _step(x, g, 0.5 * lr)
    err = _local_error(x_stepped, x_half)
    finite = jnp.isfinite(err)
    factor = jnp.where(
        finite,
        jnp.clip(jnp.sqrt(hyper.tol / err), hyper.alpha_min, hyper.alpha_max),
        hyper.alpha_min,
    )
    if hyper.stability_check:
        accept = finite & (err <= hyper.tol)
        x_half = jax.tree.map(lambda new, old: jnp.where(accept, new, old), x_half, x_prev)
    return ADADPState(x_half, (lr * factor).astype(lr.dtype), x_stepped, x_prev)


def _as_state(state: Any) -> ADADPState:
    """``state`` as an :class:`ADADPState` of arrays (d3p 0.2 code builds it by hand as a
    plain tuple, with a Python float learning rate)."""
    x, lr, x_stepped, x_prev = state
    x, x_stepped, x_prev = jax.tree.map(jnp.asarray, (x, x_stepped, x_prev))
    return ADADPState(x, jnp.asarray(lr, dtype=jnp.result_type(lr, float)), x_stepped, x_prev)


def _update(i: jax.Array, g: Any, state: Any, hyper: _Hyper) -> ADADPState:
    state = _as_state(state)
    return jax.lax.cond(
        i % 2 == 0,
        lambda: _even_step(g, state),
        lambda: _odd_step(g, state, hyper),
    )


def _init(x0: Any, step_size: float) -> ADADPState:
    x0 = jax.tree.map(jnp.asarray, x0)
    lr = jnp.asarray(step_size, dtype=jnp.result_type(float))
    return ADADPState(x0, lr, jax.tree.map(jnp.zeros_like, x0), x0)


def adadp(
    step_size: float = 1e-3,
    tol: float = 1.0,
    stability_check: bool = True,
    alpha_min: float = 0.9,
    alpha_max: float = 1.1,
) -> tuple[Callable, Callable, Callable]:
    """ADADP as an ``(init, update, get_params)`` triple (``jax.example_libraries`` style).

    Parameters
    ----------
    step_size : float
        Initial learning rate, > 0.
    tol : float
        Error tolerance ``tau`` > 0 that the learning rate is steered towards;
        with ``stability_check``, pairs of steps with a larger error are rejected.
    stability_check : bool
        Reject pairs of steps whose error exceeds ``tol``.
    alpha_min, alpha_max : float
        Bounds of the per-pair learning-rate factor, ``0 < alpha_min <= alpha_max``.

    Returns
    -------
    tuple
        ``init(x0) -> ADADPState``, ``update(i, g, state) -> ADADPState`` (``i``
        the step counter, starting at 0) and ``get_params(state) -> x``.
    """
    step_size, hyper = _check_hyper(step_size, tol, stability_check, alpha_min, alpha_max)

    def init(x0: Any) -> ADADPState:
        return _init(x0, step_size)

    def update(i: jax.Array, g: Any, state: ADADPState) -> ADADPState:
        """One step; ``state`` may also be a plain ``(x, lr, x_stepped, x_prev)`` tuple."""
        return _update(i, g, state, hyper)

    def get_params(state: ADADPState) -> Any:
        return state.x

    return init, update, get_params


class ADADP(_NumPyroOptim):
    """ADADP as a NumPyro optimiser, for :class:`d3p.svi.DPSVI` and ``numpyro.infer.SVI``.

    ``init(params)`` returns ``(0, ADADPState(x, lr, x_stepped, x_prev))`` as in d3p 0.2;
    ``update(g, state)`` also takes such a state built by hand as plain tuples, with a
    Python float ``lr``. The parameters are those of :func:`adadp`.
    """

    def __init__(
        self,
        step_size: float = 1e-3,
        tol: float = 1.0,
        stability_check: bool = True,
        alpha_min: float = 0.9,
        alpha_max: float = 1.1,
    ) -> None:
        super().__init__(adadp, step_size, tol, stability_check, alpha_min, alpha_max)


class ADADPOptaxState(NamedTuple):
    """State of :func:`optax_adadp`: step ``count`` and ADADP's other state fields."""

    #: Number of updates done so far (even: a full step is next).
    count: jax.Array
    lr: jax.Array
    x_stepped: Any
    x_prev: Any


def optax_adadp(
    step_size: float = 1e-3,
    tol: float = 1.0,
    stability_check: bool = True,
    alpha_min: float = 0.9,
    alpha_max: float = 1.1,
) -> Any:
    """ADADP as an ``optax.GradientTransformation`` (needs ``optax``).

    ``update(grads, state, params)`` requires ``params`` and returns the
    updates that move ``params`` to ADADP's next iterate. Parameters as in :func:`adadp`.
    """
    import optax

    step_size, hyper = _check_hyper(step_size, tol, stability_check, alpha_min, alpha_max)

    def init(params: Any) -> ADADPOptaxState:
        _, lr, x_stepped, x_prev = _init(params, step_size)
        return ADADPOptaxState(jnp.zeros((), jnp.int32), lr, x_stepped, x_prev)

    def update(grads: Any, state: ADADPOptaxState, params: Any = None) -> tuple:
        if params is None:
            raise ValueError("optax_adadp: update needs params (ADADP works on the iterates)")
        count, lr, x_stepped, x_prev = state
        new = _update(count, grads, ADADPState(params, lr, x_stepped, x_prev), hyper)
        updates = jax.tree.map(jnp.subtract, new.x, params)
        return updates, ADADPOptaxState(count + 1, new.lr, new.x_stepped, new.x_prev)

    return optax.GradientTransformation(init, update)
