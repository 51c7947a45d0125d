"""The command line: the only place that reads the environment and configures logging.

    reactor run               the service
    reactor doctor [--json] [--probe] [--senders]
    reactor demo [--customers N] [--campaigns N] [--failure-rate R] [--keep-running] [--seed S]
    reactor mongo-emulator [--host H] [--port P] [--replica-set NAME]
    reactor preview CAMPAIGN_ID [--customer ID] [--send-to ADDRESS_OR_PHONE]

Bad usage or configuration prints one line and exits 2; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

import anyio
from pydantic import ValidationError

from . import __version__, logsetup
from .gctune import tune_for_service

EXIT_USAGE = 2


class UsageError(Exception):
    """Raised when the command line or the environment cannot be used as given."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number between 0 and 1, got {text!r}"
        ) from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="reactor",
        description="Campaign Reactor: start approved campaigns on time, exactly once.",
    )
    parser.add_argument("--version", action="version", version=f"campaign-reactor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("run", help="run the service (configured by environment variables)")
    doctor = sub.add_parser("doctor", help="check configuration, connectivity and campaigns")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument(
        "--probe", action="store_true", help="also connect to SMTP and Twilio to prove they answer"
    )
    doctor.add_argument(
        "--senders",
        action="store_true",
        help="check each sending identity's SPF, DKIM and DMARC records in DNS (only that)",
    )
    demo = sub.add_parser("demo", help="the whole system on embedded stand-ins")
    demo.add_argument("--customers", type=_positive_int, default=300)
    demo.add_argument("--campaigns", type=_positive_int, default=4)
    demo.add_argument("--failure-rate", type=_rate, default=0.0)
    demo.add_argument("--keep-running", action="store_true")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--metrics-port", type=_port, default=9464)
    from .suppress_cli import add_arguments

    add_arguments(
        sub.add_parser("suppress", help="the suppression list: add, remove, list, import, export")
    )
    preview = sub.add_parser(
        "preview", help="print a campaign's message for one customer; optionally send a test"
    )
    preview.add_argument("campaign_id")
    preview.add_argument("--customer", help="customer id (default: the first targeted)")
    preview.add_argument("--send-to", help="send one test message to this address or number")
    from .splits.report import add_arguments as add_report_arguments

    add_report_arguments(
        sub.add_parser("report", help="a campaign's sends, outcomes and engagement per variant")
    )
    emu = sub.add_parser("mongo-emulator", help="run the embedded MongoDB-compatible server")
    emu.add_argument("--host", default="127.0.0.1")
    emu.add_argument("--port", type=_port, default=27017)
    emu.add_argument("--replica-set", default="rs0")
    return parser


def load_settings() -> Any:
    from .config import Settings

    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]).upper() or "SETTINGS"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "missing":
                msg = "required but not set"
            problems.append(f"{name}: {msg}")
        raise UsageError("configuration error: " + "; ".join(problems)) from None


EMBEDDED_MODULES = ("mongomock", "aiosmtpd")


def require_embedded(command: str) -> None:
    """The stand-ins live in the `embedded` extra, which a production install does not carry."""
    missing = [m for m in EMBEDDED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"'reactor {command}' needs the embedded stand-ins ({', '.join(missing)} not "
            "installed): pip install 'campaign-reactor[embedded]'"
        )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        command = _COMMANDS.get(args.command)
        if command is None:
            return EXIT_USAGE
        return command(args)
    except UsageError as exc:
        print(f"reactor: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _cmd_mongo_emulator(args: argparse.Namespace) -> int:
    require_embedded(args.command)
    return _mongo_emulator(args)


def _cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings()
    logsetup.configure(settings.log_format, settings.log_level)
    return _run_service(settings)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor

    settings = load_settings()
    return run_doctor(settings, as_json=args.json, probe=args.probe, senders=args.senders)


def _cmd_suppress(args: argparse.Namespace) -> int:
    from .suppress_cli import BadRow
    from .suppress_cli import run as run_suppress

    try:
        return run_suppress(args, load_settings())
    except BadRow as exc:
        raise UsageError(str(exc)) from None


def _cmd_preview(args: argparse.Namespace) -> int:
    from .preview import run_preview

    settings = load_settings()
    return asyncio.run(
        run_preview(
            settings,
            args.campaign_id,
            customer=args.customer,
            send_to=args.send_to,
            out=sys.stdout,
        )
    )


def _cmd_report(args: argparse.Namespace) -> int:
    from .splits.report import run as run_report

    return run_report(args, load_settings())


def _cmd_demo(args: argparse.Namespace) -> int:
    require_embedded(args.command)
    from .demo import run_demo

    logsetup.configure(
        os.environ.get("LOG_FORMAT", "text"), os.environ.get("LOG_LEVEL", "WARNING").upper()
    )
    return run_demo(
        customers=args.customers,
        campaigns=args.campaigns,
        failure_rate=args.failure_rate,
        keep_running=args.keep_running,
        seed=args.seed,
        metrics_port=args.metrics_port,
    )


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "mongo-emulator": _cmd_mongo_emulator,
    "run": _cmd_run,
    "doctor": _cmd_doctor,
    "suppress": _cmd_suppress,
    "preview": _cmd_preview,
    "report": _cmd_report,
    "demo": _cmd_demo,
}


def _run_service(settings: Any) -> int:
    from .app import Reactor

    reactor = Reactor(settings)
    tune_for_service()
    asyncio.run(_until_done(reactor.run, on_signal=reactor.request_shutdown))
    return 0


async def _until_done(main: Callable[[], Awaitable[None]], on_signal: Callable[[], None]) -> None:
    """Run `main` to its end, calling `on_signal` for every SIGTERM or SIGINT meanwhile."""
    async with anyio.create_task_group() as tg:

        async def on_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    on_signal()

        tg.start_soon(on_signals)
        await main()
        tg.cancel_scope.cancel()


def _mongo_emulator(args: argparse.Namespace) -> int:
    from .embedded.mongo.gcpolicy import freeze_survivors_of_young_collections
    from .embedded.mongo.server import serve_forever

    logsetup.configure("text", "WARNING")

    def ready(uri: str) -> None:
        print(f"ready {uri}", flush=True)

    tune_for_service()
    freeze_survivors_of_young_collections()  # a process of its own: pauses do not grow with data

    async def serve() -> None:
        with anyio.CancelScope() as scope:
            await _until_done(
                lambda: serve_forever(args.host, args.port, args.replica_set, ready),
                on_signal=scope.cancel,
            )

    try:
        asyncio.run(serve())
    except OSError as exc:
        print(f"reactor: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
