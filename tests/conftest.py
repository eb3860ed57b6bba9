# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Shared pytest fixtures."""

from pathlib import Path

import jax
import pytest

DATA_DIR = Path(__file__).parent / "data"

# The jax.monitoring event JAX records once per XLA compilation (jax._src.dispatch's
# BACKEND_COMPILE_EVENT; a cache hit records nothing).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(params=[False, True], ids=["x32", "x64"])
def x64(request):
    """Run the test once with ``jax_enable_x64`` off and once with it on."""
    with jax.enable_x64(request.param):
        yield request.param


class CompileCounter:
    """Number of XLA backend compilations since the fixture started (``.count``)."""

    def __init__(self):
        self.count = 0

    def __call__(self, event: str, duration_secs: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1


@pytest.fixture
def compile_counter():
    """Count XLA compilations (cache misses of jit and of eager ops) during the test."""
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(counter)
