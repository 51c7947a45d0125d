"""State and helpers every command family shares: connections, cursors, namespaces."""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from bson import Int64, ObjectId

from ..changestream import ChangeStreamCursor, CommandError
from ..engine import Engine
from ..failpoints import CloseConnection, FailPoints
from ..wire import Request

DEFAULT_BATCH = 101


@dataclass
class QueryCursor:
    ns: str
    docs: list[dict[str, Any]]
    batch_size: int | None = None


@dataclass
class Connection:
    id: int
    writer: asyncio.StreamWriter
    task: asyncio.Task[Any] | None = None
    app_name: str | None = None
    last_active: float = 0.0


Handler = Callable[[Request, Connection, str], Awaitable[dict[str, Any]]]

EXECUTED_LIMIT = 10_000  # retryable writes whose committed statements are remembered


class StatementLog:
    """The statements of one retryable write (lsid + txnNumber) that committed, by index, with
    what each did: a retry of the same write returns those and applies only the others, as
    mongod does by statement id. Also where onPrimaryTransactionalWrite fires."""

    def __init__(self, fail_points: FailPoints, done: dict[int, Any] | None) -> None:
        self._fail_points = fail_points
        self._done = done  # None: not a retryable write

    def previous(self, index: int) -> Any:
        """What statement `index` did when it committed before, or None."""
        return None if self._done is None else self._done.get(index)

    def before_commit(self) -> Any:
        """Called just before a statement commits; returns a token for `committed`. Raises
        what the fail point says when it skips the commit."""
        if self._done is None:
            return None
        point = self._fail_points.transactional_write()
        if point is None:
            return None
        code = point.data.get("failBeforeCommitExceptionCode")
        if code is not None:
            if point.data.get("closeConnection", True):
                raise CloseConnection
            raise CommandError(int(code), "Failing write via 'onPrimaryTransactionalWrite'")
        return point

    def committed(self, index: int, outcome: Any, token: Any) -> None:
        """Statement `index` committed with `outcome`; the fail point may now drop the client."""
        if self._done is None:
            return
        self._done[index] = outcome
        if token is not None and token.data.get("closeConnection", True):
            raise CloseConnection


class CommandsBase:
    """What the command mixins may use of the server they are mixed into."""

    HANDLERS: ClassVar[dict[str, str]] = {}

    engine: Engine
    host: str
    port: int
    replica_set: str
    fail_points: FailPoints
    _connections: dict[int, Connection]
    _cursor_ids: itertools.count[int]
    _cursors: dict[int, QueryCursor | ChangeStreamCursor]
    _election_id: ObjectId
    _executed: OrderedDict[tuple[bytes, int], dict[int, Any]]
    _sessions: OrderedDict[Any, Any]  # lsid.id -> last use, for $listLocalSessions

    @property
    def address(self) -> str:
        raise NotImplementedError

    def _statement_log(self, request: Request) -> StatementLog:
        command = request.command
        txn, lsid = command.get("txnNumber"), command.get("lsid")
        if txn is None or not isinstance(lsid, dict) or not isinstance(lsid.get("id"), bytes):
            return StatementLog(self.fail_points, None)
        key = (bytes(lsid["id"]), int(txn))
        done = self._executed.get(key)
        if done is None:
            done = self._executed[key] = {}
            while len(self._executed) > EXECUTED_LIMIT:
                self._executed.popitem(last=False)
        return StatementLog(self.fail_points, done)

    def _coll_name(self, request: Request, name: str) -> str:
        value = request.command.get(name)
        if not isinstance(value, str) or not value:
            raise CommandError(73, f"Invalid namespace specified for {name}", "InvalidNamespace")
        return value

    def _cursor_reply(
        self,
        ns: str,
        docs: list[dict[str, Any]],
        command: dict[str, Any],
        single_batch: bool = False,
    ) -> dict[str, Any]:
        cursor_opts = command.get("cursor") or {}
        batch_size = command.get("batchSize", cursor_opts.get("batchSize"))
        first = DEFAULT_BATCH if batch_size is None else int(batch_size)
        if batch_size == 0:
            first_batch: list[dict[str, Any]] = []
            rest = docs
        else:
            first_batch, rest = docs[:first], docs[first:]
        cursor_id = 0
        if rest and not single_batch:
            cursor_id = next(self._cursor_ids)
            self._cursors[cursor_id] = QueryCursor(ns, rest, None)
        return {"cursor": {"id": Int64(cursor_id), "ns": ns, "firstBatch": first_batch}}
