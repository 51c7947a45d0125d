"""The container installs deploy/requirements.lock: every runtime dependency the project
declares must be pinned there (with hashes), or the image lacks it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", requirement)
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def test_every_runtime_dependency_is_pinned_in_the_lock() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = (ROOT / "deploy" / "requirements.lock").read_text()
    pinned = {
        _name(m.group(1)): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", lock, re.M)
    }
    missing = [r for r in project["dependencies"] if _name(r) not in pinned]
    assert not missing, f"not in deploy/requirements.lock: {missing}"
    for extra in ("embedded", "test", "docs"):  # the image stays lean: no test-only packages
        for r in project["optional-dependencies"][extra]:
            assert _name(r) not in pinned or _name(r) in {
                _name(d) for d in project["dependencies"]
            }, f"{r} (extra {extra}) is in the runtime lock"
    assert lock.count("--hash=sha256:") >= len(pinned)
