# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Differentially private stochastic variational inference (DP-VI) for NumPyro.

:class:`DPSVI` is a drop-in replacement for :class:`numpyro.infer.SVI` that makes each
update differentially private with the Gaussian mechanism (DP-SGD applied to the ELBO):
per-example gradients are clipped to a bound ``C``, summed, and Gaussian noise of standard
deviation ``dp_scale * C`` is added before the optimiser sees the gradient.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.flatten_util import ravel_pytree
from numpyro.infer import SVI, Trace_ELBO

import d3p.random
from d3p import _clipping, _sharding, _validation, dputil
from d3p._clipping import (
    GlobalSample,
    add_examples_axis,
    linearised_global_sample,
)
from d3p._elbo_split import (
    SiteLayout,
    classify_sites,
    elbo_terms,
    global_part,
    zero_examples,
)
from d3p.plan import PrivacyBudget, PrivacyPlan

__all__ = [
    "DPSVI",
    "DPSVIRunResult",
    "DPSVIState",
    "clip_gradient",
    "full_norm",
    "normalize_gradient",
]

# Data passed to ``rng_suite.fold_in`` to derive the initialisation key from the key given to
# ``DPSVI.init``. Steps derive their keys with ``rng_suite.split(key, 3)``; this constant is far
# from any split index, so initialisation randomness never coincides with noise randomness.
_INIT_STREAM = 0x7FFFFFFF


def _is_array_tree(value: Any) -> bool:
    """True if ``value`` is a pytree with at least one leaf, all of them arrays."""
    leaves = jax.tree.leaves(value)
    return bool(leaves) and all(isinstance(x, jax.Array | np.ndarray) for x in leaves)


def _abstract(tree: Any) -> Any:
    """``tree`` with its array leaves (tracers too) replaced by their shapes and dtypes."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype) if hasattr(x, "dtype") else x, tree
    )


def _shape_key(tree: Any) -> tuple:
    """Hashable key of a pytree: structure, array leaves by shape and dtype, others by value."""
    leaves, treedef = jax.tree.flatten(_abstract(tree))
    return treedef, tuple(
        (x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x for x in leaves
    )


# --------------------------------------------------------------------------------------------
# Gradient helpers
# --------------------------------------------------------------------------------------------


def full_norm(tree: Any, ord: int | float = 2) -> jax.Array:
    """Norm of all leaves of ``tree`` taken together as one long vector.

    Parameters
    ----------
    tree : pytree of arrays, or None
        For example a gradient with one leaf per parameter site.
    ord : int or float
        Order of the vector norm (as :func:`jax.numpy.linalg.norm` for vectors).

    Returns
    -------
    jax.Array
        The scalar norm; ``0.`` for ``None`` or a tree without leaves.
    """
    leaves = [jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros(())
    return jnp.linalg.norm(jnp.concatenate(leaves), ord=ord)


def clip_gradient(tree: Any, c: float) -> Any:
    """Scale ``tree`` so that its :func:`full_norm` is at most ``c``.

    Every leaf is multiplied by ``min(1, c / full_norm(tree))``, so a tree whose norm is
    below ``c`` (or any tree when ``c`` is ``inf``) is returned unchanged.

    Parameters
    ----------
    tree : pytree of arrays
        The gradient (all leaves together form one vector).
    c : float
        The clipping threshold, in ``(0, inf]``.

    Returns
    -------
    pytree
        The clipped tree, same structure and dtypes.

    Raises
    ------
    ValueError
        If ``c <= 0`` or ``c`` is NaN.
    """
    if not isinstance(c, jax.core.Tracer):  # a traced c (under jit) cannot be checked
        _validation.real(c, "c", 0.0, math.inf, closed_high=True)
    norm = full_norm(tree)
    factor = jnp.where(norm > c, c / norm, 1.0)
    return jax.tree.map(lambda x: (x * factor).astype(jnp.result_type(x)), tree)


def normalize_gradient(tree: Any, ord: int | float = 2) -> Any:
    """Scale ``tree`` to unit :func:`full_norm` of order ``ord`` (zero trees stay zero)."""
    norm = full_norm(tree, ord)
    factor = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 1.0)
    return jax.tree.map(lambda x: (x * factor).astype(jnp.result_type(x)), tree)


# --------------------------------------------------------------------------------------------
# States and results
# --------------------------------------------------------------------------------------------


class DPSVIState(NamedTuple):
    """State of :class:`DPSVI` (a pytree: it can be carried through ``jit`` and ``lax`` loops).

    Attributes
    ----------
    optim_state
        The optimiser state, holding the unconstrained variational parameters.
    rng_key
        The ``rng_suite`` key of the next step (the key given to ``init`` at first).
    observation_scale
        Factor the normalised, privatised data gradient is multiplied by: the plate scale of
        one example (the data-set size) when ``clip_unscaled_observations=True``, else 1.
    num_nonfinite_grads
        Number of per-example gradients (of valid rows) that contained NaN or infinity and
        were therefore replaced by zero, counted since ``init``. A non-zero count points to
        a numerically fragile model. Dropping them keeps the guarantee of the parameters
        (a zero is a valid clipping), but the count itself depends on the data and is NOT
        differentially private: do not publish it (nor the losses).
    num_steps
        Number of private steps (:meth:`DPSVI.update` calls) taken since ``init``. It
        depends on nothing but the number of calls (no privacy cost); :meth:`DPSVI.run`
        and :meth:`DPSVI.get_epsilon` account for all of them.
    """

    optim_state: Any
    rng_key: Any
    observation_scale: Any
    num_nonfinite_grads: Any = 0
    num_steps: Any = 0


class DPSVIRunResult(NamedTuple):
    """Result of :meth:`DPSVI.run`.

    Attributes
    ----------
    params : dict
        Constrained parameters after the last step.
    state : DPSVIState
        The final state (pass it as ``init_state`` to continue training).
    losses : jax.Array
        The loss of every step. NOT differentially private: do not publish it.
    epsilon : float
        Privacy spent at ``delta`` by all steps in ``state`` (those of an ``init_state``
        included), from ``dp_event``.
    delta : float
        The delta at which ``epsilon`` is reported.
    dp_event : dp_accounting.DpEvent
        The ``DpEvent`` of all steps in ``state``, as the run's
        :class:`~d3p.plan.PrivacyPlan` describes them.
    """

    params: dict
    state: DPSVIState
    losses: jax.Array
    epsilon: float
    delta: float
    dp_event: Any = None


def _num_iter(q: float, num_epochs: float | None, num_iter: float | None) -> float:
    if (num_epochs is None) == (num_iter is None):
        raise ValueError("give exactly one of num_epochs and num_iter")
    if num_iter is not None:
        return num_iter
    return _validation.real(num_epochs, "num_epochs", 0.0) / _validation.probability(q)


def _privacy_parameters(
    clipping_threshold: Any,
    dp_scale: Any,
    expected_batch_size: Any,
    plan: PrivacyPlan | PrivacyBudget | None,
) -> tuple[float, float, float | None]:
    """``(C, sigma, normaliser)`` of a DPSVI: from ``plan``, or from d3p 0.2's arguments."""
    if plan is not None:
        if not isinstance(plan, PrivacyPlan | PrivacyBudget):
            raise TypeError(
                f"plan must be a d3p.plan.PrivacyPlan or PrivacyBudget, got {type(plan).__name__}"
            )
        given = {"clipping_threshold": clipping_threshold, "dp_scale": dp_scale}
        if isinstance(plan, PrivacyPlan):  # a budget leaves the normaliser open (N unknown)
            given["expected_batch_size"] = expected_batch_size
        if any(v is not None for v in given.values()):
            raise TypeError(
                f"give either plan or {' and '.join(given)}; the plan holds them: {plan}"
            )
        if isinstance(plan, PrivacyPlan):
            expected_batch_size = plan.normaliser
        clipping_threshold, dp_scale = plan.clipping_threshold, plan.noise_multiplier
    if clipping_threshold is None or dp_scale is None:
        raise TypeError("DPSVI needs clipping_threshold and dp_scale, or plan=PrivacyPlan(...)")
    if expected_batch_size is not None:
        expected_batch_size = _validation.real(expected_batch_size, "expected_batch_size", 0.0)
    return (
        _validation.real(clipping_threshold, "clipping_threshold", 0.0),
        _validation.real(dp_scale, "dp_scale", 0.0, closed_low=True),
        expected_batch_size,
    )


# --------------------------------------------------------------------------------------------
# DPSVI
# --------------------------------------------------------------------------------------------


class DPSVI:
    """Differentially private stochastic variational inference (a drop-in for numpyro's SVI).

    Each :meth:`update` computes, for every example (row) of the batch, the gradient of its
    ELBO term with respect to the unconstrained variational parameters, clips each
    per-example gradient (all parameters together) to L2 norm ``clipping_threshold``, sums
    them, adds Gaussian noise of standard deviation ``dp_scale * clipping_threshold`` drawn
    from ``rng_suite`` (the hardened sampler), divides by a data-independent normaliser and
    multiplies by ``observation_scale``. The update is then (``dp_scale``, add/remove-one)
    Gaussian-mechanism private with respect to one example of the batch; see
    :meth:`get_epsilon` for the privacy of a whole run.

    **What the clipping threshold bounds.** For ``per_example_loss=numpyro.infer.Trace_ELBO()``
    the ELBO is split: the *data terms* (log-likelihood of the observed sites and the
    log-density ratio of local latents inside the data plate) are clipped per example; the
    *global terms* (prior and guide density of the global latents) do not depend on any
    individual's data, so their gradient is computed once per step, on an all-zero stand-in
    batch (so even a prior that wrongly reads the data cannot leak), and added after the
    noise (post-processing, no privacy cost). All examples share one sample of the global
    latents; local latents get per-example randomness. ``C`` therefore bounds only the data
    terms. This differs from d3p 0.2, which clipped the whole per-example ELBO including the
    prior and entropy terms (and drew separate global samples per example). Any other
    ``per_example_loss`` (e.g. ``TraceMeanField_ELBO``, ``Trace_ELBO(multi_sample_guide=True)``)
    uses the d3p 0.2 path: the whole loss of each example, with its own randomness, is
    clipped.

    **Normaliser.** The noisy sum is divided by a number that must not depend on the data:
    ``expected_batch_size`` if given, else the structural batch size (the length of the batch
    arrays, padding included). With fixed-size batches that is the batch size. With Poisson
    batches (``mask`` given), set ``expected_batch_size = q * N``; :meth:`run` does this.
    Passing a mask without ``expected_batch_size`` uses the structural batch size and warns
    once. (d3p 0.2 divided by the realised number of valid rows, which leaks it.)

    **Non-finite gradients.** A per-example gradient containing NaN or infinity is replaced
    by zero (a valid clipping to norm 0); the count is accumulated in
    :attr:`DPSVIState.num_nonfinite_grads`.

    Parameters
    ----------
    model, guide : callable
        NumPyro model and guide. Every positional argument is a batch array whose first
        axis indexes examples (one example = one individual); keyword arguments are passed
        unchanged to every example and must not contain private data. ``None`` is accepted
        here (checked in :meth:`init`), as in numpyro's SVI.
    optim : numpyro optimiser or optax.GradientTransformation
        As accepted by :class:`numpyro.infer.SVI`. It only sees the privatised gradient.
        Optax transformations that read the loss value (e.g. ``reduce_on_plateau``) receive
        NaN, since the loss is not private.
    per_example_loss : numpyro ELBO
        Normally ``numpyro.infer.Trace_ELBO()`` (the fast split path above); checked in
        :meth:`init` (``None`` is accepted here, like ``model`` and ``guide``).
    clipping_threshold : float
        ``C``, in ``(0, inf)``: bound on the L2 norm of one example's gradient. Give it
        and ``dp_scale`` (d3p 0.2's form), or ``plan``.
    dp_scale : float
        Noise multiplier ``sigma >= 0``: the noise standard deviation is ``dp_scale * C``.
        ``0`` disables the noise (not private).
    rng_suite : module
        :mod:`d3p.random` (secure, default) or :mod:`d3p.random.debug` (fast, NOT secure);
        used for the privacy noise and passed to the batch sampler in :meth:`run`.
    clip_unscaled_observations : bool
        If True (default), the plate scale of one example (the data-set size ``N``) is
        divided out before clipping, so ``C`` bounds one individual's unscaled contribution,
        and multiplied back after the noise.
    plan : d3p.plan.PrivacyPlan or d3p.plan.PrivacyBudget, optional
        Keyword-only, instead of ``clipping_threshold`` and ``dp_scale``. A
        :class:`~d3p.plan.PrivacyPlan` also sets the normaliser (instead of
        ``expected_batch_size``): :meth:`run` draws the plan's batches and refuses to take
        more than the plan's ``num_steps`` steps in all. A
        :class:`~d3p.plan.PrivacyBudget` (see :meth:`make_private_with_epsilon`) leaves the
        data-set size open: :meth:`run` makes the budget's plan for the data it is given
        and refuses runs beyond the budget. Without either, :meth:`run` builds a plan
        (Poisson sampling) for its own steps. Stored as :attr:`plan` or :attr:`budget`.
    expected_batch_size : float, optional
        Keyword-only. The data-independent normaliser ``q * N`` for Poisson batches.
    chunk_size : int, optional
        Keyword-only. Compute per-example gradients ``chunk_size`` examples at a time
        (memory ``chunk_size x number of parameters`` instead of ``batch x parameters``;
        less with the weighted clipping of mean-field guides, see the user guide); the
        result is the same up to floating-point rounding. Default: on CPU as many
        examples as keep a chunk at about 2**20 per-example entries (the whole batch for
        small models), on accelerators the whole batch.
    **static_kwargs
        Further keyword arguments for model and guide (e.g. ``N=len(data)``), as in numpyro.
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim: Any,
        per_example_loss: Any,
        clipping_threshold: float | None = None,
        dp_scale: float | None = None,
        rng_suite: Any = d3p.random,
        clip_unscaled_observations: bool = True,
        *,
        plan: PrivacyPlan | None = None,
        expected_batch_size: float | None = None,
        chunk_size: int | None = None,
        **static_kwargs: Any,
    ):
        self.clipping_threshold, self.dp_scale, self.expected_batch_size = _privacy_parameters(
            clipping_threshold, dp_scale, expected_batch_size, plan
        )
        self.plan = plan if isinstance(plan, PrivacyPlan) else None
        self.budget = plan if isinstance(plan, PrivacyBudget) else None
        if chunk_size is not None:
            chunk_size = _validation.count(chunk_size, "chunk_size")
        self.chunk_size = chunk_size
        for name in ("split", "convert_to_jax_rng_key", "fold_in", "hardened_normal"):
            if not callable(getattr(rng_suite, name, None)):
                raise TypeError(f"rng_suite must be d3p.random or d3p.random.debug (no {name})")
        self.model = model
        self.guide = guide
        self.per_example_loss = per_example_loss
        self.rng_suite = rng_suite
        self.clip_unscaled_observations = bool(clip_unscaled_observations)
        self.static_kwargs = static_kwargs
        self._check_components(allow_none=True)
        # numpyro's SVI validates/wraps the optimiser and does the parameter initialisation.
        self._svi = SVI(model, guide, optim, per_example_loss, **static_kwargs)
        self.optim = self._svi.optim
        self._split_elbo = (
            type(per_example_loss) is Trace_ELBO and not per_example_loss.multi_sample_guide
        )
        self._layouts: tuple = (model, guide, {})  # see _site_layout
        self._warned_normaliser = False
        self._first_batch_size: int | None = None
        self._warned_lengths = False
        self._compiled: dict[str, tuple] = {}

    def _check_components(self, allow_none: bool = False) -> None:
        """Validate model, guide and loss; ``None`` only fails when they are needed.

        ``__init__`` allows ``None`` (d3p 0.2 code builds ``DPSVI(None, None, optim, None,
        ...)`` to reuse the helpers and the state type, as :class:`numpyro.infer.SVI`
        allows); :meth:`init` and :meth:`update` do not.
        """
        for name in ("model", "guide"):
            value = getattr(self, name)
            if not callable(value) and not (allow_none and value is None):
                raise TypeError(f"{name} must be a callable NumPyro {name}, got {value!r}")
        loss = self.per_example_loss
        if allow_none and loss is None:
            return
        if not callable(getattr(loss, "loss", None)):
            raise TypeError("per_example_loss must be a numpyro ELBO, e.g. Trace_ELBO()")
        if getattr(loss, "sum_sites", True) is not True:
            raise ValueError("per_example_loss must sum its sites (sum_sites=True)")

    # ---------------------------------------------------------------- public API

    @property
    def constrain_fn(self) -> Callable:
        """Map unconstrained to constrained parameters (set by :meth:`init` or a first step)."""
        return self._svi.constrain_fn

    def init(
        self, rng_key: Any, *args: Any, init_params: dict | None = None, **kwargs: Any
    ) -> DPSVIState:
        """Initialise the variational parameters and the state.

        Parameters
        ----------
        rng_key
            An ``rng_suite`` key. It is stored in the state as given; initialisation uses an
            independent key derived from it.
        *args
            A batch of the data arguments (used for shapes and for the guide's
            initialisation; use public or dummy data if that initialisation must not see
            private data).
        init_params : dict, optional
            Initial (constrained) values of ``numpyro.param`` sites.
        **kwargs
            Keyword arguments of model and guide.

        Returns
        -------
        DPSVIState
        """
        self._check_components()
        args, _ = _validation.batch(args)
        init_key = self.rng_suite.convert_to_jax_rng_key(
            self.rng_suite.fold_in(rng_key, _INIT_STREAM)
        )
        svi_state = self._svi.init(init_key, *args, init_params=init_params, **kwargs)
        if svi_state.mutable_state is not None:
            raise ValueError(
                "DPSVI does not support models with mutable state (numpyro.mutable sites): "
                "the state would be updated from private data without noise."
            )
        params = self.optim.get_params(svi_state.optim_state)
        layout = self._site_layout(params, args, kwargs)
        scale = layout.observation_scale if self.clip_unscaled_observations else 1.0
        dtype = jnp.result_type(float)
        return DPSVIState(
            svi_state.optim_state,
            rng_key,
            jnp.asarray(scale, dtype),
            jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.int32),
        )

    def get_params(self, svi_state: DPSVIState) -> dict:
        """Constrained parameter values of ``svi_state`` (works inside ``jit``)."""
        return self._svi.constrain_fn(self.optim.get_params(svi_state.optim_state))

    def update(
        self, svi_state: DPSVIState, *args: Any, mask: Any = True, **kwargs: Any
    ) -> tuple[DPSVIState, jax.Array]:
        """Take one differentially private step on a batch.

        Parameters
        ----------
        svi_state : DPSVIState
            The current state.
        *args
            The batch: arrays with equal first dimension (one row per example).
        mask : bool or bool array of shape (batch,), or None
            Which rows are real examples; padded rows (False) contribute exactly nothing.
            An all-False mask gives a pure-noise step. ``None`` (d3p 0.2's default) is
            ``True``.
        **kwargs
            Keyword arguments of model and guide (public, not per-example).

        Returns
        -------
        svi_state : DPSVIState
            The new state.
        loss : jax.Array
            The negative ELBO estimate on the batch's valid rows, normalised like the
            gradient. It is NOT differentially private: do not publish it.
        """
        args, batch_size = _validation.batch(args)
        _sharding.check_divisible(batch_size, _sharding.context_shards())
        mask_array = _validation.mask(mask, batch_size)
        normaliser = self._normaliser(batch_size, masked=mask is not None and jnp.ndim(mask) > 0)
        return self._call_compiled(self._update, svi_state, args, kwargs, mask_array, normaliser)

    def evaluate(
        self, svi_state: DPSVIState, *args: Any, mask: Any = True, **kwargs: Any
    ) -> jax.Array:
        """The loss :meth:`update` would report for this batch, without taking a step.

        Uses the same randomness as the next :meth:`update`. Rows with a non-finite
        gradient are included (no gradient is computed). NOT differentially private.
        """
        args, batch_size = _validation.batch(args)
        mask_array = _validation.mask(mask, batch_size)
        normaliser = self._normaliser(batch_size, masked=mask is not None and jnp.ndim(mask) > 0)
        return self._call_compiled(self._evaluate, svi_state, args, kwargs, mask_array, normaliser)

    def get_epsilon(
        self,
        target_delta: float,
        q: float | None = None,
        num_epochs: float | None = None,
        num_iter: float | None = None,
        *,
        dataset_size: int | None = None,
        max_batch_size: int | float | None = None,
        state: DPSVIState | None = None,
    ) -> float:
        """Privacy spent: epsilon at ``target_delta`` after training with Poisson rate ``q``.

        Add/remove-one relation, PLD accountant (:func:`d3p.dputil.compute_epsilon`); with
        a plan, the plan's accounting. Give exactly one of ``num_epochs`` (then
        ``num_iter = num_epochs / q``, rounded up), ``num_iter`` (number of :meth:`update`
        steps) and ``state`` (the steps it has taken, :attr:`DPSVIState.num_steps`).
        ``q`` defaults to the rate of the plan or budget. ``inf`` when ``dp_scale == 0``.

        Batches from :func:`d3p.minibatch.poisson_batchify_data` are truncated at
        ``max_batch_size`` rows by default, which costs privacy: pass the same
        ``max_batch_size`` (int, or quantile level in (0, 1)) and ``dataset_size`` (the
        number of records N) to account for it. Without them the result is the epsilon of
        untruncated Poisson sampling, which understates the cost of truncated batches.
        With a budget (:meth:`make_private_with_epsilon`), ``dataset_size`` alone gives the
        accounting of the batches :meth:`run` draws (:meth:`d3p.plan.PrivacyBudget.plan`).
        """
        run = self._accounted(q, num_epochs, num_iter, dataset_size, max_batch_size, state)
        if run is None:
            return 0.0
        if isinstance(run, PrivacyPlan):
            return run.epsilon(target_delta)
        if self.dp_scale == 0:
            return math.inf
        return dputil.compute_epsilon(self.dp_scale, target_delta, **run)

    def get_delta(
        self,
        target_epsilon: float,
        q: float | None = None,
        num_epochs: float | None = None,
        num_iter: float | None = None,
        *,
        dataset_size: int | None = None,
        max_batch_size: int | float | None = None,
        state: DPSVIState | None = None,
    ) -> float:
        """Privacy spent: delta at ``target_epsilon`` (see :meth:`get_epsilon`); 1 if no noise."""
        run = self._accounted(q, num_epochs, num_iter, dataset_size, max_batch_size, state)
        if run is None:
            return 0.0
        if isinstance(run, PrivacyPlan):
            return run.delta(target_epsilon)
        if self.dp_scale == 0:
            return 1.0
        return dputil.compute_delta(self.dp_scale, target_epsilon, **run)

    def _accounted(
        self,
        q: Any,
        num_epochs: Any,
        num_iter: Any,
        dataset_size: Any,
        max_batch_size: Any,
        state: DPSVIState | None,
    ) -> PrivacyPlan | dict | None:
        """The steps :meth:`get_epsilon` accounts: a plan, or, for untruncated Poisson
        sampling of an unknown number of records, :mod:`d3p.dputil`'s keywords; None if no
        step was taken."""
        if state is not None:
            if num_epochs is not None or num_iter is not None:
                raise ValueError("give exactly one of num_epochs, num_iter and state")
            num_iter = int(state.num_steps)
            if num_iter == 0:
                return None
        covered = self.plan or self.budget
        q = covered.q if q is None and covered is not None else q
        if q is None:
            raise ValueError("give the Poisson sampling rate q, in (0, 1]")
        num_steps = _num_iter(q, num_epochs, num_iter)
        if self.plan is not None:
            if q != self.plan.q or dataset_size is not None or max_batch_size is not None:
                raise ValueError(
                    "this DPSVI's plan sets q, dataset_size and the batch size; give only the "
                    f"number of steps (plan: {self.plan})"
                )
            return self.plan.with_steps(math.ceil(num_steps))
        if self.budget is not None and dataset_size is not None and max_batch_size is None:
            return self.budget.plan(dataset_size, math.ceil(num_steps))  # what run draws
        if (dataset_size is None) != (max_batch_size is None):
            raise ValueError(
                "give both dataset_size and max_batch_size (truncated Poisson batches) or "
                f"neither (untruncated); got dataset_size={dataset_size!r}, "
                f"max_batch_size={max_batch_size!r}"
            )
        if dataset_size is None:
            return {"q": q, "num_iter": num_steps}
        return PrivacyPlan.poisson(
            dataset_size,
            q,
            self.clipping_threshold,
            self.dp_scale,
            math.ceil(num_steps),
            max_batch_size=max_batch_size,
        )

    @classmethod
    def make_private_with_epsilon(
        cls,
        model: Callable,
        guide: Callable,
        optim: Any,
        per_example_loss: Any,
        clipping_threshold: float,
        target_epsilon: float,
        target_delta: float,
        q: float,
        num_steps: int,
        rng_suite: Any = d3p.random,
        clip_unscaled_observations: bool = True,
        *,
        tol: float = 1e-3,
        **kwargs: Any,
    ) -> DPSVI:
        """A :class:`DPSVI` whose ``dp_scale`` spends at most ``target_epsilon``.

        Like Opacus's ``make_private_with_epsilon``: the DPSVI of a
        :meth:`d3p.plan.PrivacyBudget.calibrate` budget (add/remove-one relation, PLD
        accountant, ``force_smaller=True``, so the accountant's epsilon never exceeds the
        target) for ``num_steps`` steps of Poisson sampling with rate ``q``; the budget is
        :attr:`budget`. Its :meth:`run` defaults to ``q`` and ``target_delta`` and
        refuses, before any work, a run that would take more than ``num_steps`` steps in
        all (those of its ``init_state`` included). Train in one call with
        ``DPSVI.make_private_with_epsilon(...).run(rng_key, num_steps, *data)``.

        Parameters
        ----------
        target_epsilon : float
            Privacy budget epsilon (> 0).
        target_delta : float
            Privacy budget delta, in (0, 1).
        q : float
            Poisson sampling rate (expected batch size / N), in (0, 1].
        num_steps : int
            Number of update steps the budget must cover.
        tol : float
            Calibration tolerance on epsilon (the result lies in
            ``[target_epsilon - tol, target_epsilon]``).
        **kwargs
            The keyword-only options and static model arguments of :class:`DPSVI`.
        """
        budget = PrivacyBudget.calibrate(
            target_epsilon, target_delta, q, num_steps, clipping_threshold, tol=tol
        )
        return cls(
            model,
            guide,
            optim,
            per_example_loss,
            rng_suite=rng_suite,
            clip_unscaled_observations=clip_unscaled_observations,
            plan=budget,
            **kwargs,
        )

    def run(
        self,
        rng_key: Any,
        num_steps: int,
        *args: Any,
        q: float | None = None,
        max_batch_size: int | float | None = None,
        delta: float | None = None,
        progress_bar: bool = True,
        init_state: DPSVIState | None = None,
        init_params: dict | None = None,
        mesh: jax.sharding.Mesh | None = None,
        check_finite: bool = True,
        **kwargs: Any,
    ) -> DPSVIRunResult:
        """Train for ``num_steps`` private steps on Poisson-sampled minibatches of ``args``.

        Each step draws a batch with :func:`d3p.minibatch.poisson_batchify_data` (every
        record independently with probability ``q``, from ``rng_suite``; oversized draws
        are truncated to ``max_batch_size`` uniformly chosen records) and calls
        :meth:`update` with the normaliser ``q * N``. With a ``plan`` (see :class:`DPSVI`)
        the batches, the normaliser and the accounting are the plan's. Steps run in jitted
        chunks with a tqdm progress bar. The parameters are initialised on an all-zero
        stand-in batch, so initialisation sees no private data.

        The run is accounted as a :class:`~d3p.plan.PrivacyPlan` of all steps in the
        state, those of ``init_state`` included (counted in
        :attr:`DPSVIState.num_steps`; the earlier steps are taken to have used the same
        sampling). A DPSVI with a budget (:meth:`make_private_with_epsilon`) or a plan
        refuses, before any work, a run that would take more steps than it covers.

        Parameters
        ----------
        rng_key
            An ``rng_suite`` key (split for batch sampling and the updates).
        num_steps : int
            Number of update steps.
        *args
            The full data set: arrays with equal first dimension ``N`` (one row per
            individual).
        q : float
            Poisson sampling rate in (0, 1]; expected batch size ``q * N``. Defaults to
            the planned rate of :meth:`make_private_with_epsilon` or of the plan.
        max_batch_size : int or float, optional
            Structural batch size, or as a float in (0, 1) that quantile of the batch-size
            distribution. Oversized draws are truncated, and the truncation is included in
            the accounting. Default: the ``1 - 1e-6`` quantile, or, for a calibrated
            :meth:`make_private_with_epsilon` plan, the smallest of the ``1 - 1e-6``,
            ``1 - 1e-9``, ... quantiles whose accounting stays within the budget.
        delta : float
            The delta at which the privacy spent is reported, in (0, 1), usually well
            below ``1 / N``. Required unless :meth:`make_private_with_epsilon` planned
            it (then it defaults to the planned delta).
        progress_bar : bool
            Show a tqdm progress bar (with the non-private average loss).
        init_state : DPSVIState, optional
            Continue from this state instead of initialising.
        init_params : dict, optional
            Initial constrained values of ``numpyro.param`` sites.
        mesh : jax.sharding.Mesh, optional
            Run on the devices of ``mesh`` (several processes too, after
            :func:`jax.distributed.initialize`): each batch, padded with masked-out rows to
            a multiple of the size of the mesh axis ``"data"``, is split along it. The batch
            is drawn once from the replicated key and each device gathers its own rows. The
            state, the keys and the noise are replicated (one noise draw per step, as on one
            device); the data too, unless given as arrays already placed on the mesh (e.g.
            rows split along ``"data"``). Same key, same result as without a mesh up to
            summation order, and the same privacy accounting. Every process must pass the
            same arguments.
        check_finite : bool
            If True (default), refuse data holding NaN or infinity with a ``ValueError``
            before any work. Training would drop such records' non-finite gradients
            (a valid clipping to zero, see :class:`DPSVI`) where d3p 0.2 turned the
            parameters into NaN; the check makes bad data visible. The error is about
            your own data and is not private: do not publish it. False skips the check.
        **kwargs
            Keyword arguments of model and guide (public).

        Returns
        -------
        DPSVIRunResult
            ``(params, state, losses, epsilon, delta, dp_event)``; ``epsilon`` is the
            privacy spent by all steps in ``state`` (the plan's relation; add/remove-one
            without a plan), ``losses`` are not private.
        """
        num_steps = _validation.count(num_steps, "num_steps")
        shards = 1 if mesh is None else _sharding.check_mesh(mesh)
        args, n = _validation.batch(args)
        if any(a is None for a in args):
            raise ValueError("DPSVI.run needs every positional argument to be a data array")
        taken = 0 if init_state is None else int(init_state.num_steps)
        plan, delta = self._plan_run(n, taken, num_steps, q, max_batch_size, delta)
        epsilon = plan.epsilon(delta)
        if check_finite:
            _validation.finite_data(args)
        in_mesh = contextlib.nullcontext()
        if mesh is not None:
            mesh = _sharding.auto_mesh(mesh)
            args = _sharding.place(args, mesh)
            in_mesh = jax.set_mesh(mesh)
        batch_key, svi_key = self.rng_suite.split(rng_key)
        # on a mesh the sampler draws row indices (replicated); each device gathers its rows
        rows = args if mesh is None else (jnp.arange(n, dtype=jnp.int32),)
        batch_init, get_batch = plan.batcher(rows, self.rng_suite)
        size, expected = plan.batch_size, plan.normaliser
        _, batch_state = batch_init(batch_key)
        if init_state is None:
            zeros = zero_examples(args, size)
            state = self.init(svi_key, *zeros, init_params=init_params, **kwargs)
        if init_state is not None:  # counters as arrays (a d3p 0.2 state has plain ints)
            state = init_state._replace(
                num_nonfinite_grads=jnp.asarray(init_state.num_nonfinite_grads, jnp.int32),
                num_steps=jnp.asarray(taken, jnp.int32),
            )
        if mesh is not None:
            state, batch_state = _sharding.place((state, batch_state), mesh)

        # on a mesh the data are an argument of the jitted chunk: a global array whose rows
        # live in several processes cannot be closed over
        data = () if mesh is None else args

        def step(state, i, data):
            batch, mask = get_batch(i, batch_state)
            if mesh is not None:
                batch, mask = _sharding.gather_batch(data, batch[0], mask, shards)
            return self._update(state, batch, kwargs, mask, expected)

        chunk = -(-num_steps // 50) if progress_bar else num_steps

        loss_dtype = jnp.result_type(float)  # the loss's: it is promoted with this dtype

        def body(state, i, data):
            new_state, loss = step(state, i, data)
            return new_state, loss.astype(loss_dtype)

        def body_or_skip(state, i, data):  # for a last chunk that reaches past num_steps
            skip = (state, jnp.full((), jnp.nan, loss_dtype))
            return jax.lax.cond(i < num_steps, body, lambda *_: skip, state, i, data)

        # one trace of the step (no eval_shape for the loss type), and no cond when every
        # chunk is full (always without a progress bar)
        @jax.jit
        def run_chunk(state, start, data):
            scan_body = body_or_skip if num_steps % chunk else body
            return jax.lax.scan(
                lambda s, i: scan_body(s, i, data), state, start + jnp.arange(chunk)
            )

        losses = []
        with in_mesh, tqdm.trange(num_steps, disable=not progress_bar) as bar:
            for start in range(0, num_steps, chunk):
                state, chunk_losses = run_chunk(state, start, data)
                losses.append(chunk_losses)
                done = min(chunk, num_steps - start)
                bar.set_postfix_str(f"loss {float(jnp.nanmean(chunk_losses)):.4g} (not private)")
                bar.update(done)
        losses = jnp.concatenate(losses)[:num_steps]
        params = self.get_params(state)
        return DPSVIRunResult(params, state, losses, epsilon, delta, plan.dp_event())

    # ---------------------------------------------------------------- internals

    def _plan_run(
        self, n: int, done: int, num_steps: int, q: Any, max_batch_size: Any, delta: Any
    ) -> tuple[PrivacyPlan, float]:
        """The plan of all ``done + num_steps`` steps of a run over ``n`` records and the
        delta to report at: this DPSVI's plan, its budget's plan, or a Poisson plan at rate
        ``q``. Refuses, before any work, runs beyond what a plan or budget covers."""
        covered = self.plan or self.budget
        if covered is not None:
            covered.check_steps(done, num_steps)
            if q is not None and q != covered.q:
                kind = "plan" if covered is self.plan else "budget"
                raise ValueError(
                    f"this DPSVI's privacy {kind} is for q={covered.q}, got q={q} (its "
                    "accounting would not describe the run: the budget could be exceeded)"
                )
        if delta is None and self.budget is None:
            raise ValueError(
                "DPSVI.run needs the delta at which to report the privacy spent, in "
                "(0, 1); choose it well below 1 / N (the number of records), e.g. 1e-5"
            )
        delta = self.budget.delta if delta is None else delta
        total = done + num_steps
        if self.plan is not None:
            if max_batch_size is not None:
                raise ValueError("the plan sets the batch size; do not pass max_batch_size")
            return self.plan.with_steps(total), delta
        if self.budget is not None:
            plan = self.budget.plan(n, total, max_batch_size)
        elif q is None:
            raise ValueError("DPSVI.run needs the Poisson sampling rate q, in (0, 1]")
        else:
            plan = PrivacyPlan.poisson(
                n, q, self.clipping_threshold, self.dp_scale, total, max_batch_size=max_batch_size
            )
        if self.expected_batch_size is not None and not math.isclose(
            self.expected_batch_size, plan.normaliser
        ):
            warnings.warn(
                f"DPSVI.run normalises by q * N = {plan.normaliser}, not expected_batch_size="
                f"{self.expected_batch_size}",
                UserWarning,
                stacklevel=3,
            )
        return plan, delta

    def _site_layout(self, params: Any, args: tuple, kwargs: dict) -> SiteLayout:
        """Which sites are per-example, for these unconstrained params, batch and kwargs.

        Classified by abstract tracing, so a function of the model, the guide, the shapes
        and dtypes of ``params``, ``args`` and array kwargs, and the other kwargs' values;
        derived when first needed (also while a step is traced) and cached on those.
        """
        self._check_components()
        model, guide, cache = self._layouts
        if model is not self.model or guide is not self.guide:
            cache = {}
            self._layouts = (self.model, self.guide, cache)
        params, args = _abstract(params), _abstract(args)
        key = _shape_key((params, args, kwargs, self.static_kwargs))
        try:
            return cache[key]
        except TypeError:  # an unhashable keyword argument: classify without caching
            key = None
        except KeyError:
            pass
        rng_key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        if self._svi.constrain_fn is None:
            # numpyro's SVI reads the parameters' constraints while initialising: do that
            # abstractly (nothing is computed, no data are read)
            jax.eval_shape(lambda k, a: self._svi.init(k, *a, **kwargs), rng_key, args)
        layout = classify_sites(
            self.model,
            self.guide,
            jax.eval_shape(self._svi.constrain_fn, params),
            rng_key,
            args,
            {**kwargs, **self.static_kwargs},
        )
        if key is not None:
            cache[key] = layout
        return layout

    def _normaliser(self, batch_size: int, masked: bool) -> float:
        """The data-independent divisor of the noisy gradient sum."""
        if self.expected_batch_size is not None:
            return self.expected_batch_size
        if not masked:
            self._warn_if_length_varies(batch_size)
        if masked and not self._warned_normaliser:
            self._warned_normaliser = True
            warnings.warn(
                "DPSVI.update got a mask but no expected_batch_size: the gradient is divided by "
                f"the structural batch size {batch_size} (data-independent, but smaller steps "
                "than intended). For Poisson batches pass expected_batch_size=q*N to DPSVI "
                "(DPSVI.run does this).",
                UserWarning,
                stacklevel=3,
            )
        return float(batch_size)

    def _warn_if_length_varies(self, batch_size: int) -> None:
        """Warn once when unmasked batches change length: the divisor then is the realised
        batch size, which leaks it if the batch was sampled (d3p 0.2's leak)."""
        first = self._first_batch_size
        if first is None:
            self._first_batch_size = batch_size
        elif batch_size != first and not self._warned_lengths:
            self._warned_lengths = True
            warnings.warn(
                f"DPSVI.update got unmasked batches of different lengths ({first}, then "
                f"{batch_size}) and no expected_batch_size: each step is divided by its own "
                "batch length, which reveals the realised size of a sampled batch. Pad "
                "batches to one length, pass mask=... for the real rows and "
                "expected_batch_size=q*N to DPSVI (or use DPSVI.run / a d3p.plan.PrivacyPlan).",
                UserWarning,
                stacklevel=4,
            )

    def _step_inputs(self, state: DPSVIState, args: tuple, kwargs: dict) -> tuple:
        """Keys, unconstrained params, merged kwargs and site layout for the step."""
        params = self.optim.get_params(state.optim_state)
        layout = self._site_layout(params, args, kwargs)
        new_key, elbo_key, noise_key = self.rng_suite.split(state.rng_key, 3)
        jax_key = self.rng_suite.convert_to_jax_rng_key(elbo_key)
        return new_key, jax_key, noise_key, params, {**kwargs, **self.static_kwargs}, layout

    def _particles(self, fn: Callable, jax_key: jax.Array, *stacked: Any) -> Any:
        """``fn(key, *xs)`` for each particle of the loss, keyed as numpyro's Trace_ELBO.

        ``stacked`` holds per-particle inputs (leading particle axis when there are several).
        """
        num_particles = self.per_example_loss.num_particles
        if num_particles == 1:
            return fn(jax_key, *stacked)
        return jax.vmap(fn)(jax.random.split(jax_key, num_particles), *stacked)

    def _global_part(
        self, params: dict, jax_key: jax.Array, zero_args: tuple, kwargs: dict, layout: SiteLayout
    ) -> tuple[dict, jax.Array]:
        """The step's sample of the global latents and ``-(log p(z_g) - log q(z_g))`` at it.

        A function of the params only: ``zero_args`` is a data-free stand-in batch. The
        sample is shared by all examples (split path only).
        """
        cparams = self._svi.constrain_fn(params)

        def particle(key):
            values, term = global_part(
                self.model, self.guide, cparams, key, zero_args, kwargs, layout
            )
            return values, -term

        values, losses = self._particles(particle, jax_key)
        return values, jnp.mean(losses)

    def _linearised_global_part(
        self, params: dict, jax_key: jax.Array, args: tuple, kwargs: dict, layout: SiteLayout
    ) -> tuple[GlobalSample, jax.Array, Any]:
        """The shared global sample with its linear maps, the global loss and its gradient."""
        zero_args = zero_examples(args)
        return linearised_global_sample(
            lambda p: self._global_part(p, jax_key, zero_args, kwargs, layout), params
        )

    def _example_loss(
        self,
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
        global latents (:meth:`_global_part`, shared by all examples). Generic path
        (``global_values`` is None): the whole loss, with its own randomness.
        """
        cparams = self._svi.constrain_fn(params)
        if global_values is None:
            loss = self.per_example_loss.loss(
                jax.random.fold_in(jax_key, index),
                cparams,
                self.model,
                self.guide,
                *example_args,
                **kwargs,
            )
            return loss / obs_scale

        def particle(key, values):
            data_term, _ = elbo_terms(
                self.model,
                self.guide,
                cparams,
                key,
                example_args,
                kwargs,
                layout,
                index,
                values,
            )
            return -data_term

        return jnp.mean(self._particles(particle, jax_key, global_values)) / obs_scale

    def _noise(self, noise_key: Any, like: Any) -> Any:
        """Privacy noise N(0, (dp_scale * C)^2) per coordinate, shaped like ``like``."""
        flat, unravel = ravel_pytree(like)
        z = self.rng_suite.hardened_normal(noise_key, flat.shape, flat.dtype)
        return unravel(z * (self.dp_scale * self.clipping_threshold))

    def _optim_update(self, grads: Any, optim_state: Any) -> Any:
        if getattr(self.optim, "update_with_value", False):
            # optax wrappers want the loss value; the loss is not private, so never pass it
            return self.optim.update(grads, optim_state, value=jnp.array(jnp.nan))
        return self.optim.update(grads, optim_state)

    def _call_compiled(
        self,
        method: Callable,
        state: DPSVIState,
        args: tuple,
        kwargs: dict,
        mask: jax.Array,
        normaliser: float,
    ) -> Any:
        """``method(state, args, kwargs, mask, normaliser)`` through a cached ``jax.jit``.

        Called un-jitted in a Python loop, each step then reuses one compiled program per
        input shape instead of recompiling its loops every call. Array-valued keyword
        arguments are traced; the others (e.g. ``num_obs_total``) are static and must be
        hashable, else the call runs un-jitted. The cache is keyed on everything the traced
        step reads from ``self``, so changing e.g. ``dp_scale`` takes effect (a stale noise
        scale is never used).
        """
        dynamic = {k: v for k, v in kwargs.items() if _is_array_tree(v)}
        static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in dynamic))
        try:
            hash(static)
        except TypeError:
            return method(state, args, kwargs, mask, normaliser)
        # objects compared by identity (they may hold arrays), settings by value; the site
        # layout is derived while tracing from these and the traced shapes (_site_layout)
        objects = (
            self._svi,
            self.static_kwargs,
            self.model,
            self.guide,
            self.per_example_loss,
            self.optim,
            self.rng_suite,
        )
        settings = (
            self.dp_scale,
            self.clipping_threshold,
            self.chunk_size,
            self._split_elbo,
            _sharding.context_shards(),
        )
        cached = self._compiled.get(method.__name__)
        if (
            cached is None
            or any(a is not b for a, b in zip(cached[0], objects, strict=True))
            or cached[1] != settings
        ):

            def call(state, args, dynamic, mask, normaliser, static):
                return method(state, args, {**dynamic, **dict(static)}, mask, normaliser)

            cached = (objects, settings, jax.jit(call, static_argnums=5))
            self._compiled[method.__name__] = cached
        return cached[2](state, args, dynamic, mask, normaliser, static)

    def _evaluate(
        self, state: DPSVIState, args: tuple, kwargs: dict, mask: jax.Array, normaliser: float
    ) -> jax.Array:
        batch_size = args[0].shape[0]
        _, jax_key, _, params, kwargs, layout = self._step_inputs(state, args, kwargs)
        obs_scale = state.observation_scale
        values, global_loss = None, 0.0
        if self._split_elbo:
            values, global_loss = self._global_part(
                params, jax_key, zero_examples(args), kwargs, layout
            )
        losses = jax.vmap(
            lambda ex, i: self._example_loss(
                params, values, jax_key, ex, kwargs, i, obs_scale, layout
            )
        )(add_examples_axis(args), jnp.arange(batch_size))
        return jnp.sum(jnp.where(mask, losses, 0.0)) * (obs_scale / normaliser) + global_loss

    def _update(
        self, state: DPSVIState, args: tuple, kwargs: dict, mask: jax.Array, normaliser: float
    ) -> tuple[DPSVIState, jax.Array]:
        new_key, jax_key, noise_key, params, kwargs, layout = self._step_inputs(state, args, kwargs)
        obs_scale = state.observation_scale
        sample = None
        if self._split_elbo:
            sample, global_loss, global_grads = self._linearised_global_part(
                params, jax_key, args, kwargs, layout
            )

        def example(p, v, ex, i):
            return self._example_loss(p, v, jax_key, ex, kwargs, i, obs_scale, layout)

        grad_sum, loss_sum, num_bad = _clipping.clipped_sum(
            example,
            params,
            sample,
            args,
            mask,
            self.clipping_threshold,
            self.chunk_size,
            weighted=self.per_example_loss.num_particles == 1,
            groups=_sharding.context_shards(),
        )
        if self.dp_scale > 0:
            grad_sum = jax.tree.map(jnp.add, grad_sum, self._noise(noise_key, grad_sum))
        factor = obs_scale / normaliser
        grads = jax.tree.map(lambda g: (g * factor).astype(g.dtype), grad_sum)
        loss = loss_sum * factor
        if self._split_elbo:
            # post-processing: data-free term added after the noise
            grads = jax.tree.map(jnp.add, grads, global_grads)
            loss = loss + global_loss
        optim_state = self._optim_update(grads, state.optim_state)
        count = jnp.asarray(state.num_nonfinite_grads, jnp.int32) + num_bad
        steps = jnp.asarray(state.num_steps, jnp.int32) + 1
        return DPSVIState(optim_state, new_key, obs_scale, count, steps), loss
