# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Differentially private stochastic variational inference (DP-VI) for NumPyro.

:class:`DPSVI` is a drop-in replacement for :class:`numpyro.infer.SVI` that makes each
update differentially private with the Gaussian mechanism (DP-SGD applied to the ELBO):
per-example gradients are clipped to a bound ``C``, summed, and Gaussian noise of standard
deviation ``dp_scale * C`` is added before the optimiser sees the gradient.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from numpyro.infer import SVI, Trace_ELBO

import d3p.random
from d3p import _mechanism, _sharding, _training, _validation, minibatch
from d3p.history import PrivacyHistory, UnplannedStep, plans_delta, plans_epsilon, with_history
from d3p.plan import PrivacyBudget, PrivacyPlan

__all__ = [
    "DPSVI",
    "DPSVIRunResult",
    "DPSVIState",
    "clip_gradient",
    "full_norm",
    "normalize_gradient",
]

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
        The ``rng_suite`` key of the next step. Every step draws its batch (in
        :meth:`DPSVI.run`), its model randomness and its noise from it and replaces it
        by a fresh key (:func:`d3p.random.rekey`), so this key cannot recompute any
        earlier step. It is secret while training may continue: whoever holds it can
        recompute the noise of the coming steps. Publish the parameters, not the state.
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
        depends on nothing but the number of calls (no privacy cost).
    history
        The :class:`~d3p.history.PrivacyHistory` of all steps taken since ``init``: the
        mechanism (sampling, clipping bound, noise, normaliser) of each run of steps.
        :meth:`DPSVI.run` and :meth:`DPSVI.get_epsilon` compose it with the new steps,
        whatever their parameters. ``None`` for a state built the d3p 0.2 way, whose
        earlier steps are unknown (accepted with a warning).
    """

    optim_state: Any
    rng_key: Any
    observation_scale: Any
    num_nonfinite_grads: Any = 0
    num_steps: Any = 0
    history: PrivacyHistory | None = None


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
            An ``rng_suite`` key. It is split into the key of the initialisation and the
            seed of the state's first key (rekeyed, see :attr:`DPSVIState.rng_key`).
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
            With an empty :class:`~d3p.history.PrivacyHistory` that will record this
            DPSVI's steps.
        """
        self._check_components()
        args, _ = _validation.batch(args)
        init_key, state_key = _mechanism.init_keys(self.rng_suite, rng_key)
        try:
            svi_state = self._svi.init(init_key, *args, init_params=init_params, **kwargs)
        except TypeError as error:
            raise self._missing_plate_size(kwargs) or error from error
        if svi_state.mutable_state is not None:
            raise ValueError(
                "DPSVI does not support models with mutable state (numpyro.mutable sites): "
                "the state would be updated from private data without noise."
            )
        params = self.optim.get_params(svi_state.optim_state)
        layout = _mechanism.site_layout(self, params, args, kwargs)
        scale = layout.observation_scale if self.clip_unscaled_observations else 1.0
        history = PrivacyHistory.start().record(self._update_mechanism(), 0)
        return DPSVIState(
            svi_state.optim_state,
            state_key,
            jnp.asarray(scale, jnp.result_type(float)),
            jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.int32),
            history,
        )

    def get_params(self, svi_state: DPSVIState) -> dict:
        """Constrained parameter values of ``svi_state`` (works inside ``jit``)."""
        return self._svi.constrain_fn(self.optim.get_params(svi_state.optim_state))

    def batch_key(self, svi_state: DPSVIState) -> Any:
        """The ``rng_suite`` key to draw the batch of ``svi_state``'s next step from.

        In a hand loop, draw each batch with it, e.g. ``get_batch(0, dpsvi.batch_key(state))``
        for the samplers of :mod:`d3p.minibatch` and :meth:`d3p.plan.PrivacyPlan.batcher`
        (their ``init`` returns the key itself as the sampler state), as :meth:`run`
        does. Every step's key is fresh, so batches never repeat by construction and a
        released later state cannot recompute them.
        """
        return _mechanism.batch_key(self.rng_suite, svi_state)

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
            ``True``. Must be boolean.
        **kwargs
            Keyword arguments of model and guide (public, not per-example).

        Returns
        -------
        svi_state : DPSVIState
            The new state; its history records the step (the plan's, with a plan; else an
            :class:`~d3p.history.UnplannedStep`, whose sampling :meth:`get_epsilon` asks for).
        loss : jax.Array
            The negative ELBO estimate on the batch's valid rows, normalised like the
            gradient. It is NOT differentially private: do not publish it.
        """
        svi_state = with_history(svi_state)
        args, batch_size = _validation.batch(args)
        _sharding.check_divisible(batch_size, _sharding.context_shards())
        mask_array = _validation.mask(mask, batch_size)
        normaliser = self._normaliser(batch_size, masked=mask is not None and jnp.ndim(mask) > 0)
        step = self._update_mechanism()
        return self._call_compiled(
            "update", _mechanism.update, svi_state, args, kwargs, mask_array, normaliser, step
        )

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
        return self._call_compiled(
            "evaluate", _mechanism.evaluate, svi_state, args, kwargs, mask_array, normaliser
        )

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
        """Privacy spent: epsilon at ``target_delta`` of a state's steps, or of a planned run.

        Give exactly one of ``state`` (all steps it has taken, as its history records
        them, whatever their parameters), ``num_iter`` (steps) and ``num_epochs``
        (``num_epochs / q`` steps, rounded up). ``inf`` when the noise is 0.

        How the batches were drawn must be known, never guessed: steps of :meth:`run`,
        and of :meth:`update` with a plan, carry their plan in the state's history. For
        other steps (a hand loop without a plan, or ``num_iter``/``num_epochs``) give
        ``q`` and ``dataset_size`` (N) and ``max_batch_size`` of the sampler that drew
        them (:func:`d3p.minibatch.poisson_batchify_data` truncates at it; an int, or a
        quantile level in (0, 1); ``dataset_size`` for no truncation). With a plan or a
        budget they default to its own, and values that contradict it are refused. For the
        epsilon of untruncated Poisson sampling without a data set, use
        :func:`d3p.dputil.compute_epsilon`.
        """
        return plans_epsilon(
            self._accounted_plans(q, num_epochs, num_iter, dataset_size, max_batch_size, state),
            target_delta,
        )

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
        return plans_delta(
            self._accounted_plans(q, num_epochs, num_iter, dataset_size, max_batch_size, state),
            target_epsilon,
        )

    def _accounted_plans(
        self,
        q: Any,
        num_epochs: Any,
        num_iter: Any,
        dataset_size: Any,
        max_batch_size: Any,
        state: DPSVIState | None,
    ) -> list[PrivacyPlan]:
        """The plans :meth:`get_epsilon` composes (empty if no step was taken)."""
        covered = self.plan or self.budget
        if covered is not None:
            self._check_governed()
            if q is not None and q != covered.q:
                raise ValueError(
                    f"this DPSVI's privacy plan or budget has q={covered.q}, got q={q}"
                )
            q = covered.q
        if self.plan is not None:
            if dataset_size not in (None, self.plan.dataset_size) or max_batch_size is not None:
                raise ValueError(
                    "this DPSVI's plan sets the data-set size and the batch size: give "
                    f"neither (plan: {self.plan})"
                )
        if self.dp_scale == 0:
            _warn_not_private()

        def sampled(step: UnplannedStep | None, n: int) -> PrivacyPlan:
            c, sigma = (
                (self.clipping_threshold, self.dp_scale)
                if step is None
                else (step.clipping_threshold, step.noise_multiplier)
            )
            if self.plan is not None:
                return (
                    PrivacyPlan.poisson(
                        self.plan.dataset_size, q, c, sigma, n, max_batch_size=self.plan.batch_size
                    )
                    if self.plan.sampling == "poisson"
                    else self.plan.with_steps(n)
                )
            size = max_batch_size
            if self.budget is not None and dataset_size is not None and size is None:
                size = self.budget.plan(dataset_size).batch_size  # what run draws
            if q is None or dataset_size is None or size is None:
                raise ValueError(
                    "how the batches were drawn is unknown: give q, dataset_size and "
                    "max_batch_size of the sampler that drew them (max_batch_size="
                    "dataset_size if batches were never truncated); got "
                    f"q={q!r}, dataset_size={dataset_size!r}, max_batch_size={max_batch_size!r}"
                )
            return PrivacyPlan.poisson(dataset_size, q, c, sigma, n, max_batch_size=size)

        if state is None:
            if (num_epochs is None) == (num_iter is None):
                raise ValueError("give exactly one of num_epochs, num_iter and state")
            if num_epochs is not None:
                if q is None:
                    raise ValueError("num_epochs needs the sampling rate q, in (0, 1]")
                num_iter = _validation.real(num_epochs, "num_epochs", 0.0) / q
            steps = math.ceil(_validation.real(num_iter, "num_iter", 0.0))
            return [sampled(None, steps)]
        if num_epochs is not None or num_iter is not None:
            raise ValueError("give exactly one of num_epochs, num_iter and state")
        if state.history is None:
            steps = int(state.num_steps)
            with_history(state)  # warns
            return [sampled(None, steps)] if steps else []
        plans = state.history.plans(sampled)
        for plan in plans:
            if plan.sampling == "poisson" and (
                (q is not None and plan.q != q)
                or (dataset_size is not None and plan.dataset_size != dataset_size)
                or (
                    max_batch_size is not None
                    and plan.batch_size
                    != minibatch.structural_batch_size(plan.dataset_size, plan.q, max_batch_size)
                )
            ):
                raise ValueError(
                    f"the state's steps were taken with q={plan.q}, dataset_size="
                    f"{plan.dataset_size}, batch size {plan.batch_size} (its history records "
                    f"them); got q={q!r}, dataset_size={dataset_size!r}, "
                    f"max_batch_size={max_batch_size!r}"
                )
        return plans

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
        refuses, before any work, runs that would take more than ``num_steps`` steps in
        all on the data set (fresh and continued runs together). Train in one call with
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
            Number of update steps the budget covers (all runs together).
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
        return DPSVIRunResult(
            *_training.run(
                self,
                rng_key,
                num_steps,
                args,
                kwargs,
                q=q,
                max_batch_size=max_batch_size,
                delta=delta,
                progress_bar=progress_bar,
                init_state=init_state,
                init_params=init_params,
                mesh=mesh,
                check_finite=check_finite,
            )
        )

    # ---------------------------------------------------------------- internals

    def _update_mechanism(self) -> PrivacyPlan | UnplannedStep:
        """What the history records for a step of :meth:`update`: the plan's, if any."""
        if self.plan is not None:
            return self.plan.with_steps(1)
        return UnplannedStep(self.clipping_threshold, self.dp_scale)

    def _check_governed(self) -> None:
        """Refuse a clipping threshold or noise changed away from the plan's or budget's."""
        covered = self.plan or self.budget
        if (self.clipping_threshold, self.dp_scale) != (
            covered.clipping_threshold,
            covered.noise_multiplier,
        ):
            raise ValueError(
                f"clipping_threshold={self.clipping_threshold} and dp_scale={self.dp_scale} "
                f"were changed from those of this DPSVI's plan or budget ({covered}); make a "
                "new plan instead"
            )

    def _missing_plate_size(self, kwargs: dict) -> ValueError | None:
        """The error for a model called without its data-set size (a plate of size None)."""
        try:
            parameters = inspect.signature(self.model).parameters
        except (TypeError, ValueError):
            return None
        given = {**kwargs, **self.static_kwargs}
        missing = [
            name
            for name, p in parameters.items()
            if p.default is None and given.get(name) is None and p.kind != p.VAR_POSITIONAL
        ]
        if not missing:
            return None
        return ValueError(
            f"the model's data plate has no size: pass the number of records N as the "
            f"model's keyword {' or '.join(map(repr, missing))} (e.g. DPSVI(..., "
            f"{missing[-1]}=N)); it sets the likelihood's scale and must be the data-set size"
        )

    def _check_plate(self, state: DPSVIState, n: int) -> None:
        """Refuse a model whose data plate scales one example to other than ``n`` records.

        A wrong data-set size (``num_obs_total``, ``N``) changes what the likelihood means
        and the step size; :meth:`run` knows the number of records, so it checks.
        """
        if not self.clip_unscaled_observations:
            return
        scale = float(state.observation_scale)
        if not math.isclose(scale, n, rel_tol=1e-6):
            raise ValueError(
                f"the model's data plate scales one example to {scale:g} records, but the "
                f"data have {n}: pass the data-set size N={n} to the model (e.g. "
                "num_obs_total=N, as the plate's size) "
            )

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

    def _call_compiled(
        self, name: str, fn: Callable, state: DPSVIState, args: tuple, kwargs: dict, *rest: Any
    ) -> Any:
        """``fn(self, state, args, kwargs, *rest)`` through a cached ``jax.jit``.

        Called un-jitted in a Python loop, each step then reuses one compiled program per
        input shape instead of recompiling its loops every call. Array-valued keyword
        arguments are traced; the others (e.g. ``num_obs_total``) are static and must be
        hashable, else the call runs un-jitted. ``rest[-1]`` may be static (a mechanism).
        """
        split = _training.split_kwargs(kwargs)
        if split is None:
            return fn(self, state, args, kwargs, *rest)
        dynamic, static = split
        *traced, last = rest
        if isinstance(last, PrivacyPlan | UnplannedStep):
            compiled = _training.cached(
                self,
                (name, static, last),
                lambda: jax.jit(
                    lambda s, a, d, *t: fn(self, s, a, {**d, **dict(static)}, *t, last)
                ),
            )
            return compiled(state, args, dynamic, *traced)
        compiled = _training.cached(
            self,
            (name, static),
            lambda: jax.jit(lambda s, a, d, *t: fn(self, s, a, {**d, **dict(static)}, *t)),
        )
        return compiled(state, args, dynamic, *rest)


def _warn_not_private() -> None:
    warnings.warn(
        "dp_scale is 0: no noise is added, the training is NOT differentially private "
        "(epsilon is inf)",
        UserWarning,
        stacklevel=4,
    )
