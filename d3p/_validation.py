# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Argument checks shared by d3p's modules (raised before any work is done).

Each check returns the value converted to its canonical type, or raises ``TypeError`` (not
a number / not an integer) or ``ValueError`` (out of range) with a message that names the
argument and the allowed range.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["batch", "choice", "count", "finite_data", "mask", "probability", "real"]


def _interval(low: float, high: float, closed_low: bool, closed_high: bool) -> str:
    return f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"


def real(
    value: Any,
    name: str,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    closed_low: bool = False,
    closed_high: bool = False,
) -> float:
    """``value`` as a float if it lies in the interval from ``low`` to ``high``.

    The ends are excluded unless ``closed_low``/``closed_high``; NaN is never allowed.
    """
    interval = _interval(low, high, closed_low, closed_high)
    if isinstance(value, bool) or not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a real number in {interval}, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number in {interval}, got {value!r}") from None
    above = v >= low if closed_low else v > low
    below = v <= high if closed_high else v < high
    if math.isnan(v) or not (above and below):
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


def probability(value: Any, name: str = "q") -> float:
    """A sampling probability in (0, 1]."""
    return real(value, name, 0.0, 1.0, closed_high=True)


def count(value: Any, name: str, minimum: int = 1, *, allow_float: bool = True) -> int:
    """``value`` as an int if it is a whole number ``>= minimum``.

    A whole float (``100.0``) is accepted unless ``allow_float=False`` (then only integer
    types are, as sizes and indices in :mod:`d3p.minibatch` and :mod:`d3p.modelling`).
    """
    kind = numbers.Real if allow_float else numbers.Integral
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if not (math.isfinite(value) and int(value) == value and value >= minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def choice(value: Any, name: str, allowed: Sequence[str]) -> str:
    """One of the strings ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


# Row indices are int32 in the samplers and in DPSVI's per-example loop.
MAX_RECORDS = 2**31 - 1


def check_num_records(n: int, name: str) -> None:
    """Refuse ``n`` records beyond what int32 row indices can address."""
    if n > MAX_RECORDS:
        raise ValueError(
            f"{name} has {n} records; d3p supports at most 2**31 - 1 = {MAX_RECORDS} (int32 "
            "row indices): split the data or subsample it first"
        )


def batch(args: tuple) -> tuple[tuple, int]:
    """The positional data arguments as arrays (``None`` kept) and their common length.

    Every array is a batch whose first axis indexes examples.
    """
    if not args:
        raise ValueError("DPSVI needs at least one positional data argument (the batch).")
    out, sizes = [], {}
    for i, a in enumerate(args):
        if a is None:
            out.append(None)
            continue
        if np.ndim(a) > 0:  # before any copy: a view of 2**31 rows must not be materialised
            check_num_records(np.shape(a)[0], "the data")
        dtype = getattr(a, "dtype", None)  # arrays and tracers; lists go through numpy
        dtype = np.asarray(a).dtype if dtype is None else np.dtype(dtype)
        if isinstance(a, str | bytes) or dtype.kind not in "biuf":
            raise TypeError(
                f"positional argument {i} (data) must be a numeric or boolean array, got "
                f"dtype {dtype}; encode categories as integers and text as numbers first"
            )
        a = jnp.asarray(a)
        if a.ndim == 0:
            raise ValueError(
                f"positional argument {i} is a scalar; every positional argument of the model "
                "must be a batch array whose first axis indexes examples (pass public "
                "constants as keyword arguments)"
            )
        sizes[i] = a.shape[0]
        out.append(a)
    if not sizes:
        raise ValueError("all positional data arguments are None; there is no batch.")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch arrays have different lengths (first axis): {sizes}")
    n = next(iter(sizes.values()))
    check_num_records(n, "the data")
    return tuple(out), n


@jax.jit
def _count_nonfinite(a: jax.Array) -> jax.Array:
    # one compiled program (a fresh process compiles each eager operation on its own)
    return jnp.sum(~jnp.isfinite(a), dtype=jnp.int32)


def finite_data(args: tuple) -> None:
    """Raise ``ValueError`` if a floating-point data array of ``args`` holds NaN or infinity.

    The message names the positional argument and counts the entries, nothing more.
    """
    for i, a in enumerate(args):
        if a is None or not jnp.issubdtype(a.dtype, jnp.inexact):
            continue
        bad = int(_count_nonfinite(a))
        if bad:
            raise ValueError(
                f"positional argument {i} (data) holds {bad} NaN or infinite entries; DPSVI "
                "would drop the non-finite per-example gradients they cause (d3p 0.2 turned "
                "the parameters into NaN). Clean the data, or pass check_finite=False."
            )


def mask(value: Any, batch_size: int) -> jax.Array:
    """A bool mask of shape ``(batch_size,)`` from a scalar or such an array.

    ``None`` (d3p 0.2's default) means every row is an example.
    """
    value = jnp.asarray(True if value is None else value)
    if value.shape not in ((), (batch_size,)):
        raise ValueError(f"mask must be a scalar or have shape ({batch_size},), got {value.shape}")
    if value.dtype != jnp.bool_:
        raise TypeError(
            f"mask must be boolean (True for a real row), got dtype {value.dtype}; a number "
            "such as 0.5 is not a valid row flag (use mask > 0.5 if that is what you mean)"
        )
    return jnp.broadcast_to(value, (batch_size,))
