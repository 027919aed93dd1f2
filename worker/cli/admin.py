"""`hub-worker migrate` and `hub-worker accounts`: the owner role's commands."""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg

from worker import db, schema
from worker.app import migrate
from worker.cli.common import EXIT_FAILURE, EXIT_OK, Endpoints, redact
from worker.config import Settings

# How long `migrate` waits for an unreachable database before giving up, seconds.
MIGRATE_GIVE_UP_SECONDS = 60.0


def migrate_command(settings: Settings, endpoints: Endpoints) -> int:
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
            f"{redact(endpoints.database_url)} within {MIGRATE_GIVE_UP_SECONDS:g} s "
            "(check HUB_DATABASE_URL)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except (schema.MigrationsPending, schema.NoSuchRole, asyncpg.PostgresError) as err:
        print(f"hub-worker: migrate failed: {err}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


async def accounts_command(database_url: str, args: argparse.Namespace) -> int:
    try:
        conn = await db.connect(database_url, application_name="hub-worker:accounts", bounded=False)
    except db.CONNECTION_ERRORS as err:
        print(f"hub-worker: cannot reach the database: {err}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        await schema.migrate(conn)
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
    except schema.MigrationsPending as err:
        print(f"hub-worker: {err}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        await conn.close()
    return EXIT_OK
