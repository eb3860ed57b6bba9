# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""The version of d3p."""

VERSION = "0.3.0"
