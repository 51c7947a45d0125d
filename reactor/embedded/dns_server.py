"""A tiny authoritative DNS server over UDP on loopback, for tests and the demo: it answers from
a table of records the caller controls (TXT, A, AAAA, MX), NXDOMAIN for names it has nothing
at, and can stay silent (a resolver timeout). Messages are built with dnspython."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import cast

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from .served import Served


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.server.answer(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class DnsServer(Served):
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.records: dict[tuple[str, str], list[str]] = defaultdict(list)
        self.silent = False  # drop every query (the resolver times out)
        self.queries: list[tuple[str, str]] = []
        self._transport: asyncio.DatagramTransport | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def add(self, name: str, rdtype: str, value: str) -> None:
        """A record: TXT values as plain text (split into 255-byte strings here)."""
        self.records[(name.lower().rstrip("."), rdtype.upper())].append(value)

    def txt(self, name: str, value: str) -> None:
        self.add(name, "TXT", value)

    def clear(self, name: str, rdtype: str = "TXT") -> None:
        self.records.pop((name.lower().rstrip("."), rdtype.upper()), None)

    def answer(self, data: bytes) -> bytes | None:
        query = dns.message.from_wire(data)
        if self.silent or not query.question:
            return None
        question = query.question[0]
        name = question.name.to_text().lower().rstrip(".")
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        values = self.records.get((name, rdtype), [])
        if values:
            rrset = dns.rrset.from_text(
                question.name, 60, "IN", rdtype, *(self._rdata(rdtype, v) for v in values)
            )
            response.answer.append(rrset)
        elif not any(n == name for n, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    @staticmethod
    def _rdata(rdtype: str, value: str) -> str:
        if rdtype != "TXT":
            return value
        raw = value.encode()
        parts = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
        return " ".join(
            '"' + p.decode().replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(self.host, self.port)
        )
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
