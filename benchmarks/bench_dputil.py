# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Benchmark of d3p.dputil: noise calibration against a plain dp-accounting calibration.

Rows: ``approximate_sigma_remove_relation(1.0, 1e-5, 0.01, T)`` for T = 10^4 and 10^5
(d3p 0.2 with fourier-accountant took about 6 s for each on the 2-core reference
machine), next to ``dp_accounting.calibrate_dp_mechanism`` with a ``PLDAccountant`` at
its default discretisation (1e-4) and default search, in the same run. d3p's PLD cache
is cleared before every timed call, so each call does all of its accounting work.
"""

from __future__ import annotations

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant

from benchmarks._common import format_table, time_call
from d3p import dputil

TARGET_EPS, DELTA, Q = 1.0, 1e-5, 0.01


def _d3p_calibration(num_iter: int, relation: str):
    def call():
        dputil._composed_pld.cache_clear()  # measure the full work, not a cache hit
        return dputil.calibrate_sigma(TARGET_EPS, DELTA, Q, num_iter, relation=relation)

    return call


def _d3p_epsilon(num_iter: int):
    def call():
        dputil._composed_pld.cache_clear()
        return dputil.compute_epsilon(2.0, DELTA, Q, num_iter)

    return call


def _plain_calibration(num_iter: int):
    def make_event(sigma: float) -> dp_accounting.DpEvent:
        step = dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(sigma))
        return dp_accounting.SelfComposedDpEvent(step, num_iter)

    def call():
        return dp_accounting.calibrate_dp_mechanism(
            pld_privacy_accountant.PLDAccountant, make_event, TARGET_EPS, DELTA
        )

    return call


def run(quick: bool) -> list[dict]:
    """Time the calibrations; one row per (relation, number of steps)."""
    repeats = 1 if quick else 5
    rows = []
    for num_iter in (10_000, 100_000):
        plain_call = _plain_calibration(num_iter)
        plain = time_call(plain_call, repeats=1 if quick else 3, warmup=0)
        plain_sigma = plain_call()
        for relation in ("add_remove", "substitute"):
            call = _d3p_calibration(num_iter, relation)
            timing = time_call(call, repeats=repeats, warmup=1)
            sigma, eps, num_evals = call()
            row = {
                "task": f"calibrate sigma ({relation})",
                "num_iter": num_iter,
                "d3p_median_s": timing["median_s"],
                "d3p_sigma": sigma,
                "d3p_eps": eps,
                "accountant_evals": num_evals,
            }
            if relation == "add_remove":
                row.update(
                    plain_dp_accounting_s=plain["median_s"],
                    plain_sigma=plain_sigma,
                    speedup=plain["median_s"] / timing["median_s"],
                )
            rows.append(row)
        compute = time_call(_d3p_epsilon(num_iter), repeats=repeats, warmup=1)
        rows.append(
            {
                "task": "compute_epsilon (sigma=2)",
                "num_iter": num_iter,
                "d3p_median_s": compute["median_s"],
            }
        )
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one repetition per row")
    print(format_table(run(quick=parser.parse_args().quick)))
