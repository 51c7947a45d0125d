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


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m reactor.bench")
    parser.add_argument(
        "name",
        choices=[
            "emulator",
            "scheduling",
            "sending",
            "consent",
            "webhooks",
            "scale",
            "faults",
            "all",
        ],
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument("--out", default="reports", help="where `all` writes its report")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    names = (
        ["emulator", "scheduling", "sending", "consent", "faults"]
        if args.name == "all"
        else [args.name]
    )
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
