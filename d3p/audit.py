# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Empirical privacy auditing of DPSVI: a statistically valid lower bound on epsilon.

The accountant gives an *upper* bound on the privacy loss of the mechanism as analysed. An
audit measures what the mechanism as implemented leaks: it inserts ``m`` canaries, each
included independently with probability 1/2, trains once, guesses from the released
parameters which canaries were in, and turns the number of correct guesses into a lower
bound ``eps_lb`` that holds with the chosen confidence. If ``eps_lb`` exceeds the epsilon
d3p reports, the implementation or its accounting is broken.

The bound is the one-run auditing bound of Steinke, Nasr and Jagielski, "Privacy auditing
with one (1) training run" (NeurIPS 2023, arXiv:2305.08846), for (epsilon, delta)-DP with
abstentions (:func:`epsilon_lower_bound`). :func:`audit_dpsvi` runs the whole audit through
:meth:`d3p.svi.DPSVI.run`, with white-box *gradient canaries* or black-box *input canaries*.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import scipy.optimize
import scipy.special
from numpyro.infer import Trace_ELBO
from numpyro.optim import SGD

import d3p.random
from d3p import _validation
from d3p.plan import PrivacyPlan
from d3p.svi import DPSVI

__all__ = ["AuditResult", "audit_dpsvi", "epsilon_lower_bound", "p_value"]

KINDS = ("gradient", "input")

# Slope of a gradient canary's log-density in its own coordinate: far above any sensible
# clipping threshold C, so the clipped contribution is exactly C (the slope is the
# gradient's whole norm; clipping scales it to C whenever slope > C).
_CANARY_SLOPE = 1e6


# --------------------------------------------------------------------------------------------
# The bound
# --------------------------------------------------------------------------------------------


def _check_counts(num_canaries: Any, num_guesses: Any, num_correct: Any) -> tuple[int, int, int]:
    m = _validation.count(num_canaries, "num_canaries", 0, allow_float=False)
    r = _validation.count(num_guesses, "num_guesses", 0, allow_float=False)
    v = _validation.count(num_correct, "num_correct", 0, allow_float=False)
    if r > m:
        raise ValueError(f"num_guesses must be in [0, num_canaries={m}], got {r}")
    if v > r:
        raise ValueError(f"num_correct must be in [0, num_guesses={r}], got {v}")
    return m, r, v


class _PValue:
    """``p(eps)`` for fixed counts: Steinke, Nasr and Jagielski (2023), Theorem 5.2.

    For an (eps, delta)-DP algorithm, ``m`` canaries included independently with
    probability 1/2 and an auditor that makes ``r`` guesses (abstaining on the others),
    the number ``W`` of correct guesses satisfies, for every ``v``,

        P[W >= v] <= P[B >= v] + 2 m delta max_{i = 1..v} P[v - i <= B < v] / i,

    where ``B ~ Binomial(r, e^eps / (1 + e^eps))`` (the accuracy of eps-DP randomised
    response). The right-hand side, capped at 1, is the p-value of the null hypothesis
    "the algorithm is (eps, delta)-DP" given ``v`` correct guesses.
    """

    def __init__(self, m: int, r: int, v: int, delta: float):
        self.m, self.r, self.v, self.delta = m, r, v, delta
        # eps >= 0, so p >= 1/2 and __call__ reads k >= _low(1/2) only
        self.first = min(self._low(0.5), v)
        k = np.arange(self.first, v, dtype=np.float64)
        # log binomial coefficients log C(r, k) (independent of eps)
        self.k = k
        self.log_comb = (
            scipy.special.gammaln(r + 1.0)
            - scipy.special.gammaln(k + 1.0)
            - scipy.special.gammaln(r - k + 1.0)
        )
        self.divisors = np.arange(1, v + 1, dtype=np.float64)

    def _low(self, p: float) -> int:
        """Smallest k whose P[B = k] can matter (see __call__)."""
        r = self.r
        return max(0, math.floor(r * p - math.sqrt(160.0 * r * p) - 2.0))

    def __call__(self, eps: float) -> float:
        m, r, v, delta = self.m, self.r, self.v, self.delta
        if v == 0:
            return 1.0
        p = scipy.special.expit(eps)
        tail = float(scipy.special.bdtrc(v - 1, r, p))  # P[B > v - 1] = P[B >= v]
        if delta == 0.0:
            return min(tail, 1.0)
        # log q and log(1 - q) without cancellation: -log(1 + e^-eps), -log(1 + e^eps)
        log_p, log_1mp = -np.logaddexp(0.0, -eps), -np.logaddexp(0.0, eps)
        # Only k >= r p - t matter: by the Chernoff bound P[B <= r p - t] <= exp(-t^2 / (2 r p))
        # < e^-80, and every window sum reaching below that point already holds the mode's
        # mass (>= 1 / (r + 1)), so the dropped terms change alpha by a relative 1e-30.
        low = self._low(p)
        if low >= v:  # every P[B = k], k < v, is below e^-80: alpha is nil, the tail is ~1
            return min(tail, 1.0)
        k = self.k[low - self.first :]
        pmf = np.exp(self.log_comb[low - self.first :] + k * log_p + (r - k) * log_1mp)
        # window sums P[v - i <= B < v] for i = 1..v - low: cumulative from k = v - 1 down
        windows = np.cumsum(pmf[::-1])
        alpha = float(np.max(windows / self.divisors[: v - low]))
        return min(tail + 2.0 * m * delta * alpha, 1.0)


def p_value(
    epsilon: float, num_canaries: int, num_guesses: int, num_correct: int, delta: float
) -> float:
    """p-value of "the mechanism is (epsilon, delta)-DP" after a one-run audit.

    The bound of Steinke, Nasr and Jagielski (2023, Theorem 5.2) on the probability that an
    auditor of an (epsilon, delta)-DP mechanism makes at least ``num_correct`` correct
    guesses (see :func:`epsilon_lower_bound`), capped at 1.

    Parameters
    ----------
    epsilon : float
        The epsilon of the null hypothesis, >= 0.
    num_canaries, num_guesses, num_correct : int
        ``m`` canaries (each included independently with probability 1/2), ``r`` guesses
        (the others abstained on), ``v`` of them correct; ``0 <= v <= r <= m``.
    delta : float
        The delta of the null hypothesis, in [0, 1).

    Returns
    -------
    float
        In [0, 1]; small values refute the (epsilon, delta) claim.
    """
    m, r, v = _check_counts(num_canaries, num_guesses, num_correct)
    delta = _validation.real(delta, "delta", 0.0, 1.0, closed_low=True)
    epsilon = _validation.real(epsilon, "epsilon", 0.0, math.inf, closed_low=True)
    return _PValue(m, r, v, delta)(epsilon)


def epsilon_lower_bound(
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """Lower bound on epsilon from a one-run audit (Steinke, Nasr and Jagielski, 2023).

    With ``m`` canaries, each included in the training data independently with probability
    1/2, an auditor guesses "in" or "out" for ``r`` of them (abstaining on the rest) and
    gets ``v`` right. Theorem 5.2 of "Privacy auditing with one (1) training run" (NeurIPS
    2023, arXiv:2305.08846) bounds the probability of ``v`` or more correct guesses under
    (eps, delta)-DP; that bound is the p-value :func:`p_value`. The result is the largest
    eps whose p-value is at most ``1 - confidence``: with probability at least
    ``confidence`` (over the canaries' inclusion and the mechanism's randomness) the
    mechanism is *not* (eps', delta)-DP for any ``eps' < eps_lb``. It is 0 when no
    epsilon is refuted (e.g. ``v <= r / 2``).

    The p-value increases with eps (the tail term does; the whole is checked on grids in
    the tests), so a bracketing root-find (Brent's method, to 1e-9 in eps) gives the
    crossing; a call takes a few milliseconds at ``r = 10^4``, less for fewer guesses.

    Parameters
    ----------
    num_canaries : int
        ``m >= 0``, the number of canaries (inclusion bits), abstentions included.
    num_guesses : int
        ``r`` in ``[0, m]``, guesses made.
    num_correct : int
        ``v`` in ``[0, r]``, correct guesses.
    delta : float
        The delta at which epsilon is bounded, in [0, 1) (use the delta that d3p reports
        its epsilon at).
    confidence : float
        In (0, 1), e.g. 0.95: the probability that the bound is valid.

    Returns
    -------
    float
        ``eps_lb >= 0``. Even all-correct guesses give a finite value: ``eps_lb`` is capped
        by the number of guesses (about ``log(r / log(1 / (1 - confidence)))`` for
        ``delta = 0``).
    """
    m, r, v = _check_counts(num_canaries, num_guesses, num_correct)
    delta = _validation.real(delta, "delta", 0.0, 1.0, closed_low=True)
    confidence = _validation.real(confidence, "confidence", 0.0, 1.0)
    significance = 1.0 - confidence
    if v == 0:
        return 0.0
    p = _PValue(m, r, v, delta)
    if p(0.0) > significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while p(hi) <= significance:  # terminates: p -> 1 as eps grows (expit(eps) rounds to 1)
        lo, hi = hi, 2.0 * hi
    return float(
        scipy.optimize.brentq(lambda e: p(e) - significance, lo, hi, xtol=1e-9, rtol=1e-12)
    )


# --------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------


class AuditResult(NamedTuple):
    """Result of :func:`audit_dpsvi`.

    Attributes
    ----------
    epsilon : float
        The epsilon d3p reported for the audited run (``DPSVIRunResult.epsilon``), at
        ``delta``.
    epsilon_lower_bound : float
        ``eps_lb``: with probability at least ``confidence`` the run was not
        (eps, delta)-DP for any eps below it. ``eps_lb > epsilon`` means the mechanism or
        its accounting is broken (or, with probability at most ``1 - confidence``, bad luck).
    delta : float
        The delta of both epsilons.
    confidence : float
        The confidence of ``epsilon_lower_bound`` (after the multiple-testing correction).
    num_canaries : int
        ``m``, canaries whose inclusion was a fair coin flip.
    num_guesses : int
        ``r = k_plus + k_minus``, the guesses the bound was computed from.
    num_correct : int
        ``v``, correct guesses among them.
    k_plus, k_minus : int
        Guessed "in" for the ``k_plus`` highest scores, "out" for the ``k_minus`` lowest.
    scores : numpy.ndarray
        Score of every canary, shape ``(m,)`` (higher: more likely included).
    included : numpy.ndarray
        The secret inclusion bits, bool, shape ``(m,)``.
    kind : str
        ``"gradient"`` or ``"input"``.
    plan : d3p.plan.PrivacyPlan
        The plan the audited run followed (its ``dataset_size`` counts the canaries in).
    seconds : float
        Wall time of the audit (training and scoring).
    """

    epsilon: float
    epsilon_lower_bound: float
    delta: float
    confidence: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    k_plus: int
    k_minus: int
    scores: np.ndarray
    included: np.ndarray
    kind: str
    plan: PrivacyPlan
    seconds: float


# Fractions of m guessed "in" (and as many "out") when num_guesses="auto": the bound is
# taken at each and the best is kept, each at significance (1 - confidence) / 7 (a
# Bonferroni correction, so the maximum is valid at the stated confidence).
_AUTO_FRACTIONS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)


def _guess_sizes(num_guesses: Any, m: int) -> list[tuple[int, int]]:
    """The ``(k_plus, k_minus)`` candidates, fixed before any score is seen."""
    if isinstance(num_guesses, str):
        _validation.choice(num_guesses, "num_guesses", ("auto",))
        sizes = {(k, k) for k in (max(1, round(f * m)) for f in _AUTO_FRACTIONS) if 2 * k <= m}
        return sorted(sizes) or [(m // 2, m - m // 2)]
    if isinstance(num_guesses, tuple):
        if len(num_guesses) != 2:
            raise ValueError(f"num_guesses as a tuple is (k_plus, k_minus), got {num_guesses!r}")
        kp = _validation.count(num_guesses[0], "k_plus", 0, allow_float=False)
        km = _validation.count(num_guesses[1], "k_minus", 0, allow_float=False)
    else:
        r = _validation.count(num_guesses, "num_guesses", 1, allow_float=False)
        kp, km = r - r // 2, r // 2
    if kp + km > m:
        raise ValueError(f"num_guesses must total at most num_canaries={m}, got {kp + km}")
    return [(kp, km)]


def _bound_from_scores(
    scores: np.ndarray,
    included: np.ndarray,
    sizes: list[tuple[int, int]],
    delta: float,
    confidence: float,
) -> tuple[float, int, int, int, int]:
    """Best ``(eps_lb, r, v, k_plus, k_minus)`` over ``sizes``, Bonferroni-corrected."""
    m = len(scores)
    # ties broken by position: a fixed rule that does not look at the inclusion bits
    order = np.argsort(-scores, kind="stable")
    level = 1.0 - (1.0 - confidence) / len(sizes)
    best = None
    for kp, km in sizes:
        v = int(np.sum(included[order[:kp]]) + np.sum(~included[order[m - km :]]))
        eps = epsilon_lower_bound(m, kp + km, v, delta, level)
        if best is None or eps > best[0]:
            best = (eps, kp + km, v, kp, km)
    return best


def _run_plan(plan: PrivacyPlan, n: int) -> PrivacyPlan:
    """The plan for an audit data set of ``n`` records (add/remove: canaries left out)."""
    if n == plan.dataset_size:
        return plan
    if plan.sampling == "full_batch":
        return dataclasses.replace(plan, dataset_size=n, batch_size=n)
    return dataclasses.replace(plan, dataset_size=n, batch_size=min(plan.batch_size, n))


def _gradient_model(num_canaries: int) -> tuple[Callable, Callable]:
    """Model and guide of the gradient canaries.

    Records are ``(x, index)``: ``index == 0`` marks an ordinary record (a Gaussian-mean
    likelihood on the parameter ``audit_mean``), ``index = i + 1`` canary ``i``, whose
    log-density is ``slope * audit_canary[i]``: its gradient lies on coordinate ``i`` of
    ``audit_canary`` only, with norm ``slope`` far above ``C``, so the clipped contribution
    is exactly ``C`` there and nothing elsewhere.
    """

    def model(x, index, num_obs_total=None):
        mean = numpyro.param("audit_mean", jnp.zeros(()))
        canary = numpyro.param("audit_canary", jnp.zeros(num_canaries))
        with numpyro.plate("data", num_obs_total, subsample_size=x.shape[0]):
            ordinary = index == 0
            numpyro.sample("x", dist.Normal(mean, 1.0).mask(ordinary), obs=x)
            own = canary[jnp.clip(index - 1, 0, num_canaries - 1)]
            numpyro.factor("canary", jnp.where(ordinary, 0.0, _CANARY_SLOPE * own))

    def guide(x, index, num_obs_total=None):
        pass

    return model, guide


def _log_predictive(
    model: Callable,
    guide: Callable,
    params: dict,
    key: jax.Array,
    records: tuple,
    kwargs: dict,
    num_samples: int,
) -> np.ndarray:
    """``log E_q[p(record | z)]`` of each record under the guide ``q`` with ``params``."""
    guide_key, model_key = jax.random.split(key)
    # the guide's latent sample sites (Predictive also returns plates' subsample indices)
    guide_trace = numpyro.handlers.trace(
        numpyro.handlers.substitute(numpyro.handlers.seed(guide, guide_key), data=params)
    ).get_trace(*records, **kwargs)
    latents = [
        name for name, s in guide_trace.items() if s["type"] == "sample" and not s["is_observed"]
    ]
    samples = numpyro.infer.Predictive(
        guide, params=params, num_samples=num_samples, return_sites=latents
    )(guide_key, *records, **kwargs)
    m = records[0].shape[0]

    def loglik(sample: dict, k: jax.Array) -> jax.Array:
        # the model at one guide draw (seeded: a subsampling plate needs a key); observed
        # sites' unscaled log-densities, summed per record (the first axis)
        fn = numpyro.handlers.substitute(numpyro.handlers.seed(model, k), data=sample)
        trace = numpyro.handlers.trace(fn).get_trace(*records, **kwargs)
        sites = [
            s["fn"].log_prob(s["value"])
            for s in trace.values()
            if s["type"] == "sample" and s["is_observed"]
        ]
        if not sites:
            raise ValueError("the model has no observed site: input canaries cannot be scored")
        return sum(jnp.reshape(lp, (m, -1)).sum(-1) for lp in sites)

    keys = jax.random.split(model_key, num_samples)
    total = jax.vmap(loglik)(samples, keys)  # (num_samples, m)
    return jax.nn.logsumexp(total, axis=0) - math.log(num_samples)


def audit_dpsvi(
    plan: PrivacyPlan,
    num_canaries: int,
    *,
    kind: str = "gradient",
    model: Callable | None = None,
    guide: Callable | None = None,
    data: tuple = (),
    canaries: tuple | None = None,
    neutral: tuple | None = None,
    optim: Any = None,
    num_guesses: int | tuple[int, int] | str = "auto",
    delta: float = 1e-5,
    confidence: float = 0.95,
    seed: int = 0,
    rng_suite: Any = d3p.random,
    dataset_size_kwarg: str | None = "num_obs_total",
    num_posterior_samples: int = 64,
    **model_kwargs: Any,
) -> AuditResult:
    """Audit one DPSVI configuration: train once with canaries, bound epsilon from below.

    Each of the ``m = num_canaries`` canaries is included independently with probability
    1/2 (bits from :mod:`d3p.random`, the secure generator, keyed by ``seed``). Training runs
    through :meth:`d3p.svi.DPSVI.run` with ``plan`` (its sampler, clipping, noise,
    normaliser and accounting) and ``rng_suite``. Every canary then gets a score; the
    auditor guesses "in" for the ``k_plus`` highest and "out" for the ``k_minus`` lowest
    scores and abstains on the rest, and :func:`epsilon_lower_bound` turns the number of
    correct guesses into ``eps_lb``. The guess counts are fixed before the scores are seen:
    given, or with ``num_guesses="auto"`` the best of seven symmetric choices (``k_plus =
    k_minus`` from 0.5 % to 50 % of ``m``), each bounded at significance
    ``(1 - confidence) / 7`` (Bonferroni), so the best is valid at ``confidence``.

    The neighbouring datasets that the bound is about differ in one canary: under
    ``plan.relation == "add_remove"`` an excluded canary is left out (the run's plan is
    ``plan`` with the data-set size it got); under ``"substitute"`` it is replaced by a
    ``neutral`` record, so the data-set size is ``plan.dataset_size`` in every run.

    Canary kinds:

    ``"gradient"`` (white-box, the strongest audit of the mechanism)
        The harness uses its own model: ordinary records fit a Gaussian mean, and canary
        ``i`` has a per-example gradient only on coordinate ``i`` of a parameter
        ``audit_canary``, of norm far above ``C``, so its clipped contribution is exactly
        ``C`` there and canaries do not interfere. Training uses plain SGD, so the score,
        the released movement of that coordinate, is a fixed multiple of the sum of the
        noisy gradient sums on it. ``plan.dataset_size - m`` ordinary records are used;
        ``model``, ``guide``, ``data``, ``canaries``, ``neutral`` must not be given.
    ``"input"`` (black-box, any model)
        ``canaries`` (records shaped like ``data``'s) are added to the user's ``data``;
        ``model`` and ``guide`` are trained with ``optim``. The score of a canary is how
        much more likely the trained posterior makes it than the initial one: the
        difference of ``log E_q[p(canary | z)]`` (over ``num_posterior_samples`` draws of
        the guide) after and before training. Requires
        ``plan.dataset_size == len(data) + m``. Start the guide at a fixed point (e.g.
        ``init_loc_fn=numpyro.infer.init_to_feasible``): with Adam a random start moves
        the excluded canaries' parameters as much as the included ones'.

    Parameters
    ----------
    plan : d3p.plan.PrivacyPlan
        The configuration audited, for the data set with every canary in
        (``dataset_size`` counts the canaries).
    num_canaries : int
        ``m >= 2``. More canaries allow larger ``eps_lb`` (see the user guide's table).
    kind : str
        ``"gradient"`` or ``"input"``.
    model, guide : callable
        ``"input"`` only: the NumPyro model and guide (as for :class:`~d3p.svi.DPSVI`).
    data : tuple of array
        ``"input"`` only: the user's records (no canaries), first axis indexing records.
    canaries : tuple of array
        ``"input"`` only: ``m`` canary records, arrays shaped like ``data``'s.
    neutral : tuple of array, optional
        ``"input"`` with the substitute relation: one record (arrays with first dimension
        1) that replaces an excluded canary; default an all-zero record.
    optim : numpyro optimiser, optional
        ``"input"`` only (default ``numpyro.optim.Adam(1e-3)``); gradient canaries use
        ``numpyro.optim.SGD(1.0)``.
    num_guesses : int, tuple of int, or "auto"
        ``r`` guesses split as ``(ceil(r/2), floor(r/2))``, ``(k_plus, k_minus)``, or
        ``"auto"`` (see above).
    delta : float
        The delta in (0, 1) at which d3p's epsilon and ``eps_lb`` are computed.
    confidence : float
        In (0, 1): probability that ``eps_lb`` is a valid lower bound.
    seed : int
        Seeds the inclusion bits and the training run (keep it secret for a real audit of
        a deployed key schedule; for tests it makes the audit reproducible).
    rng_suite : module
        Passed to :class:`~d3p.svi.DPSVI` (noise and batches).
    dataset_size_kwarg : str or None
        ``"input"`` only: the keyword through which ``model`` and ``guide`` receive the
        data-set size (the plate size), passed with the size of the audited data set;
        ``None`` passes nothing.
    num_posterior_samples : int
        ``"input"`` only: guide draws per score.
    **model_kwargs
        ``"input"`` only: further (public) keyword arguments of ``model`` and ``guide``.

    Returns
    -------
    AuditResult
    """
    start = time.perf_counter()
    if not isinstance(plan, PrivacyPlan):
        raise TypeError(f"plan must be a d3p.plan.PrivacyPlan, got {type(plan).__name__}")
    m = _validation.count(num_canaries, "num_canaries", 2, allow_float=False)
    kind = _validation.choice(kind, "kind", KINDS)
    delta = _validation.real(delta, "delta", 0.0, 1.0)
    confidence = _validation.real(confidence, "confidence", 0.0, 1.0)
    sizes = _guess_sizes(num_guesses, m)
    num_posterior_samples = _validation.count(
        num_posterior_samples, "num_posterior_samples", 1, allow_float=False
    )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if m > plan.dataset_size:
        raise ValueError(
            f"num_canaries must be at most plan.dataset_size={plan.dataset_size}, got {m}"
        )
    substitute = plan.relation == "substitute"

    if kind == "gradient":
        given = {"model": model, "guide": guide, "canaries": canaries, "neutral": neutral}
        extra = [k for k, v in given.items() if v is not None] + (["data"] if data else [])
        extra += ["optim"] if optim is not None else []
        extra += list(model_kwargs)
        if extra:
            raise TypeError(f"kind='gradient' uses its own model; do not pass {extra}")
        num_ordinary = plan.dataset_size - m
        model, guide = _gradient_model(m)
        data = (jnp.zeros(num_ordinary), jnp.zeros(num_ordinary, jnp.int32))
        canaries = (jnp.zeros(m), jnp.arange(1, m + 1, dtype=jnp.int32))
        neutral = (jnp.zeros(1), jnp.zeros(1, jnp.int32))
        optim = SGD(1.0)
        dataset_size_kwarg = "num_obs_total"
    else:
        if not callable(model) or not callable(guide):
            raise TypeError("kind='input' needs a NumPyro model and guide")
        data, num_ordinary = _validation.batch(tuple(data))
        if canaries is None:
            raise TypeError("kind='input' needs canaries: a tuple of arrays with m records")
        canaries, num_given = _validation.batch(tuple(canaries))
        if num_given != m or len(canaries) != len(data):
            raise ValueError(
                f"canaries must be {len(data)} arrays (like data) of num_canaries={m} "
                f"records, got {len(canaries)} of {num_given}"
            )
        if num_ordinary + m != plan.dataset_size:
            raise ValueError(
                f"plan.dataset_size must be len(data) + num_canaries = {num_ordinary + m}, "
                f"got {plan.dataset_size}"
            )
        if neutral is None:
            neutral = tuple(jnp.zeros((1, *jnp.shape(a)[1:]), jnp.result_type(a)) for a in data)
        neutral, one = _validation.batch(tuple(neutral))
        if one != 1 or len(neutral) != len(data):
            raise ValueError(f"neutral must be {len(data)} arrays holding one record")
        optim = numpyro.optim.Adam(1e-3) if optim is None else optim

    root = d3p.random.PRNGKey(seed)
    bits_key, run_key, init_key = d3p.random.split(root, 3)
    included = np.asarray(d3p.random.random_bits(bits_key, 8, (m,)) & 1, bool)

    # the audited data set: ordinary records, then the included canaries (and, under the
    # substitute relation, a neutral record in place of each excluded one)
    if substitute:
        rows = [
            jnp.where(jnp.reshape(included, (m,) + (1,) * (jnp.ndim(c) - 1)), c, z)
            for c, z in zip(canaries, neutral, strict=True)
        ]
    else:
        rows = [c[np.flatnonzero(included)] for c in canaries]
    dataset = tuple(
        jnp.concatenate([jnp.asarray(d), jnp.asarray(r, jnp.result_type(d))])
        for d, r in zip(data, rows, strict=True)
    )
    n = int(dataset[0].shape[0])
    run_plan = _run_plan(plan, n)
    kwargs = dict(model_kwargs)
    if dataset_size_kwarg is not None:
        kwargs[dataset_size_kwarg] = n

    dpsvi = DPSVI(model, guide, optim, Trace_ELBO(), rng_suite=rng_suite, plan=run_plan, **kwargs)
    if kind == "gradient":
        init_params = {"audit_mean": jnp.zeros(()), "audit_canary": jnp.zeros(m)}
    else:
        zeros = tuple(jnp.zeros((run_plan.batch_size, *a.shape[1:]), a.dtype) for a in dataset)
        # the run's starting point, fixed here so that scores can compare with it
        init_params = jax.jit(lambda key, z: dpsvi.get_params(dpsvi.init(key, *z)))(init_key, zeros)
    result = dpsvi.run(
        run_key,
        run_plan.num_steps,
        *dataset,
        delta=delta,
        init_params=init_params,
        progress_bar=False,
    )
    if kind == "gradient":
        scores = np.asarray(result.params["audit_canary"] - init_params["audit_canary"])
    else:
        score_key = jax.random.key(seed)  # scoring randomness is the auditor's, not private
        score_kwargs = dict(kwargs)
        if dataset_size_kwarg is not None:  # all m canaries at once: a plate of >= m records
            score_kwargs[dataset_size_kwarg] = max(n, m)

        @jax.jit  # one compiled program instead of hundreds of eager operations
        def gain(params_after, params_before, records):
            after = _log_predictive(
                model, guide, params_after, score_key, records, score_kwargs, num_posterior_samples
            )
            before = _log_predictive(
                model, guide, params_before, score_key, records, score_kwargs, num_posterior_samples
            )
            return after - before

        scores = gain(result.params, init_params, canaries)
    scores = np.asarray(scores, np.float64)
    eps_lb, r, v, kp, km = _bound_from_scores(scores, included, sizes, delta, confidence)
    return AuditResult(
        epsilon=float(result.epsilon),
        epsilon_lower_bound=eps_lb,
        delta=delta,
        confidence=confidence,
        num_canaries=m,
        num_guesses=r,
        num_correct=v,
        k_plus=kp,
        k_minus=km,
        scores=scores,
        included=included,
        kind=kind,
        plan=run_plan,
        seconds=time.perf_counter() - start,
    )
