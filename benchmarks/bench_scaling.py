# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""DPSVI steps per second of workload W3 (benchmarks/bench_svi.py) on 1, 2 and 4 devices.

Each row runs ``steps`` jitted DPSVI updates (secure noise) on a fixed batch of q * N = 500
rows placed with ``NamedSharding(mesh, P("data"))`` on the first k devices, inside
``jax.set_mesh``. numpyro's SVI on one device is timed in the same run for the ratio.
Scaling efficiency is steps/s on k devices divided by k times steps/s on one.

On a CPU the devices are forced host devices (``--xla_force_host_platform_device_count=4``)
sharing the machine's cores: the numbers mean something only with at least k free cores.
On GPUs the devices are the GPUs; rows for more devices than there are are left out. The
timing runs in a subprocess, since the device count must be set before JAX starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

COUNTS = (1, 2, 4)


def measure(quick: bool) -> list[dict]:
    import functools

    import jax
    import numpyro
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoDiagonalNormal

    import d3p.random
    from benchmarks._common import time_interleaved
    from benchmarks.bench_svi import CLIP, DP_SCALE, STEP_SIZE, _loop, bnn_model, make_data
    from d3p.svi import DPSVI

    n, d, q = 50_000, 50, 0.01
    steps, repeats = (10, 3) if quick else (100, 5)
    x, y = make_data(n, d)
    batch = int(round(q * n))
    xb, yb = x[:batch], y[:batch]
    guide = AutoDiagonalNormal(bnn_model)
    optim = numpyro.optim.Adam(STEP_SIZE)

    svi = SVI(bnn_model, guide, optim, Trace_ELBO(), N=n)
    svi_state = svi.init(jax.random.PRNGKey(0), xb, yb)
    loops = {"svi": (_loop(lambda i, s: svi.update(s, xb, yb)[0], svi_state, steps), svi_state)}
    dpsvi = DPSVI(bnn_model, guide, optim, Trace_ELBO(), CLIP, DP_SCALE, N=n)
    state = dpsvi.init(d3p.random.PRNGKey(1), xb, yb)
    meshes = {}
    for k in COUNTS:
        if k > len(jax.devices()):
            continue
        mesh = jax.make_mesh((k,), ("data",), (AxisType.Auto,), devices=jax.devices()[:k])
        rows = NamedSharding(mesh, P("data"))
        bx, by = jax.device_put(xb, rows), jax.device_put(yb, rows)
        placed = jax.device_put(state, NamedSharding(mesh, P()))
        with jax.set_mesh(mesh):
            loop = _loop(lambda i, s, bx=bx, by=by: dpsvi.update(s, bx, by)[0], placed, steps)
            jax.block_until_ready(loop(placed))  # compile with the mesh in context
        meshes[k] = mesh
        loops[k] = loop, placed

    def timed(k, fn, s):
        if k == "svi":
            return fn(s)
        with jax.set_mesh(meshes[k]):
            return fn(s)

    seconds = time_interleaved(
        {k: functools.partial(timed, k, fn, s) for k, (fn, s) in loops.items()}, repeats
    )
    base = steps / seconds[1]
    return [
        {
            "workload": "W3 BNN 50-100-1",
            "devices": k,
            "batch": batch,
            "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
            "steps_per_s": steps / seconds[k],
            "speedup": (steps / seconds[k]) / base,
            "efficiency": (steps / seconds[k]) / (k * base),
            "ratio_svi": seconds[k] / seconds["svi"],
        }
        for k in meshes
    ]


def run(quick: bool) -> list[dict]:
    """Time W3 on 1, 2, 4 devices in a subprocess with 4 forced CPU host devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={max(COUNTS)}"
    ).strip()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "benchmarks.bench_scaling", "--worker"]
    out = subprocess.run(
        argv + (["--quick"] if quick else []), env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-4000:])
    return json.loads(out.stdout.splitlines()[-1])


if __name__ == "__main__":
    if "--worker" in sys.argv:
        print(json.dumps(measure(quick="--quick" in sys.argv)))
    else:
        from benchmarks._common import format_table

        print(format_table(run(quick="--quick" in sys.argv)))
