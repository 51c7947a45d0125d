"""Queries, aggregation (change streams included) and cursors."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, ClassVar

import mongomock
from bson import Int64
from mongomock import filtering

from ..changestream import CommandError, next_batch, open_stream
from ..engine import clone
from ..planner import winning_plan
from ..wire import Request
from .base import DEFAULT_BATCH, CommandsBase, Connection, QueryCursor
from .outputs import WRITE_STAGES, write_results

DEFAULT_AWAIT_MS = 1000
# Stages that start a database aggregation ({aggregate: 1}) without a collection.
DATABASE_SOURCES = frozenset({"$documents", "$listLocalSessions"})


class ReadCommands(CommandsBase):
    HANDLERS: ClassVar[dict[str, str]] = {
        "find": "_find",
        "count": "_count",
        "distinct": "_distinct",
        "aggregate": "_aggregate",
        "getMore": "_get_more",
        "killCursors": "_kill_cursors",
        "explain": "_explain",
    }

    async def _explain(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        """The plan of a find (planner.py); other commands' plans are refused, not guessed."""
        inner = request.command.get("explain")
        if not isinstance(inner, dict) or not inner:
            raise CommandError(2, "explain command requires a nested object", "BadValue")
        verb = next(iter(inner))
        if verb != "find":
            raise CommandError(115, f"explain of {verb} is not supported by the embedded server")
        name = inner.get("find")
        if not isinstance(name, str) or not name:
            raise CommandError(73, "Invalid namespace specified for find", "InvalidNamespace")
        query = inner.get("filter") or {}
        if not isinstance(query, dict):
            raise CommandError(14, "'filter' must be an object", "TypeMismatch")
        indexes = (
            self.engine.collection(db, name).index_information()
            if self.engine.collection_exists(db, name)
            else {}
        )
        return {
            "queryPlanner": winning_plan(query, indexes, f"{db}.{name}"),
            "command": inner,
        }

    async def _find(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        command = request.command
        name = self._coll_name(request, "find")
        coll = self.engine.collection(db, name)
        limit = int(command.get("limit", 0) or 0)
        single = bool(command.get("singleBatch")) or limit < 0
        sort = command.get("sort")
        bounds: dict[str, Any] = {k: command[k] for k in ("min", "max") if k in command}
        if bounds and not command.get("hint"):
            raise CommandError(
                51173, "When using min()/max() a hint of which index to use must be provided"
            )
        skip = int(command.get("skip", 0) or 0)
        try:
            filter_ = command.get("filter") or {}
            if bounds:  # min (inclusive) / max (exclusive) on the hinted index's keys
                filter_ = {"$and": [filter_, *(_bound(k, v) for k, v in bounds.items())]}
            cursor = coll.find(
                filter_,
                command.get("projection"),
                skip=skip,
                limit=abs(limit),
                sort=list(sort.items()) if sort else None,
            )
            docs = list(cursor)
        except (mongomock.OperationFailure, ValueError, TypeError, NotImplementedError) as exc:
            raise CommandError(
                getattr(exc, "code", None) or 2, str(exc) or type(exc).__name__
            ) from exc
        return self._cursor_reply(f"{db}.{name}", docs, command, single_batch=single)

    async def _count(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        command = request.command
        name = self._coll_name(request, "count")
        coll = self.engine.collection(db, name)
        try:
            n = sum(1 for _ in coll._iter_documents(command.get("query") or {}))
        except (mongomock.OperationFailure, ValueError, TypeError) as exc:
            raise CommandError(2, str(exc)) from exc
        skip = int(command.get("skip", 0) or 0)
        n = max(0, n - skip)
        limit = abs(int(command.get("limit", 0) or 0))
        if limit:
            n = min(n, limit)
        return {"n": n}

    async def _distinct(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        command = request.command
        name = self._coll_name(request, "distinct")
        key = command.get("key")
        if not isinstance(key, str):
            raise CommandError(14, "distinct needs a string 'key'")
        try:
            values = self.engine.collection(db, name).distinct(key, command.get("query") or {})
        except (mongomock.OperationFailure, ValueError, TypeError) as exc:
            raise CommandError(2, str(exc)) from exc
        # mongod collects distinct values in BSON order
        return {"values": sorted(values, key=filtering.BsonComparable)}

    async def _aggregate(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        command = request.command
        target = command.get("aggregate")
        pipeline = command.get("pipeline")
        if not isinstance(pipeline, list):
            raise CommandError(14, "'pipeline' option must be specified as an array")
        if pipeline and "$changeStream" in pipeline[0]:
            return self._open_change_stream(command, db, target, pipeline)
        first_stage = _check_pipeline(command, target, pipeline)
        writing = pipeline[-1] if pipeline and next(iter(pipeline[-1])) in WRITE_STAGES else None
        if writing is not None:
            pipeline = pipeline[:-1]
        result = self._run_pipeline(db, target, pipeline, first_stage)
        ns = f"{db}.{target}" if isinstance(target, str) else f"{db}.$cmd.aggregate"
        if writing is not None:
            write_results(self.engine, db, writing, result)
            return {"cursor": {"id": Int64(0), "ns": ns, "firstBatch": []}}
        return self._cursor_reply(ns, result, command)

    def _open_change_stream(
        self, command: dict[str, Any], db: str, target: Any, pipeline: list[dict[str, Any]]
    ) -> dict[str, Any]:
        level = (command.get("readConcern") or {}).get("level")
        if level not in (None, "majority"):
            raise CommandError(72, "Change stream must use majority read concern.")
        coll = target if isinstance(target, str) else None
        stream = open_stream(
            self.engine, db, coll, pipeline[0]["$changeStream"] or {}, pipeline[1:]
        )
        batch_size = (command.get("cursor") or {}).get("batchSize")
        limit = DEFAULT_BATCH if batch_size is None else int(batch_size)
        first = next_batch(self.engine, stream, limit) if limit else []
        cursor_id = next(self._cursor_ids)
        self._cursors[cursor_id] = stream
        ns = f"{db}.{coll}" if coll else f"{db}.$cmd.aggregate"
        return {
            "cursor": {
                "id": Int64(cursor_id),
                "ns": ns,
                "firstBatch": first,
                "postBatchResumeToken": stream.batch_token(),
            }
        }

    def _run_pipeline(
        self, db: str, target: Any, pipeline: list[dict[str, Any]], first_stage: str
    ) -> list[dict[str, Any]]:
        database = self.engine.client[db]
        try:
            rest = pipeline
            if not isinstance(target, str):  # {aggregate: 1}: its first stage is the source
                source, rest = self._database_source(pipeline[0], first_stage), pipeline[1:]
            elif pipeline and "$match" in pipeline[0] and len(pipeline[0]) == 1:
                source_coll = self.engine.collection(db, target)
                # Narrow the input with the fast paths before mongomock copies it.
                source = [clone(d) for d in source_coll._iter_documents(pipeline[0]["$match"])]
                rest = pipeline[1:]
            else:
                source = list(self.engine.collection(db, target).find())
            return list(mongomock.aggregate.process_pipeline(source, database, rest, None))
        except mongomock.OperationFailure as exc:
            raise CommandError(getattr(exc, "code", None) or 2, str(exc)) from exc
        except NotImplementedError as exc:
            raise CommandError(
                40324, f"Unrecognized or unsupported pipeline stage: {exc}", "Location40324"
            ) from exc
        except (ValueError, TypeError, KeyError) as exc:
            raise CommandError(2, f"aggregation failed: {exc!r}") from exc

    def _database_source(self, stage: dict[str, Any], name: str) -> list[dict[str, Any]]:
        """The documents a source stage of a database aggregation ({aggregate: 1}) produces."""
        argument = stage[name]
        if name == "$documents":
            docs = mongomock.aggregate._Parser({}).parse(argument)
            if not isinstance(docs, list) or not all(isinstance(d, dict) for d in docs):
                raise CommandError(5858203, "$documents stage must evaluate to an array of objects")
            return [dict(d) for d in docs]
        # $listLocalSessions: the sessions this server has seen commands from
        return [
            {"_id": {"id": lsid, "uid": b"\0" * 32}, "lastUse": last_use}
            for lsid, last_use in self._sessions.items()
        ]

    async def _get_more(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        command = request.command
        cursor_id = command.get("getMore")
        if not isinstance(cursor_id, int):
            raise CommandError(14, "getMore needs a cursor id")
        cursor = self._cursors.get(int(cursor_id))
        if cursor is None:
            raise CommandError(43, f"cursor id {cursor_id} not found")
        self.fail_points.check_get_more(conn.app_name)
        batch_size = command.get("batchSize")
        if isinstance(cursor, QueryCursor):
            size = int(batch_size) if batch_size else len(cursor.docs)
            batch, cursor.docs = cursor.docs[:size], cursor.docs[size:]
            next_id = int(cursor_id) if cursor.docs else 0
            if not cursor.docs:
                self._cursors.pop(int(cursor_id), None)
            return {"cursor": {"id": Int64(next_id), "ns": cursor.ns, "nextBatch": batch}}
        limit = int(batch_size) if batch_size else 10_000
        max_time_ms = command.get("maxTimeMS")
        wait_s = (DEFAULT_AWAIT_MS if max_time_ms is None else int(max_time_ms)) / 1000
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            batch = next_batch(self.engine, cursor, limit)
            if batch or cursor.invalidated:
                break
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            changed = self.engine.change_signal()  # no await since next_batch read the log
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        ns_coll = cursor.coll or "$cmd.aggregate"
        ns = f"{cursor.db or 'admin'}.{ns_coll}"
        next_id = int(cursor_id)
        if cursor.invalidated and not cursor.pending:
            self._cursors.pop(int(cursor_id), None)
            next_id = 0
        return {
            "cursor": {
                "id": Int64(next_id),
                "ns": ns,
                "nextBatch": batch,
                "postBatchResumeToken": cursor.batch_token(),
            }
        }

    async def _kill_cursors(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        ids = request.command.get("cursors") or []
        killed, missing = [], []
        for cursor_id in ids:
            if self._cursors.pop(int(cursor_id), None) is not None:
                killed.append(cursor_id)
            else:
                missing.append(cursor_id)
        return {
            "cursorsKilled": killed,
            "cursorsNotFound": missing,
            "cursorsAlive": [],
            "cursorsUnknown": [],
        }


def _bound(which: str, key: Any) -> dict[str, Any]:
    """`min` / `max` of a find as a condition: the index key tuple compared lexicographically,
    `min` inclusive and `max` exclusive."""
    if not isinstance(key, dict) or not key:
        raise CommandError(2, f"'{which}' must be a non-empty document of index key values")
    last = "$gte" if which == "min" else "$lt"
    beyond = "$gt" if which == "min" else "$lt"
    fields = list(key.items())
    alternatives = []
    for i, (field, value) in enumerate(fields):
        equal_before = dict(fields[:i])
        op = last if i == len(fields) - 1 else beyond
        alternatives.append({**equal_before, field: {op: value}})
    return alternatives[0] if len(alternatives) == 1 else {"$or": alternatives}


def _check_pipeline(command: dict[str, Any], target: Any, pipeline: list[dict[str, Any]]) -> str:
    """mongod's rules for where stages may stand and what a pipeline may run on; the first
    stage's name."""
    if not isinstance(target, str) and target != 1:
        raise CommandError(
            73, "aggregate needs a collection name or 1 (the database)", "InvalidNamespace"
        )
    first_stage = next(iter(pipeline[0]), "") if pipeline and pipeline[0] else ""
    if (target == 1) != (first_stage in DATABASE_SOURCES):
        raise CommandError(
            73,
            f"'{first_stage}' must be run with {{aggregate: 1}}"
            if target != 1
            else f"{{aggregate: 1}} is not valid for '{first_stage or 'an empty pipeline'}'; "
            "a collection name is required",
            "InvalidNamespace",
        )
    level = (command.get("readConcern") or {}).get("level")
    if level == "linearizable" and any(next(iter(st), "") in WRITE_STAGES for st in pipeline):
        raise CommandError(
            72, "$out and $merge cannot be used with a 'linearizable' read concern level"
        )
    if any("$changeStream" in s for s in pipeline[1:]):
        raise CommandError(40602, "$changeStream is only valid as the first stage", "Location40602")
    for stage in pipeline[:-1]:
        name = next(iter(stage), "")
        if name in ("$out", "$merge"):
            raise CommandError(
                40601, f"{name} can only be the final stage in the pipeline", "Location40601"
            )
    return first_stage
