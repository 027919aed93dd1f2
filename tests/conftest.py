"""Real servers for the tests: a nats-server with JetStream and a PostgreSQL.

By default both are embedded (started here from the PyPI packages); set
HUB_TEST_NATS_URL and/or HUB_TEST_DATABASE_URL to use external ones (the
database role needs CREATEDB). Each test gets its own database, copied from
a migrated template, and its own subject prefix, so tests never see each
other's rows, streams or consumers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from uuid import uuid4

import asyncpg
import pytest

from tests.support import Hub, open_hub, with_database
from worker import db, schema
from worker.config import DEFAULT_BATCH_MAX, Settings
from worker.embedded import EmbeddedNats, EmbeddedPostgres

# Durability is not under test here; speed is welcome.
FAST_POSTGRES = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "400",
}
TEMPLATE_DATABASE = f"hub_template_{os.getpid()}"


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    external = os.environ.get("HUB_TEST_DATABASE_URL")
    if external:
        yield external
        return
    # Not under pytest's basetemp: pytest makes that private to root again at
    # every start (and prunes old ones), while the server runs as another user.
    data_dir = Path(tempfile.mkdtemp(prefix="hub-worker-test-postgres-"))
    server = EmbeddedPostgres(data_dir, options=FAST_POSTGRES)
    server.start()
    try:
        yield server.dsn()
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("HUB_TEST_NATS_URL")
    if external:
        yield external
        return
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
async def template_database(postgres_admin_url: str) -> AsyncIterator[str]:
    """A database with every migration applied, copied for each test."""
    admin = await asyncpg.connect(postgres_admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DATABASE}"')
        await admin.execute(f'CREATE DATABASE "{TEMPLATE_DATABASE}"')
        conn = await db.connect(with_database(postgres_admin_url, TEMPLATE_DATABASE))
        try:
            await schema.migrate(conn)
        finally:
            await conn.close()
        yield TEMPLATE_DATABASE
        await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DATABASE}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def database_url(postgres_admin_url: str, template_database: str) -> AsyncIterator[str]:
    name = f"hub_test_{uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
        yield with_database(postgres_admin_url, name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def settings() -> Settings:
    """Settings of one test's hub; tests may replace fields with dataclasses.replace."""
    return Settings(
        subject_prefix=f"t{uuid4().hex[:10]}",
        http_addr="",
        log_format="json",
        partitions=4,
        stall_after_seconds=600,
        sweep_interval_seconds=30,
        # HUB_TEST_BATCH_MAX=1 runs the suite in the per-message mode.
        batch_max=int(os.environ.get("HUB_TEST_BATCH_MAX", str(DEFAULT_BATCH_MAX))),
    )


@pytest.fixture
async def hub(
    settings: Settings, database_url: str, nats_url: str, tmp_path: Path
) -> AsyncIterator[Hub]:
    async with open_hub(settings, database_url, nats_url, tmp_path) as the_hub:
        yield the_hub


def pytest_report_header() -> list[str]:
    where = {
        "nats": os.environ.get("HUB_TEST_NATS_URL", "embedded"),
        "postgres": "external" if os.environ.get("HUB_TEST_DATABASE_URL") else "embedded",
    }
    return [f"hub-worker servers: {json.dumps(where)}"]


_SUMMARIES: list[str] = []


@pytest.fixture
def summary() -> Callable[[str], None]:
    """A line for the end of the test run: what a chaos or fault test injected and compared."""
    return _SUMMARIES.append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _SUMMARIES:
        terminalreporter.section("faults injected and results compared")
        for line in _SUMMARIES:
            terminalreporter.write_line(line)
