# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Run the d3p benchmark sections, print their tables and write one JSON file."""

from __future__ import annotations

import argparse
import importlib
import time

from benchmarks._common import format_table, machine_info, write_json

SECTIONS = ("random", "minibatch", "dputil", "svi", "loop", "scaling", "audit", "quality")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", default="benchmark-results.json", help="output JSON path")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    args = parser.parse_args(argv)

    print("machine:", machine_info())
    results = {}
    for name in args.only or SECTIONS:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        start = time.perf_counter()
        rows = module.run(quick=args.quick)
        print(f"\n== {name} ({time.perf_counter() - start:.1f} s)")
        # a section returns its rows, or a dict of titled tables
        for title, table in rows.items() if isinstance(rows, dict) else [(None, rows)]:
            print(format_table(table) if title is None else f"-- {title}\n{format_table(table)}")
        results[name] = rows
    write_json(args.json, {"quick": args.quick, "sections": results})
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
