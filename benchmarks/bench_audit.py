# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Benchmark of d3p.audit: eps_lb of one-run audits against the epsilon d3p reports.

Rows: for a reported epsilon of 1, 4 and 8 at delta = 1e-5 (the noise multiplier
calibrated by :meth:`d3p.plan.PrivacyPlan.calibrate` for Poisson sampling at q = 0.5, 20
steps, C = 1) and m = 1000 and 10000 canaries (plus m / 10 ordinary records), the lower
bound eps_lb at 95 % confidence of a gradient-canary audit and of an input-canary audit
(``num_guesses="auto"``), and the wall time of each audit (training and scoring, compile
included). The input canaries are black-box: records of a logistic regression with a
categorical feature, each canary the only record of its own category, scored by how much
more likely the trained posterior makes the canary's label than the initial one (the guide
starts at the prior's centre, ``init_to_feasible``).
``--quick``: m = 200 and reported epsilon 4 only.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import init_to_feasible
from numpyro.infer.autoguide import AutoDiagonalNormal
from numpyro.optim import Adam

from d3p.audit import audit_dpsvi
from d3p.plan import PrivacyPlan

DELTA, Q, STEPS, C = 1e-5, 0.5, 20, 1.0
NUM_FEATURES = 5


def logistic_model(x, category, y, num_categories=1, num_obs_total=None):
    """Logistic regression on features ``x`` plus one weight per category."""
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    u = numpyro.sample("u", dist.Normal(0.0, 1.0).expand([num_categories]).to_event(1))
    with numpyro.plate("data", num_obs_total, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=x @ w + u[category]), obs=y)


def _input_data(m: int, seed: int = 0) -> tuple[tuple, tuple]:
    """Ordinary records (category 0) and m canaries (category i + 1, no features, y = 1)."""
    rng = np.random.default_rng(seed)
    n = m // 10
    x = rng.normal(size=(n, NUM_FEATURES)).astype(np.float32)
    w = rng.normal(size=NUM_FEATURES)
    y = (rng.random(n) < 1 / (1 + np.exp(-x @ w))).astype(np.float32)
    data = (x, np.zeros(n, np.int32), y)
    canaries = (
        np.zeros((m, NUM_FEATURES), np.float32),
        np.arange(1, m + 1, dtype=np.int32),
        np.ones(m, np.float32),
    )
    return data, canaries


def _audit_row(epsilon: float, m: int) -> dict:
    plan = PrivacyPlan.calibrate(
        epsilon,
        DELTA,
        sampling="poisson",
        q=Q,
        dataset_size=m + m // 10,
        clipping_threshold=C,
        num_steps=STEPS,
    )
    gradient = audit_dpsvi(plan, m, delta=DELTA, seed=0)
    data, canaries = _input_data(m)
    # start every weight at the prior's centre: with Adam a random start moves the excluded
    # canaries' weights too (towards the prior), which drowns their signal
    guide = AutoDiagonalNormal(logistic_model, init_loc_fn=init_to_feasible)
    inputs = audit_dpsvi(
        plan,
        m,
        kind="input",
        model=logistic_model,
        guide=guide,
        data=data,
        canaries=canaries,
        optim=Adam(0.05),
        delta=DELTA,
        seed=0,
        num_categories=m + 1,
    )
    return {
        "reported eps": round(gradient.epsilon, 3),
        "m": m,
        "sigma": round(plan.noise_multiplier, 3),
        "eps_lb gradient": round(gradient.epsilon_lower_bound, 3),
        "correct (gradient)": f"{gradient.num_correct}/{gradient.num_guesses}",
        "s gradient": round(gradient.seconds, 1),
        "eps_lb input": round(inputs.epsilon_lower_bound, 3),
        "correct (input)": f"{inputs.num_correct}/{inputs.num_guesses}",
        "s input": round(inputs.seconds, 1),
    }


def run(quick: bool) -> list[dict]:
    """One row per (reported epsilon, number of canaries)."""
    grid = [(4.0, 200)] if quick else [(e, m) for m in (1000, 10_000) for e in (1.0, 4.0, 8.0)]
    jnp.zeros(()).block_until_ready()  # start JAX before the first timed audit
    return [_audit_row(epsilon, m) for epsilon, m in grid]
