# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Split a NumPyro model/guide ELBO into per-example (data) and global (data-free) terms.

Used by :class:`d3p.svi.DPSVI`. For a model whose likelihood factorises over the examples
of a minibatch, the single-sample ELBO estimate is::

    ELBO = sum_i [log p(x_i, z_i | z_g) - log q(z_i)]  +  [log p(z_g) - log q(z_g)]
           \\______ per-example (data) terms ______/      \\_ global (data-free) _/

where ``z_g`` are the global latents (one value shared by all examples) and ``z_i`` the local
latents of example ``i``. Only the first part depends on an individual's record, so only it
needs per-example gradients, clipping and noise.

Sites are classified by tracing the model and the guide on a batch of one and a batch of two
examples: a sample site whose value shape changes with the batch size belongs to the data
plate (per-example), every other sample site is global. An observed site outside the plate
(a ``numpyro.factor`` penalty, say) is a global term when its log-density reads no data.
Parameter sites may hold any pytree of arrays (network weights from ``numpyro.module``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Var
from numpyro.handlers import replay, seed, substitute
from numpyro.infer.util import compute_log_probs
from numpyro.primitives import Messenger

__all__ = ["SiteLayout", "classify_sites", "elbo_terms", "global_part", "zero_examples"]


class SiteLayout(NamedTuple):
    """Which sample sites are per-example, and the plate scale of one example.

    Attributes
    ----------
    model_local : frozenset of str
        Model sample sites inside the data plate (observations and local latents).
    guide_local : frozenset of str
        Guide sample sites inside the data plate (local latents).
    observation_scale : float
        The scale (plate weight) of the observed sites when the batch holds one example,
        i.e. the data-set size for a correctly plated model; 1.0 when not scaled.
    global_latents : frozenset of str
        Global latent sites of the model that the guide samples: the data terms depend on
        the guide's global parameters only through their values.
    """

    model_local: frozenset
    guide_local: frozenset
    observation_scale: float
    global_latents: frozenset


class _FoldInExampleIndex(Messenger):
    """Give the listed (per-example) sample sites randomness specific to one example.

    Must wrap a ``seed`` handler: it folds the example index into the key that ``seed``
    assigned, so local latents of different examples are independent while global sites
    keep the key shared by every example.
    """

    def __init__(self, fn: Callable, names: frozenset, index: jax.Array):
        self.names = names
        self.index = index
        super().__init__(fn)

    def process_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or msg["name"] not in self.names:
            return
        key = msg["kwargs"].get("rng_key")
        if key is not None:
            msg["kwargs"]["rng_key"] = jax.random.fold_in(key, self.index)


def zero_examples(args: Sequence[Any], n: int = 1, host: bool = False) -> tuple:
    """A batch of ``n`` all-zero examples shaped like ``args`` (data-free stand-in).

    ``host``: made by NumPy and copied to the device (outside ``jit``: no compilation, which
    a fresh process pays for every eager operation; inside, keep the default, a broadcast
    rather than a constant of the batch's size)."""

    def zeros(shape, dtype):
        return jax.device_put(np.zeros(shape, dtype)) if host else jnp.zeros(shape, dtype)

    return tuple(None if a is None else zeros((n, *a.shape[1:]), a.dtype) for a in args)


def _run_traces(
    model: Callable,
    guide: Callable,
    params: dict,
    rng_key: jax.Array,
    args: tuple,
    kwargs: dict,
    layout: SiteLayout | None,
    index: jax.Array | int,
    global_values: dict | None = None,
) -> tuple[dict, Any, dict, Any]:
    """Trace guide then model (replayed) like numpyro's ``Trace_ELBO`` with one particle.

    ``global_values`` replace the guide's samples at those sites (after ``seed`` drew its
    keys, so the keys of all other sites are unchanged). Returns the per-site scaled
    log-densities and the traces of the model and the guide.
    """
    model_seed, guide_seed = jax.random.split(rng_key)
    guide_fn = seed(guide, guide_seed)
    if layout is not None:
        guide_fn = _FoldInExampleIndex(guide_fn, layout.guide_local, index)
    if global_values is not None:
        guide_fn = substitute(guide_fn, data=global_values)
    guide_lp, guide_trace = compute_log_probs(guide_fn, args, kwargs, params)
    model_fn = replay(seed(model, model_seed), guide_trace)
    if layout is not None:
        model_fn = _FoldInExampleIndex(model_fn, layout.model_local, index)
    model_lp, model_trace = compute_log_probs(model_fn, args, kwargs, params)
    return model_lp, model_trace, guide_lp, guide_trace


def elbo_terms(
    model: Callable,
    guide: Callable,
    params: dict,
    rng_key: jax.Array,
    args: tuple,
    kwargs: dict,
    layout: SiteLayout,
    index: jax.Array | int,
    global_values: dict | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The per-example and the global part of a single-particle ELBO estimate.

    Parameters
    ----------
    params : dict
        Constrained parameter values of the model and the guide.
    rng_key : jax.Array
        Raw JAX key of the particle; global latents are drawn from it unchanged, so every
        example sees the same global sample.
    args : tuple
        Batch arguments holding exactly one example each (leading dimension 1).
    index : int or jax.Array
        Position of the example in the batch, folded into the keys of local latents.
    global_values : dict, optional
        Values for the global latents (see :func:`global_part`) instead of the guide's
        own samples; gradients then flow to these values, not to the guide's parameters.

    Returns
    -------
    data_term, global_term : jax.Array
        ``log p(x_i, z_i | z_g) - log q(z_i)`` (with the sites' scales) and
        ``log p(z_g) - log q(z_g)``.
    """
    model_lp, _, guide_lp, _ = _run_traces(
        model, guide, params, rng_key, args, kwargs, layout, index, global_values
    )
    data_term = jnp.zeros(()) + sum(v for k, v in model_lp.items() if k in layout.model_local)
    data_term = data_term - sum(v for k, v in guide_lp.items() if k in layout.guide_local)
    return data_term, _global_term(model_lp, guide_lp, layout)


def _global_term(model_lp: dict, guide_lp: dict, layout: SiteLayout) -> jax.Array:
    """``log p(z_g) - log q(z_g)``: the sites outside the data plate."""
    term = jnp.zeros(()) + sum(v for k, v in model_lp.items() if k not in layout.model_local)
    return term - sum(v for k, v in guide_lp.items() if k not in layout.guide_local)


def global_part(
    model: Callable,
    guide: Callable,
    params: dict,
    rng_key: jax.Array,
    args: tuple,
    kwargs: dict,
    layout: SiteLayout,
) -> tuple[dict, jax.Array]:
    """The guide's sample of the global latents for particle key ``rng_key``, and the global
    term ``log p(z_g) - log q(z_g)`` at it.

    The sample is drawn exactly as in :func:`elbo_terms` with the same key (reparameterised:
    a differentiable function of ``params``). Pass data-free ``args`` (:func:`zero_examples`).
    """
    model_lp, _, guide_lp, guide_trace = _run_traces(
        model, guide, params, rng_key, args, kwargs, layout, 0
    )
    values = {name: guide_trace[name]["value"] for name in layout.global_latents}
    return values, _global_term(model_lp, guide_lp, layout)


class _Site(NamedTuple):
    """What classification needs to know about one trace site (static, no arrays)."""

    type: str
    shape: tuple  # the shapes of the value's leaves (param sites may hold pytrees)
    is_observed: bool
    scale: Any
    in_plate: bool


def _summarise(tr: dict) -> dict[str, _Site]:
    return {
        name: _Site(
            site["type"],
            tuple(jnp.shape(leaf) for leaf in jax.tree.leaves(site["value"])),
            bool(site.get("is_observed", False)),
            site.get("scale"),
            bool(site.get("cond_indep_stack")),
        )
        for name, site in tr.items()
    }


def _trace_summaries(
    model: Callable,
    guide: Callable,
    params: dict,
    rng_key: jax.Array,
    args: tuple,
    kwargs: dict,
    batch_size: int,
) -> tuple[dict, dict]:
    """Summaries of the model and guide traces for a batch of ``batch_size`` examples.

    Traced abstractly (``jax.eval_shape``): nothing is computed.
    """
    out = {}

    def run(params, rng_key, batch):
        _, model_trace, _, guide_trace = _run_traces(
            model, guide, params, rng_key, batch, kwargs, None, 0
        )
        out["model"], out["guide"] = _summarise(model_trace), _summarise(guide_trace)
        return 0

    batch = tuple(
        None if a is None else jax.ShapeDtypeStruct((batch_size, *a.shape[1:]), a.dtype)
        for a in args
    )
    jax.eval_shape(run, params, rng_key, batch)
    return out["model"], out["guide"]


def _sample_sites(summary: dict) -> dict:
    return {name: site for name, site in summary.items() if site.type == "sample"}


def _check_no_mutable(summary: dict, which: str) -> None:
    mutable = [name for name, site in summary.items() if site.type == "mutable"]
    if mutable:
        raise ValueError(
            f"DPSVI does not support {which}s with mutable state (numpyro.mutable sites "
            f"{mutable}): the state would be updated from private data without noise."
        )


def _local_sites(summary1: dict, summary2: dict, which: str) -> frozenset:
    s1, s2 = _sample_sites(summary1), _sample_sites(summary2)
    if set(s1) != set(s2):
        raise ValueError(
            f"The {which}'s sample sites change with the batch size "
            f"({sorted(set(s1) ^ set(s2))}); DPSVI needs the same sites for every batch."
        )
    return frozenset(n for n in s1 if s1[n].shape != s2[n].shape)


def _as_static_float(scale: Any, name: str) -> float:
    if scale is None:
        return 1.0
    try:
        return float(scale)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError(
            f"The scale of observed site '{name}' must be a static number (a plate size or a "
            f"constant handlers.scale), not a traced or array value."
        ) from None


def _data_dependent(
    model: Callable,
    guide: Callable,
    params: dict,
    rng_key: jax.Array,
    args: tuple,
    kwargs: dict,
    names: Sequence[str],
) -> list[str]:
    """Which of the model sites ``names`` have a log-density that may read the batch ``args``.

    Structural and conservative (from the jaxpr, never from values): every output of an
    equation with a data-dependent input counts as data-dependent.
    """

    def log_probs(params, rng_key, batch):
        model_lp, _, _, _ = _run_traces(model, guide, params, rng_key, batch, kwargs, None, 0)
        return [model_lp[name] for name in names]

    batch = tuple(None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args)
    closed = jax.make_jaxpr(log_probs)(params, rng_key, batch)
    jaxpr = closed.jaxpr
    num_data = len(jax.tree.leaves(batch))
    tainted = set(jaxpr.invars[len(jaxpr.invars) - num_data :])
    for eqn in jaxpr.eqns:
        if any(isinstance(v, Var) and v in tainted for v in eqn.invars):
            tainted.update(eqn.outvars)
    return [
        name
        for name, v in zip(names, jaxpr.outvars, strict=True)
        if isinstance(v, Var) and v in tainted
    ]


def _observation_scale(model_summary: dict, model_local: frozenset, reads_data: Callable) -> float:
    observed = {n: s for n, s in _sample_sites(model_summary).items() if s.is_observed}
    global_obs = sorted(n for n in observed if n not in model_local)
    if global_obs:
        with_data = reads_data(global_obs)
        if with_data:
            raise ValueError(
                f"Observed sites {with_data} do not grow with the batch size but read the "
                "data, so their likelihood does not factorise over examples and cannot be "
                "clipped per example. Put every observation in a plate over the batch "
                "(numpyro.plate('data', N, subsample_size=batch_size)); data-free factors "
                "outside the plate are global terms, like a prior."
            )
        # data-free (e.g. numpyro.factor penalties on global latents): global terms
        observed = {n: s for n, s in observed.items() if n in model_local}
    if not observed:
        raise ValueError("The model has no observed sample site; there is no data to protect.")
    unplated = sorted(n for n, s in observed.items() if not s.in_plate)
    if unplated:
        warnings.warn(
            f"Observed sites {unplated} are not inside a numpyro.plate: the likelihood of a "
            "minibatch is not scaled up to the data-set size, so the prior is over-weighted "
            "(by N / batch size). Use numpyro.plate('data', N, subsample_size=batch_size).",
            UserWarning,
            stacklevel=4,
        )
    scales = {n: _as_static_float(s.scale, n) for n, s in observed.items()}
    if len(set(scales.values())) > 1:
        raise ValueError(
            f"Observed sites have different plate scales {scales}; DPSVI needs one scale "
            "(one example = one individual) to clip unscaled per-example gradients."
        )
    return next(iter(scales.values()))


def classify_sites(
    model: Callable,
    guide: Callable,
    params: dict,
    rng_key: jax.Array,
    args: tuple,
    kwargs: dict,
) -> SiteLayout:
    """Classify the sample sites of ``model`` and ``guide`` and validate the model for DPSVI.

    Parameters
    ----------
    params : dict
        Constrained parameter values (as after ``init``).
    rng_key : jax.Array
        Raw JAX key used for the two (abstract) tracing runs.
    args : tuple
        A batch (leading dimension >= 1) of the positional data arguments; only shapes
        and dtypes are used.
    kwargs : dict
        Keyword arguments of model and guide (not per-example).

    Returns
    -------
    SiteLayout

    Raises
    ------
    ValueError
        Mutable state, no observed site in the data plate, observed sites outside the data
        plate that read the data, observed sites with different scales, or sites that
        appear only for some batch sizes.
    """
    model1, guide1 = _trace_summaries(model, guide, params, rng_key, args, kwargs, 1)
    model2, guide2 = _trace_summaries(model, guide, params, rng_key, args, kwargs, 2)
    _check_no_mutable(model1, "model")
    _check_no_mutable(guide1, "guide")
    model_local = _local_sites(model1, model2, "model")
    guide_local = _local_sites(guide1, guide2, "guide")
    global_latents = frozenset(
        name
        for name, site in _sample_sites(model1).items()
        if not site.is_observed and name not in model_local and name in _sample_sites(guide1)
    )
    scale = _observation_scale(
        model1,
        model_local,
        lambda names: _data_dependent(model, guide, params, rng_key, args, kwargs, names),
    )
    return SiteLayout(model_local, guide_local, scale, global_latents)
