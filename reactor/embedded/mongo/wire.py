"""MongoDB wire protocol framing: OP_MSG (with document sequences and checksums) and the legacy
OP_QUERY / OP_REPLY pair that drivers still use for the very first handshake.

Only framing lives here; what a command means is the server's business.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import bson
import crc32c as _crc32c
from bson.codec_options import CodecOptions

OP_REPLY = 1
OP_QUERY = 2004
OP_COMPRESSED = 2012
OP_MSG = 2013

MAX_MESSAGE_SIZE = 48_000_000
MAX_DOCUMENT_SIZE = 16 * 1024 * 1024  # maxBsonObjectSize, as hello reports it
LARGE_DOCUMENT = 1024 * 1024  # statements this large have their results' size checked
HEADER = struct.Struct("<iiii")

FLAG_CHECKSUM_PRESENT = 1 << 0
FLAG_MORE_TO_COME = 1 << 1
FLAG_EXHAUST_ALLOWED = 1 << 16
_KNOWN_FLAGS = FLAG_CHECKSUM_PRESENT | FLAG_MORE_TO_COME | FLAG_EXHAUST_ALLOWED

# Dates stay naive UTC inside the emulator: mongomock compares them with each other and mixing
# aware and naive datetimes would raise.
CODEC: CodecOptions[dict[str, Any]] = CodecOptions(tz_aware=False)


class ProtocolError(Exception):
    """Raised when a client sends bytes that are not a valid message; the connection is closed."""


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of an OP_MSG, from a native implementation."""
    return int(_crc32c.crc32c(data))


@dataclass
class Request:
    request_id: int
    op_code: int
    command: dict[str, Any]
    more_to_come: bool = False
    exhaust_allowed: bool = False  # the client takes a stream of getMore replies
    # OP_QUERY only: the full collection name the legacy query addressed.
    legacy_namespace: str | None = None
    sequences: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # Documents of a sequence over LARGE_DOCUMENT: {sequence: {index: bytes}}. The message may
    # carry one over mongod's 16 MiB document limit (its own limit is 48 MB): the write of that
    # one must fail alone; a large update statement has its resulting document measured.
    large: dict[str, dict[int, int]] = field(default_factory=dict)


def _decode_one(data: bytes, offset: int) -> tuple[dict[str, Any], int]:
    if offset + 4 > len(data):
        raise ProtocolError("truncated BSON document")
    (size,) = struct.unpack_from("<i", data, offset)
    if size < 5 or offset + size > len(data):
        raise ProtocolError("BSON document length out of bounds")
    try:
        doc = bson.decode(data[offset : offset + size], codec_options=CODEC)
    except Exception as exc:  # bson raises several types for corrupt input
        raise ProtocolError(f"invalid BSON: {exc}") from exc
    return doc, offset + size


def parse_message(op_code: int, request_id: int, body: bytes, whole: bytes) -> Request:
    """Parse the body (everything after the 16-byte header) of one message."""
    if op_code == OP_MSG:
        return _parse_op_msg(request_id, body, whole)
    if op_code == OP_QUERY:
        return _parse_op_query(request_id, body)
    if op_code == OP_COMPRESSED:
        raise ProtocolError("compression was not negotiated")
    raise ProtocolError(f"unsupported opcode {op_code}")


def _parse_op_msg(request_id: int, body: bytes, whole: bytes) -> Request:
    if len(body) < 5:
        raise ProtocolError("OP_MSG too short")
    (flags,) = struct.unpack_from("<I", body, 0)
    if flags & 0xFFFF & ~_KNOWN_FLAGS:
        # Unknown required bits (the low 16) must make the server reject the message.
        raise ProtocolError(f"unknown required OP_MSG flag bits {flags:#x}")
    end = len(body)
    if flags & FLAG_CHECKSUM_PRESENT:
        if end < 9:
            raise ProtocolError("OP_MSG checksum missing")
        (expected,) = struct.unpack_from("<I", body, end - 4)
        if crc32c(whole[:-4]) != expected:
            raise ProtocolError("OP_MSG checksum mismatch")
        end -= 4
    offset = 4
    command: dict[str, Any] | None = None
    sequences: dict[str, list[dict[str, Any]]] = {}
    large: dict[str, dict[int, int]] = {}
    while offset < end:
        kind = body[offset]
        offset += 1
        if kind == 0:
            if command is not None:
                raise ProtocolError("OP_MSG has more than one body section")
            command, offset = _decode_one(body[:end], offset)
        elif kind == 1:
            name, docs, sizes, offset = _document_sequence(body[:end], offset)
            sequences[name] = docs
            if sizes:
                large[name] = sizes
        else:
            raise ProtocolError(f"unknown OP_MSG section kind {kind}")
    if command is None:
        raise ProtocolError("OP_MSG without a body section")
    for name, docs in sequences.items():
        command[name] = docs
    return Request(
        request_id,
        OP_MSG,
        command,
        more_to_come=bool(flags & FLAG_MORE_TO_COME),
        exhaust_allowed=bool(flags & FLAG_EXHAUST_ALLOWED),
        sequences=sequences,
        large=large,
    )


def _document_sequence(
    body: bytes, offset: int
) -> tuple[str, list[dict[str, Any]], dict[int, int], int]:
    """A kind-1 section at `offset`: its identifier, documents, the sizes of those over
    LARGE_DOCUMENT (by position), and where the next section starts."""
    if offset + 4 > len(body):
        raise ProtocolError("truncated document sequence")
    (size,) = struct.unpack_from("<i", body, offset)
    seq_end = offset + size
    if size < 5 or seq_end > len(body):
        raise ProtocolError("document sequence length out of bounds")
    name_end = body.find(b"\x00", offset + 4, seq_end)
    if name_end < 0:
        raise ProtocolError("document sequence identifier not terminated")
    name = body[offset + 4 : name_end].decode("utf-8", "replace")
    docs: list[dict[str, Any]] = []
    sizes: dict[int, int] = {}
    pos = name_end + 1
    while pos < seq_end:
        start = pos
        doc, pos = _decode_one(body[:seq_end], pos)
        if pos - start > LARGE_DOCUMENT:
            sizes[len(docs)] = pos - start
        docs.append(doc)
    return name, docs, sizes, seq_end


def _parse_op_query(request_id: int, body: bytes) -> Request:
    if len(body) < 4:
        raise ProtocolError("OP_QUERY too short")
    name_end = body.find(b"\x00", 4)
    if name_end < 0:
        raise ProtocolError("OP_QUERY collection name not terminated")
    namespace = body[4:name_end].decode("utf-8", "replace")
    offset = name_end + 1 + 8  # numberToSkip, numberToReturn
    query, _ = _decode_one(body, offset)
    # Drivers wrap legacy commands as {$query: {...}, $readPreference: ...}.
    if "$query" in query:
        query = dict(query["$query"])
    return Request(request_id, OP_QUERY, query, legacy_namespace=namespace)


_next_response_id = 0


def _response_id() -> int:
    global _next_response_id
    _next_response_id = (_next_response_id + 1) & 0x7FFFFFFF
    return _next_response_id


def encode_op_msg(response_to: int, doc: dict[str, Any], more_to_come: bool = False) -> bytes:
    return encode_op_msg_with_id(response_to, doc, more_to_come)[0]


def encode_op_msg_with_id(
    response_to: int, doc: dict[str, Any], more_to_come: bool = False
) -> tuple[bytes, int]:
    """The OP_MSG and its request id (what the next reply of an exhaust stream answers to)."""
    payload = bson.encode(doc)
    flags = FLAG_MORE_TO_COME if more_to_come else 0
    body = struct.pack("<I", flags) + b"\x00" + payload
    message_id = _response_id()
    return HEADER.pack(16 + len(body), message_id, response_to, OP_MSG) + body, message_id


def encode_op_reply(response_to: int, doc: dict[str, Any]) -> bytes:
    payload = bson.encode(doc)
    body = struct.pack("<iqii", 0, 0, 0, 1) + payload
    return HEADER.pack(16 + len(body), _response_id(), response_to, OP_REPLY) + body
