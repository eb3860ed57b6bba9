# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Aligned gradients for Gaussian guides of the global latents (DPSVI's
``aligned_gradients``).

DPVIm (Jälkö, Prediger, Honkela & Kaski, "DPVIm: Differentially private variational
inference improved", TMLR 2023, arXiv:2210.15961) links the gradients of a reparameterised
Gaussian guide ``z = loc + scale * eta``: the data gradient with respect to the scale is the
one with respect to the location times ``eta`` (times the derivative of the scale's
parametrisation). Clipped together and noised alike, the small scale gradients drown in
the noise (poor convergence, high variance). Their *aligned* gradients privatise the
location gradients only and derive the scale update from them, so the covariance is
updated "without a privacy cost" (post-processing).

In d3p's split ELBO every example's data term depends on the parameters directly
(``d_params_i``) and through the step's one shared sample ``v = g(params)`` of the global
latents (``d_v_i``). For a guide whose every sample entry depends on exactly one location
entry (``v_j = T_j(loc_k + s(rho_k) eta_j)`` with elementwise ``T``), example ``i``'s
location gradient is ``t * d_v_i`` with ``t = J_g 1_loc`` (``T'(z)``, one entry per sample
entry), and

* the released vector is ``R = (sum_i w_i d_params_i, t * sum_i w_i d_v_i) + N(0, (sigma
  C)^2 I)`` over the parameters the data terms read directly (never those of ``g``: they
  are refused) and one coordinate per location entry, with ``w_i`` clipping each
  example's vector ``(d_params_i, t * d_v_i)`` to norm ``C``: the Gaussian mechanism of
  :mod:`d3p._mechanism` on fewer coordinates, same sensitivity and noise;
* the gradient is ``R_params + J_g^T (R_loc / t)``: the location receives exactly its
  released coordinate, the scale ``R_loc * eta * s'(rho)`` (DPVIm's derived scale
  gradient), both from ``R`` alone (post-processing).

The clipped sum is computed by :func:`d3p._clipping.clipped_sum` itself, on the released
coordinates: the global sample's linear map is replaced by ``diag(t)`` on them, so its
weighted path (norms with weights ``t^2``), its exact fallback and its safety nets apply
unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal, AutoNormal

from d3p._clipping import GlobalSample, weighted_global_clipping
from d3p._ghost import _index_maps, _Unsupported, coordinatewise_support

__all__ = ["AlignedStep", "aligned_step", "option"]

_AUTO_GUIDES = (AutoNormal, AutoDiagonalNormal)


def _refusal(reason: str) -> ValueError:
    return ValueError(f"aligned_gradients: {reason}")


def _check_loss(loss: Any) -> None:
    """Refuse losses without one shared sample of the global latents per step."""
    if type(loss) is not Trace_ELBO or loss.multi_sample_guide:
        raise _refusal(
            "needs per_example_loss=Trace_ELBO() (the split ELBO, whose one shared sample "
            f"of the global latents the location gradients are taken at), got {loss!r}"
        )
    if loss.num_particles != 1:
        raise _refusal(
            f"needs num_particles=1, got {loss.num_particles}: with several particles the "
            "scale gradient is not a function of the location gradient"
        )


def option(value: Any, guide: Any, loss: Any) -> bool | tuple[str, ...]:
    """``aligned_gradients`` of :class:`~d3p.svi.DPSVI` checked as far as the guide and
    loss allow before :meth:`~d3p.svi.DPSVI.init`: False, True or a tuple of names."""
    if value is False or value is True:
        aligned = value
    elif isinstance(value, str):
        raise _refusal(f"expected a sequence of parameter names, not a string: [{value!r}]?")
    elif not isinstance(value, Sequence):
        raise TypeError(
            "aligned_gradients must be a bool or a sequence of the names of the guide's "
            f"location parameters, got {value!r}"
        )
    else:
        aligned = tuple(value)
        if not aligned or not all(isinstance(n, str) for n in aligned):
            raise _refusal(f"expected a non-empty sequence of parameter names, got {value!r}")
        if len(set(aligned)) != len(aligned):
            raise _refusal(f"names a parameter twice: {value!r}")
    if aligned is True and guide is not None and not isinstance(guide, _AUTO_GUIDES):
        raise _refusal(
            f"True is for AutoNormal and AutoDiagonalNormal guides, got {guide!r}; for a "
            "hand-written mean-field Gaussian guide pass the names of its location parameters"
        )
    if aligned and loss is not None:
        _check_loss(loss)
    return aligned


def _location_names(aligned: bool | tuple[str, ...], guide: Any, params: dict) -> tuple:
    if aligned is not True:
        return aligned
    if isinstance(guide, AutoNormal):  # numpyro names them "{site}_{prefix}_loc"
        return tuple(n for n in params if n.endswith(f"_{guide.prefix}_loc"))
    return (f"{guide.prefix}_loc",)


class AlignedStep(NamedTuple):
    """A step's clipping problem on the released coordinates, and its post-processing.

    ``example``, ``released`` and ``sample`` go to :func:`d3p._clipping.clipped_sum` in
    place of the loss of one example, the parameters and the global sample; its result,
    once noised, is the released vector ``R``, and ``gradient(R)`` is the gradient of all
    parameters (post-processing).
    """

    example: Callable
    released: tuple  # (params read directly by the data terms, zeros like the sample)
    sample: GlobalSample
    gradient: Callable


def _one_location_each(jvp: Callable, params: dict, names: tuple) -> bool:
    """Whether each entry of ``jvp(tangent)`` reads exactly one entry of the ``names``
    leaves of the tangent (structural: from the jaxpr, whatever the values)."""
    zeros = jax.tree.map(jnp.zeros_like, params)
    locs = [params[n] for n in names]
    closed = jax.make_jaxpr(lambda *ls: jvp({**zeros, **dict(zip(names, ls, strict=True))}))(*locs)
    offsets = np.cumsum([0, *(math.prod(jnp.shape(x)) for x in locs)])
    in_maps = [
        (np.arange(a, b).reshape(jnp.shape(x)),)
        for x, a, b in zip(locs, offsets[:-1], offsets[1:], strict=True)
    ]
    try:
        out_maps = _index_maps(closed.jaxpr, [None] * len(closed.consts), in_maps)
    except _Unsupported:
        return False
    for var, maps in zip(closed.jaxpr.outvars, out_maps, strict=True):
        if maps is None:
            return False
        shape = var.aval.shape
        entries = np.sort([np.broadcast_to(m, shape).reshape(-1) for m in maps], axis=0)
        first = np.ones((1, entries.shape[1]), bool)
        new = (entries >= 0) & np.concatenate([first, entries[1:] != entries[:-1]])
        if not np.all(new.sum(axis=0) == 1):
            return False
    return True


def aligned_step(
    dpsvi: Any, params: dict, sample: GlobalSample | None, example: Callable, args: tuple
) -> AlignedStep:
    """The aligned step at unconstrained ``params`` (traced values allowed); a
    ``ValueError`` naming ``aligned_gradients`` where the guide's structure does not hold.

    ``example(params, values, example_args, index)`` is the loss of one example, as
    :func:`d3p._clipping.clipped_sum` takes it. All checks are structural (jaxprs, shapes,
    names), so a step is refused or not whatever the data and the parameters' values.
    """
    _check_loss(dpsvi.per_example_loss)
    if sample is None or not jax.tree.leaves(sample.values):
        raise _refusal("the model has no global latent variables (nothing to align)")
    names = _location_names(dpsvi.aligned_gradients, dpsvi.guide, params)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise _refusal(f"{unknown} are not parameters (parameters: {sorted(params)})")
    support = coordinatewise_support(sample.jvp, params)
    if support is None:
        raise _refusal(
            "the guide of the global latents is not mean-field (each sample entry must "
            "depend on its own parameter entries, e.g. not AutoMultivariateNormal, "
            "AutoLowRankMultivariateNormal or flows)"
        )
    read = jax.tree.unflatten(jax.tree.structure(params), np.split(support, _ends(params)))
    guide_names = {n for n in params if any(np.any(r) for r in jax.tree.leaves(read[n]))}
    if dpsvi.aligned_gradients is True:  # AutoNormal: the locations of local latents stay
        names = tuple(n for n in names if n in guide_names)  # parameters read directly
    outside = [n for n in names if n not in guide_names]
    if not names or outside:
        raise _refusal(
            f"the location parameters {outside or list(names)} are not read by the guide's "
            "sample of the global latents"
        )
    single = all(jax.tree_util.treedef_is_leaf(jax.tree.structure(params[n])) for n in names)
    if not single or not _one_location_each(sample.jvp, params, names):
        raise _refusal(
            "each entry of the global sample must depend on exactly one entry of the "
            f"location parameters {list(names)}"
        )
    if weighted_global_clipping(example, params, sample, args, dpsvi.clipping_threshold) is None:
        raise _refusal(
            "the data terms read parameters of the global latents' guide directly (their "
            "location and scale gradients would not be those through the sample)"
        )

    fixed = {n: params[n] for n in guide_names}
    direct = {n: v for n, v in params.items() if n not in guide_names}
    ones = {n: jnp.ones_like(params[n]) for n in names}
    # t = J_g 1_loc: d v_j / d loc_k(j), the factor from d_v_i to the location gradient
    t = sample.jvp({**jax.tree.map(jnp.zeros_like, params), **ones})

    def scaled(u: Any) -> Any:
        return jax.tree.map(jnp.multiply, t, u)

    def aligned_example(released, values, example_args, index):
        return example({**fixed, **released[0]}, values, example_args, index)

    def gradient(released: tuple) -> dict:
        r_direct, r_loc = released
        u = jax.tree.map(lambda r, s: jnp.where(s != 0, r / jnp.where(s != 0, s, 1), 0), r_loc, t)
        grads = jax.tree.map(
            jnp.add, {**jax.tree.map(jnp.zeros_like, fixed), **r_direct}, sample.vjp(u)
        )
        # a location whose t underflowed (or whose R_loc / t overflowed) gets 0, not NaN/inf:
        # post-processing, and the optimiser's state is never poisoned
        return jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, 0).astype(g.dtype), grads)

    return AlignedStep(
        example=aligned_example,
        released=(direct, jax.tree.map(jnp.zeros_like, sample.values)),
        sample=GlobalSample(
            sample.values,
            jvp=lambda tangent: scaled(tangent[1]),
            vjp=lambda u: (jax.tree.map(jnp.zeros_like, direct), scaled(u)),
        ),
        gradient=gradient,
    )


def _ends(params: dict) -> list[int]:
    """Split points of the concatenated, flattened leaves of ``params``."""
    return list(np.cumsum([math.prod(jnp.shape(x)) for x in jax.tree.leaves(params)])[:-1])
