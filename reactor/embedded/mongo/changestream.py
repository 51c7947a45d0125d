"""Change streams over the engine's change log: resume tokens, the `$changeStream` stage options,
the user's pipeline applied per event, and invalidation."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from mongomock import aggregate as mm_aggregate
from mongomock import filtering

from .engine import Engine, OplogEntry, int_to_ts

# A token is the cluster time of the event it follows (8 bytes) plus one flag byte:
# 0 = an event or a high-water mark, 1 = the invalidate event that followed a drop at that time.
_FLAG_EVENT = 0
_FLAG_INVALIDATE = 1


class CommandError(Exception):
    """Raised by a command handler to answer with MongoDB's error shape."""

    def __init__(
        self, code: int, message: str, code_name: str | None = None, labels: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.code_name = code_name or CODE_NAMES.get(code, "UnknownError")
        self.labels = labels or []
        self.extra: dict[str, Any] = {}  # more fields of the reply (keyPattern, keyValue…)


CODE_NAMES = {
    1: "InternalError",
    2: "BadValue",
    6: "HostUnreachable",
    7: "HostNotFound",
    9: "FailedToParse",
    11: "UserNotFound",
    14: "TypeMismatch",
    20: "IllegalOperation",
    26: "NamespaceNotFound",
    28: "PathNotViable",
    40: "ConflictingUpdateOperators",
    43: "CursorNotFound",
    48: "NamespaceExists",
    52: "DollarPrefixedFieldName",
    56: "EmptyFieldName",
    59: "CommandNotFound",
    66: "ImmutableField",
    72: "InvalidOptions",
    85: "IndexOptionsConflict",
    89: "NetworkTimeout",
    91: "ShutdownInProgress",
    115: "CommandNotSupported",
    121: "DocumentValidationFailure",
    133: "FailedToSatisfyReadPreference",
    150: "StaleEpoch",
    189: "PrimarySteppedDown",
    234: "RetryChangeStream",
    260: "InvalidResumeToken",
    262: "ExceededTimeLimit",
    280: "ChangeStreamFatalError",
    286: "ChangeStreamHistoryLost",
    9001: "SocketException",
    10107: "NotWritablePrimary",
    11000: "DuplicateKey",
    11600: "InterruptedAtShutdown",
    11602: "InterruptedDueToReplStateChange",
    13388: "StaleConfig",
    13435: "NotPrimaryNoSecondaryOk",
    13436: "NotPrimaryOrSecondary",
    40324: "Location40324",
    63: "StaleShardVersion",
    50: "MaxTimeMSExpired",
}


def encode_token(ts: int, flag: int = _FLAG_EVENT) -> dict[str, Any]:
    return {"_data": f"{ts:016X}{flag:02X}"}


def decode_token(token: Any) -> tuple[int, int]:
    try:
        data = token["_data"]
        if not isinstance(data, str) or len(data) != 18:
            raise ValueError(data)
        return int(data[:16], 16), int(data[16:], 16)
    except (TypeError, KeyError, ValueError) as exc:
        raise CommandError(260, "Bad resume token: unrecognised format") from exc


@dataclass
class ChangeStreamCursor:
    """Server-side state of one open change stream."""

    db: str | None  # None: the whole cluster
    coll: str | None  # None: every collection of `db`
    pipeline: list[dict[str, Any]]
    full_document: str
    before_change: str
    position: int  # events strictly after this cluster time are next
    batch_size: int | None = None
    invalidated: bool = False
    finished: bool = False
    pending: list[dict[str, Any]] = field(default_factory=list)
    # The pipeline's leading $match when it does not look at fullDocument: applied before the
    # (costly) document lookup and copies.
    prefilter: dict[str, Any] | None = None

    def matches(self, entry: OplogEntry) -> bool:
        if self.db is None:
            return entry.db not in ("admin", "config", "local")
        if entry.db != self.db:
            return False
        if self.coll is None:
            return True
        return entry.coll == self.coll or entry.op == "dropDatabase"


def open_stream(
    engine: Engine,
    db: str,
    coll: str | None,
    stage: dict[str, Any],
    pipeline: list[dict[str, Any]],
) -> ChangeStreamCursor:
    all_cluster = bool(stage.get("allChangesForCluster"))
    if all_cluster and db != "admin":
        raise CommandError(
            73,
            "$changeStream may only be run with allChangesForCluster on admin",
            "InvalidNamespace",
        )
    if db == "admin" and not all_cluster:
        raise CommandError(
            73, "$changeStream may not be opened on the internal admin database", "InvalidNamespace"
        )
    full_document = stage.get("fullDocument", "default")
    if full_document not in ("default", "updateLookup", "whenAvailable", "required"):
        raise CommandError(2, f"unknown fullDocument mode {full_document!r}")
    before = stage.get("fullDocumentBeforeChange", "off")
    if before not in ("off", "whenAvailable", "required"):
        raise CommandError(2, f"unknown fullDocumentBeforeChange mode {before!r}")
    for stage_doc in pipeline:
        name = next(iter(stage_doc), "")
        if name not in _ALLOWED_STAGES:
            raise CommandError(
                280,
                f"{name} is not permitted in a $changeStream pipeline",
                "ChangeStreamFatalError",
            )
    options = [k for k in ("resumeAfter", "startAfter", "startAtOperationTime") if k in stage]
    if len(options) > 1:
        raise CommandError(
            40674,
            "Only one type of resume option is allowed, but multiple were found.",
            "Location40674",
        )
    if options == ["resumeAfter"] or options == ["startAfter"]:
        ts, flag = decode_token(stage[options[0]])
        if flag == _FLAG_INVALIDATE and options[0] == "resumeAfter":
            raise CommandError(
                260,
                "Attempting to resume a change stream using 'resumeAfter' is "
                "not allowed from an invalidate notification.",
            )
        position = ts
    elif options == ["startAtOperationTime"]:
        position = max(0, _ts_arg(stage["startAtOperationTime"]) - 1)
    else:
        position = engine.cluster_time
    if position < engine.history_floor:
        raise CommandError(
            286,
            "Resume of change stream was not possible, as the resume point may "
            "no longer be in the oplog.",
        )
    prefilter = None
    if pipeline and set(pipeline[0]) == {"$match"} and "fullDocument" not in repr(pipeline[0]):
        prefilter = pipeline[0]["$match"]
    return ChangeStreamCursor(
        db=None if all_cluster else db,
        coll=coll,
        pipeline=pipeline,
        full_document=full_document,
        before_change=before,
        position=position,
        prefilter=prefilter,
    )


_ALLOWED_STAGES = {
    "$match",
    "$project",
    "$addFields",
    "$set",
    "$unset",
    "$replaceRoot",
    "$replaceWith",
    "$redact",
}


def _ts_arg(value: Any) -> int:
    from bson import Timestamp

    if not isinstance(value, Timestamp):
        raise CommandError(14, "startAtOperationTime must be a timestamp")
    return (value.time << 32) | value.inc


def next_batch(engine: Engine, cursor: ChangeStreamCursor, limit: int) -> list[dict[str, Any]]:
    """Events for the cursor from its position on, at most `limit`; advances the position."""
    out: list[dict[str, Any]] = []
    while cursor.pending and len(out) < limit:
        out.append(cursor.pending.pop(0))
    if cursor.invalidated or len(out) >= limit:
        return out
    try:
        entries = engine.entries_after(cursor.position)
    except Exception as exc:
        raise CommandError(
            286,
            "Resume of change stream was not possible, as the resume point "
            "may no longer be in the oplog.",
            labels=["NonResumableChangeStreamError"],
        ) from exc
    for entry in entries:
        if len(out) >= limit:
            break
        cursor.position = entry.ts
        if not cursor.matches(entry):
            continue
        if cursor.prefilter is not None and not filtering.filter_applies(
            cursor.prefilter, _event(engine, cursor, entry, lookup=False)
        ):
            continue  # like mongod, a $match that does not read fullDocument runs first
        event = _event(engine, cursor, entry)
        for produced in _apply_pipeline(engine, cursor, event):
            out.append(produced)
        if _invalidates(cursor, entry):
            cursor.invalidated = True
            invalidate = {
                "_id": encode_token(entry.ts, _FLAG_INVALIDATE),
                "operationType": "invalidate",
                "clusterTime": int_to_ts(entry.ts),
                "wallTime": entry.wall_time,
            }
            if len(out) < limit:
                out.append(invalidate)
            else:
                cursor.pending.append(invalidate)
            break
    else:
        # Everything up to now was examined: the high-water mark moves to the current time.
        cursor.position = max(cursor.position, engine.cluster_time)
    return out


def _invalidates(cursor: ChangeStreamCursor, entry: OplogEntry) -> bool:
    if cursor.db is None:
        return False
    if cursor.coll is None:
        return entry.op == "dropDatabase"
    return entry.op in ("drop", "rename", "dropDatabase")


def _event(
    engine: Engine, cursor: ChangeStreamCursor, entry: OplogEntry, lookup: bool = True
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "_id": encode_token(entry.ts),
        "operationType": entry.op,
        "clusterTime": int_to_ts(entry.ts),
        "wallTime": entry.wall_time,
    }
    if entry.op == "dropDatabase":
        event["ns"] = {"db": entry.db}
    else:
        event["ns"] = {"db": entry.db, "coll": entry.coll}
    if entry.document_key is not None:
        event["documentKey"] = copy.deepcopy(entry.document_key)
    if not lookup:
        # A cheap view for pre-filtering: shared (not copied) parts, never handed out.
        event["updateDescription"] = entry.update_description
        return event
    if entry.op in ("insert", "replace"):
        event["fullDocument"] = copy.deepcopy(entry.full_document)
    if entry.op == "update":
        event["updateDescription"] = copy.deepcopy(entry.update_description)
        if cursor.full_document == "updateLookup":
            assert entry.document_key is not None
            coll = engine.collection(entry.db, entry.coll)
            event["fullDocument"] = coll.find_one({"_id": entry.document_key["_id"]})
    if cursor.before_change != "off" and entry.op in ("update", "replace", "delete"):
        if entry.pre_image is None:
            if cursor.before_change == "required":
                raise CommandError(
                    280,
                    "Change stream was configured to require a pre-image for all update, delete and "
                    "replace events, but no pre-image was available for this event.",
                    "ChangeStreamFatalError",
                )
            event["fullDocumentBeforeChange"] = None
        else:
            event["fullDocumentBeforeChange"] = copy.deepcopy(entry.pre_image)
    return event


def _apply_pipeline(
    engine: Engine, cursor: ChangeStreamCursor, event: dict[str, Any]
) -> list[dict[str, Any]]:
    if not cursor.pipeline:
        return [event]
    database = engine.client[cursor.db or "admin"]
    try:
        produced = list(mm_aggregate.process_pipeline([event], database, cursor.pipeline, None))
    except NotImplementedError as exc:
        raise CommandError(115, f"change stream pipeline not supported: {exc}") from exc
    for doc in produced:
        if doc.get("_id") != event["_id"]:
            raise CommandError(
                280,
                "Encountered an event whose _id field, which contains the resume "
                "token, was modified by the pipeline.",
                "ChangeStreamFatalError",
            )
    return produced
