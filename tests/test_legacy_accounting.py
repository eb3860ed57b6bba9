# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Tests of d3p 0.2's fourier-accountant names in d3p.dputil (get_epsilon_R/S, get_delta_R/S)."""

import json
from pathlib import Path

import pytest

from d3p.dputil import get_delta_R, get_delta_S, get_epsilon_R, get_epsilon_S

# rows computed with fourier-accountant 0.12.11 (L=40, nx=2e6), copied from the project's
# shared reference data (see the file's "source" and "copied_from" fields)
ROWS = json.loads((Path(__file__).parent / "data" / "accountant_reference.json").read_text())[
    "rows"
]
FAST = [2]  # the other rows take several seconds each
SLOW = [i for i in range(len(ROWS)) if i not in FAST]


def _check_row(i):
    r = ROWS[i]
    args = (r["sigma"], r["q"], r["num_iter"])
    for get_eps, get_delta, key in [
        (get_epsilon_R, get_delta_R, "epsilon_add_remove"),
        (get_epsilon_S, get_delta_S, "epsilon_substitute"),
    ]:
        ref = r[key]
        assert get_eps(r["delta"], *args) == pytest.approx(ref, rel=0.01)
        # within 1% in epsilon means: delta at 1.01 * ref <= target delta <= delta at 0.99 * ref
        assert get_delta(1.01 * ref, *args) <= r["delta"] <= get_delta(0.99 * ref, *args)


@pytest.mark.parametrize("i", FAST)
def test_matches_fourier_accountant(i):
    _check_row(i)


@pytest.mark.slow
@pytest.mark.parametrize("i", SLOW)
def test_matches_fourier_accountant_slow(i):
    _check_row(i)


def test_bad_arguments():
    with pytest.raises(ValueError, match="target_delta"):
        get_epsilon_R(0.0, 1.0, 0.01, 10)
    with pytest.raises(ValueError, match="sigma"):
        get_epsilon_S(1e-5, -1.0, 0.01, 10)
    with pytest.raises(ValueError, match="q"):
        get_delta_R(1.0, 1.0, 1.5, 10)
    with pytest.raises(ValueError, match="ncomp"):
        get_delta_S(1.0, 1.0, 0.01, 0)
    with pytest.raises(ValueError, match="nx"):
        get_epsilon_R(1e-5, 1.0, 0.01, 10, nx=0)
