"""Where notifications go: the `notification_destinations` collection (re-read every few
seconds, so an admin's edits apply live) plus the defaults from the environment, and the URL
policy every destination is held to.

A destination is `{kind: webhook|slack|json|email, url?, to?, events?, secret?, disabled?}`.
URLs must be https, except on loopback (a sidecar); after DNS resolution, loopback addresses are
refused unless NOTIFY_ALLOW_LOOPBACK=true, and private, link-local, unspecified, multicast and
metadata addresses unless NOTIFY_ALLOW_PRIVATE=true; an IPv6 address embedding an IPv4 one
(mapped, NAT64, 6to4) is judged as that address. The
check runs before each request and again inside the connector's resolver, so a name that
re-resolves to a private address between the two is refused too. Why a destination is refused or
disabled is written on its document (for defaults from the environment, in `reactor_state`).
Secrets and URLs (a Slack URL is itself a secret) are never logged: only the scheme and host.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from .events import EVENT_TYPES

log = logging.getLogger(__name__)

DESTINATIONS = "notification_destinations"
STATE = "reactor_state"
KINDS = ("webhook", "slack", "json", "email")
LOOPBACK_NAMES = {"localhost"}
# Cloud metadata services, named so the refusal says what it is.
METADATA = {
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("169.254.170.2"),
    ipaddress.ip_address("100.100.100.200"),
    ipaddress.ip_address("fd00:ec2::254"),
}

Resolve = Callable[[str, int], Awaitable[list[str]]]


class InvalidDestination(ValueError):
    """Raised when a destination document cannot be used as written."""


class RefusedAddress(OSError):
    """Raised when a destination's host is, or resolves to, an address the policy refuses."""


@dataclass(frozen=True)
class Destination:
    id: str
    kind: str
    url: str | None = None
    to: tuple[str, ...] = ()
    events: frozenset[str] | None = None  # None: every event
    secret: str | None = field(default=None, repr=False)
    disabled: str | None = None  # why, when disabled
    from_env: bool = False

    def wants(self, event_type: str) -> bool:
        return self.disabled is None and (self.events is None or event_type in self.events)

    @property
    def where(self) -> str:
        """What logs and the doctor may show: scheme and host, never the path (a secret)."""
        if self.kind == "email":
            return f"email to {len(self.to)} admin(s)"
        parts = urlsplit(self.url or "")
        return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"


def parse_destination(doc: Mapping[str, Any], *, from_env: bool = False) -> Destination:
    """A destination from its document; raises InvalidDestination saying what is wrong."""
    kind = doc.get("kind")
    if kind not in KINDS:
        raise InvalidDestination(f"kind must be one of {', '.join(KINDS)}, not {kind!r}"[:200])
    events = doc.get("events")
    wanted: frozenset[str] | None = None
    if events is not None:
        if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
            raise InvalidDestination("events must be a list of event types")
        unknown = sorted(set(events) - set(EVENT_TYPES))
        if unknown:
            raise InvalidDestination(f"unknown event types: {', '.join(unknown)[:200]}")
        wanted = frozenset(events)
    secret = doc.get("secret")
    if secret is not None and (not isinstance(secret, str) or not secret.startswith("whsec_")):
        raise InvalidDestination("secret must be a Standard Webhooks secret (whsec_…)")
    disabled = str(doc.get("disabledReason") or "disabled") if doc.get("disabled") else None
    dest_id = str(doc.get("_id"))
    if kind == "email":
        to = doc.get("to")
        if (
            not isinstance(to, list)
            or not to
            or not all(isinstance(a, str) and "@" in a for a in to)
        ):
            raise InvalidDestination("an email destination needs `to`: a list of addresses")
        return Destination(
            dest_id, kind, to=tuple(to), events=wanted, disabled=disabled, from_env=from_env
        )
    url = doc.get("url")
    if not isinstance(url, str):
        raise InvalidDestination(f"a {kind} destination needs a url")
    problem = url_problem(url)
    if problem is not None:
        raise InvalidDestination(problem)
    if kind == "webhook" and secret is None:
        raise InvalidDestination("a webhook destination needs a secret (whsec_…) to sign with")
    return Destination(
        dest_id,
        kind,
        url=url,
        events=wanted,
        secret=secret,
        disabled=disabled,
        from_env=from_env,
    )


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a destination by its form alone (scheme, host), or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return "the url is malformed"
    if not parts.hostname:
        return "the url has no host"
    if parts.scheme == "https":
        return None
    if parts.scheme == "http" and _loopback_host(parts.hostname):
        return None
    return "the url must be https (plain http only to a loopback address)"


def _loopback_host(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# NAT64 prefixes (RFC 6052 well-known, RFC 8215 local-use): the last 32 bits are an IPv4
# address a translator connects to, so that address is what the policy judges.
NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")


def _embedded(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4), or None."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def address_problem(
    address: str, *, allow_private: bool, allow_loopback: bool = False
) -> str | None:
    """Why a resolved address is refused, or None. An IPv6 address embedding an IPv4 one
    (mapped, NAT64, 6to4) is judged as that IPv4 address. Loopback is refused unless
    `allow_loopback` (a sidecar) or `allow_private`."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address!r} is not an IP address"
    shown = str(ip)
    if isinstance(ip, ipaddress.IPv6Address) and ip in NAT64_LOCAL_USE:
        return None if allow_private else f"{shown} is a private (local-use NAT64) address"
    embedded = _embedded(ip)
    if embedded is not None:
        ip = embedded
        shown = f"{shown} (embedding {embedded})" if str(embedded) != shown else shown
    if allow_private:
        return None
    if ip.is_loopback:
        return None if allow_loopback else f"{shown} is a loopback address"
    if ip in METADATA:
        return f"{shown} is a cloud metadata address"
    if ip.is_link_local:
        return f"{shown} is a link-local address"
    if ip.is_private or ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return f"{shown} is a private or reserved address"
    if not ip.is_global:
        return f"{shown} is not a public address"
    return None


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def vet_host(
    host: str, port: int, resolve: Resolve, *, allow_private: bool, allow_loopback: bool = False
) -> list[str]:
    """The addresses `host` resolves to, all of them allowed; RefusedAddress otherwise."""
    try:
        ipaddress.ip_address(host)
        addresses = [host]
    except ValueError:
        try:
            addresses = await resolve(host, port)
        except OSError as exc:
            raise RefusedAddress(f"cannot resolve {host}: {exc.strerror or exc}") from None
    if not addresses:
        raise RefusedAddress(f"{host} resolves to no address")
    for address in addresses:
        problem = address_problem(
            address, allow_private=allow_private, allow_loopback=allow_loopback
        )
        if problem is not None:
            setting = "NOTIFY_ALLOW_LOOPBACK" if "loopback" in problem else "NOTIFY_ALLOW_PRIVATE"
            raise RefusedAddress(f"{host} refused: {problem} ({setting}=false)")
    return addresses


class PolicyResolver(AbstractResolver):
    """aiohttp's resolver, through `resolve`, refusing what the policy refuses."""

    def __init__(
        self, resolve: Resolve, *, allow_private: bool, allow_loopback: bool = False
    ) -> None:
        self._resolve = resolve
        self._allow_private = allow_private
        self._allow_loopback = allow_loopback

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await vet_host(
            host,
            port,
            self._resolve,
            allow_private=self._allow_private,
            allow_loopback=self._allow_loopback,
        )
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for a in addresses
        ]

    async def close(self) -> None:
        return None


class DestinationSet:
    """The destinations in force: the collection's plus the environment's, re-read by
    `reload()`. Invalid documents are reported on themselves and left out."""

    def __init__(
        self, db: AsyncDatabase[dict[str, Any]], defaults: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        self._collection = db[DESTINATIONS]
        self._state = db[STATE]
        self._defaults = list(defaults)
        self.current: dict[str, Destination] = {}
        self._reported: dict[str, str] = {}

    def matching(self, event_type: str) -> list[Destination]:
        return [d for d in self.current.values() if d.wants(event_type)]

    async def reload(self) -> dict[str, Destination]:
        found: dict[str, Destination] = {}
        async for doc in self._collection.find({}):
            dest_id = str(doc.get("_id"))
            try:
                found[dest_id] = parse_destination(doc)
            except InvalidDestination as exc:
                await self._report_invalid(doc, str(exc))
                continue
            if doc.get("error") and not doc.get("disabled"):
                await self._collection.update_one({"_id": doc["_id"]}, {"$unset": {"error": ""}})
        for i, default in enumerate(self._defaults):
            dest_id = f"env:{default.get('kind')}:{i}"
            try:
                dest = parse_destination({**default, "_id": dest_id}, from_env=True)
            except InvalidDestination as exc:
                self._log_once(dest_id, str(exc))
                continue
            state = await self._state.find_one({"_id": f"notify:{dest_id}"})
            if state and state.get("disabled"):
                dest = _disabled(dest, str(state.get("disabledReason") or "disabled"))
            found[dest_id] = dest
        self.current = found
        return found

    async def _report_invalid(self, doc: Mapping[str, Any], detail: str) -> None:
        """Write why on the document (once per distinct reason) and log it once."""
        previous = doc.get("error")
        # An `error` some other writer set by hand (a string, say) is replaced, not read.
        if not isinstance(previous, Mapping) or previous.get("detail") != detail:
            await self._collection.update_one(
                {"_id": doc["_id"]},
                {"$set": {"error": {"detail": detail, "at": dt.datetime.now(dt.UTC)}}},
            )
        self._log_once(str(doc.get("_id")), detail)

    def _log_once(self, dest_id: str, detail: str) -> None:
        if self._reported.get(dest_id) != detail:
            self._reported[dest_id] = detail
            log.error("notification destination %s is not used: %s", dest_id, detail)

    async def _note(self, dest: Destination, fields: dict[str, Any]) -> bool:
        """Set `fields` where an admin looks: the destination's document, or for one from the
        environment its state document. False when the database refused."""
        try:
            if dest.from_env:
                await self._state.update_one(
                    {"_id": f"notify:{dest.id}"}, {"$set": fields}, upsert=True
                )
            else:
                await self._collection.update_one({"_id": _stored_id(dest.id)}, {"$set": fields})
        except PyMongoError:
            return False
        return True

    async def disable(self, dest: Destination, reason: str, now: dt.datetime) -> None:
        """Disable a destination (a 410 Gone), saying why where an admin looks."""
        fields = {"disabled": True, "disabledReason": reason, "disabledAt": now}
        if not await self._note(dest, fields):
            log.warning("could not record that destination %s is disabled", dest.id)
        self.current[dest.id] = _disabled(dest, reason)
        log.error("notification destination %s (%s) disabled: %s", dest.id, dest.where, reason)

    async def refuse(self, dest: Destination, reason: str, now: dt.datetime) -> None:
        """Write a refusal (a URL the policy refuses) on the destination's document."""
        fields = {"error": {"detail": reason, "at": now}}
        if not await self._note(dest, fields):
            log.warning("could not record the refusal of destination %s", dest.id)
        self._log_once(dest.id, reason)


def _disabled(dest: Destination, reason: str) -> Destination:
    return Destination(
        dest.id, dest.kind, dest.url, dest.to, dest.events, dest.secret, reason, dest.from_env
    )


def _stored_id(dest_id: str) -> Any:
    """The `_id` as stored: an ObjectId's string form maps back to the ObjectId."""
    from bson import ObjectId

    return ObjectId(dest_id) if ObjectId.is_valid(dest_id) else dest_id
