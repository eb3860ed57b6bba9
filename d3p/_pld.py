# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Privacy-loss-distribution helpers shared by :mod:`d3p.dputil` and its d3p 0.2 re-exports.

Both import from here, so the accounting modules import one way (no circle).
"""

from __future__ import annotations

from dp_accounting import NeighboringRelation
from dp_accounting.pld import privacy_loss_distribution as pld_lib

NEIGHBORING_RELATION = {
    "add_remove": NeighboringRelation.ADD_OR_REMOVE_ONE,
    "substitute": NeighboringRelation.REPLACE_ONE,
}

# Number of steps composed first when composing a PLD with itself (see self_compose).
_FIRST_COMPOSITION = 16


def self_compose(pld: pld_lib.PrivacyLossDistribution, n: int) -> pld_lib.PrivacyLossDistribution:
    """Compose ``pld`` with itself ``n`` times.

    ``dp-accounting`` 0.6 estimates the size of an ``n``-fold composition of a small
    (sparse) PLD as ``size ** n``, a Python big integer that costs seconds for
    ``n = 10**6``. Composing a block of 16 steps first (always dense afterwards) and
    then that block ``n // 16`` times gives the same distribution (up to the
    ``1e-15`` pessimistic tail truncation of each FFT stage) without that cost.
    """
    if n <= _FIRST_COMPOSITION:
        return pld.self_compose(n)
    blocks, rest = divmod(n, _FIRST_COMPOSITION)
    composed = pld.self_compose(_FIRST_COMPOSITION).self_compose(blocks)
    if rest:
        composed = composed.compose(pld.self_compose(rest))
    return composed
