# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""The privacy history of a training state: what every private step it has taken was.

A :class:`PrivacyHistory` travels inside :class:`d3p.svi.DPSVIState`. It holds, in order,
runs of consecutive steps that share one mechanism, each with its number of steps, so the
privacy spent by a state is the composition of exactly what was done, whatever a
continued run's sampling rate, noise, clipping bound or plan. A step's mechanism is a
:class:`~d3p.plan.PrivacyPlan` of one step when the sampling is known (every step of
:meth:`d3p.svi.DPSVI.run`, and :meth:`~d3p.svi.DPSVI.update` of a DPSVI with a plan), or
:class:`UnplannedStep` (clipping bound and noise only) for :meth:`~d3p.svi.DPSVI.update`
of a DPSVI without one, whose batches came from the caller.

The history is a pytree: the mechanisms are static (part of the tree structure) and the
step counts an ``int32`` array, so :meth:`record` works inside ``jit`` and ``lax`` loops.
It also holds a random chain id, drawn once per fresh state, by which a
:class:`~d3p.plan.PrivacyPlan` or :class:`~d3p.plan.PrivacyBudget` tells its runs apart
(see :meth:`d3p.plan.PrivacyPlan.record_run`). Neither depends on the data.
"""

from __future__ import annotations

import dataclasses
import secrets
import warnings
from collections.abc import Callable
from typing import Any

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np

from d3p import _validation, dputil
from d3p.plan import PrivacyPlan

__all__ = ["PrivacyHistory", "UnplannedStep"]


@dataclasses.dataclass(frozen=True)
class UnplannedStep:
    """A step whose batch the caller drew: only ``C`` and ``sigma`` are known.

    Accounting it needs the sampling (see :meth:`PrivacyHistory.plans`).
    """

    clipping_threshold: float
    noise_multiplier: float


Mechanism = PrivacyPlan | UnplannedStep


@jax.tree_util.register_pytree_node_class
class PrivacyHistory:
    """Runs of steps, each ``(mechanism, number of steps)``, in the order they were taken.

    Build an empty one with :meth:`start`. ``mechanisms`` are static; ``counts`` (int32,
    one per mechanism) and ``chain`` (uint32[4]) are arrays.
    """

    def __init__(self, mechanisms: tuple = (), counts: Any = None, chain: Any = None):
        self.mechanisms = tuple(mechanisms)
        self.counts = jnp.zeros(len(self.mechanisms), jnp.int32) if counts is None else counts
        self.chain = chain

    @classmethod
    def start(cls) -> PrivacyHistory:
        """An empty history with a fresh random chain id (no steps taken)."""
        chain = np.frombuffer(secrets.token_bytes(16), np.uint32).copy()
        return cls((), jnp.zeros(0, jnp.int32), jnp.asarray(chain))

    def tree_flatten(self) -> tuple[tuple, tuple]:
        return (self.counts, self.chain), self.mechanisms

    @classmethod
    def tree_unflatten(cls, mechanisms: tuple, children: tuple) -> PrivacyHistory:
        return cls(mechanisms, *children)

    def __repr__(self) -> str:
        try:
            runs = ", ".join(f"{n} x {m}" for m, n in self.segments())
        except jax.errors.ConcretizationTypeError:  # traced counts
            runs = f"{len(self.mechanisms)} mechanisms"
        return f"PrivacyHistory({runs})"

    # ---------------------------------------------------------------- recording

    def record(self, mechanism: Mechanism, steps: Any = 1) -> PrivacyHistory:
        """This history with ``steps`` more steps of ``mechanism`` (works under ``jit``).

        ``steps=0`` makes the history end in ``mechanism``, so that recording further
        steps of it keeps the tree structure (as ``lax`` loops need).
        """
        counts = jnp.asarray(self.counts, jnp.int32)
        if self.mechanisms and self.mechanisms[-1] == mechanism:
            return PrivacyHistory(self.mechanisms, counts.at[-1].add(steps), self.chain)
        counts = jnp.concatenate([counts, jnp.full(1, steps, jnp.int32)])
        return PrivacyHistory((*self.mechanisms, mechanism), counts, self.chain)

    # ---------------------------------------------------------------- reading

    def segments(self) -> list[tuple[Mechanism, int]]:
        """The runs ``(mechanism, steps)`` with at least one step, adjacent equal ones merged."""
        out: list[tuple[Mechanism, int]] = []
        for mechanism, n in zip(self.mechanisms, np.asarray(self.counts).tolist(), strict=True):
            if n == 0:
                continue
            if out and out[-1][0] == mechanism:
                out[-1] = (mechanism, out[-1][1] + n)
            else:
                out.append((mechanism, n))
        return out

    @property
    def num_steps(self) -> int:
        """Number of steps recorded."""
        return int(np.sum(np.asarray(self.counts)))

    def steps_of(self, plan: PrivacyPlan) -> int:
        """Number of recorded steps whose mechanism is ``plan``'s (any ``num_steps``)."""
        one = plan.with_steps(1)
        return sum(n for m, n in self.segments() if m == one)

    def plans(self, resolve: Callable[[UnplannedStep, int], PrivacyPlan] | None = None) -> list:
        """One :class:`~d3p.plan.PrivacyPlan` per run of steps, in order.

        ``resolve(step, n)`` gives the plan of ``n`` unplanned steps (their sampling);
        without it, a history holding unplanned steps raises ``ValueError``.
        """
        plans = []
        for mechanism, n in self.segments():
            if isinstance(mechanism, PrivacyPlan):
                plans.append(mechanism.with_steps(n))
            elif resolve is None:
                raise ValueError(
                    f"{n} steps were taken by DPSVI.update without a plan, so how their "
                    "batches were drawn is unknown: give q, dataset_size and max_batch_size "
                    "(those of the sampler that drew them)"
                )
            else:
                plans.append(resolve(mechanism, n))
        return plans


def warn_if_no_history(state: Any, stacklevel: int = 3) -> None:
    """Warn that a DPSVIState without history (a d3p 0.2 state) has unknown earlier steps."""
    if state.history is not None:
        return
    warnings.warn(
        "this DPSVIState has no privacy history (a d3p 0.2 state, or one built by hand): "
        "its earlier steps, if any, are unknown and NOT included in the epsilon reported "
        "from now on; add their cost yourself",
        UserWarning,
        stacklevel=stacklevel + 1,
    )


def with_history(state: Any, stacklevel: int = 3) -> Any:
    """``state`` (a DPSVIState) with an empty history and a warning if it has none."""
    if state.history is not None:
        return state
    warn_if_no_history(state, stacklevel + 1)
    return state._replace(history=PrivacyHistory.start())


def plans_epsilon(plans: list[PrivacyPlan], delta: float) -> float:
    """Epsilon at ``delta`` of ``plans`` run one after another on the same data.

    0 for no plan; one plan's own :meth:`~d3p.plan.PrivacyPlan.epsilon`; else their
    composition (:func:`d3p.dputil.compose_epsilon`, RDP if a plan needs it).
    """
    delta = _validation.real(delta, "delta", 0, 1)
    if not plans:
        return 0.0
    if len(plans) == 1:
        return plans[0].epsilon(delta)
    if any(p.noise_multiplier == 0 for p in plans):
        return float("inf")
    accountant = "rdp" if any(p.accountant == "rdp" for p in plans) else "pld"
    return dputil.compose_epsilon([p.accounting() for p in plans], delta, accountant)


def plans_delta(plans: list[PrivacyPlan], epsilon: float) -> float:
    """Delta at ``epsilon`` of ``plans`` run one after another (see :func:`plans_epsilon`)."""
    if not plans:
        return 0.0
    if len(plans) == 1:
        return plans[0].delta(epsilon)
    if any(p.noise_multiplier == 0 for p in plans):
        return 1.0
    accountant = "rdp" if any(p.accountant == "rdp" for p in plans) else "pld"
    return dputil.compose_delta([p.accounting() for p in plans], epsilon, accountant)


def plans_dp_event(plans: list[PrivacyPlan]) -> dp_accounting.DpEvent:
    """The ``DpEvent`` of ``plans`` run one after another."""
    if len(plans) == 1:
        return plans[0].dp_event()
    return dp_accounting.ComposedDpEvent([p.dp_event() for p in plans])
