"""Named queries and migrations on disk (worker/db.py), without a database."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from worker import db

QUERY_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


@pytest.fixture
def queries_copy(tmp_path: Path) -> Path:
    target = tmp_path / "queries"
    shutil.copytree(db.sql_dir() / "queries", target)
    return target


def _names_on_disk(directory: Path) -> list[str]:
    return [
        m.group(1)
        for p in sorted(directory.glob("*.sql"))
        for m in QUERY_NAME.finditer(p.read_text())
    ]


def _drop_block(directory: Path, name: str) -> None:
    for path in directory.glob("*.sql"):
        text = path.read_text()
        pattern = re.compile(rf"^--\s*name:\s*{name}\s*\n.*?(?=^--\s*name:|\Z)", re.M | re.S)
        new, count = pattern.subn("", text)
        if count:
            path.write_text(new)
            return
    raise AssertionError(f"no block {name} to drop")


def test_real_queries_load_with_every_block_non_empty() -> None:
    queries = db.queries()
    names = _names_on_disk(db.sql_dir() / "queries")
    assert names, "sql/queries defines no named query"
    for name in names:
        body = getattr(queries, name)
        assert isinstance(body, str)
        assert body.strip()
        assert not body.lstrip().startswith("--")


def test_an_unchanged_copy_loads(queries_copy: Path) -> None:
    loaded = db.Queries.load(queries_copy)
    assert loaded.record_events == db.queries().record_events


@pytest.mark.parametrize("name", ["record_events", "purge_ledger", "record_migration"])
def test_missing_block_fails_naming_it(queries_copy: Path, name: str) -> None:
    _drop_block(queries_copy, name)
    assert name not in _names_on_disk(queries_copy)
    with pytest.raises(RuntimeError, match=name):
        db.Queries.load(queries_copy)


def test_unknown_extra_block_fails_naming_it(queries_copy: Path) -> None:
    (queries_copy / "zz_extra.sql").write_text("-- name: surplus_query\nSELECT 1;\n")
    with pytest.raises(RuntimeError, match="surplus_query"):
        db.Queries.load(queries_copy)


def test_duplicate_block_fails_naming_it(queries_copy: Path) -> None:
    (queries_copy / "zz_extra.sql").write_text("-- name: ensure_spoke\nSELECT 1;\n")
    with pytest.raises(RuntimeError, match="ensure_spoke"):
        db.Queries.load(queries_copy)


def test_migrations_are_found_in_order_starting_with_0001() -> None:
    migrations = db.migration_files()
    assert migrations, "no migrations found"
    versions = [version for version, _ in migrations]
    assert versions[0] == "0001"
    assert migrations[0][1].name.startswith("0001_")
    assert versions == sorted(versions)
    assert len(set(versions)) == len(versions)
    for version, path in migrations:
        assert path.is_file()
        assert path.suffix == ".sql"
        assert path.name.startswith(f"{version}_")


def test_every_table_has_its_runtime_grant_decided() -> None:
    """A new table needs a line in sql/grants.sql, or the runtime role cannot touch it
    (and the worker waits on the missing grant instead of working)."""
    created = {
        m.group(1)
        for _, path in db.migration_files()
        for m in re.finditer(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)", path.read_text())
    }
    grants = (db.sql_dir() / "grants.sql").read_text()
    granted = {
        table.strip()
        for m in re.finditer(r"^GRANT [A-Z, ]+ ON (?!SCHEMA)([\w, ]+) TO", grants, re.MULTILINE)
        for table in m.group(1).split(",")
    }
    assert created
    assert created | {"schema_migrations"} == granted
