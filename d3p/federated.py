# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""DP variational inference across data silos, on Flower (``pip install "d3p[federated]"``).

Several data owners (silos) fit one variational posterior without pooling their records.
Every silo runs its own :class:`d3p.svi.DPSVI` steps on its own records; a server averages
the silos' unconstrained variational parameters, weighted by their numbers of records
(federated averaging), and sends the average back for the next round.

**Privacy model (record-level DP per silo).** Each silo protects each of its own records
against everyone else: the server, the other silos and whoever sees the result. Everything
a silo sends over all rounds is the output of its own DP-VI steps: Poisson sampling at
rate ``q`` over its own ``N_k`` records, clipping at ``C``, Gaussian noise ``sigma * C``
from :mod:`d3p.random`, on its own secret key, which never leaves the silo (nor does its
:class:`~d3p.svi.DPSVIState`). A silo's spend is therefore the
:class:`~d3p.plan.PrivacyPlan` of all its local steps (rounds x local steps), whatever the
server does with the updates (post-processing). Public, and not protected: the silo sizes
``N_k`` (they weight the average), the number of rounds and local steps, the privacy
settings and the epsilon each silo reports, and which silos take part in which round.

The building blocks for real deployments are :func:`make_client_app` (a Flower ``ClientApp``
run by each silo's SuperNode, with the silo's data) and :func:`make_server_app` (a Flower
``ServerApp`` with the :class:`DPVIFedAvg` strategy); :func:`train_federated` runs them in
Flower's simulation engine on one machine in one call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import pickle
import secrets
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import numpyro
import tqdm
from numpyro.infer import Trace_ELBO

import d3p.random
from d3p.plan import PrivacyBudget, PrivacyPlan
from d3p.svi import DPSVI

try:
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.serverapp.strategy.strategy_utils import sample_nodes
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'd3p.federated needs Flower: pip install "d3p[federated]" (flwr[simulation]>=1.42)'
    ) from error

__all__ = [
    "DPVIFedAvg",
    "FederatedResult",
    "SiloPrivacy",
    "check_silos",
    "initial_params",
    "make_client_app",
    "make_server_app",
    "train_federated",
]

# keys of the records exchanged between the server and the silos
_ARRAYS = "arrays"
_METRICS = "metrics"
_STATE = "d3p-silo"
_STOPPED = "stopped"


# --------------------------------------------------------------------------------------------
# Privacy settings of one silo
# --------------------------------------------------------------------------------------------


def _real(value: Any, name: str, low: float, high: float, closed_high: bool = False) -> float:
    """``value`` as a float in ``(low, high)`` (``(low, high]`` if ``closed_high``)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    inside = low < value < high or (closed_high and value == high)
    if not inside:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must be in ({low}, {high}{bracket}, got {value}")
    return value


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class SiloPrivacy:
    """The privacy settings of one silo (record-level DP over the silo's own records).

    Give ``noise_multiplier`` (then ``epsilon``, if given, caps the spend: the silo stops
    taking part before a round that would take it over ``epsilon``), or ``epsilon`` and
    ``num_steps`` without ``noise_multiplier`` (then the multiplier is calibrated with
    :meth:`d3p.plan.PrivacyBudget.calibrate` so that ``num_steps`` steps spend at most
    ``epsilon``, and the silo stops before exceeding ``num_steps``).

    Parameters
    ----------
    q : float
        Poisson sampling rate in (0, 1]: each of the silo's records joins a local step's
        batch independently with probability ``q``.
    clipping_threshold : float
        ``C`` in (0, inf): bound on the L2 norm of one record's gradient.
    delta : float
        The delta, in (0, 1), at which the silo's epsilon is reported (well below
        ``1 / N_k``).
    noise_multiplier : float, optional
        ``sigma`` in (0, inf): the noise on each step's gradient sum has standard deviation
        ``sigma * C``.
    epsilon : float, optional
        The silo's budget, > 0: it never spends more (at ``delta``).
    num_steps : int, optional
        The number of local steps the calibrated budget covers (all rounds together);
        only without ``noise_multiplier``.
    """

    q: float
    clipping_threshold: float
    delta: float
    noise_multiplier: float | None = None
    epsilon: float | None = None
    num_steps: int | None = None
    _budget: PrivacyBudget | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        fields = {
            "q": _real(self.q, "q", 0.0, 1.0, closed_high=True),
            "clipping_threshold": _real(
                self.clipping_threshold, "clipping_threshold", 0.0, math.inf
            ),
            "delta": _real(self.delta, "delta", 0.0, 1.0),
        }
        if self.noise_multiplier is not None:
            fields["noise_multiplier"] = _real(
                self.noise_multiplier, "noise_multiplier (dp_scale)", 0.0, math.inf
            )
        if self.epsilon is not None:
            fields["epsilon"] = _real(self.epsilon, "epsilon", 0.0, math.inf)
        if self.noise_multiplier is None:
            if self.epsilon is None or self.num_steps is None:
                raise ValueError(
                    "give noise_multiplier (dp_scale), or epsilon and num_steps to calibrate it"
                )
            fields["num_steps"] = _count(self.num_steps, "num_steps")
        elif self.num_steps is not None:
            raise ValueError(
                "num_steps calibrates the noise; give it only without noise_multiplier"
            )
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        if self.noise_multiplier is None:  # calibrated once, here (and pickled with it)
            budget = PrivacyBudget.calibrate(
                self.epsilon, self.delta, self.q, self.num_steps, self.clipping_threshold
            )
            object.__setattr__(self, "_budget", budget)

    @property
    def budget(self) -> PrivacyBudget | None:
        """The calibrated :class:`~d3p.plan.PrivacyBudget` (None when sigma is given)."""
        return self._budget

    @property
    def sigma(self) -> float:
        """The noise multiplier the silo uses (given or calibrated)."""
        budget = self.budget
        return self.noise_multiplier if budget is None else budget.noise_multiplier

    def plan(self, dataset_size: int, num_steps: int) -> PrivacyPlan:
        """The :class:`~d3p.plan.PrivacyPlan` of ``num_steps`` local steps over the silo's
        ``dataset_size`` records (the run :meth:`d3p.svi.DPSVI.run` takes and accounts)."""
        budget = self.budget
        if budget is not None:
            return budget.plan(dataset_size, num_steps)
        return PrivacyPlan.poisson(
            dataset_size, self.q, self.clipping_threshold, self.noise_multiplier, num_steps
        )

    def plan_within_budget(self, dataset_size: int, num_steps: int) -> PrivacyPlan | None:
        """:meth:`plan`, or None if ``num_steps`` local steps in all exceed the budget."""
        budget = self.budget
        if budget is not None and num_steps > budget.num_steps:
            return None
        plan = self.plan(dataset_size, num_steps)
        if self.epsilon is not None and plan.epsilon(self.delta) > self.epsilon:
            return None
        return plan


# --------------------------------------------------------------------------------------------
# Checks before anything starts
# --------------------------------------------------------------------------------------------


def check_silos(silos: Sequence[Sequence[Any]]) -> list[tuple[np.ndarray, ...]]:
    """Validate the silos' data: each a tuple of arrays with one row per record.

    Raises ``ValueError`` for no silos, an empty silo, arrays of unequal length within a
    silo, or silos whose arrays differ in number, per-record shape or dtype (the features
    must mean the same everywhere). Returns the silos as tuples of numpy arrays.
    """
    if isinstance(silos, np.ndarray | jax.Array) or not isinstance(silos, Sequence):
        raise TypeError("silos must be a sequence of data tuples, one per silo")
    if len(silos) == 0:
        raise ValueError("silos must hold at least one silo's data")
    checked = []
    for k, silo in enumerate(silos):
        if isinstance(silo, np.ndarray | jax.Array):
            silo = (silo,)
        arrays = tuple(np.asarray(a) for a in silo)
        if not arrays:
            raise ValueError(f"silo {k} has no data arrays")
        if any(a.ndim == 0 for a in arrays):
            raise ValueError(f"silo {k}: every data array needs a first axis of records")
        lengths = {a.shape[0] for a in arrays}
        if len(lengths) > 1:
            raise ValueError(f"silo {k}: data arrays of different lengths {sorted(lengths)}")
        if lengths == {0}:
            raise ValueError(f"silo {k} is empty (0 records); every silo needs records")
        checked.append(arrays)
    first = [(a.shape[1:], a.dtype) for a in checked[0]]
    for k, arrays in enumerate(checked[1:], start=1):
        layout = [(a.shape[1:], a.dtype) for a in arrays]
        if layout != first:
            raise ValueError(
                f"silo {k} has per-record shapes/dtypes {layout}, silo 0 has {first}; every "
                "silo must hold the same features"
            )
    return checked


def _zeros(arrays: Sequence[np.ndarray], rows: int) -> tuple[np.ndarray, ...]:
    """A data-free stand-in batch of ``rows`` rows shaped like ``arrays``."""
    return tuple(np.zeros((rows, *a.shape[1:]), a.dtype) for a in arrays)


def _check_data_plate(model: Callable, example: Sequence[np.ndarray], kwargs: dict) -> None:
    """Refuse a model without an observed site in a plate over the batch (one record = one
    row): DP-VI clips per record, which needs the likelihood to factorise over records."""
    observed = []
    for rows in (3, 5):  # the plate's length must follow the batch's
        batch = _zeros(example, rows)
        with numpyro.handlers.seed(rng_seed=0), numpyro.handlers.trace() as trace:
            model(*batch, **kwargs)
        observed.append(
            {
                name
                for name, site in trace.items()
                if site["type"] == "sample"
                and site.get("is_observed")
                and any(frame.size == rows for frame in site["cond_indep_stack"])
            }
        )
    if not observed[0] & observed[1]:
        raise ValueError(
            "the model has no observed site inside a plate over the data records (a "
            "numpyro.plate whose subsample size is the batch length, e.g. "
            "numpyro.plate('data', N, subsample_size=X.shape[0])); DP-VI needs one record per "
            "row to clip per record"
        )


def initial_params(
    model: Callable,
    guide: Callable,
    optim: Any,
    *example: Any,
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, np.ndarray]:
    """The starting unconstrained variational parameters of a federation (public).

    Computed from ``seed`` (public) and the shapes of ``example`` only: the guide is
    initialised on an all-zero stand-in batch, so no private data is read. Every silo
    starts its first round from these parameters.
    """
    batch = _zeros([np.asarray(a) for a in example], 1)
    dpsvi = DPSVI(model, guide, optim, Trace_ELBO(), clipping_threshold=1.0, dp_scale=1.0, **kwargs)
    state = dpsvi.init(d3p.random.PRNGKey(seed), *batch)
    params = dpsvi.optim.get_params(state.optim_state)
    return {name: np.asarray(value) for name, value in params.items()}


# --------------------------------------------------------------------------------------------
# Client side: one silo
# --------------------------------------------------------------------------------------------


def _silo_id(context: Context) -> int:
    """The silo's index: ``partition-id`` (simulation) or ``silo`` of the node config."""
    for key in ("partition-id", "silo"):
        if key in context.node_config:
            return int(context.node_config[key])
    return int(context.node_id)


def _to_record(params: dict) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.asarray(v)) for k, v in params.items()})


def _from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _enable_compilation_cache(path: str | None) -> None:
    """JAX's persistent compilation cache in ``path`` for this process (unless one is set).

    Flower's deployment engine starts a new ClientApp process for every round, which would
    compile the silo's DPSVI step anew; the cache turns that into a lookup. It lives on the
    silo's own machine."""
    if path is None or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class _Silo:
    """What one silo does in a round (the body of the ClientApp's train handler)."""

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim: Any,
        load_data: Callable[[Context], Sequence[Any]],
        privacy: SiloPrivacy | Callable[[Context], SiloPrivacy],
        local_steps: int,
        seed: int | Callable[[Context], int | None] | None,
        compilation_cache_dir: str | None,
        static_kwargs: dict,
    ):
        self.model, self.guide, self.optim = model, guide, optim
        self.load_data, self.privacy, self.local_steps = load_data, privacy, local_steps
        self.seed, self.cache_dir, self.static_kwargs = seed, compilation_cache_dir, static_kwargs
        self.token = secrets.token_hex(8)  # names this app's DPSVIs in _DPSVIS

    def _privacy(self, context: Context) -> SiloPrivacy:
        privacy = self.privacy(context) if callable(self.privacy) else self.privacy
        if not isinstance(privacy, SiloPrivacy):
            raise TypeError(f"privacy must give a d3p.federated.SiloPrivacy, got {privacy!r}")
        return privacy

    def _secret_key(self, context: Context, silo: int) -> Any:
        seed = self.seed(context) if callable(self.seed) else self.seed
        if seed is None:  # a fresh secret: the key never leaves the silo
            return d3p.random.PRNGKey(secrets.randbits(63))
        return d3p.random.fold_in(d3p.random.PRNGKey(seed), silo)

    def train(self, message: Message, context: Context) -> Message:
        _enable_compilation_cache(self.cache_dir)
        silo = _silo_id(context)
        privacy = self._privacy(context)
        (data,) = check_silos([self.load_data(context)])
        n = data[0].shape[0]
        stored = context.state.config_records.get(_STATE)
        if stored is None:
            stored = ConfigRecord({"steps": 0, "epsilon": 0.0, _STOPPED: False})
        done, local = int(stored["steps"]), self.local_steps
        metrics = {"silo": silo, "num-examples": n, "steps": done}
        # the plan of all the silo's steps after this round: what it would spend
        plan = None if stored[_STOPPED] else privacy.plan_within_budget(n, done + local)
        if plan is None:  # stop before a round that would overspend (and stay stopped)
            stored[_STOPPED] = True
            context.state[_STATE] = stored
            metrics.update({"epsilon": float(stored["epsilon"]), _STOPPED: 1})
            return Message(RecordDict({_METRICS: MetricRecord(metrics)}), reply_to=message)

        dpsvi = self._dpsvi(silo, privacy, plan)
        if "state" in stored:
            state, key = pickle.loads(stored["state"]), pickle.loads(stored["key"])
        else:  # the silo's own state and secret key; initialised on a data-free batch
            key = self._secret_key(context, silo)
            state = dpsvi.init(d3p.random.fold_in(key, 0), *_zeros(data, plan.batch_size))
        # the round starts from the global parameters, with a fresh optimiser state (e.g.
        # Adam's moments restart each round); the silo's key and step count carry on
        global_params = _from_record(message.content[_ARRAYS])
        state = state._replace(optim_state=dpsvi.optim.init(global_params))
        # the plan's Poisson batches, drawn with the round's own secret key; each step is
        # DPSVI.update's clipped and noised gradient: the steps the plan accounts
        batch_init, get_batch = plan.batcher(data, d3p.random)
        _, batches = batch_init(d3p.random.fold_in(key, done // local + 1))
        for i in range(local):
            batch, mask = get_batch(i, batches)
            state, _ = dpsvi.update(state, *batch, mask=mask)
        epsilon = plan.epsilon(privacy.delta)
        stored["state"] = pickle.dumps(jax.device_get(state))
        stored["key"] = pickle.dumps(jax.device_get(key))
        stored["steps"] = done + local
        stored["epsilon"] = epsilon
        context.state[_STATE] = stored
        params = dpsvi.optim.get_params(state.optim_state)
        metrics.update({"steps": done + local, "epsilon": epsilon, _STOPPED: 0})
        content = RecordDict({_ARRAYS: _to_record(params), _METRICS: MetricRecord(metrics)})
        return Message(content, reply_to=message)

    def _dpsvi(self, silo: int, privacy: SiloPrivacy, plan: PrivacyPlan) -> DPSVI:
        """The silo's DPSVI, kept for the process (its compiled step is reused each round)."""
        key = (self.token, silo, plan.clipping_threshold, plan.noise_multiplier, plan.normaliser)
        if key not in _DPSVIS:
            _DPSVIS[key] = DPSVI(
                self.model,
                self.guide,
                self.optim,
                Trace_ELBO(),
                clipping_threshold=plan.clipping_threshold,
                dp_scale=plan.noise_multiplier,
                expected_batch_size=plan.normaliser,
                **self.static_kwargs,
            )
        return _DPSVIS[key]


# DPSVIs of the silos this process serves, by app and silo: the simulation engine rebuilds
# the ClientApp for every message, and a new DPSVI would compile its step anew
_DPSVIS: dict[tuple, DPSVI] = {}


def make_client_app(
    model: Callable,
    guide: Callable,
    optim: Any,
    load_data: Callable[[Context], Sequence[Any]],
    privacy: SiloPrivacy | Callable[[Context], SiloPrivacy],
    local_steps: int,
    *,
    seed: int | Callable[[Context], int | None] | None = None,
    compilation_cache_dir: str | None = None,
    **static_kwargs: Any,
) -> ClientApp:
    """The Flower ``ClientApp`` a silo runs: local DPSVI steps on the silo's own records.

    In each round the silo receives the global unconstrained variational parameters and
    takes ``local_steps`` DPSVI steps from them on its own data: the Poisson batches of
    its :class:`~d3p.plan.PrivacyPlan` (:meth:`~d3p.plan.PrivacyPlan.batcher`, drawn with
    the silo's secret key, fresh each round), each a :meth:`d3p.svi.DPSVI.update` (clipped
    per-record gradients, noise from :mod:`d3p.random`), continuing its own
    :class:`~d3p.svi.DPSVIState` (kept in the node's context, never sent; the optimiser
    state restarts at the global parameters). It replies with its new unconstrained
    parameters and public metrics: its number of records (the weight), its steps so far
    and the epsilon of its plan of all of them. Before a round that would take it over its
    budget it replies ``stopped`` without parameters, and keeps doing so.

    Parameters
    ----------
    model, guide, optim
        As for :class:`d3p.svi.DPSVI`; identical in every silo and on the server. The
        model's data plate should have the total number of records of all silos as its
        size (a public static keyword argument), so every silo's local objective estimates
        the ELBO of the pooled data.
    load_data : callable
        ``load_data(context) -> tuple of arrays``: the silo's records (one row each), e.g.
        read from a path in ``context.node_config``.
    privacy : SiloPrivacy or callable
        The silo's privacy settings, or ``privacy(context) -> SiloPrivacy``.
    local_steps : int
        DPSVI steps per round (>= 1).
    seed : int or callable, optional
        Seed of the silo's secret key (folded with the silo's index); None (default) draws
        a fresh secret key. A fixed seed makes runs reproducible and must then be secret.
    compilation_cache_dir : str, optional
        Use JAX's persistent compilation cache there (if the process has none), so rounds
        run in new processes (Flower's deployment engine) reuse the compiled step. It is on
        the silo's own machine.
    **static_kwargs
        Public keyword arguments of model and guide (e.g. ``num_obs_total``).
    """
    local_steps = _count(local_steps, "local_steps")
    silo = _Silo(
        model,
        guide,
        optim,
        load_data,
        privacy,
        local_steps,
        seed,
        compilation_cache_dir,
        static_kwargs,
    )
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return silo.train(message, context)

    return app


# --------------------------------------------------------------------------------------------
# Server side
# --------------------------------------------------------------------------------------------


class DPVIFedAvg(FedAvg):
    """Federated averaging of the silos' unconstrained variational parameters.

    Waits for ``num_silos`` nodes, sends every round's global parameters to each silo that
    has not stopped, and averages the parameters of the silos that trained, weighted by
    their numbers of records (``num-examples``). Records per round (public): the wall time,
    and each silo's steps, epsilon and whether it stopped. Federated evaluation is off
    (a silo's loss is not private).

    Parameters
    ----------
    num_silos : int
        The number of silos (SuperNodes) to wait for; all of them train in every round.
    on_round : callable, optional
        ``on_round(record)`` after each round (e.g. a progress bar).
    """

    def __init__(self, num_silos: int, on_round: Callable[[dict], None] | None = None):
        num_silos = _count(num_silos, "num_silos")
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=num_silos,
            min_evaluate_nodes=0,
            min_available_nodes=num_silos,
            arrayrecord_key=_ARRAYS,
        )
        self.num_silos = num_silos
        self.on_round = on_round
        self.stopped_nodes: set[int] = set()
        self.silos: dict[int, dict] = {}  # silo index -> latest public metrics
        self.rounds: list[dict] = []
        self._round_start = 0.0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_start = time.perf_counter()
        nodes, _ = sample_nodes(grid, self.num_silos, self.num_silos)
        nodes = [n for n in nodes if n not in self.stopped_nodes]
        config["server-round"] = server_round
        record = RecordDict({_ARRAYS: arrays, "config": config})
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        failed = [m for m in replies if m.has_error()]
        if failed:
            reasons = "; ".join(m.error.reason for m in failed)
            raise RuntimeError(f"round {server_round}: {len(failed)} silo(s) failed: {reasons}")
        trained, taking_part = [], {}
        for message in replies:
            metrics = dict(message.content[_METRICS])
            silo = int(metrics["silo"])
            self.silos[silo] = metrics
            if metrics[_STOPPED]:
                self.stopped_nodes.add(message.metadata.src_node_id)
            else:
                trained.append(message)
                taking_part[silo] = metrics["epsilon"]
        arrays = None
        if trained:
            arrays, _ = super().aggregate_train(server_round, trained)
        record = {
            "round": server_round,
            "seconds": time.perf_counter() - self._round_start,
            "silos": sorted(taking_part),
            "epsilons": {s: float(m["epsilon"]) for s, m in sorted(self.silos.items())},
            "steps": {s: int(m["steps"]) for s, m in sorted(self.silos.items())},
        }
        self.rounds.append(record)
        if self.on_round is not None:
            self.on_round(record)
        return arrays, None


def make_server_app(
    initial: dict[str, np.ndarray],
    num_rounds: int,
    num_silos: int,
    *,
    on_result: Callable[[dict[str, np.ndarray], DPVIFedAvg, Context], None] | None = None,
    on_round: Callable[[dict], None] | None = None,
    round_timeout: float = 3600.0,
) -> ServerApp:
    """The Flower ``ServerApp``: ``num_rounds`` rounds of :class:`DPVIFedAvg`.

    Parameters
    ----------
    initial : dict
        The starting unconstrained variational parameters (public), see
        :func:`initial_params`.
    num_rounds : int
        Number of rounds (>= 1). A silo takes ``local_steps`` DPSVI steps per round.
    num_silos : int
        Number of silos to wait for.
    on_result : callable, optional
        ``on_result(params, strategy, context)`` at the end, with the final global
        unconstrained parameters, the strategy (its :attr:`~DPVIFedAvg.rounds` and
        :attr:`~DPVIFedAvg.silos` hold the public per-round and per-silo records) and the
        ServerApp's Flower ``Context`` (e.g. its ``run_config``, to save the result).
    on_round : callable, optional
        Called with each round's record.
    round_timeout : float
        Seconds to wait for the silos' replies in a round.
    """
    num_rounds = _count(num_rounds, "num_rounds")
    initial = {k: np.asarray(v) for k, v in initial.items()}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = DPVIFedAvg(num_silos, on_round=on_round)
        result = strategy.start(
            grid=grid,
            initial_arrays=_to_record(initial),
            num_rounds=num_rounds,
            timeout=round_timeout,
        )
        final = _from_record(result.arrays) if len(result.arrays) else dict(initial)
        if on_result is not None:
            on_result(final, strategy, context)

    return app


# --------------------------------------------------------------------------------------------
# One call: the simulation engine
# --------------------------------------------------------------------------------------------


class FederatedResult(NamedTuple):
    """Result of :func:`train_federated`.

    Attributes
    ----------
    params : dict
        The global constrained variational parameters after the last round.
    unconstrained_params : dict
        The same, unconstrained (what the server averages).
    epsilons : list of float
        The epsilon spent by each silo (at ``delta``), in the order the silos were given:
        the epsilon of its :class:`~d3p.plan.PrivacyPlan` of all the local steps it took.
    delta : float
        The delta of ``epsilons``.
    steps : list of int
        The local steps each silo took (rounds taken x local steps).
    stopped : list of bool
        Whether each silo stopped early to stay within its budget.
    plans : list of PrivacyPlan
        Each silo's plan of the steps it took (None for a silo that took none).
    history : list of dict
        One record per round: ``round``, ``seconds`` (wall time), ``silos`` (those that
        trained), ``epsilons`` and ``steps`` per silo so far.
    """

    params: dict
    unconstrained_params: dict
    epsilons: list
    delta: float
    steps: list
    stopped: list
    plans: list
    history: list


def _per_silo(value: Any, name: str, k: int) -> list:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != k:
            raise ValueError(f"{name} needs one value per silo ({k}), got {len(value)}")
        return list(value)
    return [value] * k


@contextlib.contextmanager
def _quiet_flower(verbose: bool):
    """Flower logs every round at INFO and warns that run_simulation is deprecated (in
    favour of its CLI, ``flwr run``); keep that off the console unless ``verbose``."""
    if verbose:
        yield
        return
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def train_federated(
    model: Callable,
    guide: Callable,
    optim: Any,
    silos: Sequence[Sequence[Any]],
    num_rounds: int,
    local_steps: int,
    *,
    q: float | Sequence[float],
    delta: float,
    clipping_threshold: float,
    dp_scale: float | Sequence[float] | None = None,
    epsilon: float | Sequence[float] | None = None,
    seed: int | None = None,
    init_seed: int = 0,
    progress_bar: bool = True,
    num_cpus: int | None = None,
    verbose: bool = False,
    **static_kwargs: Any,
) -> FederatedResult:
    """Fit one variational posterior across silos in Flower's simulation engine.

    Runs :func:`make_server_app` and, for every silo, :func:`make_client_app` on this
    machine with ``flwr.simulation.run_simulation`` (Ray). Each round every silo that is
    within its budget takes ``local_steps`` DPSVI steps from the global parameters, and
    the server averages the unconstrained parameters weighted by the silos' sizes.

    Give ``dp_scale`` (``sigma``; with ``epsilon`` too, ``epsilon`` is a cap: a silo stops
    before a round that would exceed it), or ``epsilon`` alone: then each silo's ``sigma``
    is calibrated (:meth:`d3p.plan.PrivacyBudget.calibrate`) so that all
    ``num_rounds * local_steps`` of its steps spend at most ``epsilon``.

    Parameters
    ----------
    model, guide, optim
        As for :class:`d3p.svi.DPSVI`. Give the model's data-plate size (the total number
        of records of all silos, public) as a static keyword argument.
    silos : sequence of tuples of arrays
        Each silo's data: arrays with one row per record, the same features everywhere.
    num_rounds : int
        Number of rounds (>= 1).
    local_steps : int
        DPSVI steps each silo takes per round (>= 1).
    q : float or sequence of float
        Poisson sampling rate in (0, 1] (per silo, or one for all).
    delta : float
        The delta, in (0, 1), at which each silo's epsilon is reported (and calibrated).
    clipping_threshold : float
        ``C`` in (0, inf), the bound on one record's gradient norm.
    dp_scale : float or sequence of float, optional
        Noise multiplier ``sigma`` in (0, inf) (per silo, or one for all).
    epsilon : float or sequence of float, optional
        Each silo's budget (> 0) at ``delta``.
    seed : int, optional
        Seed of the silos' secret keys (each folds in its index); None draws fresh secret
        keys. A fixed seed makes the run reproducible and must then be kept secret.
    init_seed : int
        Public seed of the starting parameters (:func:`initial_params`).
    progress_bar : bool
        A tqdm progress bar over the rounds.
    num_cpus : int, optional
        CPUs Ray may use (default: all); each silo's ClientApp gets one.
    verbose : bool
        Show Flower's log.
    **static_kwargs
        Public keyword arguments of model and guide (e.g. ``num_obs_total``).

    Returns
    -------
    FederatedResult
    """
    num_rounds = _count(num_rounds, "num_rounds")
    local_steps = _count(local_steps, "local_steps")
    data = check_silos(silos)
    k = len(data)
    if dp_scale is None and epsilon is None:
        raise ValueError("give dp_scale (sigma), or epsilon to calibrate it, or both")
    qs = _per_silo(q, "q", k)
    sigmas = _per_silo(dp_scale, "dp_scale", k)
    epsilons = _per_silo(epsilon, "epsilon", k)
    privacy = [
        SiloPrivacy(
            q=qs[i],
            clipping_threshold=clipping_threshold,
            delta=delta,
            noise_multiplier=sigmas[i],
            epsilon=epsilons[i],
            num_steps=num_rounds * local_steps if sigmas[i] is None else None,
        )
        for i in range(k)
    ]
    _check_data_plate(model, data[0], static_kwargs)
    initial = initial_params(model, guide, optim, *data[0], seed=init_seed, **static_kwargs)

    box: dict[str, Any] = {}
    bar = tqdm.tqdm(total=num_rounds, disable=not progress_bar, desc="rounds")

    def on_round(record: dict) -> None:
        bar.update(1)
        eps = ", ".join(f"{e:.3g}" for e in record["epsilons"].values())
        bar.set_postfix_str(f"epsilons {eps}")

    def on_result(params: dict, strategy: DPVIFedAvg, context: Context) -> None:
        box["params"], box["strategy"] = params, strategy

    server = make_server_app(initial, num_rounds, k, on_result=on_result, on_round=on_round)
    if num_cpus is None:  # the CPUs this process may use (not all of a shared machine's)
        affinity = getattr(os, "sched_getaffinity", None)
        num_cpus = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
    cpus = _count(num_cpus, "num_cpus")
    with tempfile.TemporaryDirectory(prefix="d3p-federated-") as cache:
        client = make_client_app(
            model,
            guide,
            optim,
            lambda context: data[_silo_id(context)],
            lambda context: privacy[_silo_id(context)],
            local_steps,
            seed=seed,
            compilation_cache_dir=cache,
            **static_kwargs,
        )
        backend_config = {
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": cpus,
                "logging_level": "ERROR" if not verbose else "WARNING",
                "log_to_driver": verbose,
            },
        }
        from flwr.simulation import run_simulation

        with _quiet_flower(verbose), warnings.catch_warnings(), bar:
            if not verbose:
                warnings.simplefilter("ignore", DeprecationWarning)
                # Ray starts its daemons with fork + exec (harmless for JAX, which warns
                # about any fork), and tells about a future default of its own
                warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
                warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
            run_simulation(server, client, k, backend_config=backend_config)
    if "params" not in box:
        raise RuntimeError("the Flower simulation ended without a result (see its log)")
    strategy: DPVIFedAvg = box["strategy"]
    final = box["params"]
    dpsvi = DPSVI(
        model, guide, optim, Trace_ELBO(), clipping_threshold=1.0, dp_scale=1.0, **static_kwargs
    )
    state = dpsvi.init(d3p.random.PRNGKey(init_seed), *_zeros(data[0], 1))
    params = dpsvi.get_params(state._replace(optim_state=dpsvi.optim.init(final)))
    steps = [int(strategy.silos.get(i, {}).get("steps", 0)) for i in range(k)]
    plans = [privacy[i].plan(len(data[i][0]), s) if s else None for i, s in enumerate(steps)]
    return FederatedResult(
        params={name: np.asarray(v) for name, v in params.items()},
        unconstrained_params=final,
        epsilons=[float(strategy.silos.get(i, {}).get("epsilon", 0.0)) for i in range(k)],
        delta=float(delta),
        steps=steps,
        stopped=[bool(strategy.silos.get(i, {}).get(_STOPPED, 0)) for i in range(k)],
        plans=plans,
        history=list(strategy.rounds),
    )
