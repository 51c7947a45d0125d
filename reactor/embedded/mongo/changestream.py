"""Change streams over the engine's change log: resume tokens, the `$changeStream` stage options,
the user's pipeline applied per event, and invalidation."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import bson
from mongomock import aggregate as mm_aggregate
from mongomock import filtering

from .codes import CODE_NAMES, CommandError
from .engine import EXPANDED_OPS, Engine, OplogEntry, int_to_ts

__all__ = ["CODE_NAMES", "ChangeStreamCursor", "CommandError", "next_batch", "open_stream"]

# A token is the cluster time of the event it follows (8 bytes) plus one flag byte:
# 0 = an event or a high-water mark, 1 = the invalidate event that followed a drop at that time.
_FLAG_EVENT = 0
_FLAG_INVALIDATE = 1
# Fragment n of an event split by $changeStreamSplitLargeEvent: flag _FLAG_FRAGMENT + n.
_FLAG_FRAGMENT = 0x10
MAX_EVENT_BYTES = 16 * 1024 * 1024


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
    show_expanded: bool = False  # showExpandedEvents: DDL events, collectionUUID, and more
    batch_size: int | None = None
    invalidated: bool = False
    finished: bool = False
    pending: list[dict[str, Any]] = field(default_factory=list)
    split: bool = False  # the pipeline ends in $changeStreamSplitLargeEvent
    skip_fragments: tuple[int, int] | None = None  # resuming inside a split event: (ts, done)
    # The pipeline's leading $match when it does not look at fullDocument: applied before the
    # (costly) document lookup and copies.
    prefilter: dict[str, Any] | None = None
    # Whether the prefilter can match an event of (collection, operation type) at all, worked
    # out once per pair (see `may_match`): a database-wide stream skips the writes of the
    # collections it does not watch without building an event for each.
    screened: dict[tuple[str, str], bool] = field(default_factory=dict)

    last_token: dict[str, Any] | None = None  # of the last event handed out

    def batch_token(self) -> dict[str, Any]:
        """postBatchResumeToken: the position, unless fragments of a split event are still to
        come, when resuming must start after the last fragment handed out."""
        if self.pending and self.last_token is not None:
            return self.last_token
        return encode_token(self.position)

    def matches(self, entry: OplogEntry) -> bool:
        if entry.op in EXPANDED_OPS and not self.show_expanded:
            return False
        if self.db is None:
            return entry.db not in ("admin", "config", "local")
        if entry.db != self.db:
            return False
        if self.coll is None:
            return True
        return entry.coll == self.coll or entry.op == "dropDatabase"

    def may_match(self, entry: OplogEntry) -> bool:
        """False only when the prefilter matches no event of the entry's collection and
        operation type, whatever else it holds (`_may_match`)."""
        if self.prefilter is None or entry.op == "dropDatabase":  # no ns.coll: not screened
            return True
        key = (entry.coll, entry.op)
        known = self.screened.get(key)
        if known is None:
            known = self.screened[key] = _may_match(self.prefilter, entry.coll, entry.op)
        return known


_SCREENED = {"ns.coll": 0, "operationType": 1}


def _may_match(match: Any, coll: str, op: str) -> bool:
    """Could `match` hold for an event whose ns.coll is `coll` and operationType `op`? Decided
    from the conditions on those two fields alone, each a plain value, `$eq` or `$in` of plain
    values, under implicit and explicit `$and` and under `$or`; any other condition may hold,
    so the answer is False only when one of those rules the pair out."""
    if not isinstance(match, dict):
        return True
    for key, cond in match.items():
        if key == "$or" and isinstance(cond, list) and cond:
            if not any(_may_match(branch, coll, op) for branch in cond):
                return False
        elif key == "$and" and isinstance(cond, list):
            if not all(_may_match(branch, coll, op) for branch in cond):
                return False
        elif key in _SCREENED and not _may_equal(cond, (coll, op)[_SCREENED[key]]):
            return False
    return True


def _plain(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) or value is None


def _may_equal(cond: Any, actual: str) -> bool:
    if _plain(cond):
        return bool(cond == actual)
    if isinstance(cond, dict) and len(cond) == 1:
        ((operator, arg),) = cond.items()
        if operator == "$eq" and _plain(arg):
            return bool(arg == actual)
        if operator == "$in" and isinstance(arg, list) and all(_plain(v) for v in arg):
            return actual in arg
    return True  # anything else (a regex, $ne, $nin, $exists, an expression): may hold


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
    _check_stages(pipeline)
    position, skip_fragments = _start_position(engine, stage)
    prefilter = None
    if pipeline and set(pipeline[0]) == {"$match"} and "fullDocument" not in repr(pipeline[0]):
        prefilter = pipeline[0]["$match"]
    return ChangeStreamCursor(
        db=None if all_cluster else db,
        coll=coll,
        pipeline=[_nest_dotted(stage) for stage in pipeline if _SPLIT_STAGE not in stage],
        full_document=full_document,
        before_change=before,
        position=position,
        show_expanded=bool(stage.get("showExpandedEvents")),
        prefilter=prefilter,
        skip_fragments=skip_fragments,
        split=bool(pipeline) and _SPLIT_STAGE in pipeline[-1],
    )


def _check_stages(pipeline: list[dict[str, Any]]) -> None:
    """An unknown stage is refused as such (40324), a known one a change stream may not use
    as not permitted (280); the split stage only last."""
    for index, stage_doc in enumerate(pipeline):
        name = next(iter(stage_doc), "")
        if name not in _KNOWN_STAGES:
            raise CommandError(
                40324, f"Unrecognized pipeline stage name: '{name}'", "Location40324"
            )
        if name == _SPLIT_STAGE and index != len(pipeline) - 1:
            raise CommandError(
                7182802,
                "$changeStreamSplitLargeEvent must be the last stage in the pipeline.",
                "Location7182802",
            )
        if name not in _ALLOWED_STAGES:
            raise CommandError(
                280,
                f"{name} is not permitted in a $changeStream pipeline",
                "ChangeStreamFatalError",
                labels=["NonResumableChangeStreamError"],
            )


def _start_position(engine: Engine, stage: dict[str, Any]) -> tuple[int, tuple[int, int] | None]:
    """Where the stream starts in the oplog (the last entry it has seen), and, when resuming
    inside a split event, which of its fragments were already delivered."""
    options = [k for k in ("resumeAfter", "startAfter", "startAtOperationTime") if k in stage]
    if len(options) > 1:
        raise CommandError(
            40674,
            "Only one type of resume option is allowed, but multiple were found.",
            "Location40674",
        )
    skip_fragments: tuple[int, int] | None = None
    if options == ["resumeAfter"] or options == ["startAfter"]:
        ts, flag = decode_token(stage[options[0]])
        if flag == _FLAG_INVALIDATE and options[0] == "resumeAfter":
            raise CommandError(
                260,
                "Attempting to resume a change stream using 'resumeAfter' is "
                "not allowed from an invalidate notification.",
            )
        position = ts
        if flag > _FLAG_FRAGMENT:  # inside a split event: its later fragments come next
            position, skip_fragments = ts - 1, (ts, flag - _FLAG_FRAGMENT)
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
    return position, skip_fragments


_SPLIT_STAGE = "$changeStreamSplitLargeEvent"
# Every stage name mongod 7.0 knows: an unknown one is refused as such (40324), a known one a
# change stream may not use as not permitted (280).
_KNOWN_STAGES = {
    "$addFields", "$bucket", "$bucketAuto", "$changeStream", "$changeStreamSplitLargeEvent",
    "$collStats", "$count", "$currentOp", "$densify", "$documents", "$facet", "$fill",
    "$geoNear", "$graphLookup", "$group", "$indexStats", "$limit", "$listLocalSessions",
    "$listSampledQueries", "$listSearchIndexes", "$listSessions", "$lookup", "$match",
    "$merge", "$out", "$planCacheStats", "$project", "$redact", "$replaceRoot", "$replaceWith",
    "$sample", "$search", "$searchMeta", "$set", "$setWindowFields", "$shardedDataDistribution",
    "$skip", "$sort", "$sortByCount", "$unionWith", "$unset", "$unwind", "$vectorSearch",
}  # fmt: skip
_ALLOWED_STAGES = {
    _SPLIT_STAGE,
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
    out = _next_batch(engine, cursor, limit)
    if out:
        cursor.last_token = out[-1].get("_id")
    return out


def _next_batch(engine: Engine, cursor: ChangeStreamCursor, limit: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while cursor.pending and len(out) < limit:
        out.append(cursor.pending.pop(0))
        if "splitEvent" in out[-1]:
            return out  # one fragment (up to 16 MiB) per batch
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
        if cursor.prefilter is None or (
            cursor.may_match(entry)
            and filtering.filter_applies(
                cursor.prefilter, _event(engine, cursor, entry, lookup=False)
            )
        ):  # like mongod, a $match that does not read fullDocument runs first
            event = _event(engine, cursor, entry)
            for produced in _apply_pipeline(engine, cursor, event):
                fragments = _split(cursor, produced, entry.ts)
                if len(fragments) > 1 or (fragments and "splitEvent" in fragments[0]):
                    cursor.pending.extend(fragments)
                else:
                    out.extend(fragments)
            if cursor.pending and not cursor.invalidated:
                if not out:
                    out.append(cursor.pending.pop(0))
                return out  # fragments go out one per batch
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
    if entry.to is not None:
        event["to"] = dict(entry.to)
    if cursor.show_expanded:
        if entry.collection_uuid is not None and entry.op != "dropDatabase":
            event["collectionUUID"] = entry.collection_uuid
        if entry.description is not None:
            event["operationDescription"] = copy.deepcopy(entry.description)
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
        if cursor.show_expanded:
            event["updateDescription"]["disambiguatedPaths"] = copy.deepcopy(
                entry.disambiguated or {}
            )
        if cursor.full_document == "updateLookup":
            assert entry.document_key is not None
            coll = engine.collection(entry.db, entry.coll)
            event["fullDocument"] = coll.find_one({"_id": entry.document_key["_id"]})
        elif cursor.full_document in ("whenAvailable", "required"):
            if entry.post_image is None and cursor.full_document == "required":
                raise _fatal(
                    "Change stream was configured to require a post-image for all update events, "
                    "but no post-image was available for this event."
                )
            event["fullDocument"] = copy.deepcopy(entry.post_image)
    if cursor.before_change != "off" and entry.op in ("update", "replace", "delete"):
        if entry.pre_image is None:
            if cursor.before_change == "required":
                raise _fatal(
                    "Change stream was configured to require a pre-image for all update, delete and "
                    "replace events, but no pre-image was available for this event."
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
            raise _fatal(
                "Encountered an event whose _id field, which contains the resume "
                "token, was modified by the pipeline."
            )
    return produced


def _fatal(message: str) -> CommandError:
    """ChangeStreamFatalError: the stream cannot go on, and a driver must not resume it."""
    return CommandError(280, message, "ChangeStreamFatalError", ["NonResumableChangeStreamError"])


def _split(cursor: ChangeStreamCursor, event: dict[str, Any], ts: int) -> list[dict[str, Any]]:
    """$changeStreamSplitLargeEvent: an event over 16 MiB as fragments of its top-level fields,
    each under 16 MiB with `_id` (a token of its own) and `splitEvent: {fragment, of}`."""
    if not cursor.split:
        return [event]
    sizes = {k: len(bson.encode({k: v})) - 5 for k, v in event.items() if k != "_id"}
    overhead = len(bson.encode({"_id": event["_id"], "splitEvent": {"fragment": 1, "of": 1}}))
    if overhead + sum(sizes.values()) <= MAX_EVENT_BYTES:
        return [event]
    groups: list[list[str]] = [[]]
    used = overhead
    for key, size in sizes.items():
        if overhead + size > MAX_EVENT_BYTES:
            raise CommandError(
                10334, f"BSONObj size: {overhead + size} is invalid.", "BSONObjectTooLarge"
            )
        if used + size > MAX_EVENT_BYTES and groups[-1]:
            groups.append([])
            used = overhead
        groups[-1].append(key)
        used += size
    fragments = []
    for number, keys in enumerate(groups, start=1):
        fragment: dict[str, Any] = {
            "_id": encode_token(ts, _FLAG_FRAGMENT + number),
            "splitEvent": {"fragment": number, "of": len(groups)},
        }
        fragment.update((k, event[k]) for k in keys)
        fragments.append(fragment)
    if cursor.skip_fragments is not None and cursor.skip_fragments[0] == ts:
        fragments = fragments[cursor.skip_fragments[1] :]
        cursor.skip_fragments = None
    return fragments


def _nest_dotted(stage: dict[str, Any]) -> dict[str, Any]:
    """A `$project` computing a dotted path (`"ns.viewOn": "db.coll"`) as the nested spec it
    means, which mongomock would otherwise take for one field named with a dot."""
    spec = stage.get("$project")
    if not isinstance(spec, dict) or not any("." in key for key in spec):
        return stage
    nested: dict[str, Any] = {}
    for key, value in spec.items():
        if "." not in key or value in (0, 1, True, False):
            nested[key] = value
            continue
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CommandError(31250, f"Path collision at {key}", "Location31250")
        node[leaf] = value
    return {"$project": nested}
