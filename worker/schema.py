"""The database's schema: migrations and the runtime role's grants.

What the owner role runs (`hub-worker migrate`, and `run` and `accounts` before their
work); the queries of a running worker are in `worker.db`.
"""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg

from worker import db

_MIGRATION_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Advisory lock (two-int form) serialising `hub-worker migrate` across replicas.
_MIGRATION_LOCK = {"namespace": 0x68756200, "key": 1}  # "hub\0", 1


def migration_files() -> list[tuple[str, Path]]:
    found = []
    for path in sorted((db.sql_dir() / "migrations").glob("*.sql")):
        match = _MIGRATION_RE.match(path.name)
        if match is None:
            raise RuntimeError(f"migration file {path.name} is not named NNNN_what.sql")
        found.append((match.group(1), path))
    return found


class MigrationsPending(Exception):
    """Migrations are pending and this role may not apply them (the runtime role)."""


class NoSuchRole(Exception):
    """HUB_DATABASE_RUNTIME_ROLE names a role the cluster does not have."""


async def migrate(conn: db.Connection) -> list[str]:
    """Apply pending migrations in order, one transaction each; returns those applied.

    The advisory lock makes concurrent `hub-worker migrate` runs wait for each
    other instead of racing to create the same tables. With nothing pending it
    changes nothing, so a role with only the runtime grants passes through;
    with something pending such a role gets MigrationsPending.
    """
    q = db.queries()
    files = migration_files()
    applied: set[str] = set()
    if await conn.fetchval(*q.migrations_table_exists.bind()):
        applied = {r["version"] for r in await conn.fetch(*q.applied_migrations.bind())}
        if all(version in applied for version, _ in files):
            return []
    await conn.execute(*q.lock_migrations.bind(**_MIGRATION_LOCK))
    try:
        await conn.execute(*q.create_migrations_table.bind())
        applied = {r["version"] for r in await conn.fetch(*q.applied_migrations.bind())}
        done = []
        for version, path in files:
            if version in applied:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text(encoding="utf-8"))
                await conn.execute(*q.record_migration.bind(version=version, name=path.name))
            done.append(path.name)
        return done
    except asyncpg.InsufficientPrivilegeError as err:
        pending = len(files) - len(applied)
        raise MigrationsPending(
            f"{pending} migration(s) pending and this role may not apply them ({err}): "
            "run `hub-worker migrate` with the owner role"
        ) from None
    finally:
        await conn.execute(*q.unlock_migrations.bind(**_MIGRATION_LOCK))


async def grant_runtime(conn: db.Connection, role: str) -> None:
    """Give `role` the rights of `hub-worker run` (sql/grants.sql), in one transaction."""
    q = db.queries()
    if not await conn.fetchval(*q.role_exists.bind(role=role)):
        raise NoSuchRole(
            f"HUB_DATABASE_RUNTIME_ROLE: no role {role!r}: create it first "
            "(CREATE ROLE … LOGIN PASSWORD …)"
        )
    # The file is written for psql (`-v runtime_role=…`); the same substitution here.
    quoted = await conn.fetchval(*q.quote_ident.bind(identifier=role))
    script = (db.sql_dir() / "grants.sql").read_text(encoding="utf-8")
    async with conn.transaction():
        await conn.execute(script.replace(':"runtime_role"', quoted))
