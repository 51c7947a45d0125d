"""pytest plugin for the conformance run: marks, by name, the drivers' tests of the few features
the embedded server does not have, each with the feature as the reason, so the table counts them.

Everything else runs. A feature listed here is refused by the embedded server with an error
(never silently ignored); the README lists the same features.

A test that checks other things before it reaches the missing feature is not skipped: it runs
as a strict expected failure that must fail with the server's refusal (an OperationFailure), so
an earlier assertion that breaks (an AssertionError) still fails the run, and a test that starts
passing fails it too (XPASS strict) until its entry is removed here."""

from __future__ import annotations

import re

import pytest
from pymongo.errors import OperationFailure

# feature -> pattern on the test's node id: skipped (nothing else in them runs)
UNSUPPORTED = {
    "collation (refused with code 115)": re.compile(r"[Cc]ollation"),
    "views (create with viewOn refused with code 115)": re.compile(r"on_views"),
}
# feature -> pattern: run, and expected to fail only at the server's refusal of the feature
REFUSED_AT_THE_END = {
    # test_index_text: the index and its weights are checked, then $text is refused.
    "text search ($text refused with code 115)": re.compile(r"::test_index_text$"),
    # test_index_filter: bad partial filters refused (14, 2), then explain is (59).
    "query plans (explain refused with code 59)": re.compile(r"::test_index_filter$"),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for feature, pattern in UNSUPPORTED.items():
            if pattern.search(item.nodeid):
                item.add_marker(pytest.mark.skip(reason=f"embedded server: no {feature}"))
                break
        for feature, pattern in REFUSED_AT_THE_END.items():
            if pattern.search(item.nodeid):
                item.add_marker(
                    pytest.mark.xfail(
                        raises=OperationFailure, strict=True, reason=f"embedded server: no {feature}"
                    )
                )
