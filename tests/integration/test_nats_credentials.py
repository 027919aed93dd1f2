"""NATS credentials from the environment, each way against a nats-server that demands it.

For every way to authenticate, a nats-server of its own runs with a config
file that requires it, and the worker is configured only through the HUB_*
variables `Settings.from_env` reads. The worker must get in and carry a
`spawned` event to its rows and its outbound event; the server must refuse
the same connection with wrong or missing credentials, so that a pass cannot
come from a server that lets anyone in; and no secret may reach the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from uuid import uuid4

import nats
import nats.errors
import nats.js.errors
import nkeys  # type: ignore[import-untyped]
import pytest
import trustme
from nats.aio.client import Client as NATS
from structlog.testing import capture_logs
from structlog.typing import EventDict

from tests.support import Hub, wait_until
from tests.support.nats_jwt import Keys, Operator, creds, user_jwt
from worker import db
from worker.app import Worker
from worker.config import Settings
from worker.connection import ConnectionUnusable
from worker.embedded import EmbeddedNats

pytestmark = pytest.mark.integration

# The worker's own user in the password method may subscribe only under this
# inbox prefix: the run proves every reply the worker waits for comes there.
WORKER_INBOX = "_INBOX_hub-worker"
AUTHORIZATION_VIOLATION = "Authorization Violation"


class Attempt(NamedTuple):
    """A connection the server must refuse: `nats.connect` options and the error it gives."""

    options: dict[str, Any]
    error: str


@dataclass(frozen=True)
class Method:
    """One way to authenticate, set up on both sides.

    config: the nats-server config file.
    env: the HUB_NATS_* variables that let the worker in.
    spoke: `nats.connect` options of the test's own connection, a separate user where
        the method has users, so the worker's credentials are not tried by the test.
    refused: connections the server must refuse, by what is wrong with them.
    wrong_env: HUB_NATS_* variables with credentials that do not let the worker in,
        and `wrong_error`, the error it then meets.
    wrong_stops: whether that stops the worker (a server certificate it cannot
        verify: waiting mends nothing, and nats-py's connect would hang) instead of
        being waited out (a refused password may be a rotation in progress).
    secrets: strings that must never be logged (the wrong credentials too).
    """

    config: str
    env: dict[str, str]
    spoke: dict[str, Any]
    refused: dict[str, Attempt]
    wrong_env: dict[str, str]
    wrong_error: str
    secrets: tuple[str, ...] = field(repr=False)
    wrong_stops: bool = False


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return str(path)


def _quoted(value: str) -> str:
    """A quoted nats-server config string (it reads JSON's escapes)."""
    return json.dumps(value)


def _password(tmp: Path, prefix: str) -> Method:
    password, spoke_password, wrong = (secrets.token_urlsafe(18) for _ in range(3))
    worker_permissions = (
        f'{{ publish: ">", subscribe: [{_quoted(prefix + ".>")}, "{WORKER_INBOX}.>"] }}'
    )
    config = f"""
authorization {{
  users = [
    {{ user: "hub-worker", password: {_quoted(password)}, permissions: {worker_permissions} }}
    {{ user: "spoke", password: {_quoted(spoke_password)} }}
  ]
}}
"""
    return Method(
        config=config,
        env={
            "HUB_NATS_USER": "hub-worker",
            # Ends with a newline as editors and `echo` write it; the worker strips it
            # (the server would refuse the password with it).
            "HUB_NATS_PASSWORD_FILE": _write(tmp / "password", f"{password}\n"),
            "HUB_NATS_INBOX_PREFIX": WORKER_INBOX,
        },
        spoke={"user": "spoke", "password": spoke_password},
        refused={
            "wrong password": Attempt(
                {"user": "hub-worker", "password": wrong}, AUTHORIZATION_VIOLATION
            ),
            "password with its newline": Attempt(
                {"user": "hub-worker", "password": f"{password}\n"}, AUTHORIZATION_VIOLATION
            ),
            "no credentials": Attempt({}, AUTHORIZATION_VIOLATION),
        },
        wrong_env={
            "HUB_NATS_USER": "hub-worker",
            "HUB_NATS_PASSWORD_FILE": _write(tmp / "wrong-password", f"{wrong}\n"),
        },
        wrong_error=AUTHORIZATION_VIOLATION,
        secrets=(password, spoke_password, wrong),
    )


def _token(tmp: Path, prefix: str) -> Method:
    token, wrong = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    return Method(
        config=f"authorization {{ token: {_quoted(token)} }}\n",
        env={"HUB_NATS_TOKEN_FILE": _write(tmp / "token", f"{token}\n")},
        spoke={"token": token},
        refused={
            "wrong token": Attempt({"token": wrong}, AUTHORIZATION_VIOLATION),
            "no credentials": Attempt({}, AUTHORIZATION_VIOLATION),
        },
        wrong_env={"HUB_NATS_TOKEN_FILE": _write(tmp / "wrong-token", f"{wrong}\n")},
        wrong_error=AUTHORIZATION_VIOLATION,
        secrets=(token, wrong),
    )


def _nkey(tmp: Path, prefix: str) -> Method:
    worker, spoke, stranger = (Keys.new(nkeys.PREFIX_BYTE_USER) for _ in range(3))
    config = f"""
authorization {{
  users = [
    {{ nkey: {worker.public} }}
    {{ nkey: {spoke.public} }}
  ]
}}
"""
    stranger_seed = _write(tmp / "stranger.nk", f"{stranger.seed}\n")
    return Method(
        config=config,
        env={"HUB_NATS_NKEY_SEED_FILE": _write(tmp / "worker.nk", f"{worker.seed}\n")},
        spoke={"nkeys_seed": _write(tmp / "spoke.nk", f"{spoke.seed}\n")},
        refused={
            "a seed the server does not know": Attempt(
                {"nkeys_seed": stranger_seed}, AUTHORIZATION_VIOLATION
            ),
            "no credentials": Attempt({}, AUTHORIZATION_VIOLATION),
        },
        wrong_env={"HUB_NATS_NKEY_SEED_FILE": stranger_seed},
        wrong_error=AUTHORIZATION_VIOLATION,
        secrets=(worker.seed, spoke.seed, stranger.seed),
    )


def _creds(tmp: Path, prefix: str) -> Method:
    operator = Operator.new()
    worker, spoke, stranger = (Keys.new(nkeys.PREFIX_BYTE_USER) for _ in range(3))
    worker_jwt = user_jwt(operator.app, worker, "hub-worker")
    # Signed by an account key the server was never told about.
    unknown_account = Keys.new(nkeys.PREFIX_BYTE_ACCOUNT)
    return Method(
        config=operator.server_config(),
        env={"HUB_NATS_CREDS_FILE": _write(tmp / "worker.creds", creds(worker_jwt, worker.seed))},
        spoke={
            "user_credentials": _write(
                tmp / "spoke.creds", creds(user_jwt(operator.app, spoke, "spoke"), spoke.seed)
            )
        },
        refused={
            "the worker's JWT without the worker's seed": Attempt(
                {
                    "user_credentials": _write(
                        tmp / "stolen-jwt.creds", creds(worker_jwt, stranger.seed)
                    )
                },
                AUTHORIZATION_VIOLATION,
            ),
            "a user of an unknown account": Attempt(
                {
                    "user_credentials": _write(
                        tmp / "unknown-account.creds",
                        creds(user_jwt(unknown_account, stranger, "stranger"), stranger.seed),
                    )
                },
                AUTHORIZATION_VIOLATION,
            ),
            "no credentials": Attempt({}, AUTHORIZATION_VIOLATION),
        },
        wrong_env={
            "HUB_NATS_CREDS_FILE": _write(tmp / "wrong.creds", creds(worker_jwt, stranger.seed))
        },
        wrong_error=AUTHORIZATION_VIOLATION,
        secrets=(worker.seed, spoke.seed, stranger.seed),
    )


def _tls(tmp: Path, prefix: str) -> Method:
    """Mutual TLS: the server requires a client certificate from its CA, and nothing else."""
    authority, stranger_authority = trustme.CA(), trustme.CA()
    server = authority.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(tmp / "server.pem")
    server.private_key_pem.write_to_path(tmp / "server.key")
    authority.cert_pem.write_to_path(tmp / "ca.pem")
    stranger_authority.cert_pem.write_to_path(tmp / "stranger-ca.pem")
    config = f"""
tls {{
  cert_file: {_quoted(str(tmp / "server.pem"))}
  key_file: {_quoted(str(tmp / "server.key"))}
  ca_file: {_quoted(str(tmp / "ca.pem"))}
  verify: true
}}
"""
    worker = authority.issue_cert("hub-worker")
    worker.cert_chain_pems[0].write_to_path(tmp / "worker.pem")
    worker.private_key_pem.write_to_path(tmp / "worker.key")

    def context(client: trustme.LeafCert | None, refused: bool = False) -> ssl.SSLContext:
        made = ssl.create_default_context()
        authority.configure_trust(made)
        if client is not None:
            client.configure_cert(made)
        if refused:
            # In TLS 1.3 the client finishes its handshake before the server has
            # judged its certificate, and the refusal then arrives as an alert
            # or a reset, by timing; in TLS 1.2 it arrives in the handshake.
            made.maximum_version = ssl.TLSVersion.TLSv1_2
        return made

    client_files = {
        "HUB_NATS_TLS_CERT_FILE": str(tmp / "worker.pem"),
        "HUB_NATS_TLS_KEY_FILE": str(tmp / "worker.key"),
    }
    return Method(
        config=config,
        env={"HUB_NATS_TLS_CA_FILE": str(tmp / "ca.pem"), **client_files},
        spoke={"tls": context(authority.issue_cert("spoke"))},
        refused={
            "no client certificate": Attempt(
                {"tls": context(None, refused=True)}, "HANDSHAKE_FAILURE"
            ),
            "a client certificate of another CA": Attempt(
                {"tls": context(stranger_authority.issue_cert("hub-worker"), refused=True)},
                "UNKNOWN_CA",
            ),
            # Without a context nats-py upgrades with the system's trust store,
            # which does not know the test CA: the CA file is what makes it work.
            "the system's trust store": Attempt({}, "CERTIFICATE_VERIFY_FAILED"),
        },
        # The worker must check the server: trusting another CA, it refuses it.
        wrong_env={"HUB_NATS_TLS_CA_FILE": str(tmp / "stranger-ca.pem"), **client_files},
        wrong_error="CERTIFICATE_VERIFY_FAILED",
        wrong_stops=True,
        secrets=tuple(
            line
            for line in worker.private_key_pem.bytes().decode().splitlines()
            if not line.startswith("-----")
        ),
    )


METHODS: dict[str, Callable[[Path, str], Method]] = {
    "password-file": _password,
    "token-file": _token,
    "nkey-seed-file": _nkey,
    "creds-file": _creds,
    "mutual-tls": _tls,
}


@dataclass(frozen=True)
class Setup:
    method: Method
    url: str
    prefix: str
    tmp: Path

    def environment(self, database_url: str, nats: dict[str, str]) -> dict[str, str]:
        """Everything the worker is told, as a deployment would set it: variables only."""
        return {
            "HUB_NATS_URL": self.url,
            "HUB_DATABASE_URL": database_url,
            "HUB_SUBJECT_PREFIX": self.prefix,
            "HUB_PARTITIONS": "2",
            "HUB_HTTP_ADDR": "",
            "HUB_LOG_FORMAT": "json",
            **nats,
        }


@pytest.fixture(params=list(METHODS))
def way(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    """A method's files and a nats-server started with its config file."""
    prefix = f"t{uuid4().hex[:10]}"
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    method = METHODS[request.param](secrets_dir, prefix)
    config = tmp_path / "nats-server.conf"
    config.write_text(method.config, encoding="utf-8")
    # EmbeddedNats adds --jetstream, --port and --store_dir on the command line.
    server = EmbeddedNats(tmp_path / "nats", extra_args=["-c", str(config)])
    url = server.start()
    try:
        yield Setup(method, url, prefix, tmp_path)
    finally:
        server.stop()


async def _quiet(err: Exception) -> None:
    """Without a callback nats-py logs every error; the tests check what they expect."""


@asynccontextmanager
async def _hub(way: Setup, settings: Settings) -> AsyncIterator[Hub]:
    """A Hub on the test's server whose own connection is the method's spoke."""
    assert settings.nats_urls is not None
    assert settings.database_url is not None
    nc = await nats.connect(way.url, error_cb=_quiet, **way.method.spoke)
    conn = await db.connect(settings.database_url, application_name="tests")
    hub = Hub(
        settings,
        settings.database_url,
        ",".join(settings.nats_urls),
        nc,
        nc.jetstream(),
        conn,
        way.tmp,
    )
    try:
        yield hub
    finally:
        await hub.stop_workers()
        await hub.db.close()
        await nc.close()


def _assert_no_secret(method: Method, logged: list[EventDict], output: str) -> None:
    text = repr(logged) + output
    # Not `secret not in text`: pytest would print the secret with the failure.
    assert not any(secret in text for secret in method.secrets), "a secret reached the logs"


def _complaints(logged: list[EventDict]) -> list[EventDict]:
    return [entry for entry in logged if entry["log_level"] not in ("debug", "info")]


async def test_the_worker_gets_in_with_credentials_from_the_environment(
    way: Setup, database_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = Settings.from_env(way.environment(database_url, way.method.env))
    with capture_logs() as logged:
        async with _hub(way, settings) as hub:
            try:
                await hub.start_worker()
            except AssertionError as timeout:
                raise AssertionError(f"not let in: {_complaints(logged)[:3]}") from timeout
            sent = await hub.send("sp1", "s1", "spawned", workspaceId="ws-1", task="t")
            await hub.settle()

            mapping = await hub.rows("SELECT session_id, spoke_id, status FROM mappings")
            assert mapping == [{"session_id": "s1", "spoke_id": "sp1", "status": "active"}]
            assert await hub.value("SELECT status FROM sessions WHERE id = 's1'") == "active"
            # The relay published too, on the same authenticated connection.
            events = await hub.outbound(f"{hub.prefix}.mapping.>")
            assert [e.body["causationId"] for e in events] == [sent["eventId"]]
            # Stopping logs a disconnection; before it, nothing may have gone wrong.
            assert _complaints(logged) == []
    assert any(entry["event"] == "stream.created" for entry in logged), "logs not captured"
    _assert_no_secret(way.method, logged, "".join(capfd.readouterr()))


async def _refusal(url: str, options: dict[str, Any]) -> str:
    """Why the server will not let a connection with `options` in; fails if it does."""
    nc = NATS()
    try:
        with pytest.raises((nats.errors.Error, ssl.SSLError)) as refused:
            await nc.connect(
                url, allow_reconnect=False, connect_timeout=2, error_cb=_quiet, **options
            )
    finally:
        # A refused connect leaves its socket open: closing the client closes it.
        # After a failed TLS handshake nats-py then waits for asyncio's close
        # forever (Python 3.11), though the socket is already closed.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(nc.close(), timeout=0.2)
    return str(refused.value)


async def test_the_server_refuses_wrong_or_missing_credentials(way: Setup) -> None:
    for what, attempt in way.method.refused.items():
        assert attempt.error in await _refusal(way.url, attempt.options), what


async def _run_refused_worker(
    way: Setup, settings: Settings, logged: list[EventDict]
) -> tuple[asyncio.Task[None], asyncio.Event]:
    """A worker started with `settings`, once it has logged the method's refusal."""
    assert settings.nats_urls is not None
    assert settings.database_url is not None
    worker = Worker(settings, settings.database_url, list(settings.nats_urls))
    stopping = asyncio.Event()
    running = asyncio.create_task(worker.run(stopping))

    async def refused() -> bool:
        return any(way.method.wrong_error in str(entry.get("error")) for entry in logged)

    await wait_until(refused, within=10, what=way.method.wrong_error)
    return running, stopping


async def test_with_wrong_credentials_the_worker_waits_or_stops_says_why_and_leaks_nothing(
    way: Setup, database_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = Settings.from_env(way.environment(database_url, way.method.wrong_env))
    with capture_logs() as logged:
        running, stopping = await _run_refused_worker(way, settings, logged)
        if way.method.wrong_stops:
            with pytest.raises(ConnectionUnusable, match=way.method.wrong_error):
                await asyncio.wait_for(running, timeout=10)
        else:
            await asyncio.sleep(0.5)
            assert not running.done(), "the worker gave up instead of waiting"
            stopping.set()
            await asyncio.wait_for(running, timeout=10)
            assert logged[-1]["event"] == "worker.stopped"
    _assert_no_secret(way.method, logged, "".join(capfd.readouterr()))
    spoke = await nats.connect(way.url, error_cb=_quiet, **way.method.spoke)
    try:
        with pytest.raises(nats.js.errors.NotFoundError):
            await spoke.jetstream().stream_info(settings.events_stream)
    finally:
        await spoke.close()


@pytest.mark.parametrize("way", ["creds-file"], indirect=True)
async def test_a_creds_file_fixed_while_the_worker_waits_lets_it_in(
    way: Setup, database_url: str
) -> None:
    """nats-py reads the .creds file at every connection attempt: a rotated or
    corrected file is picked up without a restart."""
    settings = Settings.from_env(way.environment(database_url, way.method.wrong_env))
    assert settings.nats_auth.creds_file is not None
    with capture_logs() as logged:
        async with _hub(way, settings) as hub:
            running, stopping = await _run_refused_worker(way, settings, logged)
            hub.workers.append((running, stopping))
            # Swapped in whole, as a secret volume or `mv` does.
            os.replace(way.method.env["HUB_NATS_CREDS_FILE"], settings.nats_auth.creds_file)
            await hub.wait_ready()
            await hub.send("sp1", "s1", "spawned")
            await hub.settle()
            assert await hub.value("SELECT status FROM sessions WHERE id = 's1'") == "active"


@pytest.mark.parametrize("way", ["password-file"], indirect=True)
async def test_the_inbox_prefix_is_what_lets_a_restricted_user_use_jetstream(
    way: Setup,
) -> None:
    """The worker's user may subscribe only under its own inbox prefix: with the default
    `_INBOX` prefix JetStream's replies are out of reach, with HUB_NATS_INBOX_PREFIX's they are."""
    password_file = Path(way.method.env["HUB_NATS_PASSWORD_FILE"])
    password = (await asyncio.to_thread(password_file.read_text)).rstrip("\n")
    for prefix, works in (("_INBOX", False), (WORKER_INBOX, True)):
        nc = await nats.connect(
            way.url, user="hub-worker", password=password, inbox_prefix=prefix, error_cb=_quiet
        )
        try:
            if works:
                await nc.jetstream().account_info()
            else:
                with pytest.raises(nats.errors.Error):
                    await nc.jetstream(timeout=1).account_info()
        finally:
            await nc.close()
