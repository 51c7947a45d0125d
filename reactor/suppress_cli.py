"""`reactor suppress add|remove|list|import|export`: the suppression list for operators.

Values are validated and normalised the way the send path does (email-validator, phonenumbers to
E.164, customer ids in their one spelling), so an entry made here matches the sends it should
stop. Import reads CSV (`kind,value[,channel][,reason][,note]`, with a header row), adds the
valid rows in batches and names every rejected row by its line; export writes the same columns
plus `source` and `createdAt`.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import sys
from collections.abc import Iterator
from typing import IO, Any

from .domain.addresses import email_address, phone_address
from .domain.consent import ALL_CHANNELS, CHANNEL_SCOPES, Kind, Reason, Suppression, suppression_id
from .domain.ids import normalise_id

BATCH = 1000
EXPORT_COLUMNS = ["kind", "value", "channel", "reason", "source", "note", "campaign", "createdAt"]


class BadRow(ValueError):
    """Raised when a suppression's kind, value, channel or reason is not valid."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="suppress a customer, an email address or a phone number")
    _target(add)
    add.add_argument("--channel", choices=CHANNEL_SCOPES, default=ALL_CHANNELS)
    add.add_argument("--reason", choices=[r.value for r in Reason], default=Reason.MANUAL.value)
    add.add_argument("--note", default=None)
    remove = sub.add_parser("remove", help="lift a suppression")
    _target(remove)
    remove.add_argument(
        "--channel", choices=[*CHANNEL_SCOPES, "any"], default="any", help="default: every scope"
    )
    show = sub.add_parser("list", help="show entries, newest first")
    show.add_argument("--reason", choices=[r.value for r in Reason], default=None)
    show.add_argument("--limit", type=int, default=50)
    imp = sub.add_parser("import", help="add entries from CSV (kind,value[,channel,reason,note])")
    imp.add_argument("file", help="a CSV file, or - for standard input")
    imp.add_argument("--source", default="import")
    exp = sub.add_parser("export", help="write every entry as CSV")
    exp.add_argument("file", nargs="?", default="-", help="default: standard output")


def _target(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--customer", help="a customer id")
    group.add_argument("--email", help="an email address")
    group.add_argument("--phone", help="a phone number (E.164, or national in --region)")
    parser.add_argument(
        "--region", default=None, help="for national phone numbers (default: DEFAULT_PHONE_REGION)"
    )


def normalised(kind: str, value: str, region: str) -> str:
    kind = kind.strip().lower()
    if kind == Kind.EMAIL:
        address, problem = email_address(value.strip())
        if address is None:
            raise BadRow(f"{problem}: not a valid email address")
        return address.lower()
    if kind == Kind.PHONE:
        number, problem = phone_address(value.strip(), region)
        if number is None:
            raise BadRow(f"{problem}: not a valid phone number")
        return number
    if kind == Kind.CUSTOMER:
        if not value.strip():
            raise BadRow("empty customer id")
        return normalise_id(value)
    raise BadRow(f"kind must be customer, email or phone, not {kind[:20]!r}")


def entry(row: dict[str, str], *, region: str, source: str) -> Suppression:
    kind = (row.get("kind") or "").strip().lower()
    value = normalised(kind, row.get("value") or "", region)
    channel = (row.get("channel") or ALL_CHANNELS).strip().lower()
    if channel not in CHANNEL_SCOPES:
        raise BadRow(f"channel must be one of {', '.join(CHANNEL_SCOPES)}")
    reason_text = (row.get("reason") or Reason.MANUAL).strip().lower()
    try:
        reason = Reason(reason_text)
    except ValueError:
        raise BadRow(f"reason must be one of {', '.join(r.value for r in Reason)}") from None
    note = (row.get("note") or "").strip() or None
    return Suppression(Kind(kind), value, channel, reason, source=source, note=note)


def read_csv(stream: IO[str]) -> Iterator[tuple[int, dict[str, str]]]:
    reader = csv.DictReader(stream)
    if reader.fieldnames is None or not {"kind", "value"} <= {f.strip() for f in reader.fieldnames}:
        raise BadRow("the first row must name the columns, including kind and value")
    for row in reader:
        yield reader.line_num, {k.strip(): (v or "") for k, v in row.items() if k}


def run(args: argparse.Namespace, settings: Any) -> int:
    """Files are opened here, before the event loop runs (opening is a blocking call)."""
    stream: IO[str] | None = None
    if args.action == "import":
        stream = sys.stdin if args.file == "-" else open(args.file, newline="", encoding="utf-8")
    elif args.action == "export":
        stream = (
            sys.stdout if args.file == "-" else open(args.file, "w", newline="", encoding="utf-8")
        )
    try:
        return asyncio.run(_run(args, settings, stream))
    finally:
        if stream is not None and stream not in (sys.stdin, sys.stdout):
            stream.close()


async def _run(args: argparse.Namespace, settings: Any, stream: IO[str] | None) -> int:
    from .adapters.mongo import MongoSuppressions
    from .app import mongo_client

    client = mongo_client(settings.mongo_uri.get_secret_value(), "suppress-cli")
    try:
        store = MongoSuppressions(client[settings.campaigns_db])
        await store.ensure_indexes()
        region = getattr(args, "region", None) or settings.default_phone_region
        now = dt.datetime.now(dt.UTC)
        if args.action == "add":
            kind, value = _kind_value(args)
            e = entry(
                {
                    "kind": kind,
                    "value": value,
                    "channel": args.channel,
                    "reason": args.reason,
                    "note": args.note or "",
                },
                region=region,
                source="cli",
            )
            new = await store.add([e], now=now)
            print(f"{'added' if new else 'already suppressed'}: {e.kind} {e.value} ({e.channel})")
            return 0
        if args.action == "remove":
            kind, value = _kind_value(args)
            value = normalised(kind, value, region)
            scopes = CHANNEL_SCOPES if args.channel == "any" else (args.channel,)
            removed = await store.remove([suppression_id(kind, value, ch) for ch in scopes])
            print(f"removed {removed} entr{'y' if removed == 1 else 'ies'} for {kind} {value}")
            return 0 if removed else 1
        if args.action == "list":
            return await _list(store, args.reason, args.limit)
        if args.action == "import":
            assert stream is not None
            return await _import(store, stream, region=region, source=args.source, now=now)
        if args.action == "export":
            assert stream is not None
            return await _export(store, stream)
    finally:
        await client.close()
    return 2


def _kind_value(args: argparse.Namespace) -> tuple[str, str]:
    for kind in ("customer", "email", "phone"):
        value = getattr(args, kind)
        if value is not None:
            return kind, value
    raise BadRow("name a --customer, --email or --phone")


async def _list(store: Any, reason: str | None, limit: int) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table("kind", "value", "channel", "reason", "source", "created (UTC)")
    n = 0
    async for doc in store.entries(reason=reason, limit=limit):
        created = doc.get("createdAt")
        table.add_row(
            str(doc.get("kind", "")),
            str(doc.get("value", "")),
            str(doc.get("channel", "")),
            str(doc.get("reason", "")),
            str(doc.get("source", "")),
            created.strftime("%Y-%m-%d %H:%M:%S") if isinstance(created, dt.datetime) else "",
        )
        n += 1
    console = Console(highlight=False, markup=False)
    console.print(table)
    total = await store.count()
    console.print(f"{n} shown of {total}")
    return 0


async def _import(
    store: Any, stream: IO[str], *, region: str, source: str, now: dt.datetime
) -> int:
    added = seen = 0
    bad: list[str] = []
    batch: list[Suppression] = []
    for line, row in read_csv(stream):
        try:
            batch.append(entry(row, region=region, source=source))
        except BadRow as exc:
            bad.append(f"line {line}: {exc}")
            continue
        if len(batch) >= BATCH:
            added += len(await store.add(batch, now=now))
            seen += len(batch)
            batch = []
    if batch:
        added += len(await store.add(batch, now=now))
        seen += len(batch)
    for problem in bad:
        print(f"rejected {problem}", file=sys.stderr)
    print(
        f"imported {seen} rows: {added} new, {seen - added} already suppressed, {len(bad)} rejected"
    )
    return 1 if bad else 0


async def _export(store: Any, stream: IO[str]) -> int:
    n = 0
    writer = csv.DictWriter(stream, EXPORT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    async for doc in store.entries():
        created = doc.get("createdAt")
        row = {k: doc.get(k) or "" for k in EXPORT_COLUMNS}
        row["createdAt"] = (
            created.astimezone(dt.UTC).isoformat() if isinstance(created, dt.datetime) else ""
        )
        writer.writerow(row)
        n += 1
    if stream is not sys.stdout:
        print(f"exported {n} entries", file=sys.stderr)
    return 0
