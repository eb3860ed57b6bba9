# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""d3p benchmarks: ``python -m benchmarks [--quick] [--json PATH] [--only SECTION ...]``."""
