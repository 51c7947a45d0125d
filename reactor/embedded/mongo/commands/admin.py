"""Handshake, server information and test commands: what drivers ask before any work."""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from bson import Int64

from ..changestream import CommandError
from ..engine import int_to_ts
from ..wire import MAX_DOCUMENT_SIZE, MAX_MESSAGE_SIZE, Request
from .base import CommandsBase, Connection

MAX_WIRE_VERSION = 21  # MongoDB 7.0
SERVER_VERSION = "7.0.0-reactor-emulator"


class AdminCommands(CommandsBase):
    HANDLERS: ClassVar[dict[str, str]] = {
        "hello": "_hello",
        "ismaster": "_hello",
        "isMaster": "_hello",
        "ping": "_ping",
        "buildInfo": "_build_info",
        "buildinfo": "_build_info",
        "endSessions": "_ok",
        "killSessions": "_ok",
        "killAllSessions": "_ok",
        "whatsmyuri": "_ok",
        "configureFailPoint": "_configure_fail_point",
        "replSetGetStatus": "_repl_set_get_status",
        "serverStatus": "_server_status",
        "getParameter": "_get_parameter",
        "getCmdLineOpts": "_get_cmd_line_opts",
        "connectionStatus": "_connection_status",
        "getLog": "_get_log",
    }

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
            "maxBsonObjectSize": MAX_DOCUMENT_SIZE,
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
            "maxBsonObjectSize": MAX_DOCUMENT_SIZE,
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
            # No journal, no durability: what drivers' suites check before durability tests.
            "storageEngine": {"name": "reactor-emulator", "supportsCommittedReads": True},
        }

    async def _get_parameter(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        """The parameters drivers' test suites read (`getParameter: "*"` for all of them)."""
        params: dict[str, Any] = {
            "featureCompatibilityVersion": {"version": "7.0"},
            "enableTestCommands": True,  # configureFailPoint is available
            "authenticationMechanisms": [],
            "requireApiVersion": False,
        }
        which = request.command.get("getParameter")
        if which == "*" or (isinstance(which, dict) and which.get("allParameters")):
            return params
        asked = {k: v for k, v in request.command.items() if k in params}
        if not asked:
            raise CommandError(72, "no option found to get", "InvalidOptions")
        return {k: params[k] for k in asked}

    async def _get_cmd_line_opts(
        self, request: Request, conn: Connection, db: str
    ) -> dict[str, Any]:
        """How this server was started, as mongod reports it: a replica set, no auth, test
        commands on."""
        return {
            "argv": ["mongod", "--replSet", self.replica_set, "--port", str(self.port)],
            "parsed": {
                "net": {"bindIp": self.host, "port": self.port},
                "replication": {"replSet": self.replica_set},
                "setParameter": {"enableTestCommands": "1"},
            },
        }

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
        return self.fail_points.configure(request.command)
