"""`python -m reactor.bench NAME`; see the package docstring."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from .common import machine
from .figures import entry_for, write

# Every bench `python -m reactor.bench NAME` runs, and `all` runs each of them (the full scale
# bench alone takes most of an hour; `--quick` sizes are stated by each bench). A bench module
# has `async run(quick) -> dict` and, to publish, `figures(result) -> list[Figure]` (figures.py).
BENCHES = [
    "emulator",
    "scheduling",
    "sending",
    "consent",
    "webhooks",
    "scale",
    "faults",
    "model",
    "templates",
    "engagement",
    "abtest",
    "notify",
    "dkim",
    "localtime",
]
ALL = list(BENCHES)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m reactor.bench")
    parser.add_argument(
        "name",
        choices=[*BENCHES, "all"],
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument("--out", default="reports", help="where `all` writes its report")
    parser.add_argument(
        "--write",
        type=Path,
        help="merge the figures of each bench that publishes into this file (docs/figures.md)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    names = ALL if args.name == "all" else [args.name]
    entries = []
    results: dict[str, Any] = {
        "machine": machine(),
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    for name in names:
        module = __import__(f"reactor.bench.{name}", fromlist=["run"])
        print(f"== {name}", flush=True)
        result = asyncio.run(module.run(quick=args.quick))
        results[name] = result
        print(json.dumps(result, indent=2, default=str), flush=True)
        if args.write is not None and hasattr(module, "figures"):
            quick = " --quick" if args.quick else ""
            entries.append(
                entry_for(
                    name,
                    module.figures(result),
                    command=f"python -m reactor.bench {name}{quick}",
                    machine=results["machine"],
                    sources=list(getattr(module, "SOURCES", [f"reactor/bench/{name}.py"])),
                )
            )
    if args.write is not None:
        write(args.write, entries)
        print(f"wrote {len(entries)} bench section(s) to {args.write}")
    if args.name == "all":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(results, indent=2, default=str))
        from .report import markdown

        (out / "report.md").write_text(markdown(results))
        print(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
