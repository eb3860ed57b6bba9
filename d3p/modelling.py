# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Sampling from NumPyro models and guides: prior and posterior predictive draws.

Keys here are plain :mod:`jax.random` keys (these draws are released outputs of
an already private model, not privacy noise); get one from a d3p key with
:func:`d3p.random.convert_to_jax_rng_key`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from numpyro.handlers import condition, seed, substitute, trace

from d3p import _validation
from d3p.util import unvectorize_shape_2d

__all__ = [
    "get_samples_from_trace",
    "sample_prior_predictive",
    "sample_posterior_predictive",
    "sample_multi_prior_predictive",
    "sample_multi_posterior_predictive",
    "make_observed_model",
    "map_args_obs_to_shape",
]

#: Default number of draws vectorised at once by the ``sample_multi_*`` functions.
DEFAULT_CHUNK_SIZE = 1024


def get_samples_from_trace(trace: dict, with_intermediates: bool = False) -> dict[str, Any]:
    """Collect the values of all sample sites of a NumPyro trace.

    Parameters
    ----------
    trace : dict
        A trace from ``numpyro.handlers.trace(fn).get_trace(...)``.
    with_intermediates : bool
        If true, also return each site's intermediates (as produced by the
        distribution's ``sample_with_intermediates``; empty for substituted or
        observed sites).

    Returns
    -------
    dict
        ``{site: value}``, or ``{site: (value, intermediates)}`` if
        ``with_intermediates``.
    """
    return {
        name: (site["value"], site["intermediates"]) if with_intermediates else site["value"]
        for name, site in trace.items()
        if site["type"] == "sample"
    }


def _run(rng_key: jax.Array, fn: Callable, fixed: dict, args: tuple, kwargs: dict) -> dict:
    return trace(seed(substitute(fn, data=fixed), rng_key)).get_trace(*args, **kwargs)


def sample_prior_predictive(
    rng_key: jax.Array,
    model: Callable,
    model_args: tuple,
    substitutes: dict | None = None,
    with_intermediates: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Draw one joint sample of all sites of ``model``.

    Parameters
    ----------
    rng_key : jax.Array
        A :mod:`jax.random` key.
    model : callable
        NumPyro model.
    model_args : tuple
        Positional arguments of ``model``.
    substitutes : dict, optional
        ``{site: value}`` fixing these sites instead of sampling them.
    with_intermediates : bool
        Return ``{site: (value, intermediates)}`` instead of ``{site: value}``.
    **kwargs
        Keyword arguments of ``model``.

    Returns
    -------
    dict
        The sampled (and substituted) site values.
    """
    tr = _run(rng_key, model, substitutes or {}, tuple(model_args), kwargs)
    return get_samples_from_trace(tr, with_intermediates)


def sample_posterior_predictive(
    rng_key: jax.Array,
    model: Callable,
    model_args: tuple,
    guide: Callable,
    guide_args: tuple,
    params: dict,
    with_intermediates: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Draw the latent sites from ``guide`` and then the remaining sites of ``model`` given them.

    Parameters
    ----------
    rng_key : jax.Array
        A :mod:`jax.random` key.
    model : callable
        NumPyro model.
    model_args : tuple
        Positional arguments of ``model``.
    guide : callable
        NumPyro guide (variational posterior) for ``model``.
    guide_args : tuple
        Positional arguments of ``guide``.
    params : dict
        Values for the ``param`` sites of the guide (and model), e.g.
        ``DPSVI.get_params(state)``.
    with_intermediates : bool
        Return ``{site: (value, intermediates)}`` instead of ``{site: value}``.
    **kwargs
        Keyword arguments of both ``model`` and ``guide``.

    Returns
    -------
    dict
        The model's sites together with the guide's (for sites present in
        both, the guide sample, which the model was run with).
    """
    model_key, guide_key = jax.random.split(rng_key)
    guide_trace = _run(guide_key, guide, params, tuple(guide_args), kwargs)
    latents = get_samples_from_trace(guide_trace, with_intermediates=False)
    model_trace = _run(model_key, model, {**params, **latents}, tuple(model_args), kwargs)
    # guide entries last: same values for shared sites, but they carry the intermediates
    samples = get_samples_from_trace(model_trace, with_intermediates)
    samples.update(get_samples_from_trace(guide_trace, with_intermediates))
    return samples


def _sample_many(
    rng_key: jax.Array, n: int, chunk_size: int, draw: Callable[[jax.Array], dict]
) -> dict:
    """``n`` draws stacked on a leading axis; at most ``chunk_size`` are vmapped at a time."""
    n = _validation.count(n, "n", allow_float=False)
    chunk_size = _validation.count(chunk_size, "chunk_size", allow_float=False)
    keys = jax.random.split(rng_key, n)
    return jax.lax.map(draw, keys, batch_size=min(n, chunk_size))


def sample_multi_prior_predictive(
    rng_key: jax.Array,
    n: int,
    model: Callable,
    model_args: tuple,
    substitutes: dict | None = None,
    with_intermediates: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **kwargs: Any,
) -> dict[str, Any]:
    """Draw ``n`` independent prior predictive samples (see :func:`sample_prior_predictive`).

    Parameters
    ----------
    rng_key : jax.Array
        A :mod:`jax.random` key.
    n : int
        Number of draws, ``n >= 1`` (static).
    model, model_args, substitutes, with_intermediates, **kwargs
        As in :func:`sample_prior_predictive`.
    chunk_size : int
        At most this many draws are vectorised at once (bounds the memory; the
        chunks run sequentially under :func:`jax.lax.map`).

    Returns
    -------
    dict
        As :func:`sample_prior_predictive`, each value with a new leading axis of size ``n``.
    """

    def draw(key: jax.Array) -> dict:
        return sample_prior_predictive(
            key, model, model_args, substitutes, with_intermediates, **kwargs
        )

    return _sample_many(rng_key, n, chunk_size, draw)


def sample_multi_posterior_predictive(
    rng_key: jax.Array,
    n: int,
    model: Callable,
    model_args: tuple,
    guide: Callable,
    guide_args: tuple,
    params: dict,
    with_intermediates: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **kwargs: Any,
) -> dict[str, Any]:
    """Draw ``n`` independent posterior predictive samples.

    See :func:`sample_posterior_predictive`.

    Parameters
    ----------
    rng_key : jax.Array
        A :mod:`jax.random` key.
    n : int
        Number of draws, ``n >= 1`` (static).
    model, model_args, guide, guide_args, params, with_intermediates, **kwargs
        As in :func:`sample_posterior_predictive`.
    chunk_size : int
        At most this many draws are vectorised at once (bounds the memory).

    Returns
    -------
    dict
        As :func:`sample_posterior_predictive`, each value with a new leading axis of size ``n``.
    """

    def draw(key: jax.Array) -> dict:
        return sample_posterior_predictive(
            key, model, model_args, guide, guide_args, params, with_intermediates, **kwargs
        )

    return _sample_many(rng_key, n, chunk_size, draw)


def make_observed_model(
    model: Callable, obs_to_model_args_fn: Callable[..., tuple[tuple, dict, dict]]
) -> Callable:
    """Turn a generative model into one that takes the observations as first argument.

    Parameters
    ----------
    model : callable
        NumPyro model that samples its data sites (no ``obs=`` needed).
    obs_to_model_args_fn : callable
        ``(obs, *args, **kwargs) -> (model_args, model_kwargs, observations)``;
        ``observations`` is ``{site: value}`` for the sites to condition on.
        See :func:`map_args_obs_to_shape`.

    Returns
    -------
    callable
        ``observed_model(obs, *args, **kwargs)``: runs ``model`` with the
        sites in ``observations`` conditioned (marked observed) on their values,
        as needed for the likelihood in (DP)SVI.
    """

    def observed_model(obs: Any, *args: Any, **kwargs: Any) -> Any:
        model_args, model_kwargs, observations = obs_to_model_args_fn(obs, *args, **kwargs)
        return condition(model, data=observations)(*model_args, **model_kwargs)

    return observed_model


def map_args_obs_to_shape(obs: Any, *args: Any, **kwargs: Any) -> tuple[tuple, dict, dict]:
    """Default ``obs_to_model_args_fn`` for :func:`make_observed_model`.

    Parameters
    ----------
    obs : array_like
        Observations, shape ``(N, d)`` (or ``(d,)`` for one example inside the
        per-example ``vmap`` of DPSVI).
    *args, **kwargs
        Further model arguments, passed through.

    Returns
    -------
    tuple
        ``((shape, *args), kwargs, {"obs": obs})`` with ``shape`` the 2-d shape
        of ``obs`` (:func:`d3p.util.unvectorize_shape_2d`): the model is called
        as ``model(shape, *args, **kwargs)`` and its site ``"obs"`` is conditioned on ``obs``.
    """
    return (unvectorize_shape_2d(obs), *args), kwargs, {"obs": obs}
