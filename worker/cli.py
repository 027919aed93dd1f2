"""The `hub-worker` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog

from worker import __version__, cli_ops, db, logs, running
from worker.app import Worker, migrate
from worker.config import ConfigError, Settings
from worker.embedded import EmbeddedError, EmbeddedNats, EmbeddedPostgres, preferred_port

log = structlog.get_logger("worker.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Ports the embedded servers prefer, so that repeated runs keep their URLs.
EMBEDDED_NATS_PORT = 4222
EMBEDDED_POSTGRES_PORT = 5432
# How long `migrate` waits for an unreachable database before giving up, seconds.
MIGRATE_GIVE_UP_SECONDS = 60.0

EPILOG = """\
examples:
  hub-worker run                      # embedded NATS and PostgreSQL under ./.hub
  HUB_NATS_URL=nats://nats:4222 HUB_DATABASE_URL=postgresql://hub@db/hub hub-worker run
  hub-worker migrate                  # apply pending migrations and exit
  hub-worker accounts add ops-alice   # an account that may resolve detections
"""


RUN_EPILOG = """\
environment (README.md has the full table, credentials and TLS included):
  HUB_NATS_URL                NATS URL(s), comma-separated; unset: an embedded NATS
  HUB_DATABASE_URL            PostgreSQL DSN; unset: an embedded PostgreSQL
  HUB_DATA_DIR                where embedded servers keep their data (default .hub)
  HUB_SUBJECT_PREFIX          first token of every subject, and of the streams (hub)
  HUB_HTTP_ADDR               /metrics, /healthz, /readyz; empty disables (127.0.0.1:9464)
  HUB_LOG_FORMAT              json or console (console on a terminal)
  HUB_LOG_LEVEL               debug, info, warning or error (info)
  HUB_PARTITIONS              ordered lanes of a new inbound stream (8)
  HUB_STREAM_REPLICAS         replicas of the streams the worker creates (1)
  HUB_STREAM_MAX_AGE_SECONDS  how long the streams and the ledger keep events (604800)
  HUB_STALL_AFTER_SECONDS     a session silent this long is stalled (600)
  HUB_SWEEP_INTERVAL_SECONDS  how often the stall sweep runs (30)
  HUB_BATCH_MAX               most events per transaction; 1 is per-message (200)
  HUB_SHUTDOWN_GRACE_SECONDS  how long a stop may take (20)
  HUB_DATABASE_RUNTIME_ROLE   (migrate) the role granted the rights of run

examples:
  hub-worker run
  HUB_DATA_DIR=/srv/hub hub-worker run    # then: HUB_DATA_DIR=/srv/hub hub-worker alerts
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
        "servers are started under HUB_DATA_DIR and their URLs printed; the other commands "
        "then find them there. One such run per HUB_DATA_DIR.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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

    if args.command == "run":
        return _run_command(settings)
    endpoints = _find_hub(args, settings)
    if endpoints is None:
        return EXIT_USAGE
    if args.command in cli_ops.COMMANDS:
        return _operate(args, settings, endpoints)
    if args.command == "migrate":
        return _migrate(settings, endpoints)
    return asyncio.run(_accounts(endpoints.database_url, args))


@dataclass(frozen=True)
class Endpoints:
    database_url: str
    nats_urls: list[str]


def _find_hub(args: argparse.Namespace, settings: Settings) -> Endpoints | None:
    """The configured servers; for what is not configured, those of the `hub-worker run`
    running on HUB_DATA_DIR. None (after saying so) when that is needed and none runs."""
    command = str(args.command)
    needs_nats = command in cli_ops.COMMANDS and (
        command not in cli_ops.DATABASE_COMMANDS or getattr(args, "action", None) == "replay"
    )
    needs_database = command not in cli_ops.COMMANDS or command in cli_ops.DATABASE_COMMANDS
    database_url = settings.database_url or ""
    nats_urls = list(settings.nats_urls or [])
    missing = [
        variable
        for variable, needed, have in (
            ("HUB_DATABASE_URL", needs_database, bool(database_url)),
            ("HUB_NATS_URL", needs_nats, bool(nats_urls)),
        )
        if needed and not have
    ]
    if not missing:
        return Endpoints(database_url, nats_urls)
    data_dir = settings.data_dir.resolve()
    hub = running.running_hub(data_dir)
    if needs_database and not database_url and hub is not None:
        database_url = hub.database_url or ""
    if needs_nats and not nats_urls and hub is not None and hub.nats_url:
        nats_urls = [hub.nats_url]
    if (needs_database and not database_url) or (needs_nats and not nats_urls):
        print(
            f"hub-worker {command}: no hub is running on {data_dir}: start one there with "
            "`hub-worker run`, point HUB_DATA_DIR at the folder one runs on, or set "
            f"{' and '.join(missing)}",
            file=sys.stderr,
        )
        return None
    return Endpoints(database_url, nats_urls)


def _run_command(settings: Settings) -> int:
    """`run`: embedded servers for what is not configured, under a lock on HUB_DATA_DIR."""
    if settings.database_url is not None and settings.nats_urls:
        return _run(settings, Endpoints(settings.database_url, list(settings.nats_urls)))
    data_dir = settings.data_dir.resolve()
    lock = running.RunLock(data_dir)
    try:
        lock.acquire()
    except running.AlreadyRunning as err:
        print(f"hub-worker run: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with servers(settings, data_dir) as endpoints:
            return _run(settings, endpoints)
    except EmbeddedError as err:
        print(f"hub-worker: {err}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        lock.release()


@contextmanager
def servers(settings: Settings, data_dir: Path) -> Iterator[Endpoints]:
    """The configured servers, or embedded ones under `data_dir` for what is not configured,
    recorded in its `hub.json` while they run (the caller holds its lock)."""
    previous = running.read_state(data_dir)
    running.stop_leftover_nats(previous, data_dir / "nats")
    state = running.HubState(pid=os.getpid())
    embedded_nats: EmbeddedNats | None = None
    embedded_pg: EmbeddedPostgres | None = None
    try:
        database_url = settings.database_url
        if database_url is None:
            embedded_pg = EmbeddedPostgres(
                data_dir / "postgres",
                port=preferred_port(previous.postgres_port, EMBEDDED_POSTGRES_PORT),
            )
            database_url = embedded_pg.start()
            state.database_url, state.postgres_port = database_url, embedded_pg.port
            state.postgres_data_dir = str(embedded_pg.data_dir)
            print(f"hub-worker: embedded PostgreSQL  {database_url}", flush=True)
            print(f"            psql {database_url}", flush=True)
        nats_urls = list(settings.nats_urls or [])
        if not nats_urls:
            embedded_nats = EmbeddedNats(
                data_dir / "nats", port=preferred_port(previous.nats_port, EMBEDDED_NATS_PORT)
            )
            nats_urls = [embedded_nats.start()]
            state.nats_url, state.nats_port = nats_urls[0], embedded_nats.port
            state.nats_pid = embedded_nats.process.pid if embedded_nats.process else None
            print(f"hub-worker: embedded NATS        {nats_urls[0]}", flush=True)
            print(
                f"            spokes publish to {settings.subject_prefix}.spoke.<spokeId>."
                "session.<sessionId>.<event>",
                flush=True,
            )
        running.write_state(data_dir, state)
        yield Endpoints(database_url, nats_urls)
    finally:
        if embedded_nats is not None:
            embedded_nats.stop()
        if embedded_pg is not None:
            embedded_pg.stop()
        # Not running any more; the ports stay, for the next `run` to prefer.
        state.pid = state.nats_pid = None
        with contextlib.suppress(OSError):
            running.write_state(data_dir, state)


def _operate(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    try:
        return asyncio.run(cli_ops.dispatch(args, settings, endpoints))
    except KeyboardInterrupt:
        return EXIT_OK


def _migrate(settings: Settings, endpoints: Endpoints) -> int:
    async def apply() -> None:
        # "Apply and exit": an unreachable database (a mistyped URL, a server that never
        # comes) is waited for a while, as at a compose start, then given up on.
        async with asyncio.timeout(MIGRATE_GIVE_UP_SECONDS):
            await migrate(endpoints.database_url, runtime_role=settings.database_runtime_role)

    try:
        asyncio.run(apply())
    except TimeoutError:
        print(
            f"hub-worker: migrate failed: no database answered at "
            f"{cli_ops.redact(endpoints.database_url)} within {MIGRATE_GIVE_UP_SECONDS:g} s "
            "(check HUB_DATABASE_URL)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
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
