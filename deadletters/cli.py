"""``deadletters``: list, replay and purge the messages in ``campaign.deadletter``.

    deadletters list   [--tenant T] [--error-type E] [--event-id ID]... [--limit N] [--json]
    deadletters replay [--tenant T] [--error-type E] [--event-id ID]... [--all] [--limit N]
                       [--dry-run]
    deadletters purge  [--tenant T] [--error-type E] [--event-id ID]... [--all] [--limit N]
                       [--dry-run | --yes]

``list`` leaves every message where it was. ``replay`` sends each matching message back to
``worker.campaign.created`` (confirmed), then removes it: the worker gives it a new round of
attempts. ``purge`` records each matching event as a ``failed`` row with the reason "purged"
(unless it has a final row already), then removes it. Both refuse to act without a filter or
``--all``; ``purge`` also wants ``--yes``.

Reads ``RABBITMQ_URL`` and ``DATABASE_URL`` (only ``purge`` uses the database) as the services
do. Output goes to stdout, log lines (JSON) to stderr. Exit status: 0 done, 1 stopped part way
(what was not done stays in the queue), 2 invalid arguments, 69 the broker or the database
unreachable, 78 invalid settings, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import uuid
from collections.abc import Sequence
from typing import TextIO
from urllib.parse import urlsplit

from aio_pika.exceptions import AMQPError
from faststream.rabbit import RabbitBroker
from opentelemetry.sdk.trace import TracerProvider
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from deadletters.letters import DeadLetter, Selection
from deadletters.session import DeadLetterSession, QueueMissing, Scan, purge, replay
from deadletters.settings import DeadLetterSettings
from shared.db import create_engine, ping
from shared.logs import configure_logging
from shared.messaging import DEAD_LETTER_QUEUE, WORKER_QUEUE_NAME, create_broker
from shared.telemetry import broker_telemetry, configure_tracing
from shared.tenancy import TENANT_ID_PATTERN

EXIT_OK = 0
EXIT_STOPPED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69  # sysexits' EX_UNAVAILABLE
EXIT_CONFIG = 78  # sysexits' EX_CONFIG
EXIT_INTERRUPTED = 130

_TENANT = re.compile(TENANT_ID_PATTERN)
_ERROR_TYPE = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
_LIMIT_MAX = 1_000_000


class Unavailable(Exception):
    """The broker or the database cannot be reached, or the queue is not there."""


def _tenant(value: str) -> str:
    if not _TENANT.fullmatch(value):
        raise argparse.ArgumentTypeError(
            "a tenant id is 1 to 63 lower-case letters, digits and inner hyphens"
        )
    return value


def _error_type(value: str) -> str:
    if not _ERROR_TYPE.fullmatch(value):
        raise argparse.ArgumentTypeError(
            "an error type is 1 to 200 letters, digits, '_', '.', ':' or '-' "
            "(as `deadletters list` shows it, e.g. SimulatedFailure)"
        )
    return value


def _event_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError("an event id is a UUID") from None


def _limit(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= _LIMIT_MAX:
        raise argparse.ArgumentTypeError(f"a whole number from 1 to {_LIMIT_MAX}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deadletters",
        description="List, replay and purge the messages in campaign.deadletter.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "list": "show the dead letters; every message stays where it was",
        "replay": "send dead letters back to worker.campaign.created for a new round of attempts",
        "purge": "remove dead letters for good, recording each event as failed (purged)",
    }
    for name, help_text in helps.items():
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--tenant", type=_tenant, help="only this tenant's")
        command.add_argument(
            "--error-type", type=_error_type, help="only those whose last error is of this type"
        )
        command.add_argument(
            "--event-id",
            type=_event_id,
            action="append",
            default=[],
            help="only this event (repeat for several)",
        )
        command.add_argument("--limit", type=_limit, help="at most this many")
        if name == "list":
            command.add_argument("--json", action="store_true", help="a JSON array")
        else:
            command.add_argument("--all", action="store_true", help="every dead letter")
            command.add_argument(
                "--dry-run", action="store_true", help="show what would be done, change nothing"
            )
        if name == "purge":
            command.add_argument("--yes", action="store_true", help="yes, remove them for good")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    selection = Selection(
        tenant_id=args.tenant, error_type=args.error_type, event_ids=frozenset(args.event_id)
    )
    if args.command != "list":
        if not selection.narrowed and not args.all:
            parser.error(
                f"{args.command} needs a filter (--tenant, --error-type, --event-id) or --all"
            )
        if selection.narrowed and args.all:
            parser.error("--all means every dead letter: give it without filters")
    if args.command == "purge" and not (args.yes or args.dry_run):
        parser.error("purge removes messages for good: add --yes (or --dry-run to see which)")
    try:
        settings = DeadLetterSettings()
    except ValidationError as exc:
        # What is wrong and where, never the values (a URL holds a password).
        for error in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            print(f"deadletters: invalid settings: {where}: {error['msg']}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings, stream=sys.stderr)
    provider = configure_tracing(settings.service_name)
    try:
        return asyncio.run(_run(args, selection, settings, provider))
    except Unavailable as exc:
        print(f"deadletters: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        print(
            f"deadletters: interrupted; what was not removed stays in {DEAD_LETTER_QUEUE.name}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    finally:
        provider.shutdown()  # the replays' spans, sent before the process ends


def _where(url: str) -> str:
    """The URL without its credentials."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.hostname}{port}{parts.path}"


async def _run(
    args: argparse.Namespace,
    selection: Selection,
    settings: DeadLetterSettings,
    provider: TracerProvider,
) -> int:
    timeout = settings.deadletters_connect_timeout_seconds
    engine: AsyncEngine | None = None
    if args.command == "purge" and not args.dry_run:
        engine = create_engine(settings, application_name=settings.service_name)
        try:
            async with asyncio.timeout(timeout):
                await ping(engine)
        except Exception as exc:
            await engine.dispose()
            where = _where(settings.database_url)
            raise Unavailable(f"cannot reach PostgreSQL at {where}: {exc!r}") from exc
    broker = create_broker(
        settings.rabbitmq_url,
        app_id=settings.service_name,
        graceful_timeout=None,
        middlewares=[broker_telemetry(provider)],
        apply_types=False,
    )
    try:
        try:
            async with asyncio.timeout(timeout):
                await broker.connect()
        except (TimeoutError, OSError, AMQPError) as exc:
            where = _where(settings.rabbitmq_url)
            raise Unavailable(f"cannot reach RabbitMQ at {where}: {exc!r}") from exc
        try:
            return await _act(args, selection, settings, broker, engine)
        except QueueMissing as exc:
            raise Unavailable(
                f"there is no {exc} queue on this broker's vhost (the worker declares it when it "
                "starts)"
            ) from exc
        except (TimeoutError, OSError, AMQPError) as exc:
            # Whatever was read and not removed goes back to the queue with the connection.
            where = _where(settings.rabbitmq_url)
            raise Unavailable(f"lost RabbitMQ at {where}: {exc!r}") from exc
        except DBAPIError as exc:
            where = _where(settings.database_url)
            raise Unavailable(
                f"PostgreSQL at {where} failed: {type(exc.orig).__name__}; nothing was removed"
            ) from exc
    finally:
        await broker.stop()
        if engine is not None:
            await engine.dispose()


async def _act(
    args: argparse.Namespace,
    selection: Selection,
    settings: DeadLetterSettings,
    broker: RabbitBroker,
    engine: AsyncEngine | None,
) -> int:
    out = sys.stdout
    async with DeadLetterSession.open(broker) as session:
        scan = await session.scan(
            selection, scan_max=settings.deadletters_scan_max, limit=args.limit
        )
        _report_scan(scan, settings)
        letters = [held.letter for held in scan.matching]
        if args.command == "list":
            _print_letters(letters, out, as_json=args.json)
            return EXIT_OK
        if args.dry_run:
            _print_letters(letters, out, as_json=False)
            print(f"would {args.command} {len(letters)} dead letter(s)", file=out)
            return EXIT_OK
        if args.command == "replay":
            return await _replay(scan, settings, broker, out)
        assert engine is not None
        purged = await purge(scan.matching, engine=engine)
        print(
            f"purged {purged.removed} dead letter(s); {purged.recorded} recorded as failed "
            "(purged), the others had a final row already or name no campaign",
            file=out,
        )
        return EXIT_OK


async def _replay(
    scan: Scan, settings: DeadLetterSettings, broker: RabbitBroker, out: TextIO
) -> int:
    done: list[DeadLetter] = []
    try:
        await replay(
            scan.matching,
            broker=broker,
            confirm_seconds=settings.deadletters_publish_timeout_seconds,
            on_replayed=done.append,
        )
    except Exception as exc:  # not confirmed, the connection lost: stop there
        print(
            f"replayed {len(done)} of {len(scan.matching)}; stopped: {exc!r} "
            f"(the rest stay in {DEAD_LETTER_QUEUE.name})",
            file=out,
        )
        return EXIT_STOPPED
    print(f"replayed {len(done)} dead letter(s) to {WORKER_QUEUE_NAME}", file=out)
    return EXIT_OK


def _report_scan(scan: Scan, settings: DeadLetterSettings) -> None:
    if not scan.complete:
        print(
            f"deadletters: read the first {scan.scanned} messages only (DEADLETTERS_SCAN_MAX="
            f"{settings.deadletters_scan_max}); more wait behind them, and on RabbitMQ 3 the ones "
            "read now wait behind those",
            file=sys.stderr,
        )


_COLUMNS = ("event_id", "tenant_id", "campaign_id", "attempts", "died_at", "error_type")


def _print_letters(letters: Sequence[DeadLetter], out: TextIO, *, as_json: bool) -> None:
    if as_json:
        json.dump([letter.as_json() for letter in letters], out, indent=2)
        out.write("\n")
        return
    rows = [
        [_cell(letter.as_json()[column]) for column in _COLUMNS] + [_cell(letter.error_message)]
        for letter in letters
    ]
    header = [*(column.upper() for column in _COLUMNS), "ERROR"]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(_COLUMNS))]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip(), file=out)
    print(f"{len(letters)} dead letter(s)", file=out)


def _cell(value: object) -> str:
    """A value as a table cell: control characters (a header's newline or terminal escape)
    shown escaped, so no message can forge a row or drive the terminal."""
    if value is None:
        return "-"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))
