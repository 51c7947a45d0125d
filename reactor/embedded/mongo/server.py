"""An asyncio TCP server that speaks the MongoDB wire protocol and presents itself as the primary of a
one-member replica set. Documents, queries, updates and aggregation come from mongomock; change
streams, cluster times, retryable-write bookkeeping and `failCommand` fail points are ours.

Use it as an async context manager (`async with MongoEmulator() as emu: emu.uri`) or through
`reactor mongo-emulator`. The reactor never imports this module outside tests and the demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import itertools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import mongomock
from bson import Binary, Int64, ObjectId
from mongomock import filtering

from .changestream import ChangeStreamCursor, CommandError, encode_token, next_batch, open_stream
from .engine import Engine, OplogEntry, clone, diff_documents, int_to_ts, simple_update
from .wire import (
    HEADER,
    MAX_MESSAGE_SIZE,
    OP_QUERY,
    ProtocolError,
    Request,
    encode_op_msg,
    encode_op_reply,
    parse_message,
)

log = logging.getLogger(__name__)

_WriteError: type[Exception] = mongomock.WriteError  # type: ignore[attr-defined]

MAX_WIRE_VERSION = 21  # MongoDB 7.0
SERVER_VERSION = "7.0.0-reactor-emulator"
DEFAULT_BATCH = 101
DEFAULT_AWAIT_MS = 1000

RETRYABLE_CODES = {6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436}
RESUMABLE_CODES = RETRYABLE_CODES | {63, 150, 13388, 234, 133, 43}

# Fields every command may carry that say nothing about what it does.
_GENERIC_FIELDS = {
    "$db",
    "lsid",
    "$clusterTime",
    "txnNumber",
    "$readPreference",
    "readConcern",
    "writeConcern",
    "apiVersion",
    "apiStrict",
    "apiDeprecationErrors",
    "comment",
    "maxTimeMS",
    "autocommit",
    "startTransaction",
    "bypassDocumentValidation",
    "$audit",
    "signature",
}


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


class MongoEmulator:
    """The embedded MongoDB-compatible server."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, replica_set: str = "rs0") -> None:
        self.host = host
        self.port = port
        self.replica_set = replica_set
        self.engine = Engine()
        self._server: asyncio.base_events.Server | None = None
        self._connections: dict[int, Connection] = {}
        self._conn_ids = itertools.count(1)
        self._cursor_ids = itertools.count(1_000_001)
        self._cursors: dict[int, QueryCursor | ChangeStreamCursor] = {}
        self._fail_points: dict[str, FailPoint] = {}
        self._retry_cache: OrderedDict[tuple[bytes, int], dict[str, Any]] = OrderedDict()
        self._election_id = ObjectId()
        self._handlers: dict[
            str, Callable[[Request, Connection, str], Awaitable[dict[str, Any]]]
        ] = {
            "hello": self._hello,
            "ismaster": self._hello,
            "isMaster": self._hello,
            "ping": self._ping,
            "buildInfo": self._build_info,
            "buildinfo": self._build_info,
            "listDatabases": self._list_databases,
            "listCollections": self._list_collections,
            "create": self._create,
            "collMod": self._coll_mod,
            "drop": self._drop,
            "dropDatabase": self._drop_database,
            "createIndexes": self._create_indexes,
            "listIndexes": self._list_indexes,
            "dropIndexes": self._drop_indexes,
            "insert": self._insert,
            "update": self._update,
            "delete": self._delete,
            "find": self._find,
            "findAndModify": self._find_and_modify,
            "findandmodify": self._find_and_modify,
            "count": self._count,
            "distinct": self._distinct,
            "aggregate": self._aggregate,
            "getMore": self._get_more,
            "killCursors": self._kill_cursors,
            "endSessions": self._ok,
            "killSessions": self._ok,
            "killAllSessions": self._ok,
            "configureFailPoint": self._configure_fail_point,
            "replSetGetStatus": self._repl_set_get_status,
            "serverStatus": self._server_status,
            "getParameter": self._get_parameter,
            "connectionStatus": self._connection_status,
            "getLog": self._get_log,
            "whatsmyuri": self._ok,
        }

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def uri(self) -> str:
        return f"mongodb://{self.address}/?replicaSet={self.replica_set}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve_connection, self.host, self.port, limit=2**20
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = []
        for conn in list(self._connections.values()):
            conn.writer.close()
            if conn.task is not None and conn.task is not asyncio.current_task():
                conn.task.cancel()
                tasks.append(conn.task)
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> MongoEmulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ---- emulator-only controls ---------------------------------------------------------------

    def drop_change_stream_history(self) -> None:
        """Forget every change so far: resuming from an older token fails with code 286."""
        self.engine.drop_history()

    def close_all_connections(self) -> None:
        for conn in list(self._connections.values()):
            conn.writer.close()

    # ---- connection loop ---------------------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = Connection(next(self._conn_ids), writer, asyncio.current_task())
        self._connections[conn.id] = conn
        try:
            while True:
                try:
                    header = await reader.readexactly(16)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length, request_id, _response_to, op_code = HEADER.unpack(header)
                if length < 16 or length > MAX_MESSAGE_SIZE:
                    log.warning(
                        "closing connection %s: message length %s out of bounds", conn.id, length
                    )
                    return
                try:
                    body = await reader.readexactly(length - 16)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                try:
                    request = parse_message(op_code, request_id, body, header + body)
                except ProtocolError as exc:
                    log.warning("closing connection %s: %s", conn.id, exc)
                    return
                try:
                    reply = await self._dispatch(request, conn)
                except CloseConnection:
                    return
                if request.more_to_come:
                    continue
                if request.op_code == OP_QUERY:
                    writer.write(encode_op_reply(request_id, reply))
                else:
                    writer.write(encode_op_msg(request_id, reply))
                try:
                    await writer.drain()
                except ConnectionError:
                    return
        except asyncio.CancelledError:
            # Only stop() cancels a connection; end quietly so asyncio's stream callback does
            # not report the cancellation as an error.
            return
        finally:
            self._connections.pop(conn.id, None)
            writer.close()

    async def _dispatch(self, request: Request, conn: Connection) -> dict[str, Any]:
        command = request.command
        if not command:
            return self._error(CommandError(59, "no command given"))
        name = next(iter(command))
        db = command.get("$db")
        if request.legacy_namespace is not None:
            db = request.legacy_namespace.split(".", 1)[0]
        if not isinstance(db, str) or not db:
            return self._error(CommandError(73, "command has no valid $db", "InvalidNamespace"))
        if name in ("hello", "isMaster", "ismaster"):
            client = command.get("client")
            if isinstance(client, dict):
                app = client.get("application")
                if isinstance(app, dict) and isinstance(app.get("name"), str):
                    conn.app_name = app["name"]
        elif request.op_code == OP_QUERY:
            return self._error(
                CommandError(352, "Unsupported OP_QUERY command", "UnsupportedOpQueryCommand")
            )
        fail = self._matching_fail_point(name, conn)
        try:
            if fail is not None:
                await self._apply_fail_point(fail, name, command)
            if command.get("startTransaction") or "autocommit" in command:
                raise CommandError(20, "Transactions are not supported by the reactor's emulator")
            handler = self._handlers.get(name)
            if handler is None:
                raise CommandError(59, f"no such command: '{name}'")
            retry_key = self._retry_key(command, name)
            if retry_key is not None and retry_key in self._retry_cache:
                reply = copy.deepcopy(self._retry_cache[retry_key])
            else:
                reply = await handler(request, conn, db)
                if retry_key is not None:
                    self._retry_cache[retry_key] = copy.deepcopy(reply)
                    while len(self._retry_cache) > 10_000:
                        self._retry_cache.popitem(last=False)
        except CommandError as exc:
            if not exc.labels:
                if "txnNumber" in command and exc.code in RETRYABLE_CODES:
                    exc.labels = ["RetryableWriteError"]
                if name == "getMore" and exc.code in RESUMABLE_CODES:
                    cursor = self._cursors.get(command.get("getMore"))  # type: ignore[arg-type]
                    if isinstance(cursor, ChangeStreamCursor):
                        exc.labels = ["ResumableChangeStreamError"]
            return self._error(exc)
        return self._finish(reply)

    def _retry_key(self, command: dict[str, Any], name: str) -> tuple[bytes, int] | None:
        if name not in ("insert", "update", "delete", "findAndModify", "findandmodify"):
            return None
        txn = command.get("txnNumber")
        lsid = command.get("lsid")
        if txn is None or not isinstance(lsid, dict) or not isinstance(lsid.get("id"), bytes):
            return None
        return (bytes(lsid["id"]), int(txn))

    def _matching_fail_point(self, name: str, conn: Connection) -> FailPoint | None:
        if name == "configureFailPoint":
            return None
        point = self._fail_points.get("failCommand")
        if point is None or not point.applies(name, conn.app_name):
            return None
        if point.times_left == 0:
            self._fail_points.pop("failCommand", None)
        return point

    async def _apply_fail_point(self, point: FailPoint, name: str, command: dict[str, Any]) -> None:
        data = point.data
        if data.get("blockConnection"):
            await asyncio.sleep(int(data.get("blockTimeMS", 0)) / 1000)
        if data.get("closeConnection"):
            raise CloseConnection
        if "errorCode" in data:
            code = int(data["errorCode"])
            raise CommandError(
                code,
                f"Failing command {name} via 'failCommand' failpoint",
                labels=list(data.get("errorLabels", [])),
            )

    def _finish(self, reply: dict[str, Any]) -> dict[str, Any]:
        ts = int_to_ts(self.engine.cluster_time)
        reply.setdefault("ok", 1.0)
        reply["$clusterTime"] = {
            "clusterTime": ts,
            "signature": {"hash": Binary(b"\x00" * 20), "keyId": Int64(0)},
        }
        reply["operationTime"] = ts
        return reply

    def _error(self, exc: CommandError) -> dict[str, Any]:
        reply: dict[str, Any] = {
            "ok": 0.0,
            "errmsg": exc.message,
            "code": exc.code,
            "codeName": exc.code_name,
        }
        if exc.labels:
            reply["errorLabels"] = exc.labels
        return self._finish(reply)

    # ---- handshake and server info -----------------------------------------------------------

    async def _hello(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name = next(iter(request.command))
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        op_time = {"ts": int_to_ts(self.engine.cluster_time), "t": Int64(1)}
        reply: dict[str, Any] = {
            "helloOk": True,
            "isWritablePrimary": True,
            "topologyVersion": None,
            "hosts": [self.address],
            "setName": self.replica_set,
            "setVersion": 1,
            "primary": self.address,
            "me": self.address,
            "electionId": self._election_id,
            "secondary": False,
            "lastWrite": {
                "opTime": op_time,
                "lastWriteDate": now,
                "majorityOpTime": op_time,
                "majorityWriteDate": now,
            },
            "maxBsonObjectSize": 16 * 1024 * 1024,
            "maxMessageSizeBytes": MAX_MESSAGE_SIZE,
            "maxWriteBatchSize": 100_000,
            "localTime": now,
            "logicalSessionTimeoutMinutes": 30,
            "connectionId": conn.id,
            "minWireVersion": 0,
            "maxWireVersion": MAX_WIRE_VERSION,
            "readOnly": False,
        }
        del reply["topologyVersion"]  # no streaming monitor protocol: drivers poll instead
        if name != "hello":
            reply["ismaster"] = True
        return reply

    async def _ping(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        return {}

    async def _ok(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        return {}

    async def _build_info(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        return {
            "version": SERVER_VERSION,
            "versionArray": [7, 0, 0, 0],
            "bits": 64,
            "maxBsonObjectSize": 16 * 1024 * 1024,
            "storageEngines": ["mongomock"],
            "gitVersion": "emulator",
        }

    async def _repl_set_get_status(
        self, request: Request, conn: Connection, db: str
    ) -> dict[str, Any]:
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        return {
            "set": self.replica_set,
            "date": now,
            "myState": 1,
            "members": [
                {
                    "_id": 0,
                    "name": self.address,
                    "health": 1.0,
                    "state": 1,
                    "stateStr": "PRIMARY",
                    "self": True,
                }
            ],
        }

    async def _server_status(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        return {
            "host": self.address,
            "version": SERVER_VERSION,
            "process": "reactor-emulator",
            "connections": {"current": len(self._connections)},
            "repl": {"setName": self.replica_set, "isWritablePrimary": True},
        }

    async def _get_parameter(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        return {"featureCompatibilityVersion": {"version": "7.0"}}

    async def _connection_status(
        self, request: Request, conn: Connection, db: str
    ) -> dict[str, Any]:
        return {"authInfo": {"authenticatedUsers": [], "authenticatedUserRoles": []}}

    async def _get_log(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        return {"totalLinesWritten": 0, "log": []}

    async def _configure_fail_point(
        self, request: Request, conn: Connection, db: str
    ) -> dict[str, Any]:
        if db != "admin":
            raise CommandError(
                13, "configureFailPoint may only be run against the admin database.", "Unauthorized"
            )
        command = request.command
        name = command["configureFailPoint"]
        if name != "failCommand":
            raise CommandError(2, f"unknown fail point {name!r}; the emulator supports failCommand")
        mode = command.get("mode")
        if mode == "off":
            self._fail_points.pop(name, None)
            return {"count": 0}
        data = dict(command.get("data") or {})
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
        self._fail_points[name] = point
        return {"count": 0}

    # ---- databases, collections, indexes -----------------------------------------------------

    def _coll_name(self, request: Request, name: str) -> str:
        value = request.command.get(name)
        if not isinstance(value, str) or not value:
            raise CommandError(73, f"Invalid namespace specified for {name}", "InvalidNamespace")
        return value

    async def _list_databases(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        names = self.engine.client.list_database_names()
        name_only = bool(request.command.get("nameOnly"))
        dbs = [
            {"name": n} if name_only else {"name": n, "sizeOnDisk": 0, "empty": False}
            for n in names
        ]
        flt = request.command.get("filter")
        if flt:
            dbs = [d for d in dbs if filtering.filter_applies(flt, d)]
        return {"databases": dbs, "totalSize": 0}

    async def _list_collections(
        self, request: Request, conn: Connection, db: str
    ) -> dict[str, Any]:
        names = (
            self.engine.client[db].list_collection_names()
            if db in self.engine.client.list_database_names()
            else []
        )
        infos = []
        for n in sorted(names):
            options: dict[str, Any] = {}
            if (db, n) in self.engine.pre_images_enabled:
                options["changeStreamPreAndPostImages"] = {"enabled": True}
            infos.append(
                {
                    "name": n,
                    "type": "collection",
                    "options": options,
                    "info": {"readOnly": False},
                    "idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"},
                }
            )
        flt = request.command.get("filter")
        if flt:
            infos = [i for i in infos if filtering.filter_applies(flt, i)]
        if request.command.get("nameOnly"):
            infos = [{"name": i["name"], "type": i["type"]} for i in infos]
        return self._cursor_reply(f"{db}.$cmd.listCollections", infos, request.command)

    async def _create(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name = self._coll_name(request, "create")
        if self.engine.collection_exists(db, name):
            raise CommandError(48, f"Collection {db}.{name} already exists.")
        self.engine.client[db].create_collection(name)
        self._set_pre_images(db, name, request.command)
        return {}

    async def _coll_mod(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name = self._coll_name(request, "collMod")
        if not self.engine.collection_exists(db, name):
            raise CommandError(26, f"ns does not exist: {db}.{name}")
        self._set_pre_images(db, name, request.command)
        return {}

    def _set_pre_images(self, db: str, name: str, command: dict[str, Any]) -> None:
        option = command.get("changeStreamPreAndPostImages")
        if isinstance(option, dict):
            if option.get("enabled"):
                self.engine.pre_images_enabled.add((db, name))
            else:
                self.engine.pre_images_enabled.discard((db, name))

    async def _drop(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name = self._coll_name(request, "drop")
        if not self.engine.collection_exists(db, name):
            return {"nIndexesWas": 0}
        coll = self.engine.collection(db, name)
        n_indexes = len(coll.index_information())
        self.engine.touch(db, name)
        self.engine.client[db].drop_collection(name)
        self.engine.pre_images_enabled.discard((db, name))
        self.engine.indexed_fields.pop((db, name), None)
        self.engine.record([self.engine.make_entry(db, name, "drop", None)])
        return {"nIndexesWas": n_indexes, "ns": f"{db}.{name}"}

    async def _drop_database(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        if db not in self.engine.client.list_database_names():
            return {}
        entries = []
        for name in self.engine.client[db].list_collection_names():
            self.engine.touch(db, name)
            entries.append(self.engine.make_entry(db, name, "drop", None))
        self.engine.client.drop_database(db)
        entries.append(self.engine.make_entry(db, "", "dropDatabase", None))
        self.engine.record(entries)
        return {"dropped": db}

    async def _create_indexes(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name = self._coll_name(request, "createIndexes")
        specs = request.command.get("indexes")
        if not isinstance(specs, list) or not specs:
            raise CommandError(2, "Must specify at least one index to create")
        coll = self.engine.collection(db, name)
        before = len(coll.index_information()) if self.engine.collection_exists(db, name) else 0
        created_collection = not self.engine.collection_exists(db, name)
        existing = coll.index_information()
        for spec in specs:
            key = spec.get("key")
            if not isinstance(key, dict) or not key:
                raise CommandError(2, "index specification must have a non-empty 'key'")
            index_name = spec.get("name") or "_".join(f"{k}_{v}" for k, v in key.items())
            if index_name in existing:
                if existing[index_name].get("key") != list(key.items()):
                    raise CommandError(
                        86,
                        f"An existing index has the same name as the requested index: {index_name}",
                        "IndexKeySpecsConflict",
                    )
                continue
            kwargs = {
                k: spec[k]
                for k in ("unique", "sparse", "expireAfterSeconds", "partialFilterExpression")
                if k in spec
            }
            try:
                coll.create_index(list(key.items()), name=index_name, **kwargs)
            except mongomock.DuplicateKeyError as exc:
                raise CommandError(
                    11000,
                    f"Index build failed: E11000 duplicate key error "
                    f"collection: {db}.{name} index: {index_name}",
                ) from exc
            except (mongomock.OperationFailure, NotImplementedError, TypeError) as exc:
                raise CommandError(67, str(exc), "CannotCreateIndex") from exc
        self.engine.set_indexed_fields(db, name)
        after = len(coll.index_information())
        return {
            "numIndexesBefore": before or 1,
            "numIndexesAfter": after,
            "createdCollectionAutomatically": created_collection,
        }

    async def _list_indexes(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name = self._coll_name(request, "listIndexes")
        if not self.engine.collection_exists(db, name):
            raise CommandError(26, f"ns does not exist: {db}.{name}")
        infos = []
        for index_name, info in self.engine.collection(db, name).index_information().items():
            spec = {"v": 2, "key": dict(info["key"]), "name": index_name}
            for option in ("unique", "sparse", "expireAfterSeconds", "partialFilterExpression"):
                if option in info:
                    spec[option] = info[option]
            infos.append(spec)
        return self._cursor_reply(f"{db}.{name}", infos, request.command)

    async def _drop_indexes(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name = self._coll_name(request, "dropIndexes")
        if not self.engine.collection_exists(db, name):
            raise CommandError(26, f"ns not found {db}.{name}")
        coll = self.engine.collection(db, name)
        which = request.command.get("index")
        before = len(coll.index_information())
        try:
            if which == "*":
                coll.drop_indexes()
            elif isinstance(which, str):
                coll.drop_index(which)
            elif isinstance(which, dict):
                coll.drop_index(list(which.items()))
            elif isinstance(which, list):
                for n in which:
                    coll.drop_index(n)
            else:
                raise CommandError(2, "dropIndexes needs 'index'")
        except mongomock.OperationFailure as exc:
            raise CommandError(27, str(exc), "IndexNotFound") from exc
        self.engine.set_indexed_fields(db, name)
        return {"nIndexesWas": before}

    # ---- writes ------------------------------------------------------------------------------

    def _pre_image_wanted(self, db: str, name: str) -> bool:
        return (db, name) in self.engine.pre_images_enabled

    def _pre_image(self, db: str, name: str, doc: dict[str, Any] | None) -> dict[str, Any] | None:
        if doc is None or (db, name) not in self.engine.pre_images_enabled:
            return None
        return copy.deepcopy(doc)

    def _dup_key_error(
        self, db: str, name: str, doc: dict[str, Any], index: int | None = None
    ) -> dict[str, Any]:
        coll: Any = self.engine.collection(db, name)
        index_name, key_value = "_id_", {"_id": doc.get("_id")}
        for iname, info in coll.index_information().items():
            if not info.get("unique"):
                continue
            values = {}
            for k, _ in info["key"]:
                try:
                    values[k] = mongomock.helpers.get_value_by_dot(doc, k)
                except KeyError:
                    values[k] = None
            others = [
                d
                for d in coll._store.documents
                if d.get("_id") != doc.get("_id")
                and all(_get_dot(d, k) == v for k, v in values.items())
            ]
            if others:
                index_name, key_value = iname, values
                break
        rendered = ", ".join(f"{k}: {v!r}" for k, v in key_value.items())
        err: dict[str, Any] = {
            "code": 11000,
            "errmsg": f"E11000 duplicate key error collection: {db}.{name} index: {index_name} "
            f"dup key: {{ {rendered} }}",
            "keyPattern": dict.fromkeys(key_value, 1),
            "keyValue": key_value,
        }
        if index is not None:
            err["index"] = index
        return err

    async def _insert(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name = self._coll_name(request, "insert")
        docs = request.command.get("documents")
        if not isinstance(docs, list):
            raise CommandError(2, "insert needs 'documents'")
        ordered = request.command.get("ordered", True)
        coll = self.engine.collection(db, name)
        with self.engine.writing(db, name):
            return self._insert_docs(db, name, coll, docs, ordered)

    def _insert_docs(
        self, db: str, name: str, coll: Any, docs: list[dict[str, Any]], ordered: bool
    ) -> dict[str, Any]:
        n = 0
        errors: list[dict[str, Any]] = []
        entries: list[OplogEntry] = []
        for i, doc in enumerate(docs):
            doc = dict(doc)
            if "_id" not in doc:
                doc = {"_id": ObjectId(), **doc}
            try:
                coll.insert_one(doc)
            except mongomock.DuplicateKeyError:
                errors.append(self._dup_key_error(db, name, doc, i))
            except (_WriteError, mongomock.OperationFailure, ValueError, TypeError) as exc:
                errors.append(
                    {"index": i, "code": getattr(exc, "code", None) or 2, "errmsg": str(exc)}
                )
            else:
                n += 1
                entries.append(
                    self.engine.make_entry(
                        db, name, "insert", {"_id": doc["_id"]}, full_document=clone(doc)
                    )
                )
                continue
            if ordered:
                break
        self.engine.record(entries)
        reply: dict[str, Any] = {"n": n}
        if errors:
            reply["writeErrors"] = errors
        return reply

    def _apply_one_update(
        self,
        db: str,
        name: str,
        q: dict[str, Any],
        u: Any,
        *,
        multi: bool,
        upsert: bool,
        array_filters: Any,
        sort: Any = None,
        full_documents: bool = False,
    ) -> tuple[
        int, int, Any, list[OplogEntry], list[tuple[dict[str, Any] | None, dict[str, Any] | None]]
    ]:
        """Apply one update statement; returns (matched, modified, upserted_id, entries,
        [(before, after)]). Raises mongomock errors for the caller to map."""
        coll = self.engine.collection(db, name)
        if array_filters:
            raise CommandError(115, "arrayFilters are not supported by the emulator")
        is_pipeline = isinstance(u, list)
        is_replacement = (
            not is_pipeline and isinstance(u, dict) and not any(k.startswith("$") for k in u)
        )
        if not is_pipeline and not isinstance(u, dict):
            raise CommandError(9, "update must be a document or a pipeline")
        if is_replacement and multi:
            raise CommandError(9, "multi update is not supported for replacement-style update")
        if not is_pipeline and not is_replacement:
            if any(not k.startswith("$") for k in u):
                raise CommandError(9, "Unknown modifier mixed with update operators")
        # Plain $set/$setOnInsert/$inc/$unset of top-level fields skip mongomock's general
        # update path (see engine.simple_update); the results are the same.
        simple = not is_pipeline and not is_replacement and simple_update(u)
        if sort:
            ids = [d["_id"] for d in coll.find(q, {"_id": 1}, sort=list(sort.items()))]
        else:
            ids = [d["_id"] for d in coll._iter_documents(q)]
        if not multi:
            ids = ids[:1]
        entries: list[OplogEntry] = []
        pairs: list[tuple[dict[str, Any] | None, dict[str, Any] | None]] = []
        matched = modified = 0
        upserted_id = None
        # Only the fields an operator update can touch are copied for the change event: campaign
        # documents carry long target lists that no counter update should have to copy.
        touched = (
            None
            if (full_documents or is_pipeline or is_replacement or self._pre_image_wanted(db, name))
            else _touched_fields(u)
        )
        for _id in ids:
            before = _snapshot(coll, _id, touched)
            # Pin the document by _id (the engine's fast path); keep the statement's own filter
            # for positional operators and for correctness.
            target = {"_id": _id, "$and": [q]} if "_id" in q else {**q, "_id": _id}
            if is_replacement:
                replacement = dict(u)
                if "_id" in replacement and replacement["_id"] != _id:
                    raise CommandError(
                        66,
                        "After applying the update, the (immutable) field '_id' "
                        "was found to have been altered",
                    )
                coll.replace_one(target, replacement)
            elif not (simple and coll.update_simple(_id, u)):
                coll.update_one(target, u)
            after = _snapshot(coll, _id, touched)
            matched += 1
            pairs.append((before, after))
            if after != before:
                modified += 1
                if is_replacement:
                    entries.append(
                        self.engine.make_entry(
                            db,
                            name,
                            "replace",
                            {"_id": _id},
                            full_document=clone(after),
                            pre_image=self._pre_image(db, name, before),
                        )
                    )
                else:
                    assert before is not None
                    assert after is not None
                    entries.append(
                        self.engine.make_entry(
                            db,
                            name,
                            "update",
                            {"_id": _id},
                            update_description=diff_documents(before, after),
                            pre_image=self._pre_image(db, name, before),
                        )
                    )
        if not ids and upsert:
            if is_replacement:
                doc = dict(u)
                if "_id" not in doc:
                    q_id = q.get("_id")
                    doc = {"_id": q_id if _id_is_plain(q_id) else ObjectId(), **doc}
                coll.insert_one(doc)
                upserted_id = doc["_id"]
            else:
                done, upserted_id = coll.upsert_simple(q, u) if simple else (False, None)
                if not done:
                    upserted_id = coll.update_one(q, u, upsert=True).upserted_id
            after = _snapshot(coll, upserted_id)
            entries.append(
                self.engine.make_entry(
                    db, name, "insert", {"_id": upserted_id}, full_document=clone(after)
                )
            )
            pairs.append((None, after))
        return matched, modified, upserted_id, entries, pairs

    async def _update(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name = self._coll_name(request, "update")
        statements = request.command.get("updates")
        if not isinstance(statements, list):
            raise CommandError(2, "update needs 'updates'")
        ordered = request.command.get("ordered", True)
        self.engine.collection(db, name)
        with self.engine.writing(db, name):
            return self._update_statements(db, name, statements, ordered)

    def _update_statements(
        self, db: str, name: str, statements: list[dict[str, Any]], ordered: bool
    ) -> dict[str, Any]:
        n = n_modified = 0
        upserted: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for i, stmt in enumerate(statements):
            q = stmt.get("q", {})
            try:
                matched, modified, upserted_id, entries, _pairs = self._apply_one_update(
                    db,
                    name,
                    q,
                    stmt.get("u"),
                    multi=bool(stmt.get("multi")),
                    upsert=bool(stmt.get("upsert")),
                    array_filters=stmt.get("arrayFilters"),
                )
            except mongomock.DuplicateKeyError:
                doc = q if isinstance(q, dict) else {}
                errors.append(self._dup_key_error(db, name, doc, i))
            except CommandError as exc:
                errors.append({"index": i, "code": exc.code, "errmsg": exc.message})
            except (
                _WriteError,
                mongomock.OperationFailure,
                ValueError,
                TypeError,
                KeyError,
                NotImplementedError,
            ) as exc:
                errors.append(
                    {
                        "index": i,
                        "code": getattr(exc, "code", None) or 2,
                        "errmsg": str(exc) or type(exc).__name__,
                    }
                )
            else:
                self.engine.record(entries)
                n += matched
                n_modified += modified
                if upserted_id is not None:
                    n += 1
                    upserted.append({"index": i, "_id": upserted_id})
                continue
            if ordered:
                break
        reply: dict[str, Any] = {"n": n, "nModified": n_modified}
        if upserted:
            reply["upserted"] = upserted
        if errors:
            reply["writeErrors"] = errors
        return reply

    async def _delete(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name = self._coll_name(request, "delete")
        statements = request.command.get("deletes")
        if not isinstance(statements, list):
            raise CommandError(2, "delete needs 'deletes'")
        coll = self.engine.collection(db, name)
        with self.engine.writing(db, name):
            return self._delete_statements(
                db, name, coll, statements, request.command.get("ordered", True)
            )

    def _delete_statements(
        self, db: str, name: str, coll: Any, statements: list[dict[str, Any]], ordered: bool
    ) -> dict[str, Any]:
        n = 0
        errors: list[dict[str, Any]] = []
        for i, stmt in enumerate(statements):
            q = stmt.get("q", {})
            limit = stmt.get("limit", 0)
            try:
                docs = list(coll._iter_documents(q))
            except (mongomock.OperationFailure, ValueError, TypeError, NotImplementedError) as exc:
                errors.append(
                    {"index": i, "code": getattr(exc, "code", None) or 2, "errmsg": str(exc)}
                )
                if ordered:
                    break
                continue
            if limit:
                docs = docs[:1]
            entries = []
            for doc in docs:
                pre = self._pre_image(db, name, doc)
                coll.delete_one({"_id": doc["_id"]})
                entries.append(
                    self.engine.make_entry(db, name, "delete", {"_id": doc["_id"]}, pre_image=pre)
                )
                n += 1
            self.engine.record(entries)
        reply: dict[str, Any] = {"n": n}
        if errors:
            reply["writeErrors"] = errors
        return reply

    async def _find_and_modify(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        command = request.command
        name = self._coll_name(request, next(iter(command)))
        q = command.get("query") or {}
        sort = command.get("sort")
        fields = command.get("fields")
        coll = self.engine.collection(db, name)
        with self.engine.writing(db, name):
            return self._find_and_modify_in(db, name, coll, command, q, sort, fields)

    def _find_and_modify_in(
        self,
        db: str,
        name: str,
        coll: Any,
        command: dict[str, Any],
        q: dict[str, Any],
        sort: Any,
        fields: Any,
    ) -> dict[str, Any]:
        try:
            if command.get("remove"):
                if command.get("update") is not None or command.get("new"):
                    raise CommandError(9, "Cannot specify both remove and update/new")
                found = list(coll.find(q, sort=list(sort.items()) if sort else None, limit=1))
                if not found:
                    return {"lastErrorObject": {"n": 0}, "value": None}
                doc = found[0]
                coll.delete_one({"_id": doc["_id"]})
                self.engine.record(
                    [
                        self.engine.make_entry(
                            db,
                            name,
                            "delete",
                            {"_id": doc["_id"]},
                            pre_image=self._pre_image(db, name, doc),
                        )
                    ]
                )
                return {"lastErrorObject": {"n": 1}, "value": _project(coll, doc, fields)}
            if "update" not in command:
                raise CommandError(9, "Either an update or remove=true must be specified")
            matched, _modified, upserted_id, entries, pairs = self._apply_one_update(
                db,
                name,
                q,
                command["update"],
                multi=False,
                upsert=bool(command.get("upsert")),
                array_filters=command.get("arrayFilters"),
                sort=sort,
                full_documents=True,
            )
        except mongomock.DuplicateKeyError as exc:
            err = self._dup_key_error(db, name, q if isinstance(q, dict) else {})
            raise CommandError(11000, err["errmsg"]) from exc
        except (
            _WriteError,
            mongomock.OperationFailure,
            ValueError,
            TypeError,
            NotImplementedError,
        ) as exc:
            raise CommandError(
                getattr(exc, "code", None) or 2, str(exc) or type(exc).__name__
            ) from exc
        self.engine.record(entries)
        last_error: dict[str, Any] = {
            "n": matched or (1 if upserted_id is not None else 0),
            "updatedExisting": bool(matched),
        }
        if upserted_id is not None:
            last_error["upserted"] = upserted_id
        if not pairs:
            return {"lastErrorObject": last_error, "value": None}
        before, after = pairs[0]
        value = after if command.get("new") else before
        return {
            "lastErrorObject": last_error,
            "value": _project(coll, value, fields) if value is not None else None,
        }

    # ---- reads -------------------------------------------------------------------------------

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

    async def _find(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        command = request.command
        name = self._coll_name(request, "find")
        coll = self.engine.collection(db, name)
        limit = int(command.get("limit", 0) or 0)
        single = bool(command.get("singleBatch")) or limit < 0
        sort = command.get("sort")
        if command.get("collation"):
            raise CommandError(115, "collation is not supported by the emulator")
        try:
            cursor = coll.find(
                command.get("filter") or {},
                command.get("projection"),
                skip=int(command.get("skip", 0) or 0),
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
        return {"values": values}

    async def _aggregate(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        command = request.command
        target = command.get("aggregate")
        pipeline = command.get("pipeline")
        if not isinstance(pipeline, list):
            raise CommandError(14, "'pipeline' option must be specified as an array")
        if pipeline and "$changeStream" in pipeline[0]:
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
                    "postBatchResumeToken": encode_token(stream.position),
                }
            }
        if not isinstance(target, str):
            raise CommandError(
                115, "database-level aggregation is only supported for $changeStream"
            )
        for stage in pipeline:
            name = next(iter(stage), "")
            if any("$changeStream" in s for s in pipeline[1:]):
                raise CommandError(
                    40602, "$changeStream is only valid as the first stage", "Location40602"
                )
            if name in ("$out", "$merge"):
                raise CommandError(115, f"{name} is not supported by the emulator")
        source_coll = self.engine.collection(db, target)
        try:
            rest = pipeline
            if pipeline and "$match" in pipeline[0] and len(pipeline[0]) == 1:
                # Narrow the input with the fast paths before mongomock copies it.
                source = [clone(d) for d in source_coll._iter_documents(pipeline[0]["$match"])]
                rest = pipeline[1:]
            else:
                source = list(source_coll.find())
            result = list(
                mongomock.aggregate.process_pipeline(source, source_coll.database, rest, None)
            )
        except mongomock.OperationFailure as exc:
            raise CommandError(getattr(exc, "code", None) or 2, str(exc)) from exc
        except NotImplementedError as exc:
            raise CommandError(
                40324, f"Unrecognized or unsupported pipeline stage: {exc}", "Location40324"
            ) from exc
        except (ValueError, TypeError, KeyError) as exc:
            raise CommandError(2, f"aggregation failed: {exc!r}") from exc
        return self._cursor_reply(f"{db}.{target}", result, command)

    async def _get_more(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        command = request.command
        cursor_id = command.get("getMore")
        if not isinstance(cursor_id, int):
            raise CommandError(14, "getMore needs a cursor id")
        cursor = self._cursors.get(int(cursor_id))
        if cursor is None:
            raise CommandError(43, f"cursor id {cursor_id} not found")
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
            async with self.engine.changed:
                # Re-check under the condition: a write may have landed since next_batch.
                if self.engine.oplog and self.engine.oplog[-1].ts > cursor.position:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.engine.changed.wait(), remaining)
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
                "postBatchResumeToken": encode_token(cursor.position),
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


def _snapshot(coll: Any, _id: Any, fields: set[str] | None = None) -> dict[str, Any] | None:
    """A private copy of the stored document with this _id (or of only its top-level `fields`,
    plus _id), without a query."""
    key = mongomock.helpers.hashdict(_id) if isinstance(_id, dict) else _id
    try:
        doc = coll._store[key]
    except KeyError:
        return None
    if fields is None:
        return clone(doc)
    return {k: clone(v) for k, v in doc.items() if k in fields or k == "_id"}


def _touched_fields(update: dict[str, Any]) -> set[str] | None:
    """Top-level fields an operator update may change; None when that cannot be told."""
    fields: set[str] = set()
    for op, spec in update.items():
        if not isinstance(spec, dict):
            return None
        for path in spec:
            fields.add(path.split(".", 1)[0])
        if op == "$rename":
            fields.update(str(v).split(".", 1)[0] for v in spec.values())
    return fields


def _id_is_plain(value: Any) -> bool:
    return value is not None and not isinstance(value, dict)


def _get_dot(doc: dict[str, Any], path: str) -> Any:
    try:
        return mongomock.helpers.get_value_by_dot(doc, path)
    except KeyError:
        return None


def _project(coll: Any, doc: dict[str, Any], fields: dict[str, Any] | None) -> dict[str, Any]:
    if not fields:
        return doc
    return coll._copy_only_fields(copy.deepcopy(doc), fields, dict)


async def serve_forever(
    host: str, port: int, replica_set: str, on_ready: Callable[[str], None]
) -> None:
    """Run an emulator until cancelled; `on_ready` gets its URI once it accepts connections."""
    async with MongoEmulator(host, port, replica_set) as emulator:
        on_ready(emulator.uri)
        await asyncio.Event().wait()
