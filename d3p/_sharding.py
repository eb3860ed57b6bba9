# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Running DPSVI on several devices and hosts with :mod:`jax.sharding` (used by DPSVI).

The examples of a batch are split along the mesh axis named ``"data"``; everything else
(parameters, optimiser state, keys, the privacy noise) is replicated. The computation
stays one logical program (GSPMD): the noise is one draw from the replicated secure key,
identical on every device, never a draw per device, so the noise of a step is
N(0, (sigma C)^2) per coordinate whatever the number of devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from d3p import minibatch

__all__ = [
    "DATA_AXIS",
    "auto_mesh",
    "check_divisible",
    "check_mesh",
    "context_shards",
    "gather_batch",
    "place",
    "shard_batch",
]

DATA_AXIS = "data"


def check_mesh(mesh: Any) -> int:
    """The number of shards of ``mesh``'s ``"data"`` axis (devices the examples are split on)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(
            f"mesh must have an axis named {DATA_AXIS!r} (the examples of a batch are split "
            f"along it); its axes are {mesh.axis_names}"
        )
    return int(mesh.shape[DATA_AXIS])


def auto_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis of type ``Auto`` (shardings left to the XLA partitioner)."""
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)


def context_shards() -> int:
    """Shards of the ``"data"`` axis of the mesh set by :func:`jax.set_mesh` (1 if none)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[DATA_AXIS])


def _explicit_context() -> bool:
    """Whether the mesh in context has an ``Explicit`` axis (``jax.make_mesh``'s default)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and AxisType.Explicit in mesh.axis_types


def with_auto_axes(fn: Callable) -> Callable:
    """``fn`` with the context mesh's axes treated as ``Auto`` inside it, outputs replicated.

    DPSVI leaves the sharding of its per-example work to the XLA partitioner; under a mesh
    with ``Explicit`` axes (the default of :func:`jax.make_mesh`), slicing a batch sharded
    along ``"data"`` would be a sharding type error, so the step runs in
    :func:`jax.sharding.auto_axes`. Without such a mesh, ``fn`` runs as it is.
    """

    def wrapped(*args: Any) -> Any:
        if not _explicit_context():
            return fn(*args)
        return jax.sharding.auto_axes(fn, out_sharding=PartitionSpec())(*args)

    return wrapped


def check_no_explicit_without_mesh(args: tuple) -> None:
    """Refuse batch arrays sharded along an ``Explicit`` mesh axis outside ``jax.set_mesh``."""
    if not jax.sharding.get_abstract_mesh().empty:
        return
    for i, a in enumerate(args):
        sharding = getattr(jax.typeof(a), "sharding", None) if a is not None else None
        mesh = getattr(sharding, "mesh", None)
        if mesh is not None and not mesh.empty and AxisType.Explicit in mesh.axis_types:
            if any(p is not None for p in sharding.spec):
                raise ValueError(
                    f"positional argument {i} is sharded along an Explicit mesh axis "
                    f"({sharding.spec}); call DPSVI.update inside `with jax.set_mesh(mesh):` "
                    "so that d3p can split its per-example work across the devices"
                )


def check_divisible(batch_size: int, shards: int) -> None:
    """Refuse a batch whose rows cannot be split evenly across ``shards`` devices."""
    if batch_size % shards:
        raise ValueError(
            f"the batch has {batch_size} rows, which cannot be split evenly across the "
            f"{shards} devices of the mesh axis {DATA_AXIS!r}: pad it to a multiple of "
            f"{shards} rows with masked-out rows (mask False)"
        )


def shard_batch(batch: tuple, mask: jax.Array, shards: int) -> tuple[tuple, jax.Array]:
    """Pad a batch with masked-out zero rows to a multiple of ``shards`` rows and split its
    rows along the ``"data"`` axis of the mesh in context (inside ``jit``).

    The batch is drawn replicated (every device draws the same batch from the same key,
    so the sampler is never split and gathered); each device then keeps its rows. Padded
    rows are masked out, so they contribute nothing to any sum.
    """
    pad = -mask.shape[0] % shards

    def place(x):
        x = jax.lax.with_sharding_constraint(x, PartitionSpec())
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        spec = PartitionSpec(DATA_AXIS, *(None,) * (x.ndim - 1))
        return jax.lax.with_sharding_constraint(x, spec)

    return tuple(place(x) for x in batch), place(mask)


def gather_batch(
    dataset: tuple, idx: jax.Array, mask: jax.Array, shards: int
) -> tuple[tuple, jax.Array]:
    """The rows ``idx`` (drawn once, replicated) of ``dataset``, split along ``"data"``.

    The indices are padded and split like :func:`shard_batch`; each device then gathers
    only its own rows: locally from replicated data, and from data whose rows are split
    along ``"data"`` with one batch-sized reduction across devices (the data set is never
    gathered). Rows where ``mask`` is False are zero.
    """
    (idx,), mask = shard_batch((idx,), mask, shards)
    return minibatch._gather(dataset, idx, mask), mask


def _on_mesh(x: Any, mesh: Mesh) -> bool:
    """Whether ``x`` is a global array already placed on the devices of ``mesh``."""
    sharding = getattr(x, "sharding", None)
    return isinstance(sharding, NamedSharding) and np.array_equal(
        sharding.mesh.device_ids, mesh.device_ids
    )


def place(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of ``tree`` on the devices of ``mesh``: replicated, unless it is
    already an array placed on them (e.g. data whose rows are split along ``"data"``).

    Works with several processes (:func:`jax.distributed.initialize`): each process must
    hold the same values of the arrays it replicates, which become one global array.
    """
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(x):
        if _on_mesh(x, mesh):  # keep its layout, on ``mesh`` (its axis types may differ)
            return jax.device_put(x, NamedSharding(mesh, x.sharding.spec))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)
