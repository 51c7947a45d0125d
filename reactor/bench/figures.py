"""Published figures: each bench turns its result into `Figure`s (value, unit, goal), and
`python -m reactor.bench NAME --write docs/figures.md` merges them into one file that the
documentation includes. Nobody types a number into the docs; a figure that misses its goal is
published as missed, not dropped.

The file is Markdown for readers with one JSON block per bench for machines. Each section keeps
a digest of the code it measured (the bench's `sources`, as git hashes their contents), so
`python -m reactor.bench.figures check docs/figures.md` (run by CI) can tell a figure taken on
the code as it is from one older than the code: it fails when a section is older and not marked
stale. `python -m reactor.bench.figures mark-stale docs/figures.md` marks those sections, which
the page then shows as stale until their bench is run again.

A bench module opts in by defining `figures(result) -> list[Figure]` (and may define
`SOURCES`, the paths whose changes make its figures stale; default: the bench module itself).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import operator
import re
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
}
_BLOCK = re.compile(
    r"<!-- bench:(?P<name>[a-z_]+) -->\n(?P<body>.*?)<!-- /bench:(?P=name) -->", re.S
)
_JSON = re.compile(r"```json\n(?P<json>.*?)\n```", re.S)


@dataclass(frozen=True)
class Figure:
    """One published number: what it is, its value and unit, and the goal it is held to (`op`
    and `goal`; both None for a figure published for information)."""

    name: str
    value: float | int | str
    unit: str = ""
    goal: float | None = None
    op: str | None = None
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.goal is None or self.op is None or isinstance(self.value, str):
            return None
        return _OPS[self.op](float(self.value), self.goal)


@dataclass
class BenchFigures:
    """One bench's figures as written: with the command, the commit and the machine."""

    bench: str
    command: str
    commit: str
    measured_at: str
    machine: dict[str, Any]
    sources: list[str]
    digest: str = ""
    stale: bool = False
    figures: list[Figure] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["figures"] = [asdict(f) | {"met": f.met} for f in self.figures]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchFigures:
        figures = [
            Figure(**{k: v for k, v in f.items() if k != "met"}) for f in data.pop("figures")
        ]
        return cls(**data, figures=figures)


def source_digest(sources: Iterable[str], root: Path | None = None) -> str:
    """A digest of the files under `sources` as they are in the working tree (tracked or not):
    git's blob hash of each, so it is the same on any clone of the same content."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *sources],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        paths = sorted(p for p in set(listed) if (Path(root or ".") / p).is_file())
        hashes = subprocess.run(
            ["git", "hash-object", "--", *paths],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    digest = hashlib.sha256()
    for path, blob in zip(paths, hashes, strict=True):
        digest.update(f"{path} {blob}\n".encode())
    return digest.hexdigest()[:16]


def commit_of_head(root: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def _value(value: float | int | str) -> str:
    if isinstance(value, float):
        # Three significant figures below 100 (0.192, 16.7), whole numbers above (1,000).
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return value


def _goal(figure: Figure) -> str:
    if figure.goal is None or figure.op is None:
        return ""
    verdict = {True: "met", False: "**missed**", None: ""}[figure.met]
    return f"{figure.op} {_value(figure.goal)} {figure.unit}".strip() + f" ({verdict})"


def render(entry: BenchFigures) -> str:
    m = entry.machine
    lines = [
        f"<!-- bench:{entry.bench} -->",
        f"### {entry.bench}",
        "",
        f"`{entry.command}` — {entry.measured_at}, commit `{entry.commit[:10]}`, "
        f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores), Python {m.get('python', '?')}.",
        "",
        *(
            [
                '!!! warning "Stale"',
                "    The code these figures measure has changed since they were taken; run the",
                "    command above again to refresh them.",
                "",
            ]
            if entry.stale
            else []
        ),
        "| Figure | Value | Goal |",
        "| --- | ---: | --- |",
    ]
    for f in entry.figures:
        note = f" — {f.note}" if f.note else ""
        lines.append(f"| {f.name}{note} | {_value(f.value)} {f.unit} | {_goal(f)} |")
    lines += [
        "",
        '??? info "Raw figures (JSON)"',
        "    ```json",
        *("    " + line for line in json.dumps(entry.to_json(), indent=2).splitlines()),
        "    ```",
        "",
        f"<!-- /bench:{entry.bench} -->",
    ]
    return "\n".join(lines)


HEADER = """# Figures

Every figure here was written by a bench, not typed: `python -m reactor.bench NAME --write
docs/figures.md` replaces that bench's section, `python -m reactor.bench all --write
docs/figures.md` all of them. Each section names its command, when and where it ran and the
commit it measured; CI marks a section stale when the code it measures has changed since. The
machine is a noisy 2-core VM: read ratios and percentiles taken in one run, not absolute rates.

"""


def parse(text: str) -> dict[str, BenchFigures]:
    """The sections of a figures file, by bench; raises ValueError when one does not parse."""
    found: dict[str, BenchFigures] = {}
    for block in _BLOCK.finditer(text):
        body = "\n".join(line.removeprefix("    ") for line in block["body"].splitlines())
        match = _JSON.search(body)
        if match is None:
            raise ValueError(f"bench {block['name']}: no JSON block")
        entry = BenchFigures.from_json(json.loads(match["json"]))
        if entry.bench != block["name"]:
            raise ValueError(f"bench {block['name']}: its JSON names {entry.bench}")
        found[entry.bench] = entry
    return found


def write(path: Path, entries: Iterable[BenchFigures]) -> None:
    """Replaces (or adds) each entry's section in the file, keeping the others."""
    existing = parse(path.read_text()) if path.exists() else {}
    for entry in entries:
        existing[entry.bench] = entry
    body = "\n\n".join(render(existing[name]) for name in sorted(existing))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + body + "\n")


def entry_for(
    bench: str,
    figures: list[Figure],
    *,
    command: str,
    machine: dict[str, Any],
    sources: list[str],
) -> BenchFigures:
    return BenchFigures(
        bench=bench,
        command=command,
        commit=commit_of_head(),
        measured_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        machine=machine,
        sources=sources,
        digest=source_digest(sources),
        figures=figures,
    )


def outdated(entries: dict[str, BenchFigures], root: Path | None = None) -> list[str]:
    """Benches whose figures were taken on other code than the working tree's."""
    return [
        name for name, e in sorted(entries.items()) if source_digest(e.sources, root) != e.digest
    ]


def main(argv: list[str] | None = None) -> int:
    """`check FILE`: parse, and fail on a section older than its code not marked stale;
    `mark-stale FILE`: mark those sections stale."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m reactor.bench.figures")
    parser.add_argument("action", choices=["check", "mark-stale"])
    parser.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    entries = parse(args.file.read_text())
    if not entries:
        print(f"{args.file}: no figures")
        return 1
    old = outdated(entries)
    if args.action == "mark-stale":
        for name in old:
            entries[name].stale = True
        write(args.file, entries.values())
        print(f"{args.file}: marked stale: {', '.join(old) or 'none'}")
        return 0
    unmarked = [name for name in old if not entries[name].stale]
    count = sum(len(e.figures) for e in entries.values())
    print(
        f"{args.file}: {len(entries)} benches, {count} figures; stale (marked): "
        f"{', '.join(n for n in old if entries[n].stale) or 'none'}"
    )
    if unmarked:
        print(
            f"{args.file}: older than the code they measure and not marked stale: "
            f"{', '.join(unmarked)} (run their bench with --write, or mark-stale)"
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
