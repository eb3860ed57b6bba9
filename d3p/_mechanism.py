# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""The private step of DP-VI: from a batch and a state to the released gradient and the
next state.

**What is released, and its sensitivity.** A step on a batch of ``B`` rows with mask
``m`` releases

    ``g = (sum_i m_i clip_C(grad l_i) + N(0, (sigma C)^2 I)) * s / b + grad l_global``

where ``l_i`` is row ``i``'s data term of the negative ELBO divided by the observation
scale ``s`` (the plate scale of one example when ``clip_unscaled_observations``), ``clip_C``
scales a vector to L2 norm at most ``C``, the noise is one draw of the hardened Gaussian
from the state's secure key, ``b`` is the data-independent normaliser, and
``l_global`` (prior and guide of the global latents) is evaluated on an all-zero
stand-in batch. Adding or removing one record changes the clipped sum by at most ``C``
(padded rows and rows with a non-finite gradient add exactly zero), and ``s``, ``b`` and
``l_global`` do not depend on the data: each step is the Gaussian mechanism with noise
multiplier ``sigma`` on the sampled batch, the step event of
:meth:`d3p.plan.PrivacyPlan.dp_event` (replacing a record changes the sum by at most
``2 C``, as the substitute relation's events assume). The optimiser sees only ``g``.

**Aligned gradients** (``aligned_gradients``, :mod:`d3p._aligned`, DPVIm). For a mean-field
Gaussian guide of the global latents, ``grad l_i`` above is replaced by the vector of row
``i``'s gradients with respect to the parameters the data terms read directly and the
guide's locations (one coordinate per entry of the global sample); the noise is drawn on
those coordinates only, with the same ``sigma C``. The same sensitivity, the same Gaussian
mechanism: the accounting is unchanged. The gradient of all parameters (the scales'
derived from the noised locations') is computed from that released sum alone, before
``s / b`` and ``grad l_global`` are applied: post-processing.

**Randomness.** The state's key is split into four: the seed of the next state's key,
which is then rekeyed (:func:`d3p.random.rekey`: the next state cannot recompute this
step's keys), the batch key (for the sampler, :func:`batch_key`), the ELBO key (model
randomness, through JAX's generator) and the noise key. Each is used by one derivation only.

Functions take the :class:`~d3p.svi.DPSVI` whose model, guide, loss, optimiser,
``rng_suite``, ``clipping_threshold``, ``dp_scale`` and ``chunk_size`` define the step.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from d3p import _aligned, _clipping, _sharding
from d3p._clipping import GlobalSample, add_examples_axis, linearised_global_sample
from d3p._elbo_split import SiteLayout, classify_sites, elbo_terms, global_part, zero_examples
from d3p.history import Mechanism, UnplannedStep
from d3p.plan import PrivacyPlan


def _abstract(tree: Any) -> Any:
    """``tree`` with its array leaves (tracers too) replaced by their shapes and dtypes."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype) if hasattr(x, "dtype") else x, tree
    )


def shape_key(tree: Any) -> tuple:
    """Hashable key of a pytree: structure, array leaves by shape and dtype, others by value."""
    leaves, treedef = jax.tree.flatten(_abstract(tree))
    return treedef, tuple(
        (x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x for x in leaves
    )


# ---------------------------------------------------------------- per-example sites


def check_components(dpsvi: Any, allow_none: bool = False) -> None:
    """Validate model, guide and loss; ``None`` only fails when they are needed.

    ``__init__`` allows ``None`` (d3p 0.2 code builds ``DPSVI(None, None, optim, None,
    ...)`` to reuse the helpers and the state type, as :class:`numpyro.infer.SVI`
    allows); :meth:`init` and :meth:`update` do not.
    """
    for name in ("model", "guide"):
        value = getattr(dpsvi, name)
        if not callable(value) and not (allow_none and value is None):
            raise TypeError(f"{name} must be a callable NumPyro {name}, got {value!r}")
    loss = dpsvi.per_example_loss
    if allow_none and loss is None:
        return
    if not callable(getattr(loss, "loss", None)):
        raise TypeError("per_example_loss must be a numpyro ELBO, e.g. Trace_ELBO()")
    if getattr(loss, "sum_sites", True) is not True:
        raise ValueError("per_example_loss must sum its sites (sum_sites=True)")


def site_layout(dpsvi: Any, params: Any, args: tuple, kwargs: dict) -> SiteLayout:
    """Which sites are per-example, for these unconstrained params, batch and kwargs.

    Classified by abstract tracing (nothing is computed, no data are read), so a function
    of the model, the guide, the shapes and dtypes of ``params``, ``args`` and array
    kwargs, and the other kwargs' values; cached on those in ``dpsvi._layouts``.
    """
    check_components(dpsvi)
    model, guide, cache = dpsvi._layouts
    if model is not dpsvi.model or guide is not dpsvi.guide:
        cache = {}
        dpsvi._layouts = (dpsvi.model, dpsvi.guide, cache)
    params, args = _abstract(params), _abstract(args)
    key = shape_key((params, args, kwargs, dpsvi.static_kwargs))
    try:
        return cache[key]
    except TypeError:  # an unhashable keyword argument: classify without caching
        key = None
    except KeyError:
        pass
    rng_key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    svi = dpsvi._svi
    if svi.constrain_fn is None:
        # numpyro's SVI reads the parameters' constraints while initialising
        jax.eval_shape(lambda k, a: svi.init(k, *a, **kwargs), rng_key, args)
    layout = classify_sites(
        dpsvi.model,
        dpsvi.guide,
        jax.eval_shape(svi.constrain_fn, params),
        rng_key,
        args,
        {**kwargs, **dpsvi.static_kwargs},
    )
    if key is not None:
        cache[key] = layout
    return layout


# ---------------------------------------------------------------- keys


def step_keys(rng_suite: Any, key: Any) -> tuple[Any, Any, Any, Any]:
    """``(next_key, batch_key, elbo_key, noise_key)`` of the step taken from ``key``."""
    seed, batch, elbo, noise = rng_suite.split(key, 4)
    return rng_suite.rekey(seed), batch, elbo, noise


def batch_key(rng_suite: Any, state: Any) -> Any:
    """The key from which the batch of ``state``'s next step is drawn."""
    return step_keys(rng_suite, state.rng_key)[1]


@functools.partial(jax.jit, static_argnums=0)
def init_keys(rng_suite: Any, key: Any) -> tuple[jax.Array, Any]:
    """``(jax key for initialisation, the first state's key)`` from the key given to init
    (one compiled program: called eagerly, each derivation would compile on its own)."""
    init, seed = rng_suite.split(key, 2)
    return rng_suite.convert_to_jax_rng_key(init), rng_suite.rekey(seed)


# ---------------------------------------------------------------- ELBO terms


def _particles(dpsvi: Any, fn: Callable, jax_key: jax.Array, *stacked: Any) -> Any:
    """``fn(key, *xs)`` for each particle of the loss, keyed as numpyro's Trace_ELBO."""
    num_particles = dpsvi.per_example_loss.num_particles
    if num_particles == 1:
        return fn(jax_key, *stacked)
    return jax.vmap(fn)(jax.random.split(jax_key, num_particles), *stacked)


def _global_part(
    dpsvi: Any, params: dict, jax_key: jax.Array, zero_args: tuple, kwargs: dict, layout: Any
) -> tuple[dict, jax.Array]:
    """The step's sample of the global latents and ``-(log p(z_g) - log q(z_g))`` at it.

    A function of the params only: ``zero_args`` is a data-free stand-in batch. The
    sample is shared by all examples (split path only).
    """
    cparams = dpsvi._svi.constrain_fn(params)

    def particle(key):
        values, term = global_part(
            dpsvi.model, dpsvi.guide, cparams, key, zero_args, kwargs, layout
        )
        return values, -term

    values, losses = _particles(dpsvi, particle, jax_key)
    return values, jnp.mean(losses)


def _linearised_global_part(
    dpsvi: Any, params: dict, jax_key: jax.Array, args: tuple, kwargs: dict, layout: Any
) -> tuple[GlobalSample, jax.Array, Any]:
    """The shared global sample with its linear maps, the global loss and its gradient."""
    zero_args = zero_examples(args)
    return linearised_global_sample(
        lambda p: _global_part(dpsvi, p, jax_key, zero_args, kwargs, layout), params
    )


def _example_loss(
    dpsvi: Any,
    params: dict,
    global_values: dict | None,
    jax_key: jax.Array,
    example_args: tuple,
    kwargs: dict,
    index: jax.Array,
    obs_scale: jax.Array,
    layout: SiteLayout,
) -> jax.Array:
    """Loss of one example (a batch of one) whose gradient is clipped, per unit scale.

    Split path: the data terms, evaluated at ``global_values``, the step's sample of the
    global latents (shared by all examples). Generic path (``global_values`` is None):
    the whole loss, with its own randomness.
    """
    cparams = dpsvi._svi.constrain_fn(params)
    if global_values is None:
        loss = dpsvi.per_example_loss.loss(
            jax.random.fold_in(jax_key, index),
            cparams,
            dpsvi.model,
            dpsvi.guide,
            *example_args,
            **kwargs,
        )
        return loss / obs_scale

    def particle(key, values):
        data_term, _ = elbo_terms(
            dpsvi.model, dpsvi.guide, cparams, key, example_args, kwargs, layout, index, values
        )
        return -data_term

    return jnp.mean(_particles(dpsvi, particle, jax_key, global_values)) / obs_scale


# ---------------------------------------------------------------- the normaliser


def normaliser(dpsvi: Any, batch_size: int, mask: Any) -> float:
    """The data-independent divisor of the noisy gradient sum of a batch (``mask`` as given
    to :meth:`~d3p.svi.DPSVI.update`)."""
    masked = mask is not None and jnp.ndim(mask) > 0
    if dpsvi.expected_batch_size is not None:
        return dpsvi.expected_batch_size
    if not masked:
        _warn_if_length_varies(dpsvi, batch_size)
    if masked and not dpsvi._warned_normaliser:
        dpsvi._warned_normaliser = True
        warnings.warn(
            "DPSVI.update got a mask but no expected_batch_size: the gradient is divided by "
            f"the structural batch size {batch_size} (data-independent, but smaller steps "
            "than intended). For Poisson batches pass expected_batch_size=q*N to DPSVI "
            "(DPSVI.run does this).",
            UserWarning,
            stacklevel=3,
        )
    return float(batch_size)


def _warn_if_length_varies(dpsvi: Any, batch_size: int) -> None:
    """Warn once when unmasked batches change length: the divisor then is the realised
    batch size, which leaks it if the batch was sampled (d3p 0.2's leak)."""
    first = dpsvi._first_batch_size
    if first is None:
        dpsvi._first_batch_size = batch_size
    elif batch_size != first and not dpsvi._warned_lengths:
        dpsvi._warned_lengths = True
        warnings.warn(
            f"DPSVI.update got unmasked batches of different lengths ({first}, then "
            f"{batch_size}) and no expected_batch_size: each step is divided by its own "
            "batch length, which reveals the realised size of a sampled batch. Pad "
            "batches to one length, pass mask=... for the real rows and "
            "expected_batch_size=q*N to DPSVI (or use DPSVI.run / a d3p.plan.PrivacyPlan).",
            UserWarning,
            stacklevel=4,
        )


# ---------------------------------------------------------------- the step


def update_mechanism(dpsvi: Any) -> PrivacyPlan | UnplannedStep:
    """What the history records for a step of :meth:`update`: the plan's, if any."""
    if dpsvi.plan is not None:
        return dpsvi.plan.with_steps(1)
    return UnplannedStep(dpsvi.clipping_threshold, dpsvi.dp_scale)


def _inputs(dpsvi: Any, state: Any, args: tuple, kwargs: dict) -> tuple:
    """Keys, unconstrained params, merged kwargs and site layout of ``state``'s step."""
    params = dpsvi.optim.get_params(state.optim_state)
    layout = site_layout(dpsvi, params, args, kwargs)
    next_key, _, elbo_key, noise_key = step_keys(dpsvi.rng_suite, state.rng_key)
    jax_key = dpsvi.rng_suite.convert_to_jax_rng_key(elbo_key)
    return next_key, jax_key, noise_key, params, {**kwargs, **dpsvi.static_kwargs}, layout


def _noise(dpsvi: Any, noise_key: Any, like: Any) -> Any:
    """Privacy noise N(0, (dp_scale * C)^2) per coordinate, shaped like ``like``."""
    flat, unravel = ravel_pytree(like)
    z = dpsvi.rng_suite.hardened_normal(noise_key, flat.shape, flat.dtype)
    return unravel(z * (dpsvi.dp_scale * dpsvi.clipping_threshold))


def _optim_update(optim: Any, grads: Any, optim_state: Any) -> Any:
    if getattr(optim, "update_with_value", False):
        # optax wrappers want the loss value; the loss is not private, so never pass it
        return optim.update(grads, optim_state, value=jnp.array(jnp.nan))
    return optim.update(grads, optim_state)


def update(
    dpsvi: Any,
    state: Any,
    args: tuple,
    kwargs: dict,
    mask: jax.Array,
    normaliser: float,
    mechanism: Mechanism,
) -> tuple[Any, jax.Array]:
    """One private step on the batch ``args`` (rows where ``mask``); the new state and the
    (not private) loss. ``mechanism`` is what the state's history records for the step."""
    next_key, jax_key, noise_key, params, kwargs, layout = _inputs(dpsvi, state, args, kwargs)
    obs_scale = state.observation_scale
    sample = None
    if dpsvi._split_elbo:
        sample, global_loss, global_grads = _linearised_global_part(
            dpsvi, params, jax_key, args, kwargs, layout
        )

    def example(p, v, ex, i):
        return _example_loss(dpsvi, p, v, jax_key, ex, kwargs, i, obs_scale, layout)

    aligned = None
    clipped = (example, params, sample)
    if dpsvi.aligned_gradients:
        # the clipped sum of the released coordinates only (locations, no scales)
        aligned = _aligned.aligned_step(dpsvi, params, sample, example, args)
        clipped = (aligned.example, aligned.released, aligned.sample)
    grad_sum, loss_sum, num_bad = _clipping.clipped_sum(
        *clipped,
        args,
        mask,
        dpsvi.clipping_threshold,
        dpsvi.chunk_size,
        weighted=dpsvi.per_example_loss.num_particles == 1,
        groups=_sharding.context_shards(),
    )
    if dpsvi.dp_scale > 0:
        grad_sum = jax.tree.map(jnp.add, grad_sum, _noise(dpsvi, noise_key, grad_sum))
    if aligned is not None:
        grad_sum = aligned.gradient(grad_sum)  # post-processing of the released vector
    factor = obs_scale / normaliser
    grads = jax.tree.map(lambda g: (g * factor).astype(g.dtype), grad_sum)
    loss = loss_sum * factor
    if dpsvi._split_elbo:
        # post-processing: data-free term added after the noise
        grads = jax.tree.map(jnp.add, grads, global_grads)
        loss = loss + global_loss
    new_state = state._replace(
        optim_state=_optim_update(dpsvi.optim, grads, state.optim_state),
        rng_key=next_key,
        num_nonfinite_grads=jnp.asarray(state.num_nonfinite_grads, jnp.int32) + num_bad,
        num_steps=jnp.asarray(state.num_steps, jnp.int32) + 1,
        # a d3p 0.2 state (no history) stays one, so its tree structure is kept in loops;
        # its steps are counted in num_steps (get_epsilon then asks for their sampling)
        history=None if state.history is None else state.history.record(mechanism),
    )
    return new_state, loss


def evaluate(
    dpsvi: Any, state: Any, args: tuple, kwargs: dict, mask: jax.Array, normaliser: float
) -> jax.Array:
    """The loss :func:`update` would report for this batch (same randomness), no step."""
    batch_size = args[0].shape[0]
    _, jax_key, _, params, kwargs, layout = _inputs(dpsvi, state, args, kwargs)
    obs_scale = state.observation_scale
    values, global_loss = None, 0.0
    if dpsvi._split_elbo:
        values, global_loss = _global_part(
            dpsvi, params, jax_key, zero_examples(args), kwargs, layout
        )
    losses = jax.vmap(
        lambda ex, i: _example_loss(
            dpsvi, params, values, jax_key, ex, kwargs, i, obs_scale, layout
        )
    )(add_examples_axis(args), jnp.arange(batch_size))
    return jnp.sum(jnp.where(mask, losses, 0.0)) * (obs_scale / normaliser) + global_loss
