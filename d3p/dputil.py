# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Privacy accounting and noise calibration for DP-VI, built on Google's ``dp-accounting``.

A d3p training run of ``num_iter`` steps releases, at every step, the sum of the
clipped per-example gradients of a minibatch plus Gaussian noise with standard
deviation ``sigma * C`` (``sigma`` is ``DPSVI``'s ``dp_scale``, ``C`` the clipping
threshold). With Poisson sampling (every record joins a batch independently with
probability ``q``) this is ``num_iter``-fold composition of the Poisson-subsampled
Gaussian mechanism with noise multiplier ``sigma``.

Two neighbouring relations are supported:

* ``"add_remove"``: the data sets differ by adding or removing one record
  (``NeighboringRelation.ADD_OR_REMOVE_ONE``; d3p 0.2's "remove relation").
* ``"substitute"``: one record is replaced by another
  (``NeighboringRelation.REPLACE_ONE``; d3p 0.2's "substitute relation").

Two accountants are supported:

* ``"pld"`` (default): the privacy-loss-distribution (Fourier) accountant of
  ``dp-accounting``, the method of the fourier-accountant package d3p 0.2 used.
  It handles Poisson and truncated Poisson sampling under both relations.
  d3p always uses its pessimistic (connect-the-dots) discretisation, so every
  reported epsilon is an upper bound on the true one; the discretisation interval
  is chosen by :func:`pld_discretization`.
* ``"rdp"``: the Rényi-DP accountant; looser (larger epsilon) but cheap. In
  ``dp-accounting`` it supports Poisson sampling only under ``"add_remove"`` and
  fixed-size sampling without replacement only under ``"substitute"``.

Full-batch training (``sampling="full_batch"``, every record in every step) is a plain
Gaussian mechanism; both accountants handle it under both relations.

Both accountants read the same ``DpEvent`` (:func:`training_dp_event`). Its noise
multipliers follow dp-accounting: relative to the norm bound ``C`` inside Poisson events,
relative to the sensitivity of the clipped sum under the relation (``C`` add/remove-one,
``2 C`` replace-one) in a lone Gaussian and in sampling without replacement. (d3p 0.3.0
put ``sigma`` rather than ``sigma / 2`` into the without-replacement event and so
under-reported epsilon for fixed-size batches under ``"substitute"``.)

Noise calibration (:func:`approximate_sigma_remove_relation`,
:func:`approximate_sigma`, :func:`calibrate_sigma`) starts from the central-limit
(Gaussian-DP) approximation of Bu et al. (2019, arXiv:1911.11607), which costs no
accountant evaluation, and refines it with a safeguarded secant search on
``log epsilon`` against ``log sigma`` using the accountant itself. Every evaluation
counts towards ``maxeval``, and every candidate is evaluated with exactly the
accountant (and discretisation) that :func:`compute_epsilon` uses, so the reported
epsilon is reproducible.

Command line: ``python -m d3p.dputil sigma|epsilon|delta ...`` (also installed as
``d3p-privacy``); run it with ``--help``.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys
import warnings
from collections.abc import Sequence
from importlib import metadata
from typing import Any, NamedTuple

import dp_accounting
from dp_accounting import NeighboringRelation
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import rdp_privacy_accountant

from d3p import _validation
from d3p._fourier_compat import (  # noqa: F401 (d3p 0.2 re-exports fourier-accountant's API)
    get_delta_R,
    get_delta_S,
    get_epsilon_R,
    get_epsilon_S,
)
from d3p._pld import NEIGHBORING_RELATION, self_compose

__all__ = [
    "ACCOUNTANTS",
    "RELATIONS",
    "SAMPLINGS",
    "approximate_sigma",
    "approximate_sigma_remove_relation",
    "calibrate_sigma",
    "compose_delta",
    "compose_epsilon",
    "compute_delta",
    "compute_epsilon",
    "main",
    "pld_discretization",
    "training_dp_event",
]

RELATIONS = ("add_remove", "substitute")
ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("poisson", "fixed_size", "truncated_poisson", "full_batch")


# Relations each (accountant, sampling) pair supports in dp-accounting 0.6.
_SUPPORTED = {
    ("pld", "poisson"): ("add_remove", "substitute"),
    ("pld", "truncated_poisson"): ("add_remove", "substitute"),
    ("pld", "full_batch"): ("add_remove", "substitute"),
    ("rdp", "poisson"): ("add_remove",),
    ("rdp", "fixed_size"): ("substitute",),
    ("rdp", "full_batch"): ("add_remove", "substitute"),
}

# PLD discretisation: the interval is this fraction of the per-step privacy-loss scale
# (see pld_discretization), kept within [_MIN, _MAX].
_DISCRETIZATION_FRACTION = 0.1
_MIN_DISCRETIZATION = 3e-6
_MAX_DISCRETIZATION = 1e-2

# Largest step of the calibration search in log(sigma) before a bracket is known.
_MAX_LOG_STEP = math.log(4.0)


# ---------------------------------------------------------------------------
# Argument checks (all raised before any accounting work)
# ---------------------------------------------------------------------------


def _check_num_iter(num_iter: float) -> int:
    """Return the number of steps as an int, rounding a float up (never down)."""
    return math.ceil(_validation.real(num_iter, "num_iter", 1, math.inf, closed_low=True))


def _required_count(name: str, value: int | None, needed_for: str) -> int:
    if value is None:
        raise ValueError(f"{name} is required for {needed_for}")
    return _validation.count(value, name)


class _Setting(NamedTuple):
    """A validated description of a training run and how to account for it."""

    sigma: float
    q: float
    num_iter: int
    relation: str
    accountant: str
    sampling: str
    dataset_size: int | None
    max_batch_size: int | None


def _check_run(sigma, q, num_iter, relation, sampling, dataset_size, max_batch_size) -> _Setting:
    """Validate the description of a training run (the accountant not yet set)."""
    sigma = _validation.real(sigma, "sigma", 0, math.inf)
    q = _validation.probability(q)
    num_iter = _check_num_iter(num_iter)
    _validation.choice(relation, "relation", RELATIONS)
    _validation.choice(sampling, "sampling", SAMPLINGS)
    if sampling in ("fixed_size", "truncated_poisson"):
        dataset_size = _required_count("dataset_size", dataset_size, f"sampling={sampling!r}")
    if sampling == "truncated_poisson":
        max_batch_size = _required_count("max_batch_size", max_batch_size, "truncated_poisson")
    if sampling == "fixed_size" and round(q * dataset_size) < 1:
        raise ValueError(
            f"q * dataset_size must round to a batch size >= 1, got q={q!r}, "
            f"dataset_size={dataset_size!r}"
        )
    if sampling == "fixed_size" and relation != "substitute":
        raise ValueError(
            "sampling='fixed_size' is accounted under relation='substitute' only (the "
            f"data-set size is public); got relation={relation!r}"
        )
    if sampling == "full_batch" and q != 1:
        raise ValueError(f"sampling='full_batch' needs q=1, got q={q!r}")
    return _Setting(sigma, q, num_iter, relation, "", sampling, dataset_size, max_batch_size)


def _check_setting(
    sigma, q, num_iter, relation, accountant, sampling, dataset_size, max_batch_size
) -> _Setting:
    """Validate a training run and the (relation, accountant) used to account for it."""
    _validation.choice(accountant, "accountant", ACCOUNTANTS)
    run = _check_run(sigma, q, num_iter, relation, sampling, dataset_size, max_batch_size)
    if relation not in _SUPPORTED.get((accountant, sampling), ()):
        supported = [
            f"accountant={a!r} with relation={r!r}"
            for (a, s), rels in _SUPPORTED.items()
            if s == sampling
            for r in rels
        ]
        raise ValueError(
            f"accountant={accountant!r} does not support relation={relation!r} with "
            f"sampling={sampling!r} in dp-accounting; supported for this sampling: "
            + "; ".join(supported)
        )
    return run._replace(accountant=accountant)


# ---------------------------------------------------------------------------
# Events and accountants
# ---------------------------------------------------------------------------


def _step_event(setting: _Setting) -> dp_accounting.DpEvent:
    """One step's DpEvent: the only description of the mechanism both accountants read.

    The noise multiplier of a sampled-Gaussian event (Poisson, truncated Poisson) is
    relative to the per-record norm bound ``C``; dp-accounting models the replacement of a
    record inside those events. A lone ``GaussianDpEvent`` and a
    ``SampledWithoutReplacementDpEvent`` are read relative to the sensitivity of the sum
    under the relation: ``C`` for add/remove-one, ``2 C`` for replace-one (one clipped
    gradient ``g`` becomes ``g'`` with ``|g - g'| <= 2 C``), hence ``sigma / 2``
    (dp-accounting's RDP analysis of sampling without replacement, Wang, Balle and
    Kasiviswanathan 2019, is stated for that sensitivity).
    """
    if setting.sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(
            setting.q, dp_accounting.GaussianDpEvent(setting.sigma)
        )
    if setting.sampling == "truncated_poisson":
        # dp-accounting's event with dataset_size=n models n - 1 records besides the one
        # that differs. Under add/remove the larger neighbour of N records has N + 1, and
        # epsilon grows with n, so account for N + 1 (covers both neighbours).
        others = 1 if setting.relation == "add_remove" else 0
        return dp_accounting.TruncatedSubsampledGaussianDpEvent(
            dataset_size=setting.dataset_size + others,
            sampling_probability=setting.q,
            truncated_batch_size=setting.max_batch_size,
            noise_multiplier=setting.sigma,
        )
    sensitivity = 2.0 if setting.relation == "substitute" else 1.0
    gaussian = dp_accounting.GaussianDpEvent(setting.sigma / sensitivity)
    if setting.sampling == "full_batch":
        return gaussian
    batch_size = round(setting.q * setting.dataset_size)
    return dp_accounting.SampledWithoutReplacementDpEvent(
        setting.dataset_size, batch_size, gaussian
    )


def training_dp_event(
    sigma: float,
    q: float,
    num_iter: float,
    sampling: str = "poisson",
    dataset_size: int | None = None,
    max_batch_size: int | None = None,
    *,
    relation: str = "add_remove",
) -> dp_accounting.DpEvent:
    """Describe a d3p training run as a ``dp_accounting`` ``DpEvent``.

    Hand the result to a ``dp_accounting`` accountant with the same neighbouring relation,
    e.g. ``dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)``.
    :func:`compute_epsilon` reads the same event.

    Parameters
    ----------
    sigma : float
        Noise multiplier (``dp_scale``): the noise standard deviation divided by the
        clipping threshold. Must be > 0.
    q : float
        Sampling ratio in (0, 1]: the probability that a record joins a batch
        (Poisson), or batch size / data-set size (fixed size).
    num_iter : float
        Number of update steps, >= 1; a float is rounded up.
    sampling : str
        ``"poisson"`` (``PoissonSampledDpEvent``, what ``DPSVI.run`` and
        ``d3p.minibatch.poisson_batchify_data`` do); ``"fixed_size"``
        (``SampledWithoutReplacementDpEvent`` with batch size
        ``round(q * dataset_size)``, as ``subsample_batchify_data``; replace-one
        relation only); ``"truncated_poisson"`` (``TruncatedSubsampledGaussianDpEvent``:
        Poisson sampling whose oversized batches keep ``max_batch_size`` records chosen
        at random, as ``poisson_batchify_data(..., handle_oversized_batch="truncate")``);
        or ``"full_batch"`` (``GaussianDpEvent``: every step uses all records, ``q=1``).
    dataset_size : int, optional
        Number of records; required for ``"fixed_size"`` and ``"truncated_poisson"``.
    max_batch_size : int, optional
        Truncation size; required for ``"truncated_poisson"``.
    relation : str
        ``"add_remove"`` or ``"substitute"``. A lone Gaussian and sampling without
        replacement carry the noise multiplier relative to the relation's sensitivity
        (``sigma / 2`` under ``"substitute"``, see the module notes).

    Returns
    -------
    dp_accounting.DpEvent
        ``SelfComposedDpEvent`` of one step's event, ``num_iter`` times.
    """
    run = _check_run(sigma, q, num_iter, relation, sampling, dataset_size, max_batch_size)
    return dp_accounting.SelfComposedDpEvent(_step_event(run), run.num_iter)


def pld_discretization(sigma: float, q: float) -> float:
    """The PLD ``value_discretization_interval`` d3p uses for noise ``sigma`` and ratio ``q``.

    The pessimistic connect-the-dots discretisation overestimates epsilon by a
    relative amount of roughly ``0.085 * (interval / s) ** 2``, where ``s`` is the
    standard deviation of one step's privacy loss, measured for
    ``q`` in [1e-4, 0.5], ``sigma`` in [0.5, 20] and 10 to 10^6 steps. d3p uses
    ``interval = 0.1 * s`` with ``s ~ min(q * sqrt(exp(1 / sigma**2) - 1), 1 / sigma)``
    (about 1e-3 relative), clipped to [3e-6, 1e-2]: below 3e-6 the floating-point
    error of the composition starts to dominate. The interval is a continuous
    function of ``sigma``, so epsilon is continuous in ``sigma`` and the noise
    calibration can hit a target epsilon to any tolerance.

    Parameters
    ----------
    sigma : float
        Noise multiplier, > 0.
    q : float
        Sampling ratio in (0, 1].

    Returns
    -------
    float
        The discretisation interval of the privacy loss (in nats).
    """
    sigma = _validation.real(sigma, "sigma", 0, math.inf)
    q = _validation.probability(q)
    inv_var = 1.0 / sigma**2
    loss_scale = (
        1.0 / sigma if inv_var > 700 else min(q * math.sqrt(math.expm1(inv_var)), 1.0 / sigma)
    )
    return min(max(_DISCRETIZATION_FRACTION * loss_scale, _MIN_DISCRETIZATION), _MAX_DISCRETIZATION)


def _step_pld(
    event: dp_accounting.DpEvent, relation: NeighboringRelation, interval: float
) -> pld_lib.PrivacyLossDistribution:
    """The pessimistic PLD of one step's event (as dp-accounting's ``PLDAccountant``).

    A lone ``GaussianDpEvent`` carries its noise multiplier relative to the sensitivity
    under the relation (see :func:`_step_event`), which is the add/remove-one PLD of that
    multiplier whatever the relation.
    """
    if isinstance(event, dp_accounting.PoissonSampledDpEvent):
        return pld_lib.from_gaussian_mechanism(
            event.event.noise_multiplier,
            value_discretization_interval=interval,
            sampling_prob=event.sampling_probability,
            neighboring_relation=relation,
        )
    if isinstance(event, dp_accounting.TruncatedSubsampledGaussianDpEvent):
        return pld_lib.from_truncated_subsampled_gaussian_mechanism(
            dataset_size=event.dataset_size,
            sampling_probability=event.sampling_probability,
            truncated_batch_size=event.truncated_batch_size,
            noise_multiplier=event.noise_multiplier,
            value_discretization_interval=interval,
            neighboring_relation=relation,
        )
    if isinstance(event, dp_accounting.GaussianDpEvent):
        return pld_lib.from_gaussian_mechanism(
            event.noise_multiplier, value_discretization_interval=interval
        )
    raise ValueError(f"the PLD accountant does not support {type(event).__name__}")


# A composed PLD of 10^6 steps takes some MB; 8 entries cover one calibration's candidates.
@functools.lru_cache(maxsize=8)
def _composed_pld(
    setting: _Setting, interval: float | None = None
) -> pld_lib.PrivacyLossDistribution:
    """The pessimistic PLD of a whole training run (cached: PLDs serve any delta/epsilon).

    ``interval`` defaults to :func:`pld_discretization` of the run.
    """
    if interval is None:
        interval = pld_discretization(setting.sigma, setting.q)
    relation = NEIGHBORING_RELATION[setting.relation]
    event = _step_event(setting)
    if isinstance(event, dp_accounting.GaussianDpEvent):
        # T Gaussian steps compose exactly to one with noise multiplier sigma / sqrt(T)
        # (as dp-accounting's PLDAccountant does), with no discretisation error per step
        event = dp_accounting.GaussianDpEvent(event.noise_multiplier / math.sqrt(setting.num_iter))
        return _step_pld(event, relation, interval)
    return self_compose(_step_pld(event, relation, interval), setting.num_iter)


# Below this noise multiplier every accountant is replaced by the Gaussian bound of
# _gaussian_mu: the PLD grid grows as 1 / sigma**2 (sigma = 0.03 takes seconds, 1e-3 hours)
# and 1 / sigma**2 overflows for sigma < 1e-154; such runs spend epsilon > 100 anyway.
_MIN_ACCOUNTED_SIGMA = 0.05


def _gaussian_mu(settings: Sequence[_Setting]) -> float:
    """mu of a Gaussian mechanism that dominates every step of ``settings`` composed.

    Whatever the sampling and relation, one step changes the clipped sum by at most
    ``2 C`` (a truncated batch can swap the added record for another); sampling only adds
    privacy. So T steps of noise multiplier sigma are at most as private as one Gaussian
    mechanism with ``mu = 2 sqrt(sum T / sigma**2)`` (Dong, Roth and Su 2019, Corollary
    3.3: mu-GDP composes as the root sum of squares).
    """
    # sqrt(T) / sigma per run (inf for a sigma so small that it overflows), then the norm
    terms = [math.sqrt(s.num_iter) / s.sigma if s.sigma > 1e-300 else math.inf for s in settings]
    return 2.0 * math.hypot(*terms)


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """Epsilon of mu-GDP at ``delta`` (inf where it overflows)."""
    if not math.isfinite(mu * mu):
        return math.inf
    high = mu * mu / 2 + mu * 40  # delta(high) < 1e-300 for any mu
    if _gdp_delta(mu, high) > delta:
        return math.inf
    return _bisect_increasing(lambda e: -_gdp_delta(mu, e), -delta, 1e-12, high, steps=200)


def _below_accounted_sigma(settings: Sequence[_Setting]) -> bool:
    return any(s.sigma < _MIN_ACCOUNTED_SIGMA for s in settings)


def _epsilon(setting: _Setting, delta: float) -> float:
    if _below_accounted_sigma([setting]):
        return _gaussian_epsilon(_gaussian_mu([setting]), delta)
    if setting.accountant == "pld":
        return float(_composed_pld(setting).get_epsilon_for_delta(delta))
    return float(_composed([setting]).get_epsilon(delta))


def _composed(settings: Sequence[_Setting]) -> Any:
    """A PLD (``accountant="pld"``) or RDP accountant of all ``settings`` composed."""
    if settings[0].accountant == "pld":
        if len(settings) == 1:
            return _composed_pld(settings[0])
        # the coarsest interval of the runs: at least as pessimistic as each run alone, so
        # adding steps never lowers the reported epsilon
        interval = max(pld_discretization(s.sigma, s.q) for s in settings)
        plds = [_composed_pld(s, interval) for s in settings]
        return functools.reduce(lambda a, b: a.compose(b), plds)
    accountant = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=NEIGHBORING_RELATION[settings[0].relation]
    )
    for s in settings:
        accountant.compose(dp_accounting.SelfComposedDpEvent(_step_event(s), s.num_iter))
    return accountant


def _check_composable(runs: Sequence[dict], accountant: str) -> list[_Setting]:
    if not runs:
        raise ValueError("runs must hold at least one run to compose")
    settings = [
        _check_setting(
            r["sigma"],
            r["q"],
            r["num_iter"],
            r.get("relation", "add_remove"),
            accountant,
            r.get("sampling", "poisson"),
            r.get("dataset_size"),
            r.get("max_batch_size"),
        )
        for r in runs
    ]
    relations = {s.relation for s in settings}
    if len(relations) > 1:
        raise ValueError(
            f"runs accounted under different relations ({sorted(relations)}) cannot be "
            "composed; account them all under one relation"
        )
    return settings


def compose_epsilon(runs: Sequence[dict], delta: float, accountant: str = "pld") -> float:
    """Epsilon at ``delta`` of several training runs on the same data, one after another.

    Parameters
    ----------
    runs : sequence of dict
        Each run as the keyword arguments of :func:`compute_epsilon`: ``sigma``, ``q``,
        ``num_iter`` and optionally ``relation`` (the same for all), ``sampling``,
        ``dataset_size``, ``max_batch_size``.
    delta : float
        Target delta in (0, 1).
    accountant : str
        ``"pld"`` (composed on the coarsest discretisation of the runs) or ``"rdp"``.

    Returns
    -------
    float
        An upper bound on the epsilon of all runs together; ``inf`` if delta cannot be
        reached.
    """
    delta = _validation.real(delta, "delta", 0, 1)
    settings = _check_composable(runs, accountant)
    if len(settings) == 1:
        return _epsilon(settings[0], delta)
    if _below_accounted_sigma(settings):
        return _gaussian_epsilon(_gaussian_mu(settings), delta)
    composed = _composed(settings)
    if accountant == "pld":
        return float(composed.get_epsilon_for_delta(delta))
    return float(composed.get_epsilon(delta))


def compose_delta(runs: Sequence[dict], epsilon: float, accountant: str = "pld") -> float:
    """Delta at ``epsilon`` of several runs composed (see :func:`compose_epsilon`)."""
    epsilon = _validation.real(epsilon, "epsilon", 0, math.inf, closed_low=True)
    settings = _check_composable(runs, accountant)
    if _below_accounted_sigma(settings):
        return _gdp_delta(_gaussian_mu(settings), epsilon)
    composed = _composed(settings)
    if accountant == "pld":
        return float(composed.get_delta_for_epsilon(epsilon))
    return float(composed.get_delta(epsilon))


def compute_epsilon(
    sigma: float,
    delta: float,
    q: float,
    num_iter: float,
    relation: str = "add_remove",
    accountant: str = "pld",
    *,
    sampling: str = "poisson",
    dataset_size: int | None = None,
    max_batch_size: int | None = None,
) -> float:
    """Epsilon of a training run at the given delta (an upper bound on the true epsilon).

    Parameters
    ----------
    sigma : float
        Noise multiplier (``dp_scale``), > 0.
    delta : float
        Target delta in (0, 1): the allowed probability of a privacy failure.
    q : float
        Sampling ratio in (0, 1].
    num_iter : float
        Number of steps, >= 1; a float (e.g. ``num_epochs / q``) is rounded up.
    relation : str
        ``"add_remove"`` (add or remove one record) or ``"substitute"`` (replace one).
    accountant : str
        ``"pld"`` (tight; Poisson and truncated Poisson sampling, both relations) or
        ``"rdp"`` (looser; Poisson sampling with ``"add_remove"``, fixed-size
        sampling with ``"substitute"``). Unsupported combinations raise
        ``ValueError``; d3p never switches accountant or relation silently.
    sampling, dataset_size, max_batch_size
        How batches are drawn, see :func:`training_dp_event` (default: Poisson).

    Returns
    -------
    float
        Epsilon; ``inf`` if delta cannot be reached.
    """
    delta = _validation.real(delta, "delta", 0, 1)
    setting = _check_setting(
        sigma, q, num_iter, relation, accountant, sampling, dataset_size, max_batch_size
    )
    return _epsilon(setting, delta)


def compute_delta(
    sigma: float,
    epsilon: float,
    q: float,
    num_iter: float,
    relation: str = "add_remove",
    accountant: str = "pld",
    *,
    sampling: str = "poisson",
    dataset_size: int | None = None,
    max_batch_size: int | None = None,
) -> float:
    """Delta of a training run at the given epsilon (an upper bound on the true delta).

    Parameters
    ----------
    sigma : float
        Noise multiplier (``dp_scale``), > 0.
    epsilon : float
        Privacy loss bound, >= 0.
    q, num_iter, relation, accountant, sampling, dataset_size, max_batch_size
        As in :func:`compute_epsilon`.

    Returns
    -------
    float
        Delta in [0, 1].
    """
    epsilon = _validation.real(epsilon, "epsilon", 0, math.inf, closed_low=True)
    setting = _check_setting(
        sigma, q, num_iter, relation, accountant, sampling, dataset_size, max_batch_size
    )
    return compose_delta([setting._asdict()], epsilon, setting.accountant)


# ---------------------------------------------------------------------------
# Noise calibration
# ---------------------------------------------------------------------------


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _gdp_delta(mu: float, epsilon: float) -> float:
    """Delta of mu-Gaussian DP at ``epsilon`` (Dong, Roth and Su 2019, Corollary 2.13)."""
    tail = _normal_cdf(-epsilon / mu - mu / 2)
    scaled = math.exp(epsilon + math.log(tail)) if tail > 0 else 0.0
    return _normal_cdf(-epsilon / mu + mu / 2) - scaled


def _bisect_increasing(f, target: float, low: float, high: float, steps: int = 80) -> float:
    """Geometric bisection for ``f(x) = target`` with ``f`` increasing on [low, high]."""
    for _ in range(steps):
        mid = math.sqrt(low * high)
        if f(mid) < target:
            low = mid
        else:
            high = mid
    return math.sqrt(low * high)


def _initial_sigma(
    target_eps: float, delta: float, q: float, num_iter: int, relation: str
) -> float:
    """Central-limit guess of sigma (no accountant evaluation).

    Poisson-subsampled Gaussian steps compose to about mu-GDP with
    ``mu = q * sqrt(T * (exp(1 / sigma**2) - 1))`` (Bu et al. 2019, arXiv:1911.11607);
    replace-one roughly doubles mu.
    """
    mu = _bisect_increasing(lambda m: _gdp_delta(m, target_eps), delta, 1e-8, 1e3)
    if relation == "substitute":
        mu /= 2
    return 1.0 / math.sqrt(math.log1p(mu**2 / (q**2 * num_iter)))


class _Point(NamedTuple):
    log_sigma: float
    gap: float  # log(eps) - log(aim); +inf if eps is infinite, -inf if eps is 0


def _next_log_sigma(points: list[_Point], low: _Point | None, high: _Point | None) -> float:
    """Safeguarded secant step on ``gap`` against ``log sigma`` (gap decreases in sigma)."""
    last = points[-1]
    if math.isinf(last.gap):
        step = _MAX_LOG_STEP if last.gap > 0 else -_MAX_LOG_STEP
    else:
        slope = -1.0  # d log(eps) / d log(sigma) of mu-GDP for large sigma
        finite = [p for p in points[:-1] if math.isfinite(p.gap) and p.log_sigma != last.log_sigma]
        if finite:
            prev = finite[-1]
            secant = (last.gap - prev.gap) / (last.log_sigma - prev.log_sigma)
            if secant < 0:
                slope = secant
        step = max(-_MAX_LOG_STEP, min(_MAX_LOG_STEP, -last.gap / slope))
    candidate = last.log_sigma + step
    if low is not None and high is not None and not low.log_sigma < candidate < high.log_sigma:
        candidate = 0.5 * (low.log_sigma + high.log_sigma)
    return candidate


def calibrate_sigma(
    target_eps: float,
    delta: float,
    q: float,
    num_iter: float,
    relation: str = "add_remove",
    accountant: str = "pld",
    tol: float = 1e-4,
    force_smaller: bool = False,
    maxeval: int = 10,
    *,
    sampling: str = "poisson",
    dataset_size: int | None = None,
    max_batch_size: int | None = None,
) -> tuple[float, float, int]:
    """Find the noise multiplier sigma that gives ``target_eps`` for a training run.

    Parameters
    ----------
    target_eps : float
        Target epsilon, > 0.
    delta : float
        Target delta in (0, 1).
    q : float
        Sampling ratio in (0, 1].
    num_iter : float
        Number of steps, >= 1; a float is rounded up.
    relation : str
        ``"add_remove"`` or ``"substitute"`` (see :func:`compute_epsilon`).
    accountant : str
        ``"pld"`` or ``"rdp"`` (the combinations of :func:`compute_epsilon`).
    tol : float
        Tolerance on epsilon, > 0: the search stops once ``|eps - target_eps| <= tol``.
    force_smaller : bool
        If True, the returned ``eps`` never exceeds ``target_eps`` (and the search
        stops once ``target_eps - tol <= eps <= target_eps``).
    maxeval : int
        Maximum number of accountant evaluations, >= 1. If the tolerance is not met
        within them, the best sigma found (closest epsilon, respecting
        ``force_smaller``) is returned with a ``RuntimeWarning``; if no evaluated
        sigma respects ``force_smaller``, ``RuntimeError`` is raised.
    sampling, dataset_size, max_batch_size
        How batches are drawn, see :func:`training_dp_event` (default: Poisson).

    Returns
    -------
    sigma : float
        The noise multiplier.
    eps : float
        The accountant's epsilon at ``sigma`` (equal to ``compute_epsilon(sigma, ...)``).
    num_evals : int
        The number of accountant evaluations made.
    """
    target_eps = _validation.real(target_eps, "target_eps", 0, math.inf)
    delta = _validation.real(delta, "delta", 0, 1)
    tol = _validation.real(tol, "tol", 0, math.inf)
    maxeval = _validation.count(maxeval, "maxeval")
    start = _check_setting(
        1.0, q, num_iter, relation, accountant, sampling, dataset_size, max_batch_size
    )
    sigma = _initial_sigma(target_eps, delta, start.q, start.num_iter, relation)

    aim = target_eps - min(tol, target_eps) / 2 if force_smaller else target_eps
    evaluated: list[tuple[float, float]] = []
    points: list[_Point] = []
    low = high = None  # largest log sigma with eps above aim, smallest with eps below
    for num_evals in range(1, maxeval + 1):
        eps = _epsilon(start._replace(sigma=sigma), delta)
        evaluated.append((sigma, eps))
        if abs(eps - target_eps) <= tol and (eps <= target_eps or not force_smaller):
            return sigma, eps, num_evals
        if eps == 0:
            gap = -math.inf
        else:
            gap = math.log(eps) - math.log(aim)
        point = _Point(math.log(sigma), gap)
        points.append(point)
        if gap > 0 and (low is None or point.log_sigma > low.log_sigma):
            low = point
        elif gap <= 0 and (high is None or point.log_sigma < high.log_sigma):
            high = point
        sigma = math.exp(_next_log_sigma(points, low, high))

    valid = [(s, e) for s, e in evaluated if e <= target_eps or not force_smaller]
    if not valid:
        raise RuntimeError(
            f"no sigma with eps <= target_eps={target_eps} found in maxeval={maxeval} "
            "accountant evaluations; increase maxeval"
        )
    sigma, eps = min(valid, key=lambda se: abs(se[1] - target_eps))
    warnings.warn(
        f"epsilon did not reach target_eps={target_eps} within tol={tol} in maxeval={maxeval} "
        f"accountant evaluations; returning the best sigma found (eps={eps})",
        RuntimeWarning,
        stacklevel=2,
    )
    return sigma, eps, maxeval


def approximate_sigma(
    target_eps: float,
    delta: float,
    q: float,
    num_iter: float,
    tol: float = 1e-4,
    force_smaller: bool = False,
    maxeval: int = 10,
) -> tuple[float, float, int]:
    """Noise multiplier sigma for the substitute (replace-one) relation, PLD accountant.

    Same arguments and return value as d3p 0.2: ``(sigma, eps, num_evals)``; see
    :func:`calibrate_sigma` for their meaning.
    """
    return calibrate_sigma(
        target_eps, delta, q, num_iter, "substitute", "pld", tol, force_smaller, maxeval
    )


def approximate_sigma_remove_relation(
    target_eps: float,
    delta: float,
    q: float,
    num_iter: float,
    tol: float = 1e-4,
    force_smaller: bool = False,
    maxeval: int = 10,
) -> tuple[float, float, int]:
    """Noise multiplier sigma for the add/remove-one relation, PLD accountant.

    Same arguments and return value as d3p 0.2: ``(sigma, eps, num_evals)``; see
    :func:`calibrate_sigma` for their meaning.
    """
    return calibrate_sigma(
        target_eps, delta, q, num_iter, "add_remove", "pld", tol, force_smaller, maxeval
    )


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _report(args: argparse.Namespace, sigma: float, eps: float, delta: float) -> str:
    """The settings and result of a command-line computation, one ``name: value`` per line."""
    num_iter = _check_num_iter(args.num_iter)
    accountant = f"{args.accountant} (dp-accounting {metadata.version('dp-accounting')})"
    if args.accountant == "pld":
        accountant += f", discretisation interval {pld_discretization(sigma, args.q):.3g}"
    relation = {"add_remove": "add or remove one record", "substitute": "replace one record"}
    lines = [
        ("accountant", accountant),
        ("relation", f"{args.relation} ({relation[args.relation]})"),
        ("sampling", f"Poisson, q = {args.q:g}"),
        ("steps", f"{num_iter}"),
        ("sigma", f"{sigma:.6g}"),
        ("epsilon", f"{eps:.6g}"),
        ("delta", f"{delta:.6g}"),
    ]
    return "\n".join(f"{name + ':':<12}{value}" for name, value in lines)


# Help of the command line's value flags (their allowed ranges are checked in _cli_problem).
_CLI_HELP = {
    "epsilon": "epsilon: the target (sigma, > 0) or the given value (delta, >= 0)",
    "delta": "delta in (0, 1)",
    "sigma": "noise multiplier > 0 (noise std / clipping threshold)",
    "q": "Poisson sampling ratio in (0, 1]",
    "num_iter": "number of steps >= 1 (a float is rounded up)",
    "tol": "tolerance on epsilon, > 0",
    "maxeval": "maximum number of accountant evaluations, >= 1",
}
# The library's argument names, as its error messages give them, and the flags they come from.
_CLI_FLAGS = {
    "target_eps": "--epsilon",
    "epsilon": "--epsilon",
    "delta": "--delta",
    "sigma": "--sigma",
    "q": "--q",
    "num_iter": "--num-iter",
    "tol": "--tol",
    "maxeval": "--maxeval",
    "relation": "--relation",
    "accountant": "--accountant",
}
# "name=..." or "name must ..." in a library message: an argument, not a word of the text
_CLI_NAME = re.compile(r"\b(" + "|".join(_CLI_FLAGS) + r")\b(?=\s*(?:=|must\b))")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d3p-privacy",
        description="Privacy accounting for DP-VI with d3p (Poisson-sampled Gaussian steps).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    specs = {
        "sigma": ("noise multiplier for a target epsilon", ("epsilon", "delta")),
        "epsilon": ("epsilon spent by a run", ("sigma", "delta")),
        "delta": ("delta at a given epsilon", ("sigma", "epsilon")),
    }
    for name, (help_text, given) in specs.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        # errors found after parsing go through the subcommand's parser: it prints its usage
        sub.set_defaults(subparser=sub)
        for arg in given:
            sub.add_argument(f"--{arg}", type=float, required=True, help=_CLI_HELP[arg])
        sub.add_argument("--q", type=float, required=True, help=_CLI_HELP["q"])
        sub.add_argument("--num-iter", type=float, required=True, help=_CLI_HELP["num_iter"])
        sub.add_argument("--relation", choices=RELATIONS, default="add_remove")
        sub.add_argument("--accountant", choices=ACCOUNTANTS, default="pld")
        if name == "sigma":
            sub.add_argument("--tol", type=float, default=1e-4, help=_CLI_HELP["tol"])
            sub.add_argument(
                "--force-smaller",
                action="store_true",
                help="never return an epsilon above the target",
            )
            sub.add_argument("--maxeval", type=int, default=10, help=_CLI_HELP["maxeval"])
    return parser


def _cli_problem(args: argparse.Namespace) -> str | None:
    """The first value flag out of its range, as a message naming the flag (None if all fit)."""
    given_epsilon = args.command == "delta"  # a given epsilon may be 0; a target may not
    checks = (
        ("epsilon", (lambda v: v >= 0) if given_epsilon else (lambda v: v > 0)),
        ("delta", lambda v: 0 < v < 1),
        ("sigma", lambda v: v > 0),
        ("q", lambda v: 0 < v <= 1),
        ("num_iter", lambda v: v >= 1),
        ("tol", lambda v: v > 0),
        ("maxeval", lambda v: v >= 1),
    )
    allowed = {
        "epsilon": ">= 0" if given_epsilon else "> 0",
        "delta": "in (0, 1)",
        "sigma": "> 0",
        "q": "in (0, 1]",
        "num_iter": ">= 1",
        "tol": "> 0",
        "maxeval": ">= 1",
    }
    for name, fits in checks:
        value = getattr(args, name, None)
        if value is None:
            continue
        if not math.isfinite(value):
            return f"{_CLI_FLAGS[name]} must be finite, got {value}"
        if not fits(value):
            return f"{_CLI_FLAGS[name]} must be {allowed[name]}, got {value:g}"
    return None


def _cli_message(error: Exception) -> str:
    """A library error with its argument names replaced by the command line's flags."""
    return _CLI_NAME.sub(lambda m: _CLI_FLAGS[m[1]], str(error))


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point (``python -m d3p.dputil`` / ``d3p-privacy``).

    Values out of range are refused before any accounting, with the flag's name and the
    subcommand's usage (exit status 2, as for argparse's own errors).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments (default: ``sys.argv[1:]``).
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    command = args.subparser
    problem = _cli_problem(args)
    if problem is not None:
        command.error(problem)
    common = dict(relation=args.relation, accountant=args.accountant)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sigma, eps, delta, note = _cli_compute(args, common)
    except (ValueError, RuntimeError) as error:
        command.error(_cli_message(error))
    for warning in caught:  # e.g. the calibration missed --tol within --maxeval evaluations
        print(f"{command.prog}: warning: {_cli_message(warning.message)}", file=sys.stderr)
    print(_report(args, sigma, eps, delta))
    print(f"{'note:':<12}{note}")


def _cli_compute(args: argparse.Namespace, common: dict) -> tuple[float, float, float, str]:
    """sigma, epsilon, delta and a note for the command ``args.command``."""
    if args.command == "sigma":
        sigma, eps, num_evals = calibrate_sigma(
            args.epsilon,
            args.delta,
            args.q,
            args.num_iter,
            tol=args.tol,
            force_smaller=args.force_smaller,
            maxeval=args.maxeval,
            **common,
        )
        delta = args.delta
        note = (
            f"target epsilon {args.epsilon:g} (tol {args.tol:g}"
            f"{', never above' if args.force_smaller else ''}), "
            f"{num_evals} accountant evaluations"
        )
    elif args.command == "epsilon":
        sigma, delta = args.sigma, args.delta
        eps = compute_epsilon(sigma, delta, args.q, args.num_iter, **common)
        note = "epsilon is an upper bound for this delta"
    else:
        sigma, eps = args.sigma, args.epsilon
        delta = compute_delta(sigma, eps, args.q, args.num_iter, **common)
        note = "delta is an upper bound for this epsilon"
    return sigma, eps, delta, note


if __name__ == "__main__":
    main()
