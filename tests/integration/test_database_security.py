"""PostgreSQL least privilege, passwords and TLS, against a server that enforces them.

The server of this module accepts its application roles only with a SCRAM
password (pg_hba.conf below), unlike the trusting one the rest of the suite
uses, so a test here passes only if the worker really sends the password from
its file. The owner role applies the migrations and grants sql/grants.sql to
the runtime role; the worker then runs as the runtime role, which may read and
write rows and nothing else.

TLS: the embedded PostgreSQL is built without OpenSSL, so the tests reach it
through `TlsTerminator`, which speaks PostgreSQL's own TLS negotiation
(SSLRequest, then a handshake with a certificate from a throwaway CA) and
refuses clients that do not ask for TLS, as a `hostssl`-only server does.
What is under test is the client side: that the DSN's `sslmode` and
`sslrootcert` reach every connection the worker opens, and that
`verify-full` refuses a server whose certificate another CA signed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import ssl
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from uuid import uuid4

import asyncpg
import pytest
import trustme

from tests.support import open_hub, start_hub_worker
from worker import app, db, schema
from worker.config import Settings, with_password
from worker.embedded import EmbeddedPostgres, free_port, postgres_bin_dir

pytestmark = pytest.mark.integration

# Application roles need a SCRAM password; the superuser the fixtures use stays
# trusted on loopback.
PG_HBA = """\
host  all  postgres  127.0.0.1/32  trust
host  all  all       127.0.0.1/32  scram-sha-256
"""

ROOT = Path(__file__).resolve().parents[2]

# The first message of a client that wants TLS (PostgreSQL protocol, "SSLRequest").
SSL_REQUEST_CODE = 80877103


@dataclass
class TlsTerminator:
    """TLS in front of a PostgreSQL server without it: the server's side of sslmode."""

    upstream_port: int
    ca_file: Path
    context: ssl.SSLContext
    port: int = 0
    tls_sessions: int = 0
    refused_plaintext: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            length, code = struct.unpack("!ii", await reader.readexactly(8))
            if length != 8 or code != SSL_REQUEST_CODE:
                self.refused_plaintext += 1
                writer.write(error_response("28000", "this server accepts TLS connections only"))
                await writer.drain()
                return
            writer.write(b"S")
            await writer.drain()
            await writer.start_tls(self.context)
            self.tls_sessions += 1
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # a client that gave up, or refused our certificate
        finally:
            writer.close()

    def track(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self.handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(OSError, ssl.SSLError):
            writer.close()


def error_response(code: str, message: str) -> bytes:
    fields = b"".join(
        kind + value.encode() + b"\0"
        for kind, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", code), (b"M", message))
    )
    body = fields + b"\0"
    return b"E" + struct.pack("!i", len(body) + 4) + body


@dataclass(frozen=True)
class SecuredPostgres:
    admin_dsn: str
    port: int


@dataclass(frozen=True)
class Hub:
    """One database owned by `owner`, and a runtime role, each with a password file."""

    server: SecuredPostgres
    tls: TlsTerminator
    database: str
    owner: str
    runtime: str
    passwords: dict[str, str]
    password_files: dict[str, Path]

    def dsn(self, role: str, sslmode: str = "verify-full") -> str:
        """A DSN without the password: it comes from HUB_DATABASE_PASSWORD_FILE."""
        return (
            f"postgresql://{role}@127.0.0.1:{self.tls.port}/{self.database}"
            f"?sslmode={sslmode}&sslrootcert={self.tls.ca_file}"
        )

    def env(self, role: str) -> dict[str, str]:
        return {
            "HUB_DATABASE_URL": self.dsn(role),
            "HUB_DATABASE_PASSWORD_FILE": str(self.password_files[role]),
        }

    def admin_dsn(self) -> str:
        return self.server.admin_dsn.rsplit("/", 1)[0] + f"/{self.database}"


@pytest.fixture(scope="module")
def secured_postgres() -> Iterator[SecuredPostgres]:
    data_dir = Path(tempfile.mkdtemp(prefix="hub-worker-test-pg-scram-"))
    server = EmbeddedPostgres(data_dir, options={"fsync": "off"})
    server.start()
    try:
        (data_dir / "pg_hba.conf").write_text(PG_HBA)
        if server.run_as is not None:
            shutil.chown(data_dir / "pg_hba.conf", server.run_as, server.run_as)

        async def reload() -> None:
            admin = await asyncpg.connect(server.dsn())
            try:
                await admin.execute("SELECT pg_reload_conf()")
            finally:
                await admin.close()

        asyncio.run(reload())
        yield SecuredPostgres(server.dsn(), server.port)
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
async def tls_terminator(
    secured_postgres: SecuredPostgres, tmp_path: Path
) -> AsyncIterator[TlsTerminator]:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    terminator = TlsTerminator(secured_postgres.port, ca_file, context)
    server = await asyncio.start_server(terminator.track, "127.0.0.1", 0)
    terminator.port = server.sockets[0].getsockname()[1]
    try:
        yield terminator
    finally:
        server.close()
        for task in list(terminator._tasks):
            task.cancel()
        await asyncio.gather(*terminator._tasks, return_exceptions=True)


@pytest.fixture
async def secured_hub(
    secured_postgres: SecuredPostgres, tls_terminator: TlsTerminator, tmp_path: Path
) -> AsyncIterator[Hub]:
    tag = uuid4().hex[:10]
    owner, runtime, database = f"hub_owner_{tag}", f"hub_runtime_{tag}", f"hub_{tag}"
    passwords = {owner: f"owner-{uuid4().hex}", runtime: f"runtime-{uuid4().hex}"}
    files = {}
    for role, password in passwords.items():
        files[role] = tmp_path / f"{role}.password"
        files[role].write_text(password + "\n")  # as `echo` writes it
    admin = await asyncpg.connect(secured_postgres.admin_dsn)
    try:
        for role, password in passwords.items():
            # Passwords cannot be query parameters; these are hex and ours.
            await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        await admin.execute(f"CREATE DATABASE {database} OWNER {owner}")
        yield Hub(secured_postgres, tls_terminator, database, owner, runtime, passwords, files)
        await admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        for role in passwords:
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
    finally:
        await admin.close()


def runtime_settings(hub: Hub, settings: Settings) -> Settings:
    """The test's settings, with the database part read from the environment as in production."""
    from_env = Settings.from_env(hub.env(hub.runtime))
    return dataclasses.replace(settings, database_url=from_env.database_url)


async def run_cli(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    process = await start_hub_worker(*args, env=env, cwd=cwd)
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_the_runtime_role_waits_while_the_owner_is_half_way_through_migrating(
    secured_hub: Hub, settings: Settings
) -> None:
    """The owner creates schema_migrations first and grants the runtime role only after
    the last migration: a runtime role polling in between could not read the table, and
    `run` failed instead of waiting (seen once in the per-message suite)."""
    hub = secured_hub
    settings = runtime_settings(hub, settings)
    assert settings.database_url is not None
    owner = await db.connect(with_password(hub.dsn(hub.owner), hub.passwords[hub.owner]))
    try:
        await owner.execute(*db.queries().create_migrations_table.bind())
        stopping = asyncio.Event()
        waiting = asyncio.create_task(app.migrate(settings.database_url, stopping))
        await asyncio.sleep(1.5)
        assert not waiting.done(), waiting.exception()
        await schema.migrate(owner)
        await schema.grant_runtime(owner, hub.runtime)
        assert await asyncio.wait_for(waiting, timeout=30) == []
    finally:
        await owner.close()


async def test_worker_runs_as_the_runtime_role_over_tls_with_dml_only(
    secured_hub: Hub, settings: Settings, nats_url: str, tmp_path: Path
) -> None:
    hub = secured_hub
    settings = dataclasses.replace(
        runtime_settings(hub, settings), stall_after_seconds=2, sweep_interval_seconds=1
    )
    assert settings.database_url is not None

    # `run` as the runtime role before the owner migrated: it waits, it does not fail.
    stopping = asyncio.Event()
    waiting = asyncio.create_task(app.migrate(settings.database_url, stopping))
    await asyncio.sleep(2)
    assert not waiting.done()

    code, output = await run_cli(
        "migrate", env=hub.env(hub.owner) | {"HUB_DATABASE_RUNTIME_ROLE": hub.runtime}, cwd=tmp_path
    )
    assert code == 0, output
    assert await asyncio.wait_for(waiting, timeout=30) == []
    for password in hub.passwords.values():
        assert password not in output

    owner = await db.connect(with_password(hub.dsn(hub.owner), hub.passwords[hub.owner]))
    try:
        await owner.execute("INSERT INTO accounts (id) VALUES ('ops')")
    finally:
        await owner.close()

    async with open_hub(settings, settings.database_url, nats_url, tmp_path) as h:
        await h.start_worker()
        await h.send("sp1", "s1", "spawned", task="t1")
        await h.send("sp1", "s1", "signal.high_error_count", severity="medium")
        await h.send("sp1", "s1", "signal.high_error_count", severity="high")
        await h.send("sp1", "s2", "spawned", task="t2")
        await h.send("sp1", "s2", "completed")
        await h.publish_raw(f"{h.prefix}.spoke.sp1.session.s3.heartbeat", b"{not json")
        await h.settle()

        detection = await h.value(
            "SELECT id FROM detections WHERE anomaly_type = 'HIGH_ERROR_COUNT'"
        )
        reply = await h.nc.request(
            f"{h.prefix}.cmd.detection.resolve",
            (
                f'{{"detectionId": "{detection}", "resolvedBy": "ops", "resolution": "fixed"}}'
            ).encode(),
            timeout=10,
        )
        assert b'"ok":true' in reply.data.replace(b" ", b""), reply.data

        # s1 goes silent: the sweep (a schedules claim and an insert) opens a stall.
        async def stalled() -> bool:
            kinds = await h.rows("SELECT anomaly_type FROM detections WHERE resolved_at IS NULL")
            return {"anomaly_type": "SESSION_STALL"} in kinds

        deadline = asyncio.get_running_loop().time() + 30
        while not await stalled():
            assert asyncio.get_running_loop().time() < deadline, "no stall opened"
            await asyncio.sleep(0.5)
        await h.settle()

        assert await h.rows("SELECT session_id, status FROM mappings ORDER BY session_id") == [
            {"session_id": "s1", "status": "active"},
            {"session_id": "s2", "status": "completed"},
        ]
        assert await h.value("SELECT count(*) FROM dead_letters") == 1
        outbound = {o.subject.split(".")[1] for o in await h.outbound()}
        assert {"detection", "mapping", "deadletter"} <= outbound
        # The ledger purge of the janitor: a DELETE the runtime role may do.
        await db.purge_ledger(h.db, 0, 1000)
        await h.stop_workers()

    # The worker's only way to the database is through TLS: every connection
    # it opened (lanes, leaders, the command pool) was one of these.
    assert hub.tls.tls_sessions >= settings.partitions
    assert hub.tls.refused_plaintext == 0


FORBIDDEN = [
    "CREATE TABLE intruder (id int)",
    "DROP TABLE detections",
    "ALTER TABLE sessions ADD COLUMN intruder int",
    "TRUNCATE outbox",
    "DELETE FROM detections",
    "DELETE FROM sessions",
    "UPDATE schema_migrations SET name = 'x'",
    "INSERT INTO accounts (id) VALUES ('intruder')",
    "UPDATE dead_letters SET reason = 'x'",
    "CREATE FUNCTION intruder() RETURNS int LANGUAGE sql AS 'SELECT 1'",
]


async def test_runtime_role_may_not_change_the_schema_or_delete_coordination_rows(
    secured_hub: Hub, tmp_path: Path
) -> None:
    hub = secured_hub
    code, output = await run_cli(
        "migrate", env=hub.env(hub.owner) | {"HUB_DATABASE_RUNTIME_ROLE": hub.runtime}, cwd=tmp_path
    )
    assert code == 0, output
    conn = await db.connect(with_password(hub.dsn(hub.runtime), hub.passwords[hub.runtime]))
    try:
        refused = []
        for statement in FORBIDDEN:
            try:
                async with conn.transaction():
                    await conn.execute(statement)
            except asyncpg.InsufficientPrivilegeError:
                refused.append(statement)
        assert refused == FORBIDDEN
        # What it may do, for contrast: the same connection is not refused everything.
        assert await conn.fetchval("SELECT count(*) FROM detections") == 0
    finally:
        await conn.close()

    code, output = await run_cli("migrate", env=hub.env(hub.runtime), cwd=tmp_path)
    assert code == 0, output  # nothing pending: nothing to refuse

    # Accounts are the owner's to manage; the runtime role only reads them.
    code, output = await run_cli("accounts", "add", "ops", env=hub.env(hub.runtime), cwd=tmp_path)
    assert code == 1
    assert "manage accounts with the owner role" in output
    code, output = await run_cli("accounts", "add", "ops", env=hub.env(hub.owner), cwd=tmp_path)
    assert code == 0, output
    code, output = await run_cli("accounts", "list", env=hub.env(hub.runtime), cwd=tmp_path)
    assert code == 0, output
    assert output.startswith("ops\t")

    code, output = await run_cli(
        "migrate", env=hub.env(hub.owner) | {"HUB_DATABASE_RUNTIME_ROLE": "nobody"}, cwd=tmp_path
    )
    assert code == 1
    assert "no role 'nobody'" in output


async def test_migrate_as_runtime_role_with_pending_migrations_says_what_to_do(
    secured_hub: Hub, tmp_path: Path
) -> None:
    hub = secured_hub
    code, output = await run_cli("migrate", env=hub.env(hub.runtime), cwd=tmp_path)
    assert code == 1
    assert "migration(s) pending and this role may not apply them" in output
    assert "with the owner role" in output
    assert hub.passwords[hub.runtime] not in output


async def test_wrong_password_plain_tcp_and_unknown_ca_are_refused(
    secured_hub: Hub, tmp_path: Path
) -> None:
    hub = secured_hub
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(with_password(hub.dsn(hub.owner), "wrong"))
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="TLS"):
        await asyncpg.connect(
            with_password(hub.dsn(hub.owner, sslmode="disable"), hub.passwords[hub.owner])
        )
    assert hub.tls.refused_plaintext == 1
    stranger = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncpg.connect(
            with_password(hub.dsn(hub.owner), hub.passwords[hub.owner]).replace(
                str(hub.tls.ca_file), str(stranger)
            )
        )
    # The password from the file, the DSN without one: accepted.
    settings = Settings.from_env(hub.env(hub.owner))
    assert settings.database_url is not None
    sessions = hub.tls.tls_sessions
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert await conn.fetchval("SELECT current_user") == hub.owner
    finally:
        await conn.close()
    assert hub.tls.tls_sessions == sessions + 1


@pytest.mark.parametrize("where", ["file", "dsn"])
async def test_worker_waits_out_a_refused_password_and_never_prints_it(
    secured_hub: Hub, tmp_path: Path, nats_url: str, where: str
) -> None:
    """A wrong password (say, mid-rotation) is waited out like an outage, and printed
    nowhere: not in the logs, not in `/readyz`; whether it came from a file or in the DSN."""
    hub = secured_hub
    wrong = f"wrong-{uuid4().hex}"
    secret_file = tmp_path / "wrong.password"
    secret_file.write_text(wrong)
    port = free_port()
    env = {
        "HUB_NATS_URL": nats_url,
        "HUB_HTTP_ADDR": f"127.0.0.1:{port}",
    } | (
        {"HUB_DATABASE_URL": hub.dsn(hub.owner), "HUB_DATABASE_PASSWORD_FILE": str(secret_file)}
        if where == "file"
        else {"HUB_DATABASE_URL": with_password(hub.dsn(hub.owner), wrong)}
    )
    process = await start_hub_worker("run", env=env, cwd=tmp_path)
    await asyncio.sleep(4)
    assert process.returncode is None, "the worker gave up instead of waiting"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    readiness = (await reader.read()).decode()
    writer.close()
    process.terminate()
    output, _ = await asyncio.wait_for(process.communicate(), timeout=20)
    text = output.decode()
    assert process.returncode == 0, text
    assert " 503 " in readiness.split("\r\n", 1)[0]
    assert '"event": "database.unreachable"' in text
    assert "password authentication failed" in text
    assert wrong not in text + readiness


async def test_compose_init_script_and_psql_grants_work_as_documented(
    secured_hub: Hub, tmp_path: Path
) -> None:
    """deploy/postgres-init creates a login role; `psql -v runtime_role=… -f sql/grants.sql`
    grants it the runtime rights, as sql/grants.sql and deploy/README.md say."""
    hub = secured_hub
    code, output = await run_cli("migrate", env=hub.env(hub.owner), cwd=tmp_path)
    assert code == 0, output
    role, password = f"hub_compose_{uuid4().hex[:8]}", f"pw-{uuid4().hex}"
    psql_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {
        "PATH": f"{postgres_bin_dir()}{os.pathsep}{os.environ['PATH']}",
        "PGHOST": "127.0.0.1",
        "PGPORT": str(hub.server.port),
        "POSTGRES_USER": "postgres",
        "POSTGRES_DB": hub.database,
        "RUNTIME_DB_USER": role,
        "RUNTIME_DB_PASSWORD": password,
    }
    try:
        for command in (
            ["sh", str(ROOT / "deploy" / "postgres-init" / "10-runtime-role.sh")],
            # As the owner would run it by hand (here the superuser, trusted on loopback).
            [
                *("psql", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-d", hub.database),
                *("-v", f"runtime_role={role}", "-f", str(ROOT / "sql" / "grants.sql")),
            ],
        ):
            done = await asyncio.create_subprocess_exec(
                *command,
                env=psql_env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await done.communicate()
            assert done.returncode == 0, out.decode()
            assert password not in out.decode()
        conn = await db.connect(with_password(hub.dsn(role), password))
        try:
            assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("DELETE FROM sessions")
        finally:
            await conn.close()
    finally:
        admin = await asyncpg.connect(hub.admin_dsn())
        try:
            await admin.execute(f"DROP OWNED BY {role}")
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
        finally:
            await admin.close()
