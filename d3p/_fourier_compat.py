# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""d3p 0.2's re-exports of fourier-accountant, on dp-accounting's PLD accountant.

``get_epsilon_R/S(target_delta, sigma, q, ncomp, nx, L)`` and
``get_delta_R/S(target_eps, sigma, q, ncomp, nx, L)`` account for ``ncomp``
Poisson-subsampled Gaussian steps (rate ``q``, noise multiplier ``sigma``) under the
remove (R, add/remove-one) or substitute (S, replace-one) relation. fourier-accountant
discretised the privacy loss on ``[-L, L]`` with ``nx`` points; here ``2 * L / nx`` is
the PLD's value discretisation interval (the same grid step, pessimistic rounding),
and ``L`` bounds no range: dp-accounting truncates tails by probability mass, on the
pessimistic side.
"""

from __future__ import annotations

from dp_accounting.pld import privacy_loss_distribution as pld_lib

from d3p import _validation
from d3p._pld import NEIGHBORING_RELATION, self_compose

__all__ = ["get_delta_R", "get_delta_S", "get_epsilon_R", "get_epsilon_S"]


def _pld(sigma, q, ncomp, nx, L, relation):
    sigma = _validation.real(sigma, "sigma", 0, float("inf"))
    q = _validation.real(q, "q", 0, 1, closed_high=True)
    ncomp = _validation.real(ncomp, "ncomp", 1, float("inf"), closed_low=True)
    nx = _validation.real(nx, "nx", 0, float("inf"))
    L = _validation.real(L, "L", 0, float("inf"))
    step = pld_lib.from_gaussian_mechanism(
        sigma,
        value_discretization_interval=2 * L / nx,
        sampling_prob=q,
        neighboring_relation=NEIGHBORING_RELATION[relation],
    )
    return self_compose(step, int(-(-ncomp // 1)))


def get_epsilon_R(
    target_delta: float, sigma: float, q: float, ncomp: float, nx: float = 1e6, L: float = 20.0
) -> float:
    """Epsilon at ``target_delta`` in (0, 1), add/remove relation (``ncomp`` rounded up)."""
    target_delta = _validation.real(target_delta, "target_delta", 0, 1)
    return float(_pld(sigma, q, ncomp, nx, L, "add_remove").get_epsilon_for_delta(target_delta))


def get_epsilon_S(
    target_delta: float, sigma: float, q: float, ncomp: float, nx: float = 1e6, L: float = 20.0
) -> float:
    """Epsilon at ``target_delta`` in (0, 1), substitute relation (``ncomp`` rounded up)."""
    target_delta = _validation.real(target_delta, "target_delta", 0, 1)
    return float(_pld(sigma, q, ncomp, nx, L, "substitute").get_epsilon_for_delta(target_delta))


def get_delta_R(
    target_eps: float, sigma: float, q: float, ncomp: float, nx: float = 1e6, L: float = 20.0
) -> float:
    """Delta at ``target_eps`` >= 0, add/remove relation (``ncomp`` rounded up)."""
    target_eps = _validation.real(target_eps, "target_eps", 0, float("inf"), closed_low=True)
    return float(_pld(sigma, q, ncomp, nx, L, "add_remove").get_delta_for_epsilon(target_eps))


def get_delta_S(
    target_eps: float, sigma: float, q: float, ncomp: float, nx: float = 1e6, L: float = 20.0
) -> float:
    """Delta at ``target_eps`` >= 0, substitute relation (``ncomp`` rounded up)."""
    target_eps = _validation.real(target_eps, "target_eps", 0, float("inf"), closed_low=True)
    return float(_pld(sigma, q, ncomp, nx, L, "substitute").get_delta_for_epsilon(target_eps))
