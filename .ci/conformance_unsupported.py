"""pytest plugin for the conformance run: skips, by name, the drivers' tests of the few features
the embedded server does not have, each with the feature as the reason, so the table counts them.

Everything else runs. A feature listed here is refused by the embedded server with an error
(never silently ignored); the README lists the same features."""

from __future__ import annotations

import re

import pytest

# feature -> pattern on the test's node id
UNSUPPORTED = {
    "collation (refused with code 115)": re.compile(r"[Cc]ollation"),
    "views (create with viewOn refused with code 115)": re.compile(r"on_views"),
    "text search ($text, text index weights)": re.compile(r"::test_index_text$"),
    "query plans (explain's winningPlan)": re.compile(r"::test_index_filter$"),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for feature, pattern in UNSUPPORTED.items():
            if pattern.search(item.nodeid):
                item.add_marker(pytest.mark.skip(reason=f"embedded server: no {feature}"))
                break
