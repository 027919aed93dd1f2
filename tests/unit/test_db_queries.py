"""Named queries (worker/db.py) and migrations (worker/schema.py) on disk, without a database."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from worker import db, schema

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
        query = getattr(queries, name)
        assert isinstance(query, db.Query)
        assert query.name == name
        assert query.sql.strip()
        assert not query.sql.lstrip().startswith("--")


def test_no_query_file_uses_positional_parameters() -> None:
    """Parameters are named (`:name`) in sql/queries; `$n` exists only once loaded."""
    for path in sorted((db.sql_dir() / "queries").glob("*.sql")):
        lines = [
            f"{path.name}:{number}: {line}"
            for number, line in enumerate(path.read_text().splitlines(), 1)
            if re.search(r"\$[0-9]", line)
        ]
        assert lines == [], "use :name parameters"


def test_a_block_with_positional_parameters_fails_naming_it(queries_copy: Path) -> None:
    _drop_block(queries_copy, "beat")
    (queries_copy / "zz_extra.sql").write_text(
        "-- name: beat\nINSERT INTO worker_heartbeats (worker_id) VALUES ($1);\n"
    )
    with pytest.raises(RuntimeError, match=r"'beat' uses \$1"):
        db.Queries.load(queries_copy)


def test_named_parameters_become_positional_ones_in_order_of_first_use() -> None:
    query = db.Query.parse(
        "sample",
        "SELECT :b::int, 'a :quoted literal', E'it\\'s :escaped', \"col:x\", :a, :b\n"
        "  -- a comment with :commented\n"
        "  /* a block :comment */ , $$ a :dollar body $$, $fn$ x := :y $fn$, :a::text[], f(v := 1)",
    )
    assert query.params == ("b", "a")
    assert query.sql == (
        "SELECT $1::int, 'a :quoted literal', E'it\\'s :escaped', \"col:x\", $2, $1\n"
        "  -- a comment with :commented\n"
        "  /* a block :comment */ , $$ a :dollar body $$, $fn$ x := :y $fn$, $2::text[], f(v := 1)"
    )
    assert db.Query.parse("bare", "SELECT now()").params == ()


def test_a_call_with_a_missing_or_unknown_parameter_fails_naming_it() -> None:
    query = db.queries().end_silent_worker
    assert query.bind(silent_seconds=30, worker_id="ab") == (query.sql, "ab", 30)
    with pytest.raises(db.QueryArguments, match=r"end_silent_worker.*missing \['silent_seconds'\]"):
        query.args(worker_id="ab")
    with pytest.raises(db.QueryArguments, match=r"unknown \['silence'\]"):
        query.args(worker_id="ab", silent_seconds=30, silence=30)


UNNEST = re.compile(r"unnest\(([^()]*)\)\s*(?:WITH ORDINALITY\s+)?AS\s+\w+\s*\(([^()]*)\)", re.I)


def test_each_unnest_parameter_is_named_after_the_column_it_becomes() -> None:
    """`unnest(:id::text[], :status::text[]) AS s (id, status)`: a column's values are
    passed by the column's name (after one prefix for all, `:s_id`, where a statement
    writes several tables), so no list of columns depends on an order."""
    checked = 0
    for path in sorted((db.sql_dir() / "queries").glob("*.sql")):
        for match in UNNEST.finditer(path.read_text()):
            arguments = [a.strip() for a in match.group(1).split(",")]
            columns = [c.strip() for c in match.group(2).split(",")]
            params = [re.fullmatch(r":([a-z_][a-z0-9_]*)::[a-z]+\[\]", a) for a in arguments]
            assert all(params), f"{path.name}: unnest({match.group(1)}) takes other than :name"
            names = [p.group(1) for p in params if p]
            prefix = names[0][:2] if re.fullmatch(r"[a-z]_", names[0][:2]) else ""
            if prefix and not all(n.startswith(prefix) for n in names):
                prefix = ""
            unprefixed = [n.removeprefix(prefix) for n in names]
            assert unprefixed == columns[: len(params)], path.name
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize(
    ("name", "columns", "prefix"),
    [
        ("write_batch", db._SESSION_COLUMNS, "s_"),
        ("write_batch", db._MAPPING_COLUMNS, "m_"),
        ("write_batch", db._CHANGED_DETECTION_COLUMNS, "d_"),
        ("write_batch", db._OUTBOX_COLUMNS, "o_"),
        ("enqueue_outbox", db._OUTBOX_COLUMNS, ""),
        ("write_batch", db._NEW_DETECTION_COLUMNS, "n_"),
    ],
    ids=["sessions", "mappings", "changed-detections", "outbox", "enqueue", "new-detections"],
)
def test_the_batch_writes_columns_are_their_querys_parameters(
    name: str, columns: tuple[str, ...], prefix: str
) -> None:
    params = getattr(db.queries(), name).params
    prefixed = sorted(p.removeprefix(prefix) for p in params if p.startswith(prefix))
    assert prefixed == sorted(columns) if prefix else sorted(params) == sorted(columns)


def test_an_unchanged_copy_loads(queries_copy: Path) -> None:
    loaded = db.Queries.load(queries_copy)
    assert loaded.write_batch == db.queries().write_batch


@pytest.mark.parametrize("name", ["write_batch", "purge_ledger", "record_migration"])
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
    (queries_copy / "zz_extra.sql").write_text("-- name: batch_start\nSELECT 1;\n")
    with pytest.raises(RuntimeError, match="'batch_start' is defined twice"):
        db.Queries.load(queries_copy)


def test_migrations_are_found_in_order_starting_with_0001() -> None:
    migrations = schema.migration_files()
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
        for _, path in schema.migration_files()
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
