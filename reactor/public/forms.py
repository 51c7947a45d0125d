"""Reading a request body on an exposed port: a size cap and a deadline, whatever the client
sends, and a form parsed strictly (url-encoded or multipart, as RFC 8058 allows)."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import MultiDict

# A body must be complete this long after its headers; a refused request's unread rest is
# drained for at most `reactor.http.LINGER_S` more: 10 s in all, as the documentation says.
BODY_TIMEOUT_S = 8.0
MAX_FIELDS = 16


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, at most `limit` bytes, within BODY_TIMEOUT_S; 413 / 408 otherwise."""
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            body = await request.content.read(limit + 1)
            while len(body) <= limit and not request.content.at_eof():
                more = await request.content.read(limit + 1 - len(body))
                if not more:
                    break
                body += more
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="Request body too slow.\n") from None
    if len(body) > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
    return body


async def read_form(request: web.Request, limit: int) -> MultiDict[str]:
    body = await read_body(request, limit)
    ctype = request.content_type
    if ctype == "multipart/form-data":
        return _multipart(request, body)
    if ctype not in ("application/x-www-form-urlencoded", "", "application/octet-stream"):
        raise web.HTTPUnsupportedMediaType(text="Send a form.\n")
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=MAX_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        raise web.HTTPBadRequest(text="Malformed form.\n") from None
    return MultiDict(pairs)


def _multipart(request: web.Request, body: bytes) -> MultiDict[str]:
    """The text fields of a small multipart/form-data body (RFC 7578)."""
    import email.parser
    import email.policy

    head = f"Content-Type: {request.headers.get('Content-Type', '')}\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise web.HTTPBadRequest(text="Malformed form.\n")
    out: MultiDict[str] = MultiDict()
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or len(out) >= MAX_FIELDS:
            continue
        payload = part.get_payload(decode=True) or b""
        if not isinstance(payload, bytes):
            continue
        try:
            out.add(name, payload.decode("utf-8"))
        except UnicodeDecodeError:
            raise web.HTTPBadRequest(text="Malformed form.\n") from None
    return out
