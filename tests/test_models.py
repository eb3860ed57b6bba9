# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""DPSVI on the model kinds of issue 15: networks (pytree param sites), tuple params, flow
guides and data-free factors outside the data plate."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.example_libraries import stax
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoBNAFNormal, AutoDiagonalNormal, AutoIAFNormal
from numpyro.optim import SGD

from d3p.random import debug
from d3p.svi import DPSVI

N, B, D = 100, 8, 3


def data():
    rng = np.random.default_rng(0)
    return (
        jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
        jnp.asarray(rng.normal(size=B), jnp.float32),
    )


def stax_model(x, y):
    net = numpyro.module("net", stax.serial(stax.Dense(5), stax.Tanh, stax.Dense(1)), (-1, D))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(net(x)[:, 0], 1.0), obs=y)


def tuple_model(x, y):
    w, b = numpyro.param("wb", (jnp.zeros(D), jnp.zeros(())))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w + b, 1.0), obs=y)


def linear_model(x, y):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(D), 1.0).to_event(1))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)


def factor_model(x, y):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(D), 1.0).to_event(1))
    numpyro.factor("ridge", -10 * jnp.sum(w**2))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)


def data_factor_model(x, y):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(D), 1.0).to_event(1))
    numpyro.factor("pooled", -jnp.sum((x @ w) ** 2))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)


def empty_guide(x, y):
    pass


CASES = {
    "stax": lambda: (stax_model, empty_guide),
    "tuple": lambda: (tuple_model, empty_guide),
    "iaf": lambda: (linear_model, AutoIAFNormal(linear_model, num_flows=1, hidden_dims=[4])),
    "bnaf": lambda: (linear_model, AutoBNAFNormal(linear_model, num_flows=1, hidden_factors=[2])),
    "factor": lambda: (factor_model, AutoDiagonalNormal(factor_model)),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_model_kind_trains(kind):
    # these crashed in DPSVI.init before (pytree param sites; factor outside the plate)
    model, guide = CASES[kind]()
    x, y = data()
    dpsvi = DPSVI(model, guide, SGD(1e-3), Trace_ELBO(), 1.0, 1.0, rng_suite=debug)
    state = dpsvi.init(debug.PRNGKey(0), x, y)
    state, loss = jax.jit(dpsvi.update)(state, x, y)
    assert jnp.isfinite(loss)
    leaves = jax.tree.leaves(dpsvi.get_params(state))
    assert leaves and all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves)


def test_factor_reading_the_data_outside_the_plate_is_refused():
    x, y = data()
    guide = AutoDiagonalNormal(data_factor_model)
    dpsvi = DPSVI(data_factor_model, guide, SGD(1e-3), Trace_ELBO(), 1.0, 1.0, rng_suite=debug)
    with pytest.raises(ValueError, match="do not grow with the batch size but read the data"):
        dpsvi.init(debug.PRNGKey(0), x, y)
