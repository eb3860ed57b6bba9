# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Tests of d3p.dputil: accounting, noise calibration, DpEvents, command line."""

import json
import math
import subprocess
import sys
import warnings

import dp_accounting
import pytest
from conftest import DATA_DIR
from dp_accounting.pld import pld_privacy_accountant, privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

from d3p import dputil

# Source: fourier-accountant 0.12.11, copied from /work/shared/reference (see the file).
REFERENCE = json.loads((DATA_DIR / "accountant_reference.json").read_text())["rows"]
RELATION_KEYS = {"add_remove": "epsilon_add_remove", "substitute": "epsilon_substitute"}


@pytest.fixture(autouse=True)
def fresh_cache():
    """Every test computes its PLDs itself (no result carried over from another test)."""
    dputil._composed_pld.cache_clear()
    yield


@pytest.mark.parametrize("relation", dputil.RELATIONS)
@pytest.mark.parametrize(
    "row", REFERENCE, ids=lambda r: f"s{r['sigma']}-q{r['q']}-T{r['num_iter']}"
)
def test_pld_matches_fourier_accountant(row, relation):
    eps = dputil.compute_epsilon(
        row["sigma"], row["delta"], row["q"], row["num_iter"], relation=relation
    )
    expected = row[RELATION_KEYS[relation]]
    # the acceptance bound: 1% relative or 0.01 absolute
    assert abs(eps - expected) <= max(0.01 * expected, 0.01)
    # pessimistic discretisation: never below the (tight) fourier-accountant value by more
    # than that accountant's own numerical error (its L=40, nx=2e6 grid: ~1e-4 relative)
    assert eps >= expected * (1 - 1e-4)


@pytest.mark.parametrize("row", REFERENCE[:3], ids=lambda r: f"s{r['sigma']}-T{r['num_iter']}")
def test_rdp_is_looser_than_pld(row):
    args = (row["sigma"], row["delta"], row["q"], row["num_iter"])
    rdp = dputil.compute_epsilon(*args, accountant="rdp")
    pld = dputil.compute_epsilon(*args, accountant="pld")
    assert rdp >= pld


def test_pld_epsilon_is_an_upper_bound():
    # dp-accounting's optimistic estimate on a 10x finer grid is a lower bound on the true
    # epsilon; d3p's reported value must lie above it, and above the fine pessimistic one.
    sigma, q, num_iter, delta = 1.0, 0.01, 1000, 1e-5
    eps = dputil.compute_epsilon(sigma, delta, q, num_iter)
    fine = dputil.pld_discretization(sigma, q) / 10
    bounds = [
        privacy_loss_distribution.from_gaussian_mechanism(
            sigma,
            value_discretization_interval=fine,
            sampling_prob=q,
            pessimistic_estimate=pessimistic,
        )
        .self_compose(num_iter)
        .get_epsilon_for_delta(delta)
        for pessimistic in (False, True)
    ]
    optimistic, pessimistic = bounds
    assert optimistic < pessimistic <= eps
    # and it is accurate: within 0.2% of the fine pessimistic value
    assert eps <= pessimistic * 1.002


def test_event_agrees_with_plain_pld_accountant():
    # The DpEvent handed to dp-accounting's own PLDAccountant (d3p's discretisation)
    # gives d3p's epsilon: d3p only composes in stages, which changes nothing but the
    # 1e-15 tail truncation and the FFT rounding (measured: 4e-9 relative).
    sigma, q, num_iter, delta = 1.3, 0.02, 300, 1e-6
    event = dputil.training_dp_event(sigma, q, num_iter)
    assert event == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), num_iter
    )
    for relation, neighbors in (
        ("add_remove", dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE),
        ("substitute", dp_accounting.NeighboringRelation.REPLACE_ONE),
    ):
        accountant = pld_privacy_accountant.PLDAccountant(
            neighbors, value_discretization_interval=dputil.pld_discretization(sigma, q)
        )
        expected = accountant.compose(event).get_epsilon(delta)
        eps = dputil.compute_epsilon(sigma, delta, q, num_iter, relation=relation)
        assert eps == pytest.approx(expected, rel=1e-7)


def test_fixed_size_and_truncated_events():
    n, batch, sigma, num_iter, delta = 10_000, 100, 1.5, 500, 1e-5
    q = batch / n
    event = dputil.training_dp_event(sigma, q, num_iter, "fixed_size", dataset_size=n)
    assert event.event == dp_accounting.SampledWithoutReplacementDpEvent(
        n, batch, dp_accounting.GaussianDpEvent(sigma)
    )
    rdp = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    expected = rdp.compose(event).get_epsilon(delta)
    eps = dputil.compute_epsilon(
        sigma,
        delta,
        q,
        num_iter,
        relation="substitute",
        accountant="rdp",
        sampling="fixed_size",
        dataset_size=n,
    )
    assert eps == pytest.approx(expected, rel=1e-12)

    truncated = dputil.training_dp_event(
        sigma, q, num_iter, "truncated_poisson", dataset_size=n, max_batch_size=150
    )
    assert truncated.event == dp_accounting.TruncatedSubsampledGaussianDpEvent(n, q, 150, sigma)
    kwargs = dict(sampling="truncated_poisson", dataset_size=n)
    poisson = dputil.compute_epsilon(sigma, delta, q, num_iter)
    # 150 is 5 standard deviations above the mean batch size 100: truncation barely matters
    loose = dputil.compute_epsilon(sigma, delta, q, num_iter, max_batch_size=150, **kwargs)
    assert loose == pytest.approx(poisson, rel=0.02)
    # truncating at the mean batch size happens in about half of the steps, which
    # dp-accounting's analysis (arXiv:2508.15089) charges: the truncation size reaches it
    tight = dputil.compute_epsilon(sigma, delta, q, num_iter, max_batch_size=100, **kwargs)
    assert tight > 1.5 * loose


def test_rdp_replace_one_poisson_is_refused():
    with pytest.raises(ValueError, match="relation='substitute'"):
        dputil.compute_epsilon(1.0, 1e-5, 0.01, 100, relation="substitute", accountant="rdp")
    with pytest.raises(ValueError, match="accountant='pld'"):
        dputil.compute_epsilon(1.0, 1e-5, 0.01, 100, sampling="fixed_size", dataset_size=100)


def test_num_iter_float_rounds_up():
    args = (1.0, 1e-5, 0.01)
    at_1000 = dputil.compute_epsilon(*args, 1000)
    assert dputil.compute_epsilon(*args, 999.01) == at_1000
    assert dputil.compute_epsilon(*args, 999) < at_1000
    assert dputil.training_dp_event(1.0, 0.01, 3.0 / 0.01 + 1e-9).count == 301


def test_delta_and_epsilon_are_inverse():
    sigma, q, num_iter, delta = 2.0, 0.01, 2000, 1e-5
    for accountant in dputil.ACCOUNTANTS:
        eps = dputil.compute_epsilon(sigma, delta, q, num_iter, accountant=accountant)
        back = dputil.compute_delta(sigma, eps, q, num_iter, accountant=accountant)
        assert back == pytest.approx(delta, rel=1e-3)
        # delta decreases in epsilon
        assert dputil.compute_delta(sigma, 1.1 * eps, q, num_iter, accountant=accountant) < back


# ε from 0.1 to 10, q from 1e-4 to 0.5, T from 10 to 10^6. Chosen to cover each end of
# every range while keeping the file fast: settings that need both q <= 1e-3 and a small
# sigma (below ~0.5, e.g. eps=0.1, q=1e-4, T=10) take seconds per accountant evaluation
# (up to ~10 s per calibration) and are not part of this file.
ROUND_TRIP = [
    (0.1, 1e-4, 1_000_000, "add_remove"),
    (10.0, 1e-4, 10, "add_remove"),
    (0.1, 0.5, 10, "add_remove"),
    (10.0, 0.5, 10, "add_remove"),
    (10.0, 0.5, 1_000_000, "add_remove"),
    (0.5, 1e-3, 100_000, "add_remove"),
    (1.0, 0.01, 10_000, "add_remove"),
    (4.0, 0.2, 100, "add_remove"),
    (0.3, 0.5, 1000, "add_remove"),
    (1.0, 0.01, 10_000, "substitute"),
    (3.0, 0.05, 500, "substitute"),
]


@pytest.mark.parametrize("target, q, num_iter, relation", ROUND_TRIP)
def test_round_trip(target, q, num_iter, relation):
    delta, tol = 1e-5, 1e-4
    calibrate = (
        dputil.approximate_sigma_remove_relation
        if relation == "add_remove"
        else dputil.approximate_sigma
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # must converge within the default maxeval
        sigma, eps, num_evals = calibrate(target, delta, q, num_iter)
    assert 1 <= num_evals <= 10
    assert abs(eps - target) <= tol
    dputil._composed_pld.cache_clear()  # recompute from scratch
    assert dputil.compute_epsilon(sigma, delta, q, num_iter, relation=relation) == eps


@pytest.mark.parametrize("target, q, num_iter", [(1.0, 0.01, 10_000), (2.0, 0.1, 200)])
def test_force_smaller(target, q, num_iter):
    tol = 1e-3
    sigma, eps, _ = dputil.approximate_sigma_remove_relation(
        target, 1e-5, q, num_iter, tol=tol, force_smaller=True
    )
    assert target - tol <= eps <= target


def test_rdp_calibration():
    sigma, eps, _ = dputil.calibrate_sigma(1.0, 1e-5, 0.01, 1000, accountant="rdp")
    assert abs(eps - 1.0) <= 1e-4
    assert dputil.compute_epsilon(sigma, 1e-5, 0.01, 1000, accountant="rdp") == eps
    # RDP is looser, so it needs more noise than PLD for the same target
    assert sigma > dputil.approximate_sigma_remove_relation(1.0, 1e-5, 0.01, 1000)[0]


@pytest.fixture
def counted(monkeypatch):
    """Count the accountant evaluations made by dputil."""
    calls = []
    original = dputil._epsilon

    def counting(setting, delta):
        calls.append(setting.sigma)
        return original(setting, delta)

    monkeypatch.setattr(dputil, "_epsilon", counting)
    return calls


def test_maxeval_counts_every_evaluation(counted):
    _, _, num_evals = dputil.approximate_sigma_remove_relation(1.0, 1e-5, 0.01, 10_000)
    assert num_evals == len(counted)
    counted.clear()
    # a tolerance the search cannot reach in 2 evaluations: best sigma found, with a warning
    with pytest.warns(RuntimeWarning, match="maxeval=2"):
        sigma, eps, num_evals = dputil.approximate_sigma_remove_relation(
            1.0, 1e-5, 0.01, 10_000, tol=1e-12, maxeval=2
        )
    assert num_evals == 2 == len(counted)
    assert sigma in counted
    assert eps == dputil.compute_epsilon(sigma, 1e-5, 0.01, 10_000)


def test_maxeval_force_smaller(counted):
    # The first guess (central-limit approximation) of this setting lies below the needed
    # sigma, i.e. its epsilon is above the target; nothing valid after 1 evaluation.
    first = dputil._initial_sigma(1.0, 1e-5, 0.05, 100, "add_remove")
    assert dputil.compute_epsilon(first, 1e-5, 0.05, 100) > 1.0
    counted.clear()
    with pytest.raises(RuntimeError, match="maxeval=1"):
        dputil.approximate_sigma_remove_relation(
            1.0, 1e-5, 0.05, 100, force_smaller=True, maxeval=1
        )
    assert len(counted) == 1
    # with room to search, the best valid sigma is returned even if tol is unreachable
    with pytest.warns(RuntimeWarning):
        sigma, eps, num_evals = dputil.approximate_sigma_remove_relation(
            1.0, 1e-5, 0.05, 100, tol=1e-12, force_smaller=True, maxeval=4
        )
    assert eps <= 1.0 and num_evals == 4
    valid = [dputil.compute_epsilon(s, 1e-5, 0.05, 100) for s in list(counted)]
    assert eps == min((e for e in valid if e <= 1.0), key=lambda e: 1.0 - e)


GOOD = dict(target_eps=1.0, delta=1e-5, q=0.01, num_iter=100)
BAD_CALIBRATION = [
    ("target_eps", 0.0),
    ("target_eps", -1.0),
    ("delta", 0.0),
    ("delta", 1.0),
    ("q", 0.0),
    ("q", 1.5),
    ("num_iter", 0.5),
    ("num_iter", math.nan),
    ("tol", 0.0),
    ("maxeval", 0),
    ("maxeval", 2.5),
]


@pytest.fixture
def no_accounting(monkeypatch):
    """Fail the test if any accounting work starts."""

    def forbidden(*args, **kwargs):
        raise AssertionError("accounting work started before the arguments were checked")

    monkeypatch.setattr(dputil, "_epsilon", forbidden)
    monkeypatch.setattr(dputil, "_composed_pld", forbidden)
    monkeypatch.setattr(dputil, "_rdp_accountant", forbidden)


@pytest.mark.parametrize("name, value", BAD_CALIBRATION)
def test_bad_calibration_input(no_accounting, name, value):
    for calibrate in (dputil.approximate_sigma, dputil.approximate_sigma_remove_relation):
        with pytest.raises(ValueError, match=name):
            calibrate(**{**GOOD, name: value})


BAD_ACCOUNTING = [
    ("sigma", 0.0),
    ("sigma", -1.0),
    ("sigma", math.inf),
    ("delta", 0.0),
    ("delta", 1.5),
    ("q", 0.0),
    ("q", 1.01),
    ("num_iter", 0),
    ("relation", "remove"),
    ("accountant", "fourier"),
    ("sampling", "shuffle"),
]


@pytest.mark.parametrize("name, value", BAD_ACCOUNTING)
def test_bad_accounting_input(no_accounting, name, value):
    good = dict(sigma=1.0, delta=1e-5, q=0.01, num_iter=100)
    with pytest.raises(ValueError, match=name):
        dputil.compute_epsilon(**{**good, name: value})
    if name != "delta":
        good_delta = dict(sigma=1.0, epsilon=1.0, q=0.01, num_iter=100)
        with pytest.raises(ValueError, match=name):
            dputil.compute_delta(**{**good_delta, name: value})


def test_bad_input_messages_name_the_range(no_accounting):
    with pytest.raises(ValueError, match=r"q must be in \(0, 1\]"):
        dputil.compute_epsilon(1.0, 1e-5, 2.0, 100)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        dputil.approximate_sigma(1.0, 1.0, 0.01, 100)
    with pytest.raises(ValueError, match="epsilon"):
        dputil.compute_delta(1.0, -0.5, 0.01, 100)
    with pytest.raises(ValueError, match="dataset_size is required"):
        dputil.training_dp_event(1.0, 0.01, 100, "truncated_poisson")
    with pytest.raises(ValueError, match="max_batch_size"):
        dputil.training_dp_event(1.0, 0.01, 100, "truncated_poisson", dataset_size=100)
    with pytest.raises(TypeError, match="sigma"):
        dputil.compute_epsilon("1.0", 1e-5, 0.01, 100)


def test_cli_in_process_rejects_bad_input(capsys):
    with pytest.raises(SystemExit) as exit_info:
        dputil.main(["epsilon", "--sigma", "1", "--delta", "1e-5", "--q", "2", "--num-iter", "10"])
    assert exit_info.value.code == 2
    assert "q must be in (0, 1]" in capsys.readouterr().err


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "d3p.dputil", *args], capture_output=True, text=True, check=True
    ).stdout


def _field(output, name):
    line = next(line for line in output.splitlines() if line.startswith(name + ":"))
    return line.split(":", 1)[1].strip()


def test_cli_sigma():
    out = _cli("sigma", "--epsilon", "1", "--delta", "1e-5", "--q", "0.01", "--num-iter", "10000")
    sigma, eps, _ = dputil.approximate_sigma_remove_relation(1.0, 1e-5, 0.01, 10_000)
    assert float(_field(out, "sigma")) == pytest.approx(sigma, rel=1e-5)
    assert float(_field(out, "epsilon")) == pytest.approx(eps, rel=1e-5)
    assert _field(out, "steps") == "10000"
    assert _field(out, "relation").startswith("add_remove")
    assert _field(out, "accountant").startswith("pld")


def test_cli_epsilon():
    out = _cli(
        "epsilon",
        "--sigma",
        "1.2",
        "--delta",
        "1e-5",
        "--q",
        "0.01",
        "--num-iter",
        "999.5",
        "--relation",
        "substitute",
    )
    eps = dputil.compute_epsilon(1.2, 1e-5, 0.01, 1000, relation="substitute")
    assert float(_field(out, "epsilon")) == pytest.approx(eps, rel=1e-5)
    assert _field(out, "steps") == "1000"
    assert _field(out, "relation").startswith("substitute")
