# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Noise-aware posteriors: DP-VI's posterior widened by the DP noise in its parameters.

The guide's variance of DP-VI says nothing about the noise that differential privacy
left in the learned variational parameters, so its credible intervals under-cover. DPVIm
(Jälkö, Prediger, Honkela, Kaski, TMLR 2023, arXiv:2210.15961) infers that noise from the
parameter trace and includes it in the posterior: past convergence the iterates fluctuate
around the optimum, and the spread of the trace estimates the spread of the released
parameters around it (its experiments compare the trace's standard deviation with that of
the last iterates of independent runs). The noise-aware posterior then treats the
released variational parameters as uncertain and mixes the guide over them:

    q_NA(theta) = integral of q(theta | xi) p(xi | trace) d xi.

:class:`NoiseAwarePosterior` does this from the statistics of
:mod:`d3p.averaging` (``DPSVI.run(..., average=...)``'s ``iterates``): it draws
unconstrained parameters ``xi`` around the released ones with the estimated noise, and
then ``theta`` from the guide at ``xi``. Noise-aware DP-VI (NA-DPVI; Alrawajfeh, Jälkö,
Honkela, AISTATS 2025, arXiv:2410.19371) infers the noise from a model of the *gradient*
trace (with the Hessian and the optimum as latent quantities); d3p keeps no gradient
trace, so that construction is not implemented here. Its evaluation by coverage of the
true parameters is how ``tests/test_noise_aware.py`` checks this one.

**Privacy.** Post-processing of the private iterates only: it never receives the data.

Example:

.. code-block:: python

    from d3p.noise_aware import NoiseAwarePosterior

    result = dpsvi.run(key, 4000, X, y, q=0.01, delta=1e-5, average=0.5)
    posterior = NoiseAwarePosterior.from_run(dpsvi, result)
    samples = posterior.sample(jax.random.key(0), (1000,))  # {"w": (1000, d), ...}
    lo, hi = jnp.quantile(samples["w"], jnp.array([0.05, 0.95]), axis=0)  # 90 % intervals
    predictions = numpyro.infer.Predictive(model, posterior_samples=samples)(key2, X_new)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from numpyro import handlers
from numpyro.infer.autoguide import AutoGuide

from d3p import _validation, averaging

__all__ = ["NoiseAwarePosterior"]


class NoiseAwarePosterior:
    """The guide's posterior mixed over the DP noise in its variational parameters.

    Sampling draws the unconstrained variational parameters ``xi = centre + scale * t``
    (``t`` Student-t with ``df`` degrees of freedom, independently per coordinate), then
    the latent variables from the guide at ``constrain_fn(xi)``: one parameter draw per
    posterior sample. For a Gaussian guide the marginal of a location coordinate is about
    ``N(centre, guide scale ** 2 + scale ** 2)``.

    ``centre="mean"`` (default): ``centre`` is the window's mean (the averaged
    parameters) and ``scale ** 2`` its batch-means variance
    (:func:`d3p.averaging.variance_of_mean`). ``centre="last"`` (DPVIm's construction
    for the last iterate): ``centre`` is the window's last iterate and ``scale ** 2`` the
    variance of the iterates (:func:`d3p.averaging.variance`). In both, ``df`` is the
    number of blocks less one: the Student-t accounts for estimating the noise from a few
    nearly independent blocks.

    Assumptions (the intervals cover only as far as they hold):

    - the window starts past convergence: the iterates fluctuate around a fixed optimum
      without drift (otherwise the spread overstates and the centre lags);
    - the fluctuation of the iterates is the noise of the released parameters, Gaussian
      and independent between coordinates (no correlations are modelled), and the blocks
      are much longer than the iterates' correlation time. The spread also contains the
      minibatch and Monte Carlo noise of the gradient, not only DP noise;
    - clipping does not bias the optimum (a clipping bias is not noise and is not seen);
    - the guide fits the posterior: the noise is added to what the guide represents, so a
      mean-field guide still misses posterior correlations.

    Parameters
    ----------
    guide : callable
        The guide trained (:attr:`d3p.svi.DPSVI.guide`). A numpyro ``AutoGuide`` samples
        through its ``sample_posterior``; any other guide is run (seeded, with the drawn
        parameters substituted) with ``guide_args`` and ``guide_kwargs``, and its
        unobserved sample sites are returned.
    iterates : d3p.averaging.IterateStats
        The window's statistics (``DPSVI.run(..., average=...).iterates`` or a hand loop's).
        Needs at least 2 complete blocks. An :class:`~d3p.averaging.EMAState` keeps no
        spread and is refused.
    constrain_fn : callable
        Unconstrained to constrained parameters (:attr:`d3p.svi.DPSVI.constrain_fn`).
    centre : {"mean", "last"}
        See above.
    guide_args, guide_kwargs
        Arguments to call the guide with: public values only (never the data).
    """

    def __init__(
        self,
        guide: Callable,
        iterates: averaging.IterateStats,
        constrain_fn: Callable,
        *,
        centre: str = "mean",
        guide_args: tuple = (),
        guide_kwargs: dict | None = None,
    ):
        if not callable(guide):
            raise TypeError(f"guide must be a numpyro guide (callable), got {guide!r}")
        if not isinstance(iterates, averaging.IterateStats):
            raise TypeError(
                "iterates must be d3p.averaging.IterateStats (run with average=fraction); an "
                f"exponential moving average keeps no spread; got {type(iterates).__name__}"
            )
        if not callable(constrain_fn):
            raise TypeError(
                f"constrain_fn must be callable (dpsvi.constrain_fn), got {constrain_fn!r}"
            )
        _validation.choice(centre, "centre", ("mean", "last"))
        num_blocks = int(iterates.num_blocks)
        if num_blocks < 2:
            raise ValueError(
                f"iterates must hold at least 2 complete blocks to estimate the noise, got "
                f"{num_blocks} (a longer window, or a smaller block_size)"
            )
        if centre == "mean":
            self.loc, variance = iterates.mean, averaging.variance_of_mean(iterates)
        else:
            self.loc, variance = iterates.last, averaging.variance(iterates)
        self.scale = jax.tree.map(jnp.sqrt, variance)
        self.df = float(num_blocks - 1)
        self.guide = guide
        self.constrain_fn = constrain_fn
        self.guide_args = tuple(guide_args)
        self.guide_kwargs = dict(guide_kwargs or {})

    @classmethod
    def from_run(cls, dpsvi: Any, result: Any, **options: Any) -> NoiseAwarePosterior:
        """The noise-aware posterior of a :meth:`d3p.svi.DPSVI.run` result with ``average``.

        ``options``: ``centre``, ``guide_args`` and ``guide_kwargs`` (see the class).
        """
        if result.iterates is None:
            raise ValueError(
                "the run kept no iterates: run with average=fraction (e.g. 0.5) to build a "
                "noise-aware posterior"
            )
        return cls(dpsvi.guide, result.iterates, dpsvi.constrain_fn, **options)

    @property
    def params(self) -> dict:
        """The constrained variational parameters at the centre (no noise)."""
        return self.constrain_fn(self.loc)

    def sample(self, rng_key: jax.Array, sample_shape: tuple = ()) -> dict:
        """Draws of the latent variables: ``{site: array of shape sample_shape + site's}``.

        Like ``guide.sample_posterior``; pass the result as ``posterior_samples`` to
        :class:`numpyro.infer.Predictive`. ``rng_key``: a ``jax.random`` key (posterior
        sampling is post-processing: no secure generator needed).
        """
        sample_shape = tuple(sample_shape)
        for size in sample_shape:
            _validation.count(size, "sample_shape's sizes", allow_float=False)
        n = math.prod(sample_shape)
        noise_key, guide_key = jax.random.split(rng_key)
        leaves, treedef = jax.tree.flatten(self.loc)
        keys = jax.random.split(noise_key, len(leaves))
        draws = [
            loc + scale * jax.random.t(key, self.df, (n, *jnp.shape(loc)), jnp.result_type(loc))
            for key, loc, scale in zip(keys, leaves, treedef.flatten_up_to(self.scale), strict=True)
        ]
        xi = treedef.unflatten(draws)
        samples = jax.vmap(self._sample_guide)(jax.random.split(guide_key, n), xi)
        return jax.tree.map(lambda x: x.reshape(sample_shape + x.shape[1:]), samples)

    def _sample_guide(self, key: jax.Array, unconstrained: Any) -> dict:
        params = self.constrain_fn(unconstrained)
        if isinstance(self.guide, AutoGuide):
            return self.guide.sample_posterior(key, params, *self.guide_args, **self.guide_kwargs)
        guide = handlers.seed(handlers.substitute(self.guide, data=params), key)
        trace = handlers.trace(guide).get_trace(*self.guide_args, **self.guide_kwargs)
        return {
            name: site["value"]
            for name, site in trace.items()
            if site["type"] == "sample" and not site["is_observed"]
        }
