"""`python -m reactor.bench model`: the protocol model's ablation table.

Explores the claim / lease / fence / ledger model (domain/protocol_model.py) with every
mechanism on, then with each one switched off alone, and reports which property breaks and the
length of its shortest counterexample. The figures can fail: with everything on the model must
hold, and every mechanism the model shows to matter must still break something when removed.
"""

from __future__ import annotations

from typing import Any

from ..domain import protocol_model as model
from .figures import Figure

SOURCES = ["reactor/domain/protocol_model.py", "reactor/bench/model.py"]


async def run(quick: bool) -> dict[str, Any]:
    rows = model.table(model.Config())
    print(model.render(rows), flush=True)
    return {
        "config": repr(model.Config()),
        "rows": [
            {
                "switched_off": row.switched_off,
                "states": row.states,
                "broken": {p.value: len(path) for p, path in row.broken.items()},
                "counterexamples": {p.value: path for p, path in row.broken.items()},
            }
            for row in rows
        ],
    }


# Mechanisms the model shows to break nothing (docs/reliability.md says what they are for).
BREAK_NOTHING = {"conditional_outcome", "conditional_forget"}


def figures(result: dict[str, Any]) -> list[Figure]:
    rows = result["rows"]
    baseline, ablations = rows[0], rows[1:]
    out = [
        Figure(
            "properties broken with every mechanism on",
            len(baseline["broken"]),
            goal=0,
            op="==",
            note=f"{baseline['states']:,} states",
        )
    ]
    for row in ablations:
        broken = row["broken"]
        what = ", ".join(f"{p} in {n} steps" for p, n in broken.items()) or "nothing breaks"
        name = row["switched_off"]
        label = name if name.startswith("old protocol") else f"{name} off"
        needed = name not in BREAK_NOTHING
        out.append(
            Figure(
                f"{label}: properties broken",
                len(broken),
                goal=1 if needed else None,
                op=">=" if needed else None,
                note=what,
            )
        )
    return out
