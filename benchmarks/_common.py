# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Shared timing, table and JSON helpers for the benchmark sections.

Each section module ``benchmarks/bench_<name>.py`` exposes
``run(quick: bool) -> list[dict]``: one dict per measured row (or a dict of such lists,
one per titled table), with plain
JSON-serialisable values. Times are wall-clock seconds, measured after JIT
compilation (a warm-up call is made first) and after ``block_until_ready``.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


def block(x: Any) -> Any:
    """Wait for every array in the pytree ``x`` to be computed."""
    return jax.block_until_ready(x)


def time_call(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Time ``fn()`` (which must return JAX arrays) ``repeats`` times after warm-up.

    Returns the median and minimum wall-clock time in seconds.
    """
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times)}


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Median wall-clock seconds of each ``fns[name]()``, timed in turn in every repeat.

    Interleaving exposes every function to the same drift of a shared machine, so the
    ratios between them are steadier than those of separate :func:`time_call` runs.
    """
    for fn in fns.values():
        for _ in range(warmup):
            block(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            block(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine_info() -> dict[str, Any]:
    """Describe the machine and software the numbers were measured on."""
    import numpyro

    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpyro": numpyro.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "cpu_count": __import__("os").cpu_count(),
    }


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Render ``rows`` as a fixed-width text table (floats with 4 significant digits)."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write benchmark results with the machine description to ``path``."""
    with open(path, "w") as f:
        json.dump({"machine": machine_info(), **payload}, f, indent=2)
