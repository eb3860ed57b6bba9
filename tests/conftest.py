# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Shared pytest fixtures."""

from pathlib import Path

import jax
import pytest

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(params=[False, True], ids=["x32", "x64"])
def x64(request):
    """Run the test once with ``jax_enable_x64`` off and once with it on."""
    with jax.enable_x64(request.param):
        yield request.param
