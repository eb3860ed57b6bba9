# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""DPSVI on several devices (jax.sharding) and several processes (jax.distributed).

The checks run in subprocesses (tests/sharding_worker.py) with 4 or 2 forced CPU host
devices, so the rest of the suite keeps one device. The default run starts one subprocess
for all single-process checks; the 2-process test is marked slow.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from d3p import _clipping, _sharding

WORKER = Path(__file__).parent / "sharding_worker.py"

# Float32 sums over a different split of the rows differ by rounding only: a few ulp of
# the largest entry per summed row; 1e-5 relative is far above that and far below any
# real difference (the trained parameters move by O(1) relative to their start).
REL_TOL = 1e-5


def _env():
    env = dict(os.environ)
    root = str(Path(__file__).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.pop("XLA_FLAGS", None)
    return env


def _result(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(scope="module")
def checks():
    proc = subprocess.run(
        [sys.executable, str(WORKER), "checks"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _result(proc.stdout)


@pytest.mark.slow  # the 4-device subprocess (checks): about a minute
def test_run_with_mesh_equals_one_device(checks):
    assert checks["run_moved"] > 100 * REL_TOL  # the comparison can see a difference
    assert checks["run_rel_diff"] < REL_TOL
    assert checks["run_split_data_rel_diff"] < REL_TOL
    assert checks["state_replicated"]


@pytest.mark.slow  # the 4-device subprocess (checks): about a minute
def test_each_device_gathers_its_rows(checks):
    for name in ("replicated", "split"):
        assert checks[f"gather_{name}_ok"]
        assert checks[f"gather_{name}_sharded"]  # the batch comes out split along "data"
    # replicated data: every device gathers its rows locally, no communication at all
    assert checks["gather_replicated_collectives"] == []
    # data split by rows: each device contributes the rows it holds to a reduction of the
    # (88-row) batch; only the int32 row indices are gathered, never the 1000-row data set
    split = checks["gather_split_collectives"]
    assert all("1000" not in shape for shape, _ in split), split
    assert all(shape.startswith("s32") for shape, op in split if op == "all-gather"), split


@pytest.mark.slow  # the 4-device subprocess (checks): about a minute
def test_epsilon_unchanged_by_sharding(checks):
    assert checks["epsilon_1"] == checks["epsilon_4"]
    assert math.isfinite(checks["epsilon_1"])


@pytest.mark.slow  # the 4-device subprocess (checks): about a minute
@pytest.mark.parametrize("chunk_size", ["None", "5"])
def test_jitted_update_on_sharded_batch(checks, chunk_size):
    assert checks[f"update_rel_diff_{chunk_size}"] < REL_TOL
    # per-device sums are reduced (all-reduce of parameter-sized arrays) ...
    assert checks[f"update_all_reduces_{chunk_size}"] > 0
    # ... and the batch is never gathered onto one device
    assert checks[f"update_gathers_{chunk_size}"] == []
    assert checks["control_gathers"], "the all-gather detector missed a gathered batch"


@pytest.mark.slow  # the 4-device subprocess (checks): about a minute
def test_noise_drawn_once_on_four_devices(checks):
    # one draw from the replicated key: identical to the single-device noise
    assert checks["noise_rel_diff"] < REL_TOL
    # std of the gradient handed to SGD is sigma*C*N/B (a draw per device summed would
    # give twice that); the sample std of n normals has relative std 1/sqrt(2n): 5 sigma
    n, target = checks["noise_size"], checks["noise_target"]
    assert abs(checks["noise_std"] / target - 1) < 5 / math.sqrt(2 * n)


@pytest.mark.slow  # the 4-device subprocess (checks): about a minute
def test_docs_own_loop_recipe_runs_on_four_devices_with_make_mesh_defaults(checks):
    # issue 25: the recipe failed inside the clipping with a ShardingTypeError under
    # jax.make_mesh's default (Explicit) axes, and on batches the mesh could not split
    assert checks["recipe_blocks"] == 2 and checks["recipe_devices"] == 4
    assert checks["recipe_axis_types"] == ["Explicit"]
    assert checks["recipe_steps"] == 3 and 0 < checks["recipe_epsilon"] < math.inf


@pytest.mark.slow  # the 4-device subprocess (checks): about a minute
def test_bad_mesh_errors(checks):
    assert "axis named 'data'" in checks["no_data_axis"]
    assert "6 rows" in checks["not_divisible"] and "4 devices" in checks["not_divisible"]


def test_check_mesh_in_process():
    devices = np.array(jax.devices()[:1])
    assert _sharding.check_mesh(Mesh(devices, ("data",))) == 1
    with pytest.raises(ValueError, match="axis named 'data'.*'batch'"):
        _sharding.check_mesh(Mesh(devices, ("batch",)))
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        _sharding.check_mesh("data")
    assert _sharding.context_shards() == 1
    with jax.set_mesh(jax.make_mesh((1,), ("data",), (AxisType.Auto,))):
        assert _sharding.context_shards() == 1
    with jax.set_mesh(jax.make_mesh((1,), ("data",), (AxisType.Explicit,))):
        assert _sharding.context_shards() == 1  # Explicit axes: the step runs them Auto
    _sharding.check_divisible(7, 1)
    with pytest.raises(ValueError, match="7 rows.*2 devices"):
        _sharding.check_divisible(7, 2)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("data", ["replicated", "split"])
def test_two_processes_equal_one(data):
    """2 processes x 2 CPU devices (jax.distributed on localhost) against one process;
    the data set in every process, or each process holding only its own rows."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "run", str(i), "2", port, data],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
    single = subprocess.run(
        [sys.executable, str(WORKER), "run", "0", "1", "0"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-4000:]
    one = _result(single.stdout)
    assert one["devices"] == 2  # one process, no mesh
    for out, _ in outputs:
        multi = _result(out)
        assert multi["devices"] == 4
        assert multi["epsilon"] == one["epsilon"]
        for name, values in one["params"].items():
            np.testing.assert_allclose(multi["params"][name], values, rtol=REL_TOL, atol=0)


def test_chunked_sum_groups_sum_every_row_once():
    # row i contributes 2**i (sums of distinct powers below 2**24 are exact in float32):
    # a row lost or counted twice by the per-group chunking changes the total
    rows = np.arange(12)
    xs = (jax.numpy.asarray(2.0**rows), jax.numpy.asarray(rows % 5 != 0))

    def chunk(x, mask, group_axis=None):
        return jax.numpy.sum(jax.numpy.where(mask, x, 0.0))

    expected = float(np.sum(np.where(rows % 5 != 0, 2.0**rows, 0.0)))
    for groups, k in ((1, 5), (4, 2), (3, 4), (2, 5)):
        assert float(_clipping.chunked_sum(chunk, xs, k, groups)) == expected
