# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""d3p 0.2's gradient helpers (re-exported by :mod:`d3p.svi`): norms, clipping, scaling."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from d3p import _validation


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
