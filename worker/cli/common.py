"""What every `hub-worker` command shares: exit codes, where the servers are, how a
command fails, connecting to NATS and PostgreSQL, tables and times."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from worker import db, schema
from worker.cli.arguments import parse_positive_int
from worker.config import ConfigError, NatsAuth, Settings
from worker.connection import connect_options

EXIT_OK = 0


EXIT_FAILURE = 1


EXIT_USAGE = 2


EXIT_REFUSED = 3


# Where the commands look for NATS when HUB_NATS_URL is unset: the port an
# embedded `hub-worker run` prefers.
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


@dataclass(frozen=True)
class Endpoints:
    """Where the servers are: configured, or those of the `hub-worker run` on HUB_DATA_DIR."""

    database_url: str
    nats_urls: list[str]


def load_settings() -> Settings | None:
    """The settings from the environment; None (after saying why) when one is invalid."""
    try:
        return Settings.from_env()
    except ConfigError as err:
        print(f"hub-worker: configuration error: {err}", file=sys.stderr)
        return None


class CommandFailed(Exception):
    """Ends a command with an exit code and a one-sentence message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def command_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    description: str,
    epilog: str,
) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(ops_command=name)
    return parser


def listing_actions(
    parser: argparse.ArgumentParser,
    listed: str,
    options: Callable[[argparse.ArgumentParser, Any], None] | None = None,
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """The actions of a command that lists by default, with `--limit` and `--json` and
    any `options(parser, default)` of its own; `list` spelled out takes them too (their
    defaults are the command's, SUPPRESSed after `list`, so that either place counts)."""
    for into, default, limit in (
        (parser, None, 50),
        (after := argparse.ArgumentParser(add_help=False), argparse.SUPPRESS, argparse.SUPPRESS),
    ):
        if options is not None:
            options(into, default)
        into.add_argument(
            "--limit", type=parse_positive_int, default=limit, metavar="N", help="default: 50"
        )
        into.add_argument(
            "--json", action="store_true", default=default, help="a JSON array, payloads included"
        )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", parents=[after], help=f"list {listed} (the default)")
    return actions


def action_parser(
    actions: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    description: str,
    epilog: str,
) -> argparse.ArgumentParser:
    """An action of a command (`deadletters replay`), its ids as positional arguments."""
    parser = actions.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ids", nargs="+", type=parse_positive_int, metavar="ID")
    return parser


def error(command: str, message: str) -> None:
    print(f"hub-worker {command}: {message}", file=sys.stderr, flush=True)


def describe(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def silence_stdout() -> None:
    # Python would report the broken pipe again when flushing stdout at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def redact(url: str) -> str:
    """A URL without its credentials, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


async def _ignore_error(err: Exception) -> None:
    """The commands report failures themselves; nats-py would log each one with a traceback."""


@asynccontextmanager
async def nats_connection(
    endpoints: Endpoints, auth: NatsAuth, *, follow: bool = False
) -> AsyncIterator[NATS]:
    """A NATS connection that fails fast when the server is not there.

    `follow`: once connected, reconnect for as long as it takes (a long-running command
    rides out a NATS restart).
    """
    urls = list(endpoints.nats_urls) or [DEFAULT_NATS_URL]
    try:
        nc = await nats.connect(
            servers=urls,
            name="hub-worker-ops",
            connect_timeout=3,
            reconnect_time_wait=1,
            max_reconnect_attempts=1,
            error_cb=_ignore_error,
            **connect_options(auth),
        )
    except (TimeoutError, nats.errors.Error, OSError) as err:
        where = ", ".join(redact(u) for u in urls)
        raise CommandFailed(
            EXIT_FAILURE, f"cannot reach NATS at {where} ({describe(err)})"
        ) from None
    if follow:
        nc.options["max_reconnect_attempts"] = -1
    try:
        yield nc
    finally:
        if not nc.is_closed:
            # Acks are fire-and-forget publishes: get them out before closing.
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await nc.flush(timeout=2)
            await nc.close()


# Failing to connect: the server is not there, or refuses us (password, no such database).
_DB_CONNECT_ERRORS: tuple[type[Exception], ...] = (*db.CONNECTION_ERRORS, asyncpg.PostgresError)


@asynccontextmanager
async def database(endpoints: Endpoints) -> AsyncIterator[db.Connection]:
    if not endpoints.database_url:
        raise CommandFailed(EXIT_USAGE, "no database: set HUB_DATABASE_URL")
    try:
        conn = await db.connect(endpoints.database_url, application_name="hub-worker:ops")
    except _DB_CONNECT_ERRORS as err:
        raise CommandFailed(EXIT_FAILURE, f"cannot reach the database ({describe(err)})") from None
    try:
        await schema.migrate(conn)
        yield conn
    except db.CONNECTION_ERRORS as err:
        raise CommandFailed(EXIT_FAILURE, f"lost the database ({describe(err)})") from None
    finally:
        await conn.close()


@contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """SIGINT/SIGTERM end the current task quietly; the list holds the signal received."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    received: list[int] = []

    def stop(signum: int) -> None:
        received.append(signum)
        if task is not None:
            task.cancel()

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or no signals here: Ctrl-C works as usual
    try:
        yield received
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def stamp(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned with two spaces between them; the last one is not padded."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) for c, w in zip(cells[:-1], widths[:-1], strict=True)]
        return "  ".join([*padded, cells[-1]]).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])
