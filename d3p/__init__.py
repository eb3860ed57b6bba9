# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""d3p: differentially private variational inference for NumPyro.

Importing d3p has no side effects beyond importing JAX: it does not probe or
switch JAX platforms. Submodules (``d3p.svi``, ``d3p.random``, ...) are imported
explicitly by the user.
"""

from d3p.version import VERSION

__version__ = VERSION

__all__ = ["VERSION", "__version__"]
