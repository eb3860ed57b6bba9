# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Differentially private stochastic variational inference (DP-VI) for NumPyro.

:class:`DPSVI` is a drop-in replacement for :class:`numpyro.infer.SVI` that makes each
update differentially private with the Gaussian mechanism (DP-SGD applied to the ELBO):
per-example gradients are clipped to a bound ``C``, summed, and Gaussian noise of standard
deviation ``dp_scale * C`` is added before the optimiser sees the gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from numpyro.infer import SVI, Trace_ELBO

import d3p.random
from d3p import _aligned, _mechanism, _sharding, _training, _validation, averaging
from d3p._gradients import clip_gradient, full_norm, normalize_gradient
from d3p.history import PrivacyHistory, plans_delta, plans_epsilon, warn_if_no_history
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
        Constrained parameters after the last step; with ``average``, the averaged
        parameters (the state keeps the last iterate).
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
    iterates : d3p.averaging.IterateStats or d3p.averaging.EMAState, optional
        With ``average``, the statistics of the averaged iterates (unconstrained), e.g. for
        :class:`d3p.noise_aware.NoiseAwarePosterior`; else None. Post-processing of the
        private iterates: as private as ``params``.
    """

    params: dict
    state: DPSVIState
    losses: jax.Array
    epsilon: float
    delta: float
    dp_event: Any = None
    iterates: Any = None


# --------------------------------------------------------------------------------------------
# DPSVI
# --------------------------------------------------------------------------------------------


class DPSVI:
    """Differentially private stochastic variational inference (a drop-in for numpyro's SVI).

    Each :meth:`update` clips every example's gradient (all parameters together) to L2 norm
    ``clipping_threshold``, sums them, adds Gaussian noise of standard deviation
    ``dp_scale * clipping_threshold`` from ``rng_suite``, and divides by a data-independent
    normaliser: the Gaussian mechanism with noise multiplier ``dp_scale`` per step. The
    released quantity and its sensitivity are stated in :mod:`d3p._mechanism`;
    :meth:`get_epsilon` and :meth:`run` account for whole runs, from the state's history.

    **What C bounds.** With ``per_example_loss=Trace_ELBO()`` only the data terms
    (likelihood and local latents in the data plate) are clipped per example; the global
    terms (prior and guide of the global latents) are computed on an all-zero stand-in batch
    and added after the noise, at no privacy cost. Other losses (e.g.
    ``TraceMeanField_ELBO``) clip the whole per-example loss, as d3p 0.2 did.

    **Normaliser.** ``expected_batch_size`` (``q * N`` for Poisson batches; :meth:`run`
    sets it), else the structural batch size. Never the realised batch size (d3p 0.2's leak).

    **Non-finite gradients** of an example are replaced by zero (a valid clipping) and
    counted in :attr:`DPSVIState.num_nonfinite_grads`.

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
    aligned_gradients : bool or sequence of str
        Keyword-only. DPVIm's aligned gradients (Jälkö et al., TMLR 2023) for a mean-field
        Gaussian guide of the global latents: ``True`` for ``AutoNormal`` and
        ``AutoDiagonalNormal``, or the names of the location parameters of a hand-written
        location-scale guide. Each example's clipped vector is then its gradient with
        respect to the parameters the data terms read directly and the locations only;
        noise of the same ``dp_scale * C`` is added to those coordinates only. The scale
        gradients are derived from the noised location gradients (``loc_grad * eta *
        scale'``), post-processing at no privacy cost: what is released is the same
        Gaussian mechanism on fewer coordinates, so the accounting (epsilon) is
        unchanged. Refused with a ``ValueError`` (at :meth:`init` or the first
        :meth:`update`, never a silent fallback) unless ``per_example_loss`` is
        ``Trace_ELBO()`` with one particle, the model has global latents, every entry of
        their guide's sample depends on its own parameter entries and on exactly one
        location entry (not e.g. ``AutoMultivariateNormal`` or flows), and the data terms
        do not read the guide's parameters. A location whose derived factor ``T'(z)``
        underflows to 0, or any non-finite derived gradient entry, gets gradient 0.
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
        aligned_gradients: bool | Sequence[str] = False,
        **static_kwargs: Any,
    ):
        self.clipping_threshold, self.dp_scale, self.expected_batch_size = (
            _training.privacy_parameters(clipping_threshold, dp_scale, expected_batch_size, plan)
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
        _mechanism.check_components(self, allow_none=True)
        self.aligned_gradients = _aligned.option(aligned_gradients, guide, per_example_loss)
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
        _mechanism.check_components(self)
        args, batch_size = _validation.batch(args)
        init_key, state_key = _mechanism.init_keys(self.rng_suite, rng_key)
        try:
            svi_state = self._svi.init(init_key, *args, init_params=init_params, **kwargs)
        except TypeError as error:
            raise _training.missing_plate_size(self, kwargs) or error from error
        if svi_state.mutable_state is not None:
            raise ValueError(
                "DPSVI does not support models with mutable state (numpyro.mutable sites): "
                "the state would be updated from private data without noise."
            )
        params = self.optim.get_params(svi_state.optim_state)
        layout = _mechanism.site_layout(self, params, args, kwargs)
        scale = layout.observation_scale if self.clip_unscaled_observations else 1.0
        step = _mechanism.update_mechanism(self)
        state = DPSVIState(
            svi_state.optim_state,
            state_key,
            jnp.asarray(scale, jnp.result_type(float)),
            jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.int32),
            PrivacyHistory.start().record(step, 0),
        )
        if self.aligned_gradients:
            # raise the aligned step's refusals now: a step traced abstractly (no compute)
            mask = jnp.ones(batch_size, bool)
            jax.eval_shape(
                lambda s: _mechanism.update(self, s, args, kwargs, mask, 1.0, step), state
            )
        return state

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
        warn_if_no_history(svi_state)
        args, batch_size = _validation.batch(args)
        _sharding.check_no_explicit_without_mesh(args)
        _sharding.check_divisible(batch_size, _sharding.context_shards())
        mask_array = _validation.mask(mask, batch_size)
        normaliser = _mechanism.normaliser(self, batch_size, mask)
        step = _mechanism.update_mechanism(self)
        return _training.call_compiled(
            self, "update", _mechanism.update, svi_state, args, kwargs, mask_array, normaliser, step
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
        normaliser = _mechanism.normaliser(self, batch_size, mask)
        return _training.call_compiled(
            self, "evaluate", _mechanism.evaluate, svi_state, args, kwargs, mask_array, normaliser
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
        quantile level in (0, 1); ``dataset_size`` if never truncated). With a plan or a
        budget they default to its own, and values that contradict it are refused. For the
        epsilon of untruncated Poisson sampling without a data set, use
        :func:`d3p.dputil.compute_epsilon`.
        """
        return plans_epsilon(
            _training.accounted_plans(
                self, q, num_epochs, num_iter, dataset_size, max_batch_size, state
            ),
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
            _training.accounted_plans(
                self, q, num_epochs, num_iter, dataset_size, max_batch_size, state
            ),
            target_epsilon,
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
        average: float | averaging.Window | averaging.EMA | None = None,
        **kwargs: Any,
    ) -> DPSVIRunResult:
        """Train for ``num_steps`` private steps on Poisson-sampled minibatches of ``args``.

        Each step draws a Poisson batch (every record independently with probability
        ``q``; oversized draws truncated to ``max_batch_size`` random records) from the
        state's key, and takes :meth:`update`'s step with the normaliser ``q * N``; with a
        ``plan``, the plan's batches and normaliser. The parameters are initialised on an
        all-zero stand-in batch (no private data). Steps run in jitted chunks, compiled
        once per shape and reused by later runs, under a progress bar.

        A continued run (``init_state``) does not use ``rng_key``: all randomness comes
        from the state, so ``run(k, a)`` then ``run(k2, b, init_state=...)`` equals
        ``run(k, a + b)``. The reported epsilon composes the state's history with the new
        steps, whatever their parameters. A plan or budget refuses, before any work, a run
        that would take its data past the steps it covers (fresh runs count too).

        Parameters
        ----------
        rng_key
            An ``rng_suite`` key for :meth:`init` (unused with ``init_state``).
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
            Continue from this state (and its key and history) instead of initialising.
        init_params : dict, optional
            Initial constrained values of ``numpyro.param`` sites.
        mesh : jax.sharding.Mesh, optional
            Run on the devices of ``mesh`` (several processes too, after
            :func:`jax.distributed.initialize`): each batch is padded with masked rows to a
            multiple of the size of the mesh axis ``"data"`` and split along it; state,
            keys and noise are replicated. Same key, same result and accounting as without
            a mesh, up to summation order. Every process must pass the same arguments.
        check_finite : bool
            If True (default), refuse data holding NaN or infinity (a ``ValueError`` about
            your own data: not private) before any work.
        average : float, d3p.averaging.Window or d3p.averaging.EMA, optional
            Return averaged parameters (post-processing of the private iterates: no privacy
            cost, same state and epsilon). A fraction in (0, 1] (or
            :class:`~d3p.averaging.Window`): the mean of the iterates of the last
            ``ceil(fraction * num_steps)`` steps of this run, in the unconstrained space
            (DPVIm's iterate averaging); let the window start past convergence.
            :class:`~d3p.averaging.EMA`: an exponential moving average of this run's
            iterates. The result's ``iterates`` holds the statistics (for a window, also
            their spread, for :class:`~d3p.noise_aware.NoiseAwarePosterior`).
        **kwargs
            Keyword arguments of model and guide (public).

        Returns
        -------
        DPSVIRunResult
            ``(params, state, losses, epsilon, delta, dp_event, iterates)``; ``epsilon`` is
            the privacy spent by all steps in ``state`` (the plan's relation;
            add/remove-one without a plan), ``losses`` are not private.
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
                average=average,
            )
        )
