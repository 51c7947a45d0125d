"""Fail points, as mongod's `configureFailPoint` test command sets them.

`failCommand` is the one drivers' tests and the reactor's fault tests use: fail the next N
matching commands with an error code (and labels), close the connection, or block it first,
optionally only for one client's `appName`. It fires before the command runs, so the server adds
no label that depends on what the command would have touched (no ResumableChangeStreamError).

`failGetMoreAfterCursorCheckout` fails a `getMore` once its cursor is checked out, inside the
command, so a change stream's cursor gets the labels a real error there would get.

`maxTimeAlwaysTimeOut` makes every command given `maxTimeMS` fail with MaxTimeMSExpired (50).

`onPrimaryTransactionalWrite` fires per statement of a retryable write, just before it commits:
with `failBeforeCommitExceptionCode` the statement is not applied, otherwise it is; then the
connection is closed (unless `closeConnection: false`), or the code raised. The statements that
did commit are remembered by the statement log, so the driver's retry applies only the rest.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from .changestream import CommandError

TRANSACTIONAL_WRITE = "<a statement of a retryable write>"
MAX_TIME = "<a command with maxTimeMS>"


class CloseConnection(Exception):
    """Raised inside command handling to drop the client's connection without a reply."""


@dataclass
class FailPoint:
    mode: Any
    data: dict[str, Any]
    skipped: int = 0
    times_left: int | None = None

    def applies(self, command: str, app_name: str | None) -> bool:
        if command not in self.data.get("failCommands", []):
            return False
        wanted_app = self.data.get("appName")
        if wanted_app is not None and wanted_app != app_name:
            return False
        if isinstance(self.mode, dict) and "skip" in self.mode and self.skipped < self.mode["skip"]:
            self.skipped += 1
            return False
        if self.times_left is not None:
            if self.times_left <= 0:
                return False
            self.times_left -= 1
        return True


class FailPoints:
    """The fail points in force, by name."""

    SUPPORTED = (
        "failCommand",
        "failGetMoreAfterCursorCheckout",
        "onPrimaryTransactionalWrite",
        "maxTimeAlwaysTimeOut",
    )

    def __init__(self) -> None:
        self._points: dict[str, FailPoint] = {}

    def configure(self, command: dict[str, Any]) -> dict[str, Any]:
        """Apply one `configureFailPoint` command; returns its reply."""
        name = command["configureFailPoint"]
        if name not in self.SUPPORTED:
            raise CommandError(
                2, f"unknown fail point {name!r}; the emulator supports {', '.join(self.SUPPORTED)}"
            )
        mode = command.get("mode")
        if mode == "off":
            self._points.pop(name, None)
            return {"count": 0}
        data = dict(command.get("data") or {})
        if name == "failGetMoreAfterCursorCheckout":
            data["failCommands"] = ["getMore"]
        elif name == "onPrimaryTransactionalWrite":
            data["failCommands"] = [TRANSACTIONAL_WRITE]
        elif name == "maxTimeAlwaysTimeOut":
            data["failCommands"] = [MAX_TIME]
        if not isinstance(data.get("failCommands"), list):
            raise CommandError(2, "failCommand requires data.failCommands")
        if mode == "alwaysOn":
            point = FailPoint(mode, data)
        elif isinstance(mode, dict) and "times" in mode:
            point = FailPoint(mode, data, times_left=int(mode["times"]))
        elif isinstance(mode, dict) and "skip" in mode:
            point = FailPoint(mode, data)
        else:
            raise CommandError(2, f"unsupported fail point mode {mode!r}")
        self._points[name] = point
        return {"count": 0}

    def matching(
        self, command: str, app_name: str | None, name: str = "failCommand"
    ) -> FailPoint | None:
        """The fail point `name` if it applies to this command from this client (counting it)."""
        if command == "configureFailPoint":
            return None
        point = self._points.get(name)
        if point is None or not point.applies(command, app_name):
            return None
        if point.times_left == 0:
            self._points.pop(name, None)
        return point

    def check_get_more(self, app_name: str | None) -> None:
        """Inside `getMore`, its cursor checked out: raise what failGetMoreAfterCursorCheckout says."""
        point = self.matching("getMore", app_name, "failGetMoreAfterCursorCheckout")
        if point is not None and "errorCode" in point.data:
            code = int(point.data["errorCode"])
            raise CommandError(code, "Failing getMore via 'failGetMoreAfterCursorCheckout'")

    def check_max_time(self, command: dict[str, Any]) -> None:
        """maxTimeAlwaysTimeOut: a command given maxTimeMS times out at once."""
        if command.get("maxTimeMS") and self.matching(MAX_TIME, None, "maxTimeAlwaysTimeOut"):
            raise CommandError(50, "operation exceeded time limit", "MaxTimeMSExpired")

    def transactional_write(self) -> FailPoint | None:
        """onPrimaryTransactionalWrite, if it fires for the statement about to commit."""
        return self.matching(TRANSACTIONAL_WRITE, None, "onPrimaryTransactionalWrite")

    @staticmethod
    async def trigger(point: FailPoint, command: str) -> None:
        """Do what the fail point says: block, close the connection, or raise its error."""
        data = point.data
        if data.get("blockConnection"):
            await asyncio.sleep(int(data.get("blockTimeMS", 0)) / 1000)
        if data.get("closeConnection"):
            raise CloseConnection
        if "errorCode" in data:
            error = CommandError(
                int(data["errorCode"]),
                f"Failing command {command} via 'failCommand' failpoint",
                labels=list(data.get("errorLabels", [])),
            )
            error.before_command = True
            error.labels_given = "errorLabels" in data
            raise error
