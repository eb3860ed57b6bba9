# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Checks of DPSVI on several CPU devices, run in a subprocess by tests/test_sharding.py.

``python tests/sharding_worker.py checks`` runs the single-process checks on 4 forced host
devices; ``python tests/sharding_worker.py run PROCESS_ID NUM_PROCESSES PORT [split]`` trains on
``NUM_PROCESSES`` processes of 2 devices each (jax.distributed on localhost; with
``split``, each process holds only its own rows of the data set). Both print
one line ``RESULT <json>``. The device count must be set before JAX starts, hence the
subprocess: the rest of the test suite keeps one device.
"""

import json
import os
import re
import sys
import textwrap
import warnings

MODE = sys.argv[1]
DEVICES = 4 if MODE == "checks" else 2
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"

import jax  # noqa: E402

if MODE == "run" and int(sys.argv[3]) > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"localhost:{sys.argv[4]}", num_processes=int(sys.argv[3]), process_id=int(sys.argv[2])
    )

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from numpyro.infer import Trace_ELBO  # noqa: E402
from numpyro.infer.autoguide import AutoDiagonalNormal  # noqa: E402
from numpyro.optim import SGD, Adam  # noqa: E402

import d3p.random  # noqa: E402
from d3p import _sharding  # noqa: E402
from d3p.svi import DPSVI  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import d3p.random.debug as debug

N = 1000


def logreg(x, y, N=N):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(x.shape[1]), 1.0).to_event(1))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)


def noise_only(x, y, N=N):
    """A parameter vector the likelihood does not depend on: its data gradient is zero."""
    numpyro.param("w", jnp.zeros(4000))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)


def empty_guide(x, y, N=N):
    pass


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    return x, (rng.random(n) < 0.5).astype(np.float32)


def rel_diff(a, b):
    """Largest difference of two pytrees relative to the largest entry of ``a``."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(
        float(jnp.max(jnp.abs(u - v)) / jnp.maximum(jnp.max(jnp.abs(u)), 1e-30)) for u, v in pairs
    )


def logreg_dpsvi(chunk_size):
    guide = AutoDiagonalNormal(logreg)
    return DPSVI(logreg, guide, Adam(1e-2), Trace_ELBO(), 1.0, 1.0, debug, chunk_size=chunk_size)


def batch_sized_gathers(hlo, rows):
    """Result shapes of the all-gathers in ``hlo`` that have a dimension of ``rows``."""
    found = re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather\(", hlo)
    return [s for s in found if str(rows) in s.split(",")]


def check_run(mesh):
    """DPSVI.run with and without the mesh (chunked, so the per-device chunking is used)."""
    dpsvi = logreg_dpsvi(chunk_size=3)
    x, y = data(N)
    kw = dict(q=0.05, delta=1e-5, progress_bar=False)
    one = dpsvi.run(debug.PRNGKey(1), 4, x, y, **kw)
    four = dpsvi.run(debug.PRNGKey(1), 4, x, y, mesh=mesh, **kw)
    # the data set itself split by rows across the devices
    rows = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y)]
    split_data = dpsvi.run(debug.PRNGKey(1), 4, *rows, mesh=mesh, **kw)
    return {
        "run_rel_diff": rel_diff(one.params, four.params),
        "run_split_data_rel_diff": rel_diff(one.params, split_data.params),
        "run_moved": rel_diff(one.params, dpsvi.get_params(dpsvi.init(debug.PRNGKey(1), x, y))),
        "epsilon_1": one.epsilon,
        "epsilon_4": four.epsilon,
        "state_replicated": all(
            leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(four.state)
        ),
    }


def check_update(mesh):
    """A jitted update on batches sharded along "data" against one device, and its HLO."""
    rows = 48
    x, y = data(rows, seed=1)
    mask = np.random.default_rng(2).random(rows) < 0.8
    sharded = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y, mask)]
    out = {}
    warnings.simplefilter("ignore", UserWarning)  # mask without expected_batch_size
    for chunk_size in (None, 5):  # the whole batch at once, and chunks within each device
        dpsvi = logreg_dpsvi(chunk_size)
        state = dpsvi.init(debug.PRNGKey(0), x, y)
        update = jax.jit(lambda s, x, y, m, dpsvi=dpsvi: dpsvi.update(s, x, y, mask=m))
        single, _ = update(state, x, y, mask)
        with jax.set_mesh(mesh):
            lowered = update.lower(state, *sharded)
            split, _ = update(state, *sharded)
        hlo = lowered.compile().as_text()
        out[f"update_rel_diff_{chunk_size}"] = rel_diff(single, split)
        out[f"update_gathers_{chunk_size}"] = batch_sized_gathers(hlo, rows)
        out[f"update_all_reduces_{chunk_size}"] = hlo.count(" all-reduce(")
    # the detector finds a gather of the batch where there is one
    gather = jax.jit(lambda a: jax.lax.with_sharding_constraint(a * 2, P()))
    with jax.set_mesh(mesh):
        out["control_gathers"] = batch_sized_gathers(
            gather.lower(sharded[0]).compile().as_text(), rows
        )
    return out


def check_gather(mesh):
    """Each device gathers its rows of a batch drawn once: which collectives that takes."""
    x, _ = data(N)
    rows = 88
    idx = jnp.asarray(np.random.default_rng(4).integers(0, N, rows), jnp.int32)
    mask = jnp.arange(rows) < 80

    def gather(x, idx, mask):
        (batch,), mask = _sharding.gather_batch((x,), idx, mask, 4)
        return batch

    out = {}
    for name, spec in (("replicated", P()), ("split", P("data"))):
        placed = jax.device_put(x, NamedSharding(mesh, spec))
        with jax.set_mesh(mesh):
            hlo = jax.jit(gather).lower(placed, idx, mask).compile().as_text()
            batch = jax.jit(gather)(placed, idx, mask)
        out[f"gather_{name}_ok"] = bool(jnp.all(batch == jnp.where(mask[:, None], x[idx], 0)))
        out[f"gather_{name}_sharded"] = batch.sharding.is_equivalent_to(
            NamedSharding(mesh, P("data")), batch.ndim
        )
        out[f"gather_{name}_collectives"] = re.findall(
            r"= (\w+\[[\d,]*\])[^ ]* (all-gather|all-reduce|reduce-scatter|all-to-all)\(", hlo
        )
    return out


def check_noise(mesh):
    """The noise of one step with zero data gradients, on 4 devices and on one."""
    rows, c, sigma = 16, 2.0, 1.5
    x, y = data(rows, seed=3)
    dpsvi = DPSVI(noise_only, empty_guide, SGD(1.0), Trace_ELBO(), c, sigma)
    state = dpsvi.init(d3p.random.PRNGKey(5), x, y)
    before = dpsvi.optim.get_params(state.optim_state)["w"]

    def step(state, x, y):
        state, _ = dpsvi.update(state, x, y)
        return before - dpsvi.optim.get_params(state.optim_state)["w"]

    step = jax.jit(step)
    single = step(state, x, y)
    sharded = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y)]
    with jax.set_mesh(mesh):
        split = step(state, *sharded)
    return {
        "noise_std": float(jnp.std(split)),
        "noise_target": sigma * c * N / rows,
        "noise_size": int(split.size),
        "noise_rel_diff": rel_diff(single, split),
    }


def check_errors(mesh):
    x, y = data(N)
    dpsvi = logreg_dpsvi(None)
    errors = {}
    try:
        bad = Mesh(np.array(jax.devices()), ("batch",))
        dpsvi.run(debug.PRNGKey(1), 2, x, y, q=0.05, delta=1e-5, mesh=bad)
    except ValueError as e:
        errors["no_data_axis"] = str(e)
    state = dpsvi.init(debug.PRNGKey(0), x[:8], y[:8])
    try:
        with jax.set_mesh(mesh):
            dpsvi.update(state, x[:6], y[:6])
    except ValueError as e:
        errors["not_divisible"] = str(e)
    return errors


def check_docs_recipe():
    """The own-loop recipe of docs/guide/scaling.rst, as written, on the default mesh of
    jax.make_mesh (Explicit axes), with the docs tests' prelude (tests/test_docs.py)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    tree = ast.parse((root / "tests" / "test_docs.py").read_text())
    prelude = next(
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PRELUDE"
    )
    page = (root / "docs" / "guide" / "scaling.rst").read_text()
    section = page[page.index("Your own loop\n") : page.index("Several hosts\n")]
    blocks = re.findall(
        r"^\.\. (?:code-block::|invisible-code-block:) python\n\n((?:   .*\n|\n)+)",
        section,
        flags=re.M,
    )
    namespace = {}
    exec(prelude, namespace)
    for block in blocks:
        exec(textwrap.dedent(block), namespace)
    return {
        "recipe_blocks": len(blocks),
        "recipe_devices": namespace["mesh"].devices.size,
        "recipe_axis_types": [t.name for t in namespace["mesh"].axis_types],
        "recipe_epsilon": namespace["epsilon"],
        "recipe_steps": int(namespace["state"].num_steps),
    }


def checks():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    return {
        **check_docs_recipe(),
        **check_run(mesh),
        **check_update(mesh),
        **check_gather(mesh),
        **check_noise(mesh),
        **check_errors(mesh),
    }


def run():
    """Train a few steps on all devices of all processes (one process: no mesh)."""
    x, y = data(N)
    dpsvi = logreg_dpsvi(chunk_size=3)
    mesh = None if jax.process_count() == 1 else jax.make_mesh((jax.device_count(),), ("data",))
    if sys.argv[5:] == ["split"]:  # each process passes only its own rows
        rows = NamedSharding(mesh, P("data"))
        part = N // jax.process_count()
        own = slice(jax.process_index() * part, (jax.process_index() + 1) * part)
        x, y = (jax.make_array_from_process_local_data(rows, a[own], a.shape) for a in (x, y))
    result = dpsvi.run(debug.PRNGKey(1), 5, x, y, q=0.05, delta=1e-5, progress_bar=False, mesh=mesh)
    return {
        "devices": jax.device_count(),
        "params": {k: np.asarray(v).tolist() for k, v in result.params.items()},
        "epsilon": result.epsilon,
    }


if __name__ == "__main__":
    print("RESULT", json.dumps(checks() if MODE == "checks" else run()), flush=True)
