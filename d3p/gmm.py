# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""A mixture of diagonal Gaussians as a NumPyro distribution."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from numpyro.distributions import Distribution, constraints

__all__ = ["GaussianMixture"]


class GaussianMixture(Distribution):
    """Mixture of ``k`` Gaussians with diagonal covariance over ``R^d``.

    The density is ``p(x) = sum_j pi_j N(x | locs_j, diag(scales_j ** 2))``.

    Parameters
    ----------
    locs : array_like
        Component means, shape ``(k, d)``.
    scales : array_like
        Component standard deviations (per dimension, > 0), shape ``(k, d)``.
    mixture_probabilities : array_like
        Component weights ``pi``, shape ``(k,)``, on the probability simplex.
    validate_args : bool, optional
        If true, parameter values are checked (positive scales, weights on the
        simplex) and a violation raises ``ValueError``. Shapes are always checked.
    """

    arg_constraints = {
        "locs": constraints.real,
        "scales": constraints.positive,
        "mixture_probabilities": constraints.simplex,
    }
    support = constraints.real_vector
    pytree_data_fields = ("locs", "scales", "mixture_probabilities")

    def __init__(
        self,
        locs: Any,
        scales: Any,
        mixture_probabilities: Any,
        validate_args: bool | None = None,
    ) -> None:
        locs, scales, pis = (jnp.asarray(a) for a in (locs, scales, mixture_probabilities))
        if locs.ndim != 2:
            raise ValueError(f"locs must have shape (k, d), got {locs.shape}")
        if scales.shape != locs.shape:
            raise ValueError(f"scales must have the shape of locs {locs.shape}, got {scales.shape}")
        if pis.shape != locs.shape[:1]:
            raise ValueError(
                f"mixture_probabilities must have shape (k,) = {locs.shape[:1]}, got {pis.shape}"
            )
        self.locs, self.scales, self.mixture_probabilities = locs, scales, pis
        super().__init__(batch_shape=(), event_shape=locs.shape[1:], validate_args=validate_args)

    @property
    def num_components(self) -> int:
        """Number of mixture components ``k``."""
        return self.locs.shape[0]

    def sample_with_intermediates(
        self, key: jax.Array, sample_shape: tuple[int, ...] = ()
    ) -> tuple[jax.Array, list[jax.Array]]:
        """Sample, also returning the component index of each draw.

        Parameters
        ----------
        key : jax.Array
            A :mod:`jax.random` key.
        sample_shape : tuple of int
            Shape of the batch of draws.

        Returns
        -------
        tuple
            ``(x, [z])``: ``x`` of shape ``sample_shape + (d,)`` and ``z``, the
            int component indices, of shape ``sample_shape``.
        """
        sample_shape = tuple(sample_shape)
        key_z, key_x = jax.random.split(key)
        z = jax.random.categorical(key_z, jnp.log(self.mixture_probabilities), shape=sample_shape)
        eps = jax.random.normal(key_x, sample_shape + self.event_shape, dtype=self.locs.dtype)
        return self.locs[z] + self.scales[z] * eps, [z]

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        """Draw samples of shape ``sample_shape + (d,)``."""
        return self.sample_with_intermediates(key, sample_shape)[0]

    def component_log_probs(self, value: Any) -> jax.Array:
        """``log pi_j + log N(value | locs_j, scales_j)`` per component, shape ``(..., k)``."""
        x = jnp.asarray(value)[..., None, :]
        z = (x - self.locs) / self.scales
        log_norm = -0.5 * jnp.log(2 * jnp.pi) - jnp.log(self.scales)
        return jnp.log(self.mixture_probabilities) + jnp.sum(log_norm - 0.5 * z**2, axis=-1)

    def log_prob(self, value: Any) -> jax.Array:
        """Log density at ``value`` (shape ``(..., d)``): stable log-sum-exp over components."""
        return logsumexp(self.component_log_probs(value), axis=-1)

    @property
    def mean(self) -> jax.Array:
        """Mixture mean ``sum_j pi_j locs_j``, shape ``(d,)``."""
        return self.mixture_probabilities @ self.locs

    @property
    def variance(self) -> jax.Array:
        """Per-dimension variance by the law of total variance, shape ``(d,)``.

        ``E[Var[x | z]] + Var[E[x | z]] = sum_j pi_j (scales_j ** 2 + (locs_j - mean) ** 2)``.
        """
        spread = self.scales**2 + (self.locs - self.mean) ** 2
        return self.mixture_probabilities @ spread
