"""State and helpers every command family shares: connections, cursors, namespaces."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from bson import Int64, ObjectId

from ..changestream import ChangeStreamCursor, CommandError
from ..engine import Engine
from ..failpoints import FailPoints
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

    @property
    def address(self) -> str:
        raise NotImplementedError

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
