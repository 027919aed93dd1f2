"""The `hub-worker` command line: its parser, and which servers a command talks to."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from worker import __version__, logs
from worker.cli import admin, ops, run
from worker.cli.common import EXIT_OK, EXIT_USAGE, Endpoints, load_settings
from worker.cli.running import running_hub
from worker.config import Settings

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
        "servers are started under HUB_DATA_DIR and their URLs printed; the other commands "
        "then find them there. One such run per HUB_DATA_DIR.",
        epilog=run.RUN_EPILOG,
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
    ops.register(commands)
    args = parser.parse_args(argv)

    if args.command == "schemas":
        # Needs no settings and no servers.
        from worker.cli import schemas

        return schemas.main([args.action, args.directory])

    settings = load_settings()
    if settings is None:
        return EXIT_USAGE
    logs.configure(settings.log_format, settings.log_level)

    if args.command == "run":
        return run.run_command(settings)
    endpoints = _find_hub(args, settings)
    if endpoints is None:
        return EXIT_USAGE
    if args.command in ops.COMMANDS:
        return _operate(args, settings, endpoints)
    if args.command == "migrate":
        return admin.migrate_command(settings, endpoints)
    return asyncio.run(admin.accounts_command(endpoints.database_url, args))


def _find_hub(args: argparse.Namespace, settings: Settings) -> Endpoints | None:
    """The configured servers; for what is not configured, those of the `hub-worker run`
    running on HUB_DATA_DIR. None (after saying so) when that is needed and none runs."""
    command = str(args.command)
    needs_nats = command in ops.COMMANDS and (
        command not in ops.DATABASE_COMMANDS or getattr(args, "action", None) == "replay"
    )
    needs_database = command not in ops.COMMANDS or command in ops.DATABASE_COMMANDS
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
    hub = running_hub(data_dir)
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


def _operate(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    try:
        return asyncio.run(ops.dispatch(args, settings, endpoints))
    except KeyboardInterrupt:
        return EXIT_OK
