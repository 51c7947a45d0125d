"""An asyncio TCP server that speaks the MongoDB wire protocol and presents itself as the primary of a
one-member replica set. Documents, queries, updates and aggregation come from mongomock, held to
mongod's rules (`updates.py`); change streams, cluster times, retryable-write bookkeeping and fail
points are ours. The commands live in `commands/`, one module per family; this module is the
lifecycle, the connection loop and the dispatcher.

Use it as an async context manager (`async with MongoEmulator() as emu: emu.uri`) or through
`reactor mongo-emulator`. The reactor never imports this module outside tests and the demo.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from bson import Binary, Int64, ObjectId

from ..served import Served
from .changestream import ChangeStreamCursor, CommandError
from .commands import AdminCommands, DdlCommands, ReadCommands, WriteCommands
from .commands.base import Connection, Handler, QueryCursor
from .commands.errors import engine_error
from .engine import Engine, int_to_ts
from .failpoints import CloseConnection, FailPoints
from .wire import (
    HEADER,
    MAX_MESSAGE_SIZE,
    OP_QUERY,
    ProtocolError,
    Request,
    encode_op_msg,
    encode_op_msg_with_id,
    encode_op_reply,
    parse_message,
)

log = logging.getLogger(__name__)

RETRYABLE_CODES = {6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436}
RESUMABLE_CODES = RETRYABLE_CODES | {63, 150, 13388, 234, 133, 43}

MAX_CONNECTIONS = 1000
MAX_SESSIONS = 10_000  # the sessions remembered for $listLocalSessions
IDLE_TIMEOUT_S = 600.0  # no message for this long: the connection is closed (drivers reconnect)
MESSAGE_TIMEOUT_S = 30.0  # a message whose header arrived must be complete within this


class MongoEmulator(Served, AdminCommands, DdlCommands, WriteCommands, ReadCommands):
    """The embedded MongoDB-compatible server."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        replica_set: str = "rs0",
        *,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.host = host
        self.port = port
        self.replica_set = replica_set
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.engine = Engine()
        self.fail_points = FailPoints()
        self._server: asyncio.base_events.Server | None = None
        self._connections: dict[int, Connection] = {}
        self._conn_ids = itertools.count(1)
        self._cursor_ids = itertools.count(1_000_001)
        self._cursors: dict[int, QueryCursor | ChangeStreamCursor] = {}
        self._retry_cache: OrderedDict[tuple[bytes, int], dict[str, Any]] = OrderedDict()
        self._executed: OrderedDict[tuple[bytes, int], dict[int, Any]] = OrderedDict()
        self._sessions: OrderedDict[Any, Any] = OrderedDict()
        # Retryable writes in progress, by (session, txnNumber): a write that yields part way
        # (see WriteCommands.INSERT_CHUNK) is its session's only operation until it ends, as
        # mongod checks a session out, so a retry waits for the attempt it repeats.
        self._running: dict[tuple[bytes, int], asyncio.Event] = {}
        self._election_id = ObjectId()
        self.refused_connections = 0
        self._handlers: dict[str, Handler] = {}
        for family in (AdminCommands, DdlCommands, WriteCommands, ReadCommands):
            for command, method in family.HANDLERS.items():
                self._handlers[command] = getattr(self, method)

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
        if len(self._connections) >= self.max_connections:
            # mongod refuses past net.maxIncomingConnections the same way: accept, then close.
            self.refused_connections += 1
            log.warning("connection refused: %d connections open", len(self._connections))
            writer.close()
            return
        conn = Connection(next(self._conn_ids), writer, asyncio.current_task())
        self._connections[conn.id] = conn
        try:
            while await self._serve_message(reader, writer, conn):
                pass
        except asyncio.CancelledError:
            # Only stop() cancels a connection; end quietly so asyncio's stream callback does
            # not report the cancellation as an error.
            return
        finally:
            self._connections.pop(conn.id, None)
            writer.close()

    async def _serve_message(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection
    ) -> bool:
        """Read, answer and write one message; False when the connection is over."""
        try:
            header = await asyncio.wait_for(reader.readexactly(16), self.idle_timeout_s)
        except TimeoutError:
            log.info("closing connection %s: idle for %gs", conn.id, self.idle_timeout_s)
            return False
        except (asyncio.IncompleteReadError, ConnectionError):
            return False
        length, request_id, _response_to, op_code = HEADER.unpack(header)
        if length < 16 or length > MAX_MESSAGE_SIZE:
            log.warning("closing connection %s: message length %s out of bounds", conn.id, length)
            return False
        try:
            body = await asyncio.wait_for(reader.readexactly(length - 16), MESSAGE_TIMEOUT_S)
        except TimeoutError:
            log.warning(
                "closing connection %s: message incomplete after %gs", conn.id, MESSAGE_TIMEOUT_S
            )
            return False
        except (asyncio.IncompleteReadError, ConnectionError):
            return False
        try:
            # Large messages are parsed (and their checksum computed) off the event loop, so one
            # client's 40 MB batch does not stall every other client.
            if length > 1_000_000:
                request = await asyncio.to_thread(
                    parse_message, op_code, request_id, body, header + body
                )
            else:
                request = parse_message(op_code, request_id, body, header + body)
        except ProtocolError as exc:
            log.warning("closing connection %s: %s", conn.id, exc)
            return False
        try:
            reply = await self._dispatch(request, conn)
        except CloseConnection:
            return False
        if request.more_to_come:
            return True
        if request.op_code == OP_QUERY:
            writer.write(encode_op_reply(request_id, reply))
        elif request.exhaust_allowed and _exhaustible(request, reply):
            return await self._exhaust(request, conn, writer, reply)
        else:
            writer.write(encode_op_msg(request_id, reply))
        try:
            await writer.drain()
        except ConnectionError:
            return False
        return True

    async def _exhaust(
        self,
        request: Request,
        conn: Connection,
        writer: asyncio.StreamWriter,
        reply: dict[str, Any],
    ) -> bool:
        """An exhaust getMore: every batch sent without being asked for, each flagged
        moreToCome and answering the one before, until the cursor is exhausted or fails."""
        response_to = request.request_id
        while True:
            more = _exhaustible(request, reply)
            message, response_to = encode_op_msg_with_id(response_to, reply, more_to_come=more)
            writer.write(message)
            try:
                await writer.drain()
            except ConnectionError:
                return False
            if not more:
                return True
            try:
                reply = await self._dispatch(request, conn)
            except CloseConnection:
                return False

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
            _remember_app_name(command, conn)
        elif request.op_code == OP_QUERY:
            return self._error(
                CommandError(352, "Unsupported OP_QUERY command", "UnsupportedOpQueryCommand")
            )
        self._touch_session(command.get("lsid"))
        fail = self.fail_points.matching(name, conn.app_name)
        try:
            if fail is not None:
                await self.fail_points.trigger(fail, name)
            self.fail_points.check_max_time(command)
            if command.get("startTransaction") or "autocommit" in command:
                raise CommandError(20, "Transactions are not supported by the reactor's emulator")
            if _uses_collation(command):
                # Refused rather than ignored: string comparisons would silently differ.
                raise CommandError(115, "collation is not supported by the embedded server")
            if _uses_text_search(command):
                # Refused rather than answered by a stand-in's idea of relevance.
                raise CommandError(115, "$text search is not supported by the embedded server")
            handler = self._handlers.get(name)
            if handler is None:
                raise CommandError(59, f"no such command: '{name}'")
            reply = await self._run_once(handler, request, conn, db, name)
        except CommandError as exc:
            if not exc.labels and not exc.labels_given:
                exc.labels = _retryable_write_labels(command, exc.code)
                if name == "getMore" and exc.code in RESUMABLE_CODES and not exc.before_command:
                    cursor = self._cursors.get(command.get("getMore"))  # type: ignore[arg-type]
                    if isinstance(cursor, ChangeStreamCursor):
                        exc.labels = ["ResumableChangeStreamError"]
            return self._error(exc)
        except CloseConnection:
            raise
        except Exception as exc:  # (never cancellation: that is a BaseException)
            # A gap in the engine: answer as mongod would with an error, never drop the client.
            return self._error(engine_error(exc, name))
        unsatisfiable = _unsatisfiable_write_concern(name, command)
        if unsatisfiable is not None:
            reply["writeConcernError"] = unsatisfiable
        if fail is not None and isinstance(fail.data.get("writeConcernError"), dict):
            reply = _failed_write_concern(reply, command, fail.data)
        return self._finish(reply)

    async def _run_once(
        self, handler: Handler, request: Request, conn: Connection, db: str, name: str
    ) -> dict[str, Any]:
        """The handler's reply; for a retryable write already applied, the reply it gave then
        (mongod answers a retry from its transaction table, never by applying it again)."""
        command = request.command
        retry_key = self._retry_key(command, name)
        if retry_key is None:
            self.engine.begin_command(command.get("let"))
            return await handler(request, conn, db)
        while retry_key in self._running:
            await self._running[retry_key].wait()
        if retry_key in self._retry_cache:
            return copy.deepcopy(self._retry_cache[retry_key])
        done = self._running[retry_key] = asyncio.Event()
        try:
            # One value of $$NOW for the whole command, as mongod evaluates it.
            self.engine.begin_command(command.get("let"))
            reply = await handler(request, conn, db)
        finally:
            del self._running[retry_key]
            done.set()
        # The whole reply answers a retry now; its statements need no log.
        self._executed.pop(retry_key, None)
        self._retry_cache[retry_key] = copy.deepcopy(reply)
        while len(self._retry_cache) > 10_000:
            self._retry_cache.popitem(last=False)
        return reply

    def _touch_session(self, lsid: Any) -> None:
        """Logical sessions, newest last, the oldest forgotten past MAX_SESSIONS."""
        if isinstance(lsid, dict) and "id" in lsid:
            self._sessions[lsid["id"]] = self.engine.now()
            self._sessions.move_to_end(lsid["id"])
            if len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)

    def _retry_key(self, command: dict[str, Any], name: str) -> tuple[bytes, int] | None:
        if name not in ("insert", "update", "delete", "findAndModify", "findandmodify"):
            return None
        txn = command.get("txnNumber")
        lsid = command.get("lsid")
        if txn is None or not isinstance(lsid, dict) or not isinstance(lsid.get("id"), bytes):
            return None
        return (bytes(lsid["id"]), int(txn))

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
        reply.update(exc.extra)
        return self._finish(reply)


# Commands that take a write concern. The emulator is a replica set of one data-bearing member,
# so a `w` of more than one can never be satisfied: the write is applied and the reply says so
# in `writeConcernError`, as a one-member replica set answers.
WRITE_CONCERN_COMMANDS = frozenset(
    {
        "insert",
        "update",
        "delete",
        "findAndModify",
        "findandmodify",
        "create",
        "createIndexes",
        "drop",
        "dropIndexes",
        "dropDatabase",
        "collMod",
        "renameCollection",
    }
)


def _retryable_write_labels(command: dict[str, Any], code: Any) -> list[str]:
    """The label mongod adds to a retryable write's error (or write concern error) that a
    driver may retry."""
    return ["RetryableWriteError"] if "txnNumber" in command and code in RETRYABLE_CODES else []


def _unsatisfiable_write_concern(name: str, command: dict[str, Any]) -> dict[str, Any] | None:
    concern = command.get("writeConcern")
    writes = name in WRITE_CONCERN_COMMANDS or (
        name == "aggregate"
        and isinstance(command.get("pipeline"), list)
        and any(
            isinstance(st, dict) and ("$out" in st or "$merge" in st) for st in command["pipeline"]
        )
    )
    if not writes or not isinstance(concern, dict):
        return None
    w = concern.get("w")
    if isinstance(w, bool) or not isinstance(w, int) or w <= 1:
        return None
    return {
        "code": 100,
        "codeName": "UnsatisfiableWriteConcern",
        "errmsg": "Not enough data-bearing nodes",
        "errInfo": {"writeConcern": dict(concern)},
    }


async def serve_forever(
    host: str, port: int, replica_set: str, on_ready: Callable[[str], None]
) -> None:
    """Run an emulator until cancelled; `on_ready` gets its URI once it accepts connections."""
    async with MongoEmulator(host, port, replica_set) as emulator:
        on_ready(emulator.uri)
        await asyncio.Event().wait()


def _uses_collation(command: dict[str, Any]) -> bool:
    """Whether the command asks for a collation other than the simple (binary) one."""
    if _non_simple(command.get("collation")):
        return True
    for field in ("updates", "deletes"):
        statements = command.get(field)
        if isinstance(statements, list) and any(
            isinstance(st, dict) and _non_simple(st.get("collation")) for st in statements
        ):
            return True
    return False


def _uses_text_search(command: dict[str, Any]) -> bool:
    """Whether a query of the command (filter, statements, pipeline) uses `$text`."""

    def walk(value: Any) -> bool:
        if isinstance(value, dict):
            return "$text" in value or any(walk(v) for v in value.values())
        if isinstance(value, list):
            return any(walk(v) for v in value)
        return False

    return any(walk(command.get(f)) for f in ("filter", "query", "pipeline", "updates", "deletes"))


def _non_simple(collation: Any) -> bool:
    return bool(collation) and not (
        isinstance(collation, dict) and collation.get("locale") == "simple"
    )


def _exhaustible(request: Request, reply: dict[str, Any]) -> bool:
    """Whether an exhaust getMore's reply is followed by more: it succeeded and its cursor
    is still open."""
    if next(iter(request.command), "") != "getMore" or reply.get("ok") != 1.0:
        return False
    cursor = reply.get("cursor")
    return isinstance(cursor, dict) and bool(cursor.get("id"))


def _remember_app_name(command: dict[str, Any], conn: Connection) -> None:
    """The driver's appName from its handshake, which fail points may match."""
    client = command.get("client")
    if isinstance(client, dict):
        app = client.get("application")
        if isinstance(app, dict) and isinstance(app.get("name"), str):
            conn.app_name = app["name"]


def _failed_write_concern(
    reply: dict[str, Any], command: dict[str, Any], data: dict[str, Any]
) -> dict[str, Any]:
    """failCommand's writeConcernError: the command ran, its write concern "failed"."""
    reply = dict(reply)
    reply["writeConcernError"] = dict(data["writeConcernError"])
    if "errorLabels" in data:
        labels = list(data["errorLabels"])
    else:
        labels = _retryable_write_labels(command, reply["writeConcernError"].get("code"))
    if labels:
        reply["errorLabels"] = labels
    return reply
