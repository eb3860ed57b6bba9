# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""The privacy plan: one object that owns the (epsilon, delta) guarantee of a training run.

A :class:`PrivacyPlan` holds every quantity the guarantee depends on: how batches are
sampled, the data-set size, the clipping threshold, the noise multiplier, the neighbouring
relation, the normaliser and the number of steps. The ``DpEvent`` of the run, its epsilon
and delta, and the batch sampler all come from the plan, so the mechanism that runs and
the guarantee that is reported cannot drift apart: audit the plan, and you have audited
the accounting.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from types import ModuleType
from typing import Any

import dp_accounting
import jax.numpy as jnp
from scipy import stats

import d3p.random
from d3p import _validation, dputil, minibatch

__all__ = ["SAMPLINGS", "PrivacyBudget", "PrivacyPlan"]

SAMPLINGS = ("poisson", "fixed_size", "full_batch")

# Structural batch sizes of Poisson batches, as quantiles of the Binomial(N, q) batch size (a
# batch is truncated in about one step in 1e6, 1e9, ...). The first is the default; a
# PrivacyBudget tries them in turn (then N, never truncated) until the run fits the budget.
_QUANTILES = (1 - 1e-6, 1 - 1e-9, 1 - 1e-12, 1 - 1e-15)
_DEFAULT_QUANTILE = _QUANTILES[0]


def _mechanism(clipping_threshold: Any, noise_multiplier: Any, no_noise: bool) -> dict:
    """Validated ``C`` in (0, inf) and ``sigma`` in (0, inf), or [0, inf) if ``no_noise``."""
    return {
        "clipping_threshold": _validation.real(
            clipping_threshold, "clipping_threshold", 0, math.inf
        ),
        "noise_multiplier": _validation.real(
            noise_multiplier, "noise_multiplier", 0, math.inf, closed_low=no_noise
        ),
    }


def _check_steps_left(covered: int, done: int, more: int) -> None:
    """Refuse taking ``more`` steps after ``done`` when only ``covered`` are planned."""
    if done + more > covered:
        raise ValueError(
            f"this privacy budget covers {covered} steps; the state has taken {done}, so at "
            f"most {max(covered - done, 0)} more, got num_steps={more} (the budget would be "
            "exceeded)"
        )


class _Ledger:
    """The steps a plan or budget has governed on its data set, by training chain.

    A chain is the sequence of states that starts at one fresh state (its history's chain
    id) and is continued by ``run(init_state=...)``. All chains of one plan or budget
    run on the same data set, so their steps add up: :meth:`charge` refuses, before any
    work, a run that would take the total past :attr:`num_steps`, and :meth:`settle`
    records what a chain has taken. The record is kept with the object (and pickled with
    it); for more steps, make a new plan or budget.
    """

    num_steps: int
    _chains: dict

    @property
    def steps_spent(self) -> int:
        """Steps taken under this object by all chains so far (its runs on the data)."""
        return sum(self._chains.values())

    def charge(self, history: Any, step: PrivacyPlan, more: int) -> None:
        """Refuse ``more`` steps of ``step`` after ``history`` (a chain's PrivacyHistory)
        if the steps would exceed what this plan or budget covers, or if the chain holds
        steps of another mechanism (they are not part of it)."""
        kind = type(self).__name__
        foreign = [(m, n) for m, n in history.segments() if m != step]
        if foreign:
            raise ValueError(
                f"the state's history holds {sum(n for _, n in foreign)} steps with other "
                f"privacy parameters than this {kind} ({foreign[0][0]}); a {kind} covers only "
                "its own steps: continue that state with a DPSVI without a plan (the run "
                "then reports the composition), or start from a fresh state"
            )
        chain = _chain_id(history)
        others = sum(n for c, n in self._chains.items() if c != chain)
        done = others + history.num_steps
        if done + more > self.num_steps:
            raise ValueError(
                f"this {kind} covers {self.num_steps} steps on its data set; its runs have "
                f"taken {done} (this state {history.num_steps}, other runs {others}), so at "
                f"most {max(self.num_steps - done, 0)} more, got num_steps={more} (the "
                f"budget would be exceeded; for more, make a new {kind} on purpose)"
            )

    def settle(self, history: Any) -> None:
        """Record the steps of ``history``'s chain (after a run)."""
        self._chains[_chain_id(history)] = history.num_steps


def _chain_id(history: Any) -> bytes:
    return bytes(memoryview(jnp.asarray(history.chain).__array__()))


def _ledger() -> Any:
    return dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class PrivacyPlan(_Ledger):
    """Everything the differential-privacy guarantee of a DP-VI run depends on.

    Each step releases ``sum of clipped per-example gradients + N(0, (sigma C)^2)``,
    divided by the public ``normaliser``. The fields are validated (and ``q``,
    ``batch_size`` and ``normaliser`` filled in) when the plan is built; a plan is
    immutable, picklable, and its ``repr`` shows every privacy parameter.

    Parameters
    ----------
    sampling : str
        ``"poisson"``: every record joins a step's batch independently with probability
        ``q``; a batch is an array of ``batch_size`` rows (padding masked out), and a
        draw of more than ``batch_size`` records keeps ``batch_size`` of them chosen
        uniformly at random (accounted as truncated Poisson sampling, for the larger
        neighbour of ``dataset_size + 1`` records under add/remove; with ``batch_size =
        dataset_size`` that costs only when ``q`` is near 1). ``"fixed_size"``: ``batch_size``
        records drawn without replacement per step (accounted under the substitute
        relation only). ``"full_batch"``: every record in every step.
    dataset_size : int
        ``N``, the number of records (one per individual); public.
    clipping_threshold : float
        ``C`` in (0, inf): bound on the L2 norm of one example's gradient.
    noise_multiplier : float
        ``sigma >= 0``: the noise standard deviation on the gradient sum is ``sigma * C``.
        ``0`` means no noise (not private: epsilon is inf).
    num_steps : int
        Number of update steps the plan covers, >= 1.
    q : float, optional
        Poisson sampling rate in (0, 1]; required for ``"poisson"``. Set to
        ``batch_size / N`` for ``"fixed_size"`` and 1 for ``"full_batch"``.
    batch_size : int, optional
        ``"fixed_size"``: records per batch, in [1, N] (required). ``"poisson"``: the
        structural batch size (default: the ``1 - 1e-6`` quantile of Binomial(N, q)).
        ``"full_batch"``: N.
    relation : str
        ``"add_remove"`` (add or remove one record) or ``"substitute"`` (replace one).
    normaliser : float, optional
        The data-independent divisor of the noisy sum, > 0. Default: the expected
        batch size ``q * N`` (Poisson), ``batch_size`` (fixed size) or ``N`` (full
        batch). It scales the step but does not change the guarantee.
    """

    sampling: str
    dataset_size: int
    clipping_threshold: float
    noise_multiplier: float
    num_steps: int
    q: float | None = None
    batch_size: int | None = None
    relation: str = "add_remove"
    normaliser: float | None = None
    _chains: dict = _ledger()

    def __post_init__(self) -> None:
        sampling = _validation.choice(self.sampling, "sampling", SAMPLINGS)
        n = _validation.count(self.dataset_size, "dataset_size")
        _validation.check_num_records(n, "dataset_size")
        fields = {
            "dataset_size": n,
            **_mechanism(self.clipping_threshold, self.noise_multiplier, no_noise=True),
            "num_steps": _validation.count(self.num_steps, "num_steps"),
            "relation": _validation.choice(self.relation, "relation", dputil.RELATIONS),
            **_batches(sampling, n, self.q, self.batch_size),
        }
        if sampling == "fixed_size" and fields["relation"] != "substitute":
            raise ValueError(
                "sampling='fixed_size' is accounted under relation='substitute' only (the "
                f"data-set size is public); got relation={self.relation!r}"
            )
        default_normaliser = float(
            fields["q"] * n if sampling == "poisson" else fields["batch_size"]
        )
        fields["normaliser"] = (
            default_normaliser
            if self.normaliser is None
            else _validation.real(self.normaliser, "normaliser", 0, math.inf)
        )
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        if self.noise_multiplier == 0:
            warnings.warn(
                "noise_multiplier is 0: no noise is added, the run is NOT differentially "
                "private (epsilon is inf)",
                UserWarning,
                stacklevel=3,
            )

    @classmethod
    def poisson(
        cls,
        dataset_size: int,
        q: float,
        clipping_threshold: float,
        noise_multiplier: float,
        num_steps: int,
        *,
        max_batch_size: int | float | None = None,
        relation: str = "add_remove",
        normaliser: float | None = None,
    ) -> PrivacyPlan:
        """A ``"poisson"`` plan whose structural batch size is given as in :mod:`d3p.minibatch`.

        ``max_batch_size`` is an int >= 1, or a quantile level in (0, 1) of the
        Binomial(N, q) batch size (default ``1 - 1e-6``); see
        :func:`d3p.minibatch.structural_batch_size`.
        """
        n = _validation.count(dataset_size, "dataset_size")
        size = _DEFAULT_QUANTILE if max_batch_size is None else max_batch_size
        return cls(
            "poisson",
            n,
            clipping_threshold,
            noise_multiplier,
            num_steps,
            q=q,
            batch_size=minibatch.structural_batch_size(n, _validation.probability(q), size),
            relation=relation,
            normaliser=normaliser,
        )

    def check_steps(self, done: int, more: int) -> None:
        """Raise ``ValueError`` if ``done`` steps taken plus ``more`` exceed :attr:`num_steps`."""
        _check_steps_left(self.num_steps, done, more)

    # ---------------------------------------------------------------- accounting

    def _truncates(self) -> bool:
        """Whether a batch can be truncated, for the larger neighbour too (N + 1 records
        under add/remove): P(Binomial(n - 1, q) >= batch_size) > 0 in float64 for the
        neighbour's n, the probability dp-accounting's truncated event tests."""
        n = self.dataset_size + (self.relation == "add_remove")
        return float(stats.binom.sf(self.batch_size - 1, n - 1, self.q)) > 0.0

    def accounting(self) -> dict:
        """The run as keyword arguments of :func:`d3p.dputil.compute_epsilon` (``sigma``
        included): the one source of the DpEvent, epsilon and delta."""
        run = dict(
            sigma=self.noise_multiplier, q=self.q, num_iter=self.num_steps, relation=self.relation
        )
        if self.sampling == "fixed_size":
            return {**run, "sampling": "fixed_size", "dataset_size": self.dataset_size}
        if self.sampling == "poisson" and self._truncates():
            return {
                **run,
                "sampling": "truncated_poisson",
                "dataset_size": self.dataset_size,
                "max_batch_size": self.batch_size,
            }
        return {**run, "sampling": "poisson" if self.sampling == "poisson" else "full_batch"}

    def dp_event(self) -> dp_accounting.DpEvent:
        """The ``dp_accounting.DpEvent`` of the whole run (``NonPrivateDpEvent`` if no noise).

        Compose it in a ``dp_accounting`` accountant with :attr:`relation`'s
        ``NeighboringRelation``; :meth:`epsilon` and :meth:`delta` read the same event.
        """
        if self.noise_multiplier == 0:
            return dp_accounting.NonPrivateDpEvent()
        return dputil.training_dp_event(**self.accounting())

    @property
    def accountant(self) -> str:
        """The default accountant: ``"pld"``, or ``"rdp"`` for fixed-size batches (the only
        one dp-accounting has for sampling without replacement)."""
        return "rdp" if self.sampling == "fixed_size" else "pld"

    def epsilon(self, delta: float, accountant: str | None = None) -> float:
        """Epsilon of the whole run at ``delta`` in (0, 1) (an upper bound; inf if no noise).

        ``accountant`` is ``"pld"`` or ``"rdp"`` (default :attr:`accountant`), see
        :func:`d3p.dputil.compute_epsilon`.
        """
        delta = _validation.real(delta, "delta", 0, 1)
        if self.noise_multiplier == 0:
            return math.inf
        run = self.accounting()
        return dputil.compute_epsilon(
            run.pop("sigma"), delta, accountant=accountant or self.accountant, **run
        )

    def delta(self, epsilon: float, accountant: str | None = None) -> float:
        """Delta of the whole run at ``epsilon >= 0`` (an upper bound; 1 if no noise)."""
        epsilon = _validation.real(epsilon, "epsilon", 0, math.inf, closed_low=True)
        if self.noise_multiplier == 0:
            return 1.0
        run = self.accounting()
        return dputil.compute_delta(
            run.pop("sigma"), epsilon, accountant=accountant or self.accountant, **run
        )

    def with_steps(self, num_steps: int) -> PrivacyPlan:
        """The same plan for ``num_steps`` steps (e.g. the steps taken so far)."""
        return dataclasses.replace(self, num_steps=num_steps)

    @property
    def gradient_noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate of the normalised gradient:
        ``sigma * C / normaliser`` (before the observation scale)."""
        return self.noise_multiplier * self.clipping_threshold / self.normaliser

    # ---------------------------------------------------------------- sampling

    def batcher(
        self, dataset: tuple, rng_suite: ModuleType = d3p.random, *, multiple_of: int = 1
    ) -> tuple:
        """The batch sampler the plan is accounted for, over ``dataset``.

        Parameters
        ----------
        dataset : tuple of array
            Arrays whose first dimension is :attr:`dataset_size` (the records).
        rng_suite : module
            :mod:`d3p.random` (secure, default) or :mod:`d3p.random.debug` (not secure):
            the source of batch membership.
        multiple_of : int
            Keyword-only. Pad every batch with masked-out rows to a multiple of this many
            rows (e.g. the devices of a mesh's ``"data"`` axis); the accounting is
            unchanged (padded rows contribute nothing).

        Returns
        -------
        init : callable
            ``init(rng_key) -> (num_batches_per_epoch, state)``.
        get_batch : callable
            ``get_batch(i, state) -> (batch, mask)``: step ``i``'s batch of
            :attr:`batch_size` rows and the bool mask of its real rows.
        """
        arrays, n = _validation.batch(tuple(dataset))
        multiple_of = _validation.count(multiple_of, "multiple_of", allow_float=False)
        if n != self.dataset_size:
            raise ValueError(
                f"dataset has {n} records but the plan is for dataset_size={self.dataset_size}"
            )
        if self.sampling == "poisson":
            return minibatch.poisson_batchify_data(
                arrays, self.q, self.batch_size, "truncate", rng_suite, multiple_of=multiple_of
            )
        if self.sampling == "fixed_size":
            return minibatch.subsample_batchify_data(
                arrays,
                self.batch_size,
                rng_suite=rng_suite,
                return_mask=True,
                multiple_of=multiple_of,
            )
        full = minibatch._pad_rows(arrays, jnp.ones(n, bool), multiple_of)
        return (lambda rng_key: (1, rng_key)), (lambda i, state: full)

    # ---------------------------------------------------------------- calibration

    @classmethod
    def calibrate(
        cls,
        target_epsilon: float,
        target_delta: float,
        *,
        accountant: str | None = None,
        tol: float = 1e-3,
        **fields: Any,
    ) -> PrivacyPlan:
        """The plan whose noise multiplier spends at most ``target_epsilon`` at ``target_delta``.

        ``fields`` are the fields of :class:`PrivacyPlan` except ``noise_multiplier``;
        ``accountant`` defaults to the plan's :attr:`accountant`.
        The multiplier is calibrated with :func:`d3p.dputil.calibrate_sigma`
        (``force_smaller=True``): the plan's :meth:`epsilon` lies in
        ``[target_epsilon - tol, target_epsilon]``.
        """
        if "noise_multiplier" in fields:
            raise TypeError("calibrate chooses noise_multiplier; do not pass it")
        plan = cls(noise_multiplier=1.0, **fields)
        run = plan.accounting()
        del run["sigma"]
        sigma, _, _ = dputil.calibrate_sigma(
            target_epsilon,
            target_delta,
            run.pop("q"),
            run.pop("num_iter"),
            run.pop("relation"),
            accountant or plan.accountant,
            tol=tol,
            force_smaller=True,
            **run,
        )
        return dataclasses.replace(plan, noise_multiplier=sigma)


def _batches(sampling: str, n: int, q: Any, batch_size: Any) -> dict:
    """Validated ``q`` and structural ``batch_size`` of a sampling scheme over ``n`` records."""
    if sampling == "full_batch":
        if q not in (None, 1) or batch_size not in (None, n):
            raise ValueError(
                f"sampling='full_batch' uses q=1 and batch_size=dataset_size={n}; got "
                f"q={q!r}, batch_size={batch_size!r}"
            )
        return {"q": 1.0, "batch_size": n}
    if sampling == "fixed_size":
        if batch_size is None:
            raise ValueError("sampling='fixed_size' needs batch_size, in [1, dataset_size]")
        size = _validation.count(batch_size, "batch_size")
        if size > n:
            raise ValueError(f"batch_size must be in [1, {n}] (dataset_size), got {batch_size}")
        if q is not None and q != size / n:
            raise ValueError(f"sampling='fixed_size' has q=batch_size/dataset_size, got q={q!r}")
        return {"q": size / n, "batch_size": size}
    if q is None:
        raise ValueError("sampling='poisson' needs the sampling rate q, in (0, 1]")
    q = _validation.probability(q)
    size = _DEFAULT_QUANTILE if batch_size is None else _validation.count(batch_size, "batch_size")
    return {"q": q, "batch_size": minibatch.structural_batch_size(n, q, size)}


@dataclasses.dataclass(frozen=True)
class PrivacyBudget(_Ledger):
    """A privacy budget for Poisson-sampled training, before the data set is known.

    The noise multiplier is calibrated (see :meth:`calibrate`) so that ``num_steps``
    steps of Poisson sampling with rate ``q`` spend at most ``epsilon`` at ``delta``
    under the add/remove-one relation (PLD accountant). The data-set size, and with it
    the structural batch size, is fixed only when a run starts: :meth:`plan` then gives
    the :class:`PrivacyPlan` of the run, which is what is accounted and reported.
    :meth:`d3p.svi.DPSVI.make_private_with_epsilon` builds a DPSVI from a budget.

    Parameters
    ----------
    epsilon : float
        The budget's epsilon, > 0.
    delta : float
        The budget's delta, in (0, 1).
    q : float
        Poisson sampling rate in (0, 1] (expected batch size / N).
    num_steps : int
        Number of update steps the budget covers, >= 1 (all runs together).
    clipping_threshold : float
        ``C`` in (0, inf): bound on the L2 norm of one example's gradient.
    noise_multiplier : float
        ``sigma > 0``: noise standard deviation ``sigma * C`` on the gradient sum.
    """

    epsilon: float
    delta: float
    q: float
    num_steps: int
    clipping_threshold: float
    noise_multiplier: float
    _chains: dict = _ledger()

    def __post_init__(self) -> None:
        fields = {
            "epsilon": _validation.real(self.epsilon, "epsilon", 0, math.inf),
            "delta": _validation.real(self.delta, "delta", 0, 1),
            "q": _validation.probability(self.q),
            "num_steps": _validation.count(self.num_steps, "num_steps"),
            **_mechanism(self.clipping_threshold, self.noise_multiplier, no_noise=False),
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @classmethod
    def calibrate(
        cls,
        target_epsilon: float,
        target_delta: float,
        q: float,
        num_steps: int,
        clipping_threshold: float,
        *,
        tol: float = 1e-3,
    ) -> PrivacyBudget:
        """The budget whose noise multiplier spends at most ``target_epsilon``.

        Calibrated with :func:`d3p.dputil.approximate_sigma_remove_relation`
        (``force_smaller=True``) for untruncated Poisson sampling: the epsilon lies in
        ``[target_epsilon - tol, target_epsilon]``.
        """
        num_steps = _validation.count(num_steps, "num_steps")
        sigma, _, _ = dputil.approximate_sigma_remove_relation(
            target_epsilon, target_delta, q, num_steps, tol=tol, force_smaller=True
        )
        return cls(target_epsilon, target_delta, q, num_steps, clipping_threshold, sigma)

    def check_steps(self, done: int, more: int) -> None:
        """Raise ``ValueError`` if ``done`` steps taken plus ``more`` exceed :attr:`num_steps`."""
        _check_steps_left(self.num_steps, done, more)

    def plan(
        self,
        dataset_size: int,
        num_steps: int | None = None,
        max_batch_size: int | float | None = None,
    ) -> PrivacyPlan:
        """The Poisson plan of ``num_steps`` steps over ``dataset_size`` records in the budget.

        ``num_steps`` defaults to the budget's (at most that many). The structural batch
        size is chosen for all of the budget's steps, whatever ``num_steps`` is, so every
        run under one budget draws the same batches and the plan of their total describes
        the earlier runs' steps too. With ``max_batch_size`` (an int, or a quantile level
        in (0, 1), see :meth:`PrivacyPlan.poisson`) that size is used, and refused with a
        ``ValueError`` if the cost of truncating oversized batches takes the budget's
        steps over its epsilon. Without it, the smallest of the ``1 - 1e-6``, ``1 - 1e-9``,
        ... quantiles whose plan stays within the budget, or ``dataset_size`` (no
        truncation, the calibrated case).
        """
        steps = self.num_steps if num_steps is None else num_steps
        self.check_steps(0, _validation.count(steps, "num_steps"))
        n = _validation.count(dataset_size, "dataset_size")
        sizes = (max_batch_size,) if max_batch_size is not None else (*_QUANTILES, n)
        for size in sizes:
            plan = PrivacyPlan.poisson(
                n,
                self.q,
                self.clipping_threshold,
                self.noise_multiplier,
                self.num_steps,
                max_batch_size=size,
            )
            if plan.epsilon(self.delta) <= self.epsilon:
                return plan.with_steps(steps)
        raise ValueError(
            f"with max_batch_size={max_batch_size} the truncated Poisson sampling spends "
            f"epsilon={plan.epsilon(self.delta)} > the budget {self.epsilon}; use a larger "
            "max_batch_size or leave it at None"
        )
