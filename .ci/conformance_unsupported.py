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
# feature -> (pattern, the refusal's codes): run, and expected to fail only at that refusal
REFUSED_AT_THE_END = {
    # test_index_text: the index and its weights are checked, then $text is refused.
    "text search ($text refused with code 115)": (re.compile(r"::test_index_text$"), {115}),
}
_REFUSAL = pytest.StashKey[set[int]]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for feature, pattern in UNSUPPORTED.items():
            if pattern.search(item.nodeid):
                item.add_marker(pytest.mark.skip(reason=f"embedded server: no {feature}"))
                break
        for feature, (pattern, codes) in REFUSED_AT_THE_END.items():
            if pattern.search(item.nodeid):
                item.stash[_REFUSAL] = codes
                item.add_marker(
                    pytest.mark.xfail(
                        raises=OperationFailure, strict=True, reason=f"embedded server: no {feature}"
                    )
                )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """An expected failure must be the refusal itself: another server error fails the test
    (read from the report, since unittest-style tests do not raise through the call hook)."""
    report = yield
    codes = item.stash.get(_REFUSAL, None)
    if codes is None or call.when != "call" or call.excinfo is None:
        return report
    exc = call.excinfo.value
    if isinstance(exc, OperationFailure) and exc.code not in codes:
        report.outcome = "failed"
        report.longrepr = f"not the refusal {sorted(codes)}: code {exc.code}: {exc}"
        if hasattr(report, "wasxfail"):
            del report.wasxfail
    return report
