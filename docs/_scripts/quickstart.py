# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
# The quickstart of the documentation (docs/quickstart.rst); run it from the repository root.
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal
from numpyro.optim import Adam

import d3p.random
from d3p.dputil import approximate_sigma_remove_relation
from d3p.svi import DPSVI


def model(X, y=None, num_obs_total=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
    with numpyro.plate("batch", num_obs_total, subsample_size=X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)


# Stand-in data: N records with 5 features, one record per individual.
rng = np.random.default_rng(0)
true_w = np.array([1.0, -0.5, 0.0, 0.5, 1.5])
X = rng.normal(size=(10_000, 5)).astype(np.float32)
y = (rng.uniform(size=10_000) < 1 / (1 + np.exp(-X @ true_w))).astype(np.float32)

N, q, num_steps = X.shape[0], 0.01, 2_000  # Poisson sampling probability, number of steps
sigma, eps, _ = approximate_sigma_remove_relation(1.0, 1e-5, q, num_steps)  # ε = 1, δ = 1e-5
guide = AutoDiagonalNormal(model)
dpsvi = DPSVI(
    model,
    guide,
    Adam(1e-2),
    Trace_ELBO(),
    clipping_threshold=2.0,
    dp_scale=sigma,
    num_obs_total=N,
)
# Poisson batches, progress bar; epsilon spent is reported at delta (add/remove relation)
result = dpsvi.run(d3p.random.PRNGKey(0), num_steps, X, y, q=q, delta=1e-5)
print("noise scale", sigma, "epsilon spent", result.epsilon)
print("posterior mean of w", jnp.round(guide.median(result.params)["w"], 2), "true", true_w)
