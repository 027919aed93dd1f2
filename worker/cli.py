"""The `hub-worker` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import asyncpg
import structlog

from worker import __version__, cli_ops, db, logs
from worker.app import Worker, migrate
from worker.config import ConfigError, Settings
from worker.embedded import EmbeddedError, EmbeddedNats, EmbeddedPostgres, free_port

log = structlog.get_logger("worker.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Ports the embedded servers prefer, so that repeated runs keep their URLs.
EMBEDDED_NATS_PORT = 4222
EMBEDDED_POSTGRES_PORT = 5432

EPILOG = """\
examples:
  hub-worker run                      # embedded NATS and PostgreSQL under ./.hub
  HUB_NATS_URL=nats://nats:4222 HUB_DATABASE_URL=postgresql://hub@db/hub hub-worker run
  hub-worker migrate                  # apply pending migrations and exit
  hub-worker accounts add ops-alice   # an account that may resolve detections
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hub-worker",
        description="Coordination worker of the agent hub: spokes' session events on NATS "
        "become mappings and detections in PostgreSQL, and every change is published.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hub-worker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "run",
        help="apply migrations, ensure streams, process events until SIGINT/SIGTERM",
        description="Apply pending migrations, ensure the streams and consumers, and process "
        "events until SIGINT/SIGTERM. Without HUB_NATS_URL / HUB_DATABASE_URL, embedded "
        "servers are started under HUB_DATA_DIR and their URLs printed.",
    )
    commands.add_parser(
        "migrate",
        help="apply pending migrations and exit (safe to run from several replicas at once)",
    )
    accounts = commands.add_parser(
        "accounts",
        help="manage the accounts that resolve detections",
        description="Accounts are who resolves detections (detections.resolved_by).",
        epilog="examples:\n  hub-worker accounts add ops-alice --name 'Alice (on call)'\n"
        "  hub-worker accounts list",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    account_commands = accounts.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = account_commands.add_parser("add", help="create an account (or rename an existing one)")
    add.add_argument("id", metavar="ID", help="the account id, as given to `resolvedBy`")
    add.add_argument("--name", help="a display name")
    account_commands.add_parser("list", help="list the accounts")
    schemas_parser = commands.add_parser(
        "schemas",
        help="write or check the JSON Schemas and AsyncAPI document of the messages",
        description="The language-neutral message contract, generated from the pydantic models.",
        epilog="examples:\n  hub-worker schemas export            # into ./schemas\n"
        "  hub-worker schemas check schemas/     # exit 1 when they drifted from the models",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    schemas_parser.add_argument("action", choices=("export", "check"))
    schemas_parser.add_argument(
        "directory", nargs="?", default="schemas", help="default: ./schemas"
    )
    cli_ops.register(commands)
    args = parser.parse_args(argv)

    if args.command == "schemas":
        # Needs no settings and no servers.
        from worker import schemas

        return schemas.main([args.action, args.directory])

    try:
        settings = Settings.from_env()
    except ConfigError as err:
        print(f"hub-worker: configuration error: {err}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(settings.log_format, settings.log_level)

    if args.command in cli_ops.COMMANDS and args.command not in cli_ops.DATABASE_COMMANDS:
        # NATS-only commands talk to the configured NATS, or to the one
        # `hub-worker run` embeds on its preferred port; they start nothing.
        nats_urls = list(settings.nats_urls or [f"nats://127.0.0.1:{EMBEDDED_NATS_PORT}"])
        return _operate(args, settings, Endpoints(settings.database_url or "", nats_urls))
    try:
        with servers(settings, need_nats=args.command == "run") as endpoints:
            if args.command in cli_ops.COMMANDS:
                return _operate(args, settings, endpoints)
            if args.command == "migrate":
                return _migrate(settings, endpoints)
            if args.command == "accounts":
                return asyncio.run(_accounts(endpoints.database_url, args))
            return _run(settings, endpoints)
    except EmbeddedError as err:
        print(f"hub-worker: {err}", file=sys.stderr)
        return EXIT_FAILURE


@dataclass(frozen=True)
class Endpoints:
    database_url: str
    nats_urls: list[str]


@contextmanager
def servers(settings: Settings, need_nats: bool) -> Iterator[Endpoints]:
    """The configured servers, or embedded ones under HUB_DATA_DIR for what is not configured."""
    embedded_nats: EmbeddedNats | None = None
    embedded_pg: EmbeddedPostgres | None = None
    try:
        database_url = settings.database_url
        if database_url is None:
            embedded_pg = EmbeddedPostgres(
                settings.data_dir / "postgres", port=_port_or_free(EMBEDDED_POSTGRES_PORT)
            )
            database_url = embedded_pg.start()
            # `run` prints the URLs for people; other commands keep stdout for their output.
            notices = sys.stdout if need_nats else sys.stderr
            print(f"hub-worker: embedded PostgreSQL  {database_url}", file=notices, flush=True)
            print(f"            psql {database_url}", file=notices, flush=True)
        nats_urls = list(settings.nats_urls or [])
        if need_nats and not nats_urls:
            embedded_nats = EmbeddedNats(
                settings.data_dir / "nats", port=_port_or_free(EMBEDDED_NATS_PORT)
            )
            nats_urls = [embedded_nats.start()]
            print(f"hub-worker: embedded NATS        {nats_urls[0]}", flush=True)
            print(
                f"            spokes publish to {settings.subject_prefix}.spoke.<spokeId>."
                "session.<sessionId>.<event>",
                flush=True,
            )
        yield Endpoints(database_url, nats_urls)
    finally:
        if embedded_nats is not None:
            embedded_nats.stop()
        if embedded_pg is not None:
            embedded_pg.stop()


def _port_or_free(preferred: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


def _operate(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    try:
        return asyncio.run(cli_ops.dispatch(args, settings, endpoints))
    except KeyboardInterrupt:
        return EXIT_OK


def _migrate(settings: Settings, endpoints: Endpoints) -> int:
    try:
        asyncio.run(migrate(endpoints.database_url, runtime_role=settings.database_runtime_role))
    except (db.MigrationsPending, db.NoSuchRole, asyncpg.PostgresError) as err:
        print(f"hub-worker: migrate failed: {err}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


async def _accounts(database_url: str, args: argparse.Namespace) -> int:
    try:
        conn = await db.connect(database_url, application_name="hub-worker:accounts", bounded=False)
    except db.CONNECTION_ERRORS as err:
        print(f"hub-worker: cannot reach the database: {err}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        await db.migrate(conn)
        if args.action == "add":
            account, created = await db.upsert_account(conn, args.id, args.name)
            verb = "created" if created else "updated" if args.name else "exists:"
            name = f" ({account.name})" if account.name else ""
            print(f"{verb} account {account.id}{name}")
        else:
            for account in await db.list_accounts(conn):
                print(f"{account.id}\t{account.name or ''}\t{account.created_at.isoformat()}")
    except asyncpg.InsufficientPrivilegeError as err:
        # The runtime role may read accounts, not write them (sql/grants.sql).
        print(f"hub-worker: {err}: manage accounts with the owner role", file=sys.stderr)
        return EXIT_FAILURE
    except db.MigrationsPending as err:
        print(f"hub-worker: {err}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        await conn.close()
    return EXIT_OK


def _run(settings: Settings, endpoints: Endpoints) -> int:
    async def serve() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if stopping.is_set():
                # A second signal: the operator does not want to wait.
                log.warning("worker.killed", action="worker.stop", signal=signum)
                os._exit(128 + signum)
            log.info("worker.stopping", action="worker.stop", signal=signum)
            stopping.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        await Worker(settings, endpoints.database_url, endpoints.nats_urls).run(stopping)

    try:
        asyncio.run(serve())
    except Exception as err:
        log.error("worker.failed", action="worker.stop", error=f"{type(err).__name__}: {err}")
        return EXIT_FAILURE
    return EXIT_OK
