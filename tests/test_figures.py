"""The published figures file: written by the benches, parsed back, and judged stale when the
code it measured has changed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from reactor.bench import figures as fig
from reactor.bench.figures import BenchFigures, Figure


def _entry(bench: str, value: float, *, sources: list[str], root: Path) -> BenchFigures:
    return BenchFigures(
        bench=bench,
        command=f"python -m reactor.bench {bench}",
        commit="0" * 40,
        measured_at="2026-12-06T00:00:00+00:00",
        machine={"cpu": "test", "cores": 2, "python": "3.11"},
        sources=sources,
        digest=fig.source_digest(sources, root),
        figures=[
            Figure("p99", value, "ms", goal=50, op="<="),
            Figure("rate", 1200, "/s"),
        ],
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    return tmp_path


def test_goal_met_and_missed_are_published_as_such(repo: Path) -> None:
    out = repo / "figures.md"
    fig.write(out, [_entry("alpha", 42.0, sources=["code.py"], root=repo)])
    fig.write(out, [_entry("beta", 77.0, sources=["code.py"], root=repo)])
    text = out.read_text()
    parsed = fig.parse(text)
    assert sorted(parsed) == ["alpha", "beta"]  # a second write keeps the first bench
    assert parsed["alpha"].figures[0].met is True
    assert parsed["beta"].figures[0].met is False
    assert "**missed**" in text
    assert "(met)" in text
    assert parsed["beta"].figures[1].met is None  # no goal: information only


def test_a_section_older_than_its_code_fails_the_check_until_marked(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = repo / "figures.md"
    fig.write(out, [_entry("alpha", 42.0, sources=["code.py"], root=repo)])
    monkeypatch.chdir(repo)
    assert fig.main(["check", str(out)]) == 0
    (repo / "code.py").write_text("x = 2\n")  # the measured code changes
    assert fig.outdated(fig.parse(out.read_text()), repo) == ["alpha"]
    assert fig.main(["check", str(out)]) == 1
    assert fig.main(["mark-stale", str(out)]) == 0
    assert fig.parse(out.read_text())["alpha"].stale
    assert '!!! warning "Stale"' in out.read_text()
    assert fig.main(["check", str(out)]) == 0


def test_a_damaged_file_does_not_parse() -> None:
    text = "<!-- bench:alpha -->\nno json here\n<!-- /bench:alpha -->\n"
    with pytest.raises(ValueError, match="no JSON block"):
        fig.parse(text)
